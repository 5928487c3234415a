"""Projectors from the vision tower's width to the language model's: mlp2x_gelu (LLaVA-1.5)."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from mmfm.config.schema import ModelConfig
from mmfm.models.projector.model import MLPProjector
from mmfm.models.spec import EncoderPartSpec, register_part


def num_params(cfg: ModelConfig) -> int:
    dv, d = cfg.vision.hidden_size, cfg.language.hidden_size
    return dv * d + d + d * d + d


def flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs for one image's patches (as many as the tower's output tokens)."""
    v = cfg.vision
    patches = (v.image_size // v.patch_size) ** 2
    return 6.0 * patches * (v.hidden_size * cfg.language.hidden_size + cfg.language.hidden_size ** 2)


def apply_tensor_parallel(projector: nn.Module, tp_mesh) -> None:
    """A Megatron MLP: columns, then rows with one all-reduce of its output."""
    parallelize_module(projector, tp_mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel(output_layouts=Replicate())})


def tp_comm_bytes(cfg: ModelConfig, batch: int, seq_len: int, images: int, act_bytes: int) -> dict[str, int]:
    """All-reduce of fc2's output [N, P, D] forward and of fc1's input gradient [N, P, Dv] backward."""
    v = cfg.vision
    positions = max(images, 1) * (v.image_size // v.patch_size) ** 2
    return {"all_reduce": positions * (cfg.language.hidden_size + v.hidden_size) * act_bytes}


SPEC = register_part("projector", EncoderPartSpec(
    kind="mlp2x_gelu", build=lambda cfg: MLPProjector(cfg.vision.hidden_size, cfg.language.hidden_size),
    num_params=num_params, apply_tensor_parallel=apply_tensor_parallel, tp_divisible=lambda cfg: {},
    validate=lambda cfg: None, flops_per_image=flops_per_image, tp_comm_bytes=tp_comm_bytes))

__all__ = ["MLPProjector", "SPEC"]
