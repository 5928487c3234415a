"""SwiGLU gating, silu(gate) * up: a Triton kernel (forward and backward) and the PyTorch reference.

`swiglu(gate, up, backend="auto") -> Tensor` for gate and up of the same shape and dtype. The math runs
in fp32; the output and the gradients (d_gate, d_up) have the inputs' dtype. The kernels are written to
run in Triton's interpreter (TRITON_INTERPRET=1) on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.kernels.dispatch import choose, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from mmfm.kernels.rms_norm import to_out

BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and cast back to gate.dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


if triton_available():
    @triton.jit
    def _swiglu_fwd(g_ptr, u_ptr, y_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        a = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        tl.store(y_ptr + offs, to_out(a * sig * u, y_ptr), mask=mask)

    @triton.jit
    def _swiglu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        # d silu(a)/da = sig * (1 + a * (1 - sig))
        dg = dy * u * sig * (1.0 + a * (1.0 - sig))
        du = dy * a * sig
        tl.store(dg_ptr + offs, to_out(dg, dg_ptr), mask=mask)
        tl.store(du_ptr + offs, to_out(du, du_ptr), mask=mask)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        if n > 0:
            _swiglu_fwd[(triton.cdiv(n, BLOCK),)](g, u, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n > 0:
            _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dy, g, u, dg, du, n, BLOCK=BLOCK)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up with fp32 math, output in the inputs' dtype. backend: auto, triton or torch."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu needs gate and up of one shape and dtype, got {gate.shape}/{gate.dtype} "
                         f"and {up.shape}/{up.dtype}")
    if choose("swiglu", backend, gate.device) == "triton":
        return _SwiGLUFn.apply(gate, up)
    return swiglu_reference(gate, up)
