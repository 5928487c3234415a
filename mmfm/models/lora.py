"""Low-rank adapters (LoRA, Hu et al. 2021), put into a plain model from outside. Plain PyTorch.

A targeted `nn.Linear` becomes a `LoRALinear` in place (its class is swapped, as mmfm.kernels.apply swaps op
modules), keeping its `weight` and `bias` and gaining two children:

    y = x W^T + b + dropout(x) A^T B^T * scale        A = lora_A.weight [rank, in], B = lora_B.weight [out, rank]
    scale = alpha / rank, or alpha / sqrt(rank) with rslora

The base parameter names are unchanged (`...attention.wq.weight`), so checkpoints of the base model, the
Hugging Face name maps and the families' tensor-parallel plans (which name the linear, not its parameters) keep
working; the adapters are its siblings `...wq.lora_A.weight` and `...wq.lora_B.weight`, the names PEFT gives
them. A is drawn as PEFT draws it (Kaiming-uniform, a=sqrt(5)), B is zero: a fresh adapter changes nothing.

Under tensor parallelism the adapters follow their base layer (`place_adapters`, called on the base's DTensor
placements): for a column-parallel base (weight Shard(0)) A is replicated and B split by output rows, so the
adapter's output is split like the base's; for a row-parallel base (weight Shard(1)) A is split by input
columns and B replicated, so the adapter's output is a partial sum that the base's own reduction adds up.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_KEYS = (".lora_A.weight", ".lora_B.weight")
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.lora.base_dtype


def is_adapter(name: str) -> bool:
    """Whether a parameter (or state-dict key) is a LoRA adapter's."""
    return name.endswith(ADAPTER_KEYS)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class WidenedLinear(torch.autograd.Function):
    """x W^T for a frozen weight stored narrower than x (a bf16 base under fp32 compute): widened per use, and only
    the narrow weight kept for the backward (F.linear would keep the widened copy of every layer until then)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter beside its (frozen) weight; made by `add_adapter`, never built."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    scaling: float
    adapter_enabled: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            out = WidenedLinear.apply(x, self.weight)  # a bf16 base (model.lora.base_dtype) under fp32 compute
            out = out if self.bias is None else out + self.bias
        else:
            out = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def add_adapter(linear: nn.Linear, rank: int, alpha: float, dropout: float, rslora: bool,
                base_dtype: torch.dtype | None = None) -> LoRALinear:
    """Turn `linear` into a LoRALinear in place (on its device, the meta device included); its weight and bias
    stop requiring gradients, and its weight is stored in base_dtype when given (the adapters keep the weight's
    original dtype). The adapters are left uninitialized: `init_adapter` fills them by name."""
    device, dtype = linear.weight.device, linear.weight.dtype
    linear.__class__ = LoRALinear
    linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
    linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
    linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    linear.scaling = lora_scale(alpha, rank, rslora)
    linear.adapter_enabled = True
    linear.weight.requires_grad_(False)
    if base_dtype is not None and base_dtype != dtype:
        linear.weight = nn.Parameter(linear.weight.to(base_dtype), requires_grad=False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    return linear


def matching_linears(model: nn.Module, patterns: list[str]) -> dict[str, nn.Linear]:
    """{module name: nn.Linear} of the linears whose name matches any fnmatch pattern (wrapper prefixes, e.g.
    activation checkpointing's, are not part of the names: apply LoRA before wrapping)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and not name.endswith((".lora_A", ".lora_B"))
            and any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def unmatched_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    """The patterns that match no nn.Linear of the model."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in linears)]


def apply_lora(model: nn.Module, cfg) -> list[str]:
    """Freeze every parameter of the model and add an adapter (trainable) to each linear cfg.targets names
    (model.lora: rank, alpha, dropout, targets, rslora). Returns the adapted modules' names. Under tensor
    parallelism call it after the plan is applied: the adapters take their base's placements."""
    model.requires_grad_(False)
    targets = matching_linears(model, list(cfg.targets))
    for linear in targets.values():
        add_adapter(linear, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, BASE_DTYPES[cfg.base_dtype])
        place_adapters(linear)
    return sorted(targets)


def place_adapters(linear: LoRALinear) -> None:
    """Distribute A and B like a tensor-parallel base layer (no-op for a plain one): column-parallel base
    (Shard(0)): A replicated, B Shard(0); row-parallel (Shard(1)): A Shard(1), B replicated."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    weight = linear.weight
    if not isinstance(weight, DTensor):
        return
    (placement,) = weight.placements  # a 1-D tensor-parallel mesh: FSDP comes later
    a, b = [Replicate()], [Replicate()]
    if placement == Shard(0):
        b = [Shard(0)]
    elif placement == Shard(1):
        a = [Shard(1)]
    for module, placements in ((linear.lora_A, a), (linear.lora_B, b)):
        module.weight = nn.Parameter(distribute_tensor(module.weight, weight.device_mesh, placements,
                                                       src_data_rank=None))


def init_adapter(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """A as PEFT draws it (Kaiming-uniform with a=sqrt(5), nn.Linear's default), B zero."""
    if name.endswith(".lora_A.weight"):
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    else:
        nn.init.zeros_(tensor)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter of `model` skipped inside the block (e.g. DPO's reference log-probs)."""
    modules = [m for _, m in lora_modules(model)]
    states = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, states):
            m.adapter_enabled = state


@torch.no_grad()
def merged_weight(linear: LoRALinear) -> torch.Tensor:
    """W + scale * B A, computed in fp32, in the adapters' dtype (a bf16 base merges into an fp32 weight)."""
    delta = linear.lora_B.weight.float() @ linear.lora_A.weight.float()
    return (linear.weight.float() + linear.scaling * delta).to(linear.lora_A.weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and turn the LoRALinear back into a plain nn.Linear, in place:
    the model then has exactly the base model's parameters (for export)."""
    for _, linear in list(lora_modules(model)):
        weight = merged_weight(linear)
        for child in ("lora_A", "lora_B", "lora_dropout"):
            delattr(linear, child)
        del linear.scaling, linear.adapter_enabled
        linear.__class__ = nn.Linear
        linear.weight = nn.Parameter(weight, requires_grad=False)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of the adapters alone."""
    return {n: p for n, p in model.named_parameters() if is_adapter(n)}
