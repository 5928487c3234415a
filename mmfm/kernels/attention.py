"""Attention over packed sequences, dispatched to the best backend available.

Several documents may share one row of a batch; `document_ids` [B, T] says which document each position
belongs to (documents are contiguous runs), and a position attends only to earlier positions of its own
document. Backends, in the order `auto` tries them:

- `flash`: flash-attn's variable-length API (CUDA, fp16/bf16, when the package imports): the batch is
  flattened to one stream of documents delimited by cumulative lengths;
- `flex`: FlexAttention with a document mask (CUDA; it has no backward on CPU);
- `sdpa`: scaled_dot_product_attention with an explicit block-diagonal causal mask (everywhere).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from mmfm.kernels.dispatch import importable
from mmfm.models.attention import document_mask

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "flash", "flex", "sdpa")


def flash_attn_available() -> bool:
    return importable("flash_attn")


def available_backends(device: torch.device, dtype: torch.dtype, training: bool = True) -> list[str]:
    """Backends that can run attention (and, when training, its backward) for tensors like these."""
    out = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        out.append("flash")
    if device.type == "cuda" or not training:
        out.append("flex")
    return out + ["sdpa"]


def cumulative_lengths(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, starting at 0) and the longest document of the flattened batch: a new document
    starts wherever the id changes and at the start of every row."""
    b, t = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    idx = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([idx, torch.tensor([b * t], device=idx.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _sdpa(q, k, v, document_ids):
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(document_ids))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # the fused kernel; eager flex materializes the scores


def _flex(q, k, v, document_ids):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, _, t, _ = q.shape
    docs = document_ids if document_ids is not None else torch.zeros(b, t, dtype=torch.long, device=q.device)

    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[batch, q_idx] == docs[batch, kv_idx])

    block_mask = create_block_mask(mask_mod, b, None, t, t, device=q.device)
    return (_compiled_flex() if q.is_cuda else flex_attention)(q, k, v, block_mask=block_mask)


def _flash(q, k, v, document_ids):
    from flash_attn import flash_attn_varlen_func

    b, h, t, d = q.shape
    if document_ids is None:
        document_ids = torch.zeros(b, t, dtype=torch.long, device=q.device)
    cu, longest = cumulative_lengths(document_ids)
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True)
    return out.reshape(b, t, h, d).transpose(1, 2)


_IMPLS = {"sdpa": _sdpa, "flex": _flex, "flash": _flash}


@functools.lru_cache(maxsize=None)
def _log_once(choice: str) -> None:
    log.info("attention backend: %s", choice)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> torch.Tensor:
    """Causal attention of q, k, v [B, H, T, D] (k, v already repeated to q's heads) within documents.

    document_ids: [B, T] integer ids, contiguous runs per document; None = one document per row.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; use one of {ATTENTION_BACKENDS}")
    usable = available_backends(q.device, q.dtype, training=torch.is_grad_enabled() and q.requires_grad)
    if backend == "auto":  # FlexAttention on CPU is for tests only (no backward there)
        backend = next(b for b in usable if not (b == "flex" and q.device.type != "cuda"))
    elif backend not in usable:
        raise ValueError(f"attention backend {backend!r} cannot run here ({q.device.type}, {q.dtype}); "
                         f"available: {usable}")
    _log_once(backend)
    return _IMPLS[backend](q, k, v, document_ids)
