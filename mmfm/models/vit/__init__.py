"""The vit family: the ViT image encoder of the small models (patchify or convolutional stem)."""

from __future__ import annotations

from mmfm.config.checks import positive, require
from mmfm.config.schema import ModelConfig
from mmfm.models.spec import EncoderPartSpec, register_part
from mmfm.models.vit import counts, parallelize
from mmfm.models.vit.model import VisionTransformer, mlp_width

MLP_WIDTH = "the vision MLP's width (model.vision.intermediate_size, or hidden_size * mlp_ratio)"


def validate(cfg: ModelConfig) -> None:
    v = cfg.vision
    for key in ("hidden_size", "num_layers", "num_heads", "patch_size"):
        positive(f"model.vision.{key}", getattr(v, key))
    require(v.image_size % v.patch_size == 0,
            f"model.vision.image_size={v.image_size} is not divisible by model.vision.patch_size="
            f"{v.patch_size}; pick a patch size that divides the image size")
    require(v.stem in ("patch", "conv"), f"model.vision.stem={v.stem!r} is unknown; use 'patch' or 'conv'")
    require(v.stem != "conv" or v.patch_size & (v.patch_size - 1) == 0,
            f"model.vision.stem=conv needs a power-of-two model.vision.patch_size, not {v.patch_size}; "
            "use stem=patch or patch_size 2, 4, 8, 16")
    require(v.position_init in ("normal", "sincos"),
            f"model.vision.position_init={v.position_init!r} is unknown; use 'normal' or 'sincos'")
    require(v.position_init != "sincos" or v.hidden_size % 4 == 0,
            f"model.vision.position_init=sincos needs model.vision.hidden_size divisible by 4 (a sine and a cosine "
            f"per axis), not {v.hidden_size}; change hidden_size or use position_init=normal")
    require(v.intermediate_size >= 0, f"model.vision.intermediate_size={v.intermediate_size} must be >= 0 "
            "(0: hidden_size * mlp_ratio)")
    require(v.act in ("", "gelu"), f"model.vision.act={v.act!r} is not supported by model.vision.kind=vit "
            "(its MLP uses gelu); leave act empty or use kind=siglip / clip")
    require(v.feature_layer == -1, f"model.vision.feature_layer={v.feature_layer} is not supported by "
            "model.vision.kind=vit (it returns its last layer, normed); use -1 or kind=siglip / clip")
    require(v.hidden_size % v.num_heads == 0,
            f"model.vision.hidden_size={v.hidden_size} is not divisible by model.vision.num_heads="
            f"{v.num_heads}; change one so that hidden_size % num_heads == 0")


def tp_divisible(cfg: ModelConfig) -> dict[str, int]:
    v = cfg.vision
    return {"model.vision.num_heads": v.num_heads, "model.vision.hidden_size": v.hidden_size,
            MLP_WIDTH: mlp_width(v),
            # sequence parallelism splits the patches
            "the vision tower's patches ((image_size / patch_size)^2)": (v.image_size // v.patch_size) ** 2}


def tp_comm_bytes(cfg: ModelConfig, batch: int, seq_len: int, images: int, act_bytes: int) -> dict[str, int]:
    """Per block, as the decoder's (mmfm.models.llama.tp_comm_bytes) on a = [N, P, Dv] (N images of P patches):
    all-gather 4a, reduce-scatter 4a; plus the first block's backward all-gather and the final norm's gather
    (Shard(1) -> Replicate) forward."""
    v = cfg.vision
    a = max(images, 1) * (v.image_size // v.patch_size) ** 2 * v.hidden_size * act_bytes
    return {"all_gather": (4 * v.num_layers + 2) * a, "reduce_scatter": 4 * v.num_layers * a}


SPEC = register_part("vision", EncoderPartSpec(
    kind="vit", build=lambda cfg: VisionTransformer(cfg.vision), num_params=counts.num_params,
    apply_tensor_parallel=parallelize.apply_tensor_parallel, tp_divisible=tp_divisible, validate=validate,
    block_container="blocks", flops_per_image=counts.flops_per_image, tp_comm_bytes=tp_comm_bytes))

__all__ = ["SPEC", "VisionTransformer"]
