"""Put the kernels into a plain model from outside, as configured by `kernels.<op>`.

`resolve_kernels` turns the config into one choice per op for this device, layout and objective (raising
ValueError, with the fix, on a choice that cannot run); `apply_kernels` then swaps the class of each module
that gets a kernel for a subclass whose forward calls it. Parameters, their names and checkpoints are
unchanged, and an op left on `torch` keeps the model's own code. Run it on the meta model, before tensor
parallelism, FSDP and context parallelism (which replaces the decoder's attention core again).

The kernels replace the op modules of mmfm.models.ops (and the causal CoreAttention) that every family builds
its blocks from, so no family's attribute names appear here:

    op                    modules                        kernel
    rms_norm              ops.RMSNorm                    mmfm.kernels.rms_norm (Triton)
    rotary                ops.Rotary                     mmfm.kernels.apply_rotary (Triton)
    swiglu                ops.SiluMul                    mmfm.kernels.swiglu (Triton)
    linear_cross_entropy  ops.LinearCrossEntropy         mmfm.kernels.fused_linear_cross_entropy
    attention             causal CoreAttention           mmfm.kernels.packed_attention
    experts               moe.GroupedExperts             torch._grouped_mm (mmfm.models.moe.grouped_mm_swiglu)
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from mmfm.kernels.attention import ATTENTION_BACKENDS, available_backends, packed_attention
from mmfm.kernels.dispatch import BACKENDS, choose
from mmfm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from mmfm.kernels.rms_norm import rms_norm
from mmfm.kernels.rotary import apply_rotary
from mmfm.kernels.swiglu import swiglu
from mmfm.models.attention import CoreAttention
from mmfm.models.moe import GroupedExperts, grouped_mm_swiglu
from mmfm.models.ops import LinearCrossEntropy, RMSNorm, Rotary, SiluMul

log = logging.getLogger(__name__)

ELEMENTWISE_OPS = ("rms_norm", "rotary", "swiglu")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
LOSS_BACKENDS = BACKENDS + ("chunked",)


class TritonRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend="triton")


class TritonRotary(Rotary):
    def forward(self, q, k, cos, sin):
        """cos/sin [T, D/2] (positions 0..T-1) or [B, T, D/2] per position: the latter are read as one
        table with position ids 0..B*T-1."""
        b, _, t, _ = q.shape
        positions = None
        if cos.dim() == 3:
            positions = torch.arange(b * t, device=q.device).view(b, t)
            cos, sin = cos.reshape(b * t, -1), sin.reshape(b * t, -1)
        return apply_rotary(q, k, cos, sin, positions, backend="triton")


class GroupedMMExperts(GroupedExperts):
    def product(self, x, counts, w1, w3, w2):
        return grouped_mm_swiglu(x, counts, w1, w3, w2, self.act)


def grouped_mm_runs(device: torch.device) -> bool:
    """Whether torch._grouped_mm computes here: on CPU, and on CUDA devices of compute capability 9.0+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0))


def _experts_choice(value: str, device: torch.device) -> str:
    _check("experts", value, EXPERT_BACKENDS)
    runs = grouped_mm_runs(device)
    if value == "grouped_mm" and not runs:
        raise ValueError(f"kernels.experts=grouped_mm cannot run on {device.type} with this torch (it needs "
                         "torch._grouped_mm: CPU, or CUDA compute capability 9.0+); use kernels.experts=auto or loop")
    if value == "auto":
        return "grouped_mm" if runs else "loop"
    return value


class TritonSiluMul(SiluMul):
    def forward(self, gate, up):
        return swiglu(gate, up, backend="triton")


class FusedLinearCrossEntropy(LinearCrossEntropy):
    """The summed loss in token chunks, never materializing the logits; backend: triton or torch."""

    backend = "triton"

    def forward(self, hidden, weight, targets):
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the GEMMs in the autocast dtype, as F.linear would run them
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):
            return fused_linear_cross_entropy(hidden, weight, targets, self.ignore_index, reduction="sum",
                                              backend=self.backend)


class PackedCoreAttention(CoreAttention):
    """Causal attention within packed documents on the configured backend (flash, flex, sdpa, auto)."""

    backend = "auto"

    def forward(self, q, k, v, attn_mask=None, document_ids=None):
        if document_ids is None or attn_mask is not None or q.shape[2] != k.shape[2]:
            return super().forward(q, k, v, attn_mask, document_ids)
        return packed_attention(q, k, v, document_ids, backend=self.backend)


def _check(op: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"kernels.{op}={value!r} is unknown; use one of {allowed}")


