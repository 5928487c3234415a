"""Rotary position embeddings (rotate-half) for q and k: a Triton kernel and the PyTorch reference.

    apply_rotary(q, k, cos, sin, position_ids=None, backend="auto") -> (q_rot, k_rot)

    q            [B, Hq, T, D]   any strides (the model passes transposed views)
    k            [B, Hkv, T, D]  Hkv divides Hq (GQA); same B, T, D as q
    cos, sin     [max_len, D/2]  tables from `rotary_tables`; they get no gradient
    position_ids [B, T] integer, each < max_len; None means 0..T-1 on every row. Packed sequences
                 restart positions at each document boundary.

Outputs have the inputs' dtype and are contiguous; math runs in fp32 and matches the model's
`apply_rotary` exactly on the torch backend. The Triton kernel reads inputs through their strides
(no copy) and writes contiguous outputs. Backward rotates the gradient by the inverse angle (sin -> -sin),
so it reuses the forward kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from mmfm.kernels.dispatch import choose, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from mmfm.kernels.rms_norm import to_out

    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, T, H, HALF, T_BLOCKS,
                       sxb, sxh, sxt, sxd, sob, soh, sot, sod,
                       INVERSE: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_HALF: tl.constexpr):
        # One program per (batch row, block of BLOCK_T positions) and group of HEADS heads: the cos/sin
        # tiles [BLOCK_T, BLOCK_HALF] are loaded once and reused for every head of the group.
        pid = tl.program_id(0)
        b = (pid // T_BLOCKS).to(tl.int64)
        t = (pid % T_BLOCKS) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        d = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (t < T) & (d < HALF)  # D/2 need not be a power of two

        pos = tl.load(pos_ptr + b * T + t, mask=t < T, other=0)  # position_ids is contiguous [B, T]
        c = tl.load(cos_ptr + pos * HALF + d, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * HALF + d, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:  # the gradient of a rotation is the inverse rotation
            s = -s

        first = tl.program_id(1) * HEADS
        for h in range(first, tl.minimum(first + HEADS, H)):
            x = x_ptr + b * sxb + h * sxh + t * sxt
            x1 = tl.load(x + d * sxd, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x + (d + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
            o = out_ptr + b * sob + h * soh + t * sot
            tl.store(o + d * sod, to_out(x1 * c - x2 * s, o + d * sod), mask=mask)
            tl.store(o + (d + HALF) * sod, to_out(x2 * c + x1 * s, o + (d + HALF) * sod), mask=mask)


def _rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   inverse: bool) -> torch.Tensor:
    """Rotate x [B, H, T, D] (any strides) into a new contiguous tensor."""
    B, H, T, D = x.shape
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_t = min(triton.next_power_of_2(T), max(1, 4096 // block_half), 64)  # tiles of <= 4096 elements
    heads = min(H, 8)
    t_blocks = triton.cdiv(T, block_t)
    grid = (B * t_blocks, triton.cdiv(H, heads))
    _rotary_kernel[grid](x, out, cos, sin, pos, T, H, half, t_blocks, *x.stride(), *out.stride(),
                         INVERSE=inverse, HEADS=heads, BLOCK_T=block_t, BLOCK_HALF=block_half)
    return out


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, pos):
        ctx.save_for_backward(cos, sin, pos)
        return _rotate_triton(q, cos, sin, pos, False), _rotate_triton(k, cos, sin, pos, False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, pos = ctx.saved_tensors
        dq = _rotate_triton(grad_q, cos, sin, pos, True) if ctx.needs_input_grad[0] else None
        dk = _rotate_triton(grad_k, cos, sin, pos, True) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None, None


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The same ops, in the same order, as mmfm.models.ops.apply_rotary with [B, T, D/2] tables.
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def _positions(q: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    B, _, T, _ = q.shape
    if position_ids is None:
        return torch.arange(T, device=q.device).expand(B, T)
    if position_ids.shape != (B, T):
        raise ValueError(f"position_ids must be [B, T] = {[B, T]}, got {list(position_ids.shape)}")
    return position_ids


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           position_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch rotary: q [B, Hq, T, D], k [B, Hkv, T, D], cos/sin [max_len, D/2], position_ids [B, T]."""
    pos = _positions(q, position_ids)
    cos, sin = cos[pos], sin[pos]  # [B, T, D/2]
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: Optional[torch.Tensor] = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings for q and k; see the module docstring for shapes. backend: auto, triton or torch."""
    B, Hq, T, D = q.shape
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D) or Hq % k.shape[1]:
        raise ValueError(f"k {list(k.shape)} does not fit q {list(q.shape)}: need [B, Hkv, T, D], Hkv | Hq")
    if D % 2 or cos.shape[-1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [max_len, {D // 2}] for head_dim {D}, got {list(cos.shape)}")
    if choose("rotary", backend, q.device) == "torch":
        return apply_rotary_reference(q, k, cos, sin, position_ids)
    pos = _positions(q, position_ids).to(torch.int64).contiguous()
    return _RotaryFunction.apply(q, k, cos.contiguous(), sin.contiguous(), pos)
