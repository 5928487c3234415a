"""RMSNorm: a Triton kernel (forward and backward) and the pure-PyTorch reference it must match.

`rms_norm(x, weight, eps=1e-5, backend="auto") -> Tensor` normalizes x [..., H] over its last dimension.
The math runs in fp32 whatever the input dtype; the output has x's dtype, the gradients have x's and
weight's dtypes. The kernels are written to run in Triton's interpreter (TRITON_INTERPRET=1) on CPU.
"""

from __future__ import annotations

import torch

from mmfm.kernels.dispatch import choose, triton_available

if triton_available():
    import triton
    import triton.language as tl

MAX_HIDDEN = 65536  # one row must fit in one block


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back to x.dtype (the model's RMSNorm)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).type_as(x)


if triton_available():
    @triton.jit
    def to_out(x, ptr):
        """fp32 x cast to ptr's element type; bf16 is rounded to nearest even by hand, because the
        interpreter's own fp32->bf16 cast truncates (on GPU this gives the same bits as the plain cast)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, M, H, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program normalizes BLOCK_M rows; columns past H are masked.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols < H)[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
        y = x * rstd[:, None] * w[None, :]
        tl.store(y_ptr + offs, to_out(y, y_ptr), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _rms_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, H, num_tiles, num_progs,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Each program walks row tiles pid, pid + num_progs, ...; it writes dx for them and its partial dw
        # (summed over its rows, fp32) into row pid of dw_part [num_progs, H].
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < H
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.full([BLOCK_N], 0.0, tl.float32)  # tl.zeros: a jit function, see _sum
        for tile in range(pid, num_tiles, num_progs):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            # dx = rstd * (g - xhat * mean(g * xhat))
            c = tl.sum(g * xhat, axis=1) / H
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, to_out(dx, dx_ptr), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
        tl.store(dw_part_ptr + pid.to(tl.int64) * H + cols, dw, mask=col_ok)


def _blocks(H: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for hidden size H."""
    if H > MAX_HIDDEN:
        raise ValueError(f"rms_norm kernel supports hidden size up to {MAX_HIDDEN}, got {H}")
    block_n = triton.next_power_of_2(H)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = min(16, max(1, block_m * block_n // 256))
    return block_m, block_n, num_warps


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()
        w = weight.contiguous()
        M = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block_m, block_n, num_warps = _blocks(H)
        if M > 0:
            _rms_fwd[(triton.cdiv(M, block_m),)](x2, w, y, rstd, M, H, eps,
                                                 BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        M, H = x2.shape
        dy2 = dy.reshape(-1, H).contiguous()
        dx = torch.empty_like(x2)
        block_m, block_n, num_warps = _blocks(H)
        num_tiles = triton.cdiv(M, block_m)
        # A few programs per SM on GPU; a handful in the interpreter, so the dw reduction still spans programs.
        per_device = torch.cuda.get_device_properties(x2.device).multi_processor_count * 2 \
            if x2.device.type == "cuda" else 4
        num_progs = max(1, min(num_tiles, per_device))
        dw_part = torch.zeros(num_progs, H, dtype=torch.float32, device=x2.device)
        if M > 0:
            _rms_bwd[(num_progs,)](dy2, x2, w, rstd, dx, dw_part, M, H, num_tiles, num_progs,
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        dw = dw_part.sum(0).to(w.dtype)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x [..., H] with weight [H]; fp32 math, output in x.dtype. backend: auto, triton or torch."""
    if choose("rms_norm", backend, x.device) == "triton":
        return _RMSNormFn.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