def _layout_allows(op: str, value: str, reason: Optional[str]) -> bool:
    """False (and the reference is used) when the layout rules the kernel out; an explicit request then fails."""
    if reason is None:
        return True
    if value != "auto":
        raise ValueError(f"kernels.{op}={value} cannot run {reason}; use kernels.{op}=auto or torch")
    return False


TOKEN_LOSS_OBJECTIVES = ("pretrain", "sft", "vla")  # a plain next-token loss: the fused kernel can take it


def loss_objective(stage) -> str:
    """The stage's objective as the fused loss kernel sees it: vla with soft bin targets needs the logits, and vla
    with a flow head has no token loss."""
    if stage.objective == "vla" and stage.vla.action == "flow":
        return "vla with a flow action head"
    return "vla with label_sigma > 0" if stage.objective == "vla" and stage.vla.label_sigma > 0 else stage.objective


def resolve_kernels(kernels, device: torch.device, tp: int = 1, pp: int = 1, cp: int = 1,
                    objective: str = "pretrain", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """One choice per op: 'triton' or 'torch' for the element-wise ops, 'triton' / 'chunked' / 'torch' for
    linear_cross_entropy, an attention backend for attention. Raises ValueError naming the fix."""
    device = torch.device(device)
    choices = {}
    for op in ELEMENTWISE_OPS:
        value = getattr(kernels, op)
        _check(op, value, BACKENDS)
        reason = None
        if op == "rms_norm" and tp > 1:
            reason = "under tensor parallelism (sequence-parallel norms run on DTensors)"
        choices[op] = choose(op, value, device) if _layout_allows(op, value, reason) else "torch"

    value = kernels.linear_cross_entropy
    _check("linear_cross_entropy", value, LOSS_BACKENDS)
    reason = None
    if tp > 1 or pp > 1:
        reason = "under tensor or pipeline parallelism (the loss is taken from vocabulary-sharded or staged logits)"
    elif objective not in TOKEN_LOSS_OBJECTIVES:
        reason = f"for stage objective {objective!r} (it needs the logits)"
    if not _layout_allows("linear_cross_entropy", value, reason):
        choices["linear_cross_entropy"] = "torch"
    elif value == "chunked":
        choices["linear_cross_entropy"] = "chunked"
    else:
        choices["linear_cross_entropy"] = choose("linear_cross_entropy", value, device)

    value = kernels.attention
    _check("attention", value, ATTENTION_BACKENDS)
    usable = available_backends(device, dtype, training=True)
    if value not in ("auto", "sdpa") and value not in usable:
        raise ValueError(f"kernels.attention={value} cannot train on {device.type} in {dtype}; usable here: {usable}")
    if cp > 1:  # context parallelism brings its own attention core
        _layout_allows("attention", value if value != "sdpa" else "auto", "under context parallelism")
    choices["attention"] = "sdpa" if cp > 1 or (value == "auto" and device.type != "cuda") else value
    choices["experts"] = _experts_choice(kernels.experts, device)
    return choices


def _swap(model: nn.Module, cls: type, new_cls: type, where=lambda name, module: True, **attrs) -> int:
    count = 0
    for name, module in model.named_modules():
        if type(module) is cls and where(name, module):
            module.__class__ = new_cls
            for key, value in attrs.items():
                setattr(module, key, value)
            count += 1
    return count


def apply_kernels(model: nn.Module, choices: dict[str, str]) -> dict[str, int]:
    """Swap in the chosen kernels; return how many modules each op replaced."""
    swapped = {}
    if choices["rms_norm"] == "triton":
        swapped["rms_norm"] = _swap(model, RMSNorm, TritonRMSNorm)
    if choices["rotary"] == "triton":
        swapped["rotary"] = _swap(model, Rotary, TritonRotary)
    if choices["swiglu"] == "triton":
        swapped["swiglu"] = _swap(model, SiluMul, TritonSiluMul)
    if choices["linear_cross_entropy"] != "torch":
        backend = "torch" if choices["linear_cross_entropy"] == "chunked" else "triton"
        swapped["linear_cross_entropy"] = _swap(model, LinearCrossEntropy, FusedLinearCrossEntropy, backend=backend)
    if choices["attention"] != "sdpa":
        swapped["attention"] = _swap(model, CoreAttention, PackedCoreAttention,
                                     where=lambda name, m: m.causal,  # a decoder's, not a vision tower's
                                     backend=choices["attention"])
    if choices.get("experts") == "grouped_mm":
        swapped["experts"] = _swap(model, GroupedExperts, GroupedMMExperts)
    log.info("kernels: %s; modules replaced: %s", choices, swapped or "none")
    return swapped

