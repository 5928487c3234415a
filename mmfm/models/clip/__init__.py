"""The clip family: the vision towers of CLIP (model.vision.kind=clip) and SigLIP / SigLIP2 (kind=siglip),
returning the features of model.vision.feature_layer as LLaVA takes them (see model.py)."""

from __future__ import annotations

from mmfm.config.checks import positive, require
from mmfm.config.schema import ModelConfig
from mmfm.models.clip import counts, parallelize
from mmfm.models.clip.model import ACTIVATIONS, LAYOUTS, ClipVisionTower
from mmfm.models.clip.state_dict_adapter import ADAPTERS
from mmfm.models.spec import EncoderPartSpec, register_part
from mmfm.models.vit import MLP_WIDTH
from mmfm.models.vit.model import mlp_width


def validate(cfg: ModelConfig) -> None:
    v = cfg.vision
    for key in ("image_size", "hidden_size", "num_layers", "num_heads", "patch_size"):
        positive(f"model.vision.{key}", getattr(v, key))
    # As transformers' patch convolution (stride = kernel, no padding), the last image_size % patch_size rows and
    # columns fall outside every patch: SigLIP-so400m at 384 px sees 27 x 27 patches of 14 px, 378 px.
    require(v.image_size >= v.patch_size,
            f"model.vision.image_size={v.image_size} is smaller than model.vision.patch_size={v.patch_size}: "
            "no patch fits; raise image_size or lower patch_size")
    require(v.stem == "patch", f"model.vision.stem={v.stem!r} is only for kind=vit; kind={v.kind} patchifies: "
            "set model.vision.stem=patch")
    require(v.position_init == "normal", f"model.vision.position_init={v.position_init!r} is only for kind=vit; "
            f"kind={v.kind} loads its position embeddings from its checkpoint: set model.vision.position_init=normal")
    require(v.hidden_size % v.num_heads == 0,
            f"model.vision.hidden_size={v.hidden_size} is not divisible by model.vision.num_heads="
            f"{v.num_heads}; change one so that hidden_size % num_heads == 0")
    require(v.intermediate_size >= 0, f"model.vision.intermediate_size={v.intermediate_size} must be >= 0 "
            "(0: hidden_size * mlp_ratio)")
    require(mlp_width(v) > 0, f"model.vision.mlp_ratio={v.mlp_ratio} gives an empty MLP; set "
            "model.vision.intermediate_size")
    require(v.act in ("", *ACTIVATIONS), f"model.vision.act={v.act!r} is unknown; use one of {sorted(ACTIVATIONS)} "
            f"or leave it empty (kind={v.kind}: {LAYOUTS[v.kind].act})")
    n = v.num_layers
    require(v.feature_layer != 0 and -n <= v.feature_layer <= n,
            f"model.vision.feature_layer={v.feature_layer} selects no layer's output of model.vision.num_layers={n}; "
            f"use 1..{n} or -1..-{n} (LLaVA: -2, the second to last)")


def tp_divisible(cfg: ModelConfig) -> dict[str, int]:
    # The sequence is split only when tp divides it (parallelize.sequence_parallel), so it is not listed.
    v = cfg.vision
    return {"model.vision.num_heads": v.num_heads, "model.vision.hidden_size": v.hidden_size,
            MLP_WIDTH: mlp_width(v)}


def _spec(kind: str) -> EncoderPartSpec:
    return register_part("vision", EncoderPartSpec(
        kind=kind, build=lambda cfg: ClipVisionTower(cfg.vision), num_params=counts.num_params,
        apply_tensor_parallel=parallelize.apply_tensor_parallel, tp_divisible=tp_divisible, validate=validate,
        block_container="blocks", hf=ADAPTERS[kind], flops_per_image=counts.flops_per_image))


CLIP_SPEC, SIGLIP_SPEC = _spec("clip"), _spec("siglip")

__all__ = ["CLIP_SPEC", "ClipVisionTower", "SIGLIP_SPEC"]
