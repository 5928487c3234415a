"""Fused linear + cross-entropy: the LM-head loss without materializing the [N, V] logits.

The tokens are processed in chunks. For each chunk, `logits = h_chunk @ W^T` goes into a scratch buffer of
`chunk * V` elements; a softmax pass (a Triton kernel, or torch ops on the `torch` backend) computes each
row's loss and overwrites the logits in place with d(loss)/d(logits); then `grad_h_chunk = dlogits @ W` and
`grad_W += dlogits^T @ h_chunk` (fp32 accumulator). The gradients are therefore computed in the forward pass
and kept; backward only scales them by grad_output. Same scheme as Liger-Kernel's fused linear CE.

Loss definition (all three implementations). With lse_i = logsumexp_j(logits_ij) and valid tokens
T = {i : targets_i != ignore_index}:

    loss_i = lse_i - logits_i[targets_i] + z_loss * lse_i ** 2       (cross-entropy + z-loss)
    sum:  sum_{i in T} loss_i
    mean: sum_{i in T} loss_i / |T|   (0 when T is empty; the gradients are then 0 too, never NaN)

so with reduction="mean" the z-loss term is exactly z_loss * mean_{i in T}(lse_i ** 2). Logits are computed
in the input dtype (fp32 for fp32 inputs; a bf16 GEMM for bf16 inputs, as `F.linear` would) and the softmax,
loss and z-loss in fp32. The loss is returned as an fp32 scalar.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmfm.kernels.dispatch import choose

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch paths below work without Triton
    triton = None

# Upper bound on a chunk's logits buffer (chunk_tokens * V * 4 bytes) when chunk_size is not given.
MAX_CHUNK_BYTES = 256 * 2**20
REDUCTIONS = ("mean", "sum")


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int, max_bytes: int = MAX_CHUNK_BYTES) -> int:
    """Tokens per chunk: a chunk's logits about as large as the hidden states (as Liger-Kernel picks it),
    and never above `max_bytes` in fp32."""
    by_hidden = math.ceil(n_tokens * hidden_size / vocab_size)
    by_budget = max_bytes // (4 * vocab_size)
    return max(1, min(n_tokens, by_hidden, by_budget))


# ---------------------------------------------------------------------------------------------------------
# Reference: naive, materializes the [N, V] logits.


def _naive(hidden, weight, targets, ignore_index, reduction, z_loss, upcast):
    logits = hidden.float() @ weight.float().T if upcast else (hidden @ weight.T).float()
    valid = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if z_loss:
        loss = loss + z_loss * torch.where(valid, logits.logsumexp(-1) ** 2, 0.0).sum()
    return loss / valid.sum().clamp(min=1) if reduction == "mean" else loss


def fused_linear_cross_entropy_reference(hidden, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0):
    """Naive reference: fp32 logits [N, V] = hidden @ weight^T, then the loss in the module docstring."""
    _check(reduction)
    return _naive(hidden, weight, targets, ignore_index, reduction, z_loss, upcast=True)


# ---------------------------------------------------------------------------------------------------------
# Per-chunk softmax / loss / gradient: loss per row, and logits overwritten with scale * d(loss_i)/d(logits).
# d(loss_i)/d(logits_ij) = softmax_ij * (1 + 2 * z_loss * lse_i) - [j == targets_i]


def _softmax_grad_torch(logits, targets, ignore_index, z_loss, scale):
    x = logits.float()  # the buffer itself for fp32 logits, an fp32 copy otherwise
    valid = targets != ignore_index
    tgt = targets.clamp(min=0).unsqueeze(1)
    lse = x.logsumexp(-1)
    row_loss = torch.where(valid, lse - x.gather(1, tgt).squeeze(1) + z_loss * lse**2, 0.0)
    x.sub_(lse.unsqueeze(1)).exp_().mul_(((1 + 2 * z_loss * lse) * valid * scale).unsqueeze(1))
    x.scatter_add_(1, tgt, (-scale * valid.float()).unsqueeze(1))  # ignored rows: += 0
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)
    return row_loss


if triton is not None:

    @triton.jit
    def _softmax_grad_kernel(logits_ptr, stride, targets_ptr, loss_ptr, ignore_index, z_loss, scale,
                             V: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr):
        # One program per row. Interpreter-clean: V is constexpr (static loop bound), no .to() on the float
        # scalars, no libdevice. RTNE_BF16: round fp32 -> bf16 to nearest-even by hand (the interpreter's
        # cast truncates; on GPU this gives the same bits as the cast).
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        y = tl.load(targets_ptr + row)
        if y == ignore_index:
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                tl.store(ptr + offs, tl.zeros([BLOCK], tl.float32).to(ptr.dtype.element_ty), mask=offs < V)
            tl.store(loss_ptr + row, 0.0)
            return
        # Pass 1: online max and sum of exp over the vocabulary blocks.
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        x_y = tl.load(ptr + y).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_y + z_loss * lse * lse)
        # Pass 2: overwrite the logits with the scaled gradient.
        coef = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * coef
            g = tl.where(offs == y, g - 1.0, g) * scale
            if RTNE_BF16:
                bits = g.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                g = bits.to(tl.float32, bitcast=True)
            tl.store(ptr + offs, g.to(ptr.dtype.element_ty), mask=offs < V)


def _softmax_grad_triton(logits, targets, ignore_index, z_loss, scale):
    n, V = logits.shape
    row_loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(V), 4096)
    _softmax_grad_kernel[(n,)](logits, logits.stride(0), targets, row_loss, ignore_index, float(z_loss),
                               float(scale), V=V, BLOCK=block, RTNE_BF16=logits.dtype == torch.bfloat16, num_warps=8)
    return row_loss


# ---------------------------------------------------------------------------------------------------------
# Chunked autograd Function, shared by the Triton and torch backends.


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, z_loss, chunk_size, softmax_grad, grad_on):
        N, H = hidden.shape
        need_h, need_w = grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[1]
        n_valid = int((targets != ignore_index).sum())
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk_size):
            h, y = hidden[s:s + chunk_size], targets[s:s + chunk_size].contiguous()
            logits = h @ weight.T  # [chunk, V], the only vocabulary-sized buffer
            loss += softmax_grad(logits, y, ignore_index, z_loss, scale).sum()  # logits now hold dlogits
            if need_h:
                torch.mm(logits, weight, out=grad_h[s:s + chunk_size])
            if need_w:
                if grad_w.dtype == logits.dtype:
                    grad_w.addmm_(logits.T, h)
                else:  # bf16/fp16: low-precision GEMM per chunk, fp32 accumulation across chunks
                    grad_w.add_(logits.T @ h)
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:  # the stored gradients are scaled in place
            raise RuntimeError("fused_linear_cross_entropy: backward can run only once (no retain_graph)")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        if grad_out.item() != 1.0:
            grad_h = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
            grad_w = grad_w.mul_(grad_out) if grad_w is not None else None
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _check(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; use one of {REDUCTIONS}")


def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0,
                               backend="auto", chunk_size=None):
    """fused_linear_cross_entropy(hidden [..., H], weight [V, H], targets [...], ignore_index=-100,
    reduction="mean"|"sum", z_loss=0.0, backend="auto"|"triton"|"torch", chunk_size=None) -> fp32 scalar

    Cross-entropy (+ optional z-loss, see the module docstring) of `hidden @ weight^T` against `targets`,
    computed `chunk_size` tokens at a time so that the [N, V] logits never exist (default chunk: logits
    about the size of `hidden`, at most MAX_CHUNK_BYTES). The backend comes from
    `dispatch.choose("fused_linear_cross_entropy", backend, hidden.device)`: the Triton kernel for the
    softmax part, or the same chunking with torch ops. Gradients (hidden, weight) are computed in the
    forward pass; backward runs once.
    """
    _check(reduction)
    impl = choose("fused_linear_cross_entropy", backend, hidden.device)
    H = hidden.shape[-1]
    hidden, targets = hidden.reshape(-1, H), targets.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], H, weight.shape[0])
    softmax_grad = _softmax_grad_triton if impl == "triton" else _softmax_grad_torch
    return _ChunkedLinearCE.apply(hidden, weight, targets, ignore_index, reduction, float(z_loss),
                                  max(1, int(chunk_size)), softmax_grad, torch.is_grad_enabled())
