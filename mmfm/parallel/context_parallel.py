"""Context parallelism: the decoder's sequence split into contiguous chunks over the `cp` mesh dim.

A portable path (plain SDPA + one all-gather per layer, runs on CPU/gloo as well as GPU), applied to the
VisionLanguageModel from outside:

- Every decoder layer's `attention.core` becomes a `ContextParallelAttention`: this rank's queries are
  its chunk; keys and values are all-gathered over the cp group (autograd-aware, so backward
  reduce-scatters their gradients) and attention is causal with the mask offset by rank * chunk.
- Forward pre-hooks on the decoder layers: the first slices the hidden states [B, T, D] to this rank's
  chunk, every one slices the rotary tables of the block context to the chunk's rows so positions stay
  global.
- The logits are [B, T / cp, V]: take this rank's targets with `shard_sequence`.

The vision tower, projector and embeddings run on the full sequence on every cp rank (redundant work,
small next to the decoder at long context); only the decoder layers and the head see one chunk.
Every parameter's gradient on a cp rank is a partial sum over its chunk's tokens: the gradients must be
summed across the cp ranks (the trainer does this by running FSDP over dp_shard x cp).
Keys/values are gathered after the grouped-query repeat (the model's Attention repeats them before its
core), so they carry num_heads rather than num_kv_heads heads. Not supported: attention masks (padded
generation) and KV caches.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from mmfm.models.attention import CoreAttention

CPGroup = Union[DeviceMesh, dist.ProcessGroup]
# A decoder block's forward(x, ctx)
_BLOCK_ARGS = ("x", "ctx")


def _group(cp_mesh: CPGroup) -> dist.ProcessGroup:
    """cp_mesh is a 1-D DeviceMesh (e.g. mesh['cp']) or the cp ProcessGroup itself."""
    return cp_mesh.get_group() if isinstance(cp_mesh, DeviceMesh) else cp_mesh


def _chunk(t: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"sequence length {t.shape[dim]} must be divisible by the context-parallel size {size}")
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n)


def shard_sequence(t: torch.Tensor, cp_mesh: CPGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous chunk of t along dim (e.g. the targets [B, T] -> [B, T / cp])."""
    group = _group(cp_mesh)
    return _chunk(t, dist.get_rank(group), dist.get_world_size(group), dim)


class ContextParallelAttention(nn.Module):
    """q and k [B, H, Tc, D] for this rank's chunk, v [B, H, Tc, Dv] likewise -> [B, H, Tc, Dv].

    Keys and values of all chunks are gathered; queries at global position p attend to keys <= p.
    """

    def __init__(self, group: dist.ProcessGroup, causal: bool = True):
        super().__init__()
        self.group, self.causal = group, causal
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def forward(self, q, k, v, attn_mask=None, document_ids=None):
        if attn_mask is not None or document_ids is not None:
            raise ValueError("attention masks (padding, generation) and packed documents are not supported under "
                             "context parallelism")
        tc = q.shape[2]
        # One collective for keys and values (side by side: their widths may differ); its backward
        # reduce-scatters their gradients.
        widths = [k.shape[-1], v.shape[-1]]
        kv = all_gather_single_autograd(torch.cat([k, v], dim=-1), 2, self.group)
        if not self.causal:
            return F.scaled_dot_product_attention(q, *kv.split(widths, dim=-1))
        # Keys after this chunk are masked anyway: drop them.
        end = (self.rank + 1) * tc
        k, v = kv[:, :, :end].split(widths, dim=-1)
        # Local query i sits at global position rank * tc + i and sees keys j <= that.
        mask = torch.ones(tc, end, dtype=torch.bool, device=q.device).tril(diagonal=self.rank * tc)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _slice_layer_inputs(rank: int, size: int, first: bool):
    """Forward pre-hook for a decoder layer (args by position or by name, whatever wraps the layer)."""

    def get(args, kwargs, i):
        name = _BLOCK_ARGS[i]
        return args[i] if i < len(args) else kwargs.get(name)

    def put(args, kwargs, i, value):
        if i < len(args):
            args[i] = value
        else:
            kwargs[_BLOCK_ARGS[i]] = value

    def hook(module, args, kwargs):
        args = list(args)
        ctx = get(args, kwargs, 1)
        if ctx.cache is not None:
            raise ValueError("KV-cache decoding is not supported under context parallelism")
        x = get(args, kwargs, 0)
        if first:  # full sequence in: keep this rank's chunk from here on
            x = _chunk(x, rank, size, 1)
            put(args, kwargs, 0, x)
        tc = x.shape[1]
        put(args, kwargs, 1, ctx.rotary_rows(rank * tc, tc))
        return tuple(args), kwargs

    return hook


def apply_context_parallel(model: nn.Module, cp_mesh: CPGroup) -> nn.Module:
    """Shard the decoder of `model` (its spec's decoder_layers) over cp_mesh in place; return it.

    Works on a meta-device model too, and under FSDP / activation checkpointing (layers may be wrapped).
    """
    from mmfm.models import model_spec

    group = _group(cp_mesh)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    layers = model_spec(model.cfg).decoder_layers(model)
    for name, module in list(layers.named_modules()):
        if isinstance(module, CoreAttention):
            parent, _, attr = name.rpartition(".")
            setattr(layers.get_submodule(parent), attr, ContextParallelAttention(group, module.causal))
    for index, block in enumerate(layers.children()):
        block.register_forward_pre_hook(_slice_layer_inputs(rank, size, first=index == 0), with_kwargs=True)
    return model
