import importlib

import pytest
import torch
from devices import DEVICE

from mmfm.kernels.fused_linear_cross_entropy import (
    default_chunk_size, fused_linear_cross_entropy, fused_linear_cross_entropy_reference)

pytest.importorskip("triton")
fce = importlib.import_module("mmfm.kernels.fused_linear_cross_entropy")  # the module, not the function

IGN = -100
# Errors are relative: ||x - ref|| / ||ref||. fp32: against the naive fp32 reference, at most FP32_TOL.
# bf16: at most 2x the error of the same-precision (bf16 logits) naive torch path, both against the fp32
# reference, plus a tiny floor. The fp32 bound: CPU BLAS sums the 131k products of a one-token chunk
# (dlogits @ W) less accurately than the naive path's 4-row GEMM (~3e-5 vs ~6e-7 against fp64); the rest
# is ~1e-7.
FP32_TOL = 1e-4
BF16_FACTOR, BF16_FLOOR = 2.0, 1e-6

# (N, H, V, chunk_size, ignored rows): single token; H and V not powers of two with uneven chunks and a whole
# ignored chunk; V > 128k with tiny N, H so the kernel walks many vocabulary blocks and one token per chunk.
SHAPES = {
    "single": (1, 48, 1000, None, []),
    "odd": (9, 37, 5003, 4, [0, 1, 2, 3, 7]),
    "bigvocab": (4, 32, 131101, None, [2]),
}


def _inputs(name, dtype, seed=0):
    n, h, v, chunk, ignored = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[ignored] = IGN
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), chunk


def _run(fn, hidden, weight, targets, grad_scale=1.37, **kw):
    """Loss and (hidden, weight) grads of grad_scale * fn(...). A scale like 3 with a mean over 3 tokens
    would give the bf16 reference exactly representable gradients (p - 1 ~ -1) and an unfairly small error."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    (grad_scale * loss).backward()
    return loss.detach().float(), h.grad, w.grad


def _err(x, ref):
    """Relative error ||x - ref|| / ||ref|| (0-safe)."""
    return ((x.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference(shape, dtype, backend, z_loss, reduction):
    hidden, weight, targets, chunk = _inputs(shape, dtype)
    kw = dict(ignore_index=IGN, reduction=reduction, z_loss=z_loss)
    got = _run(fused_linear_cross_entropy, hidden, weight, targets, backend=backend, chunk_size=chunk, **kw)
    ref = _run(fused_linear_cross_entropy_reference, hidden.float(), weight.float(), targets, **kw)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    errs = [_err(g, r) for g, r in zip(got, ref)]
    if dtype == torch.float32:
        assert max(errs) <= FP32_TOL, errs
    else:  # the same-precision torch reference: bf16 logits, fp32 softmax
        low = _run(lambda *a, **k: fce._naive(*a, **k, upcast=False), hidden, weight, targets, **kw)
        bounds = [BF16_FACTOR * _err(lo, r) + BF16_FLOOR for lo, r in zip(low, ref)]
        assert all(e <= b for e, b in zip(errs, bounds)), (errs, bounds)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_all_ignored_gives_zero(backend, reduction):
    hidden, weight, targets, _ = _inputs("odd", torch.float32)
    targets[:] = IGN
    if backend == "reference":
        fn, kw = fused_linear_cross_entropy_reference, {}
    else:
        fn, kw = fused_linear_cross_entropy, dict(backend=backend, chunk_size=4)
    loss, gh, gw = _run(fn, hidden, weight, targets, reduction=reduction, z_loss=1e-2, **kw)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_leading_dims_no_grad_and_single_backward():
    hidden, weight, targets, _ = _inputs("odd", torch.float32)
    ref = fused_linear_cross_entropy_reference(hidden, weight, targets)
    loss = fused_linear_cross_entropy(hidden.reshape(3, 3, -1), weight, targets.reshape(3, 3), backend="torch")
    torch.testing.assert_close(loss, ref)
    with torch.no_grad():  # eval: loss only
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets, backend="triton"), ref)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_default_chunk_is_bounded():
    assert default_chunk_size(8192, 4096, 128256) * 128256 * 4 <= fce.MAX_CHUNK_BYTES
    assert default_chunk_size(8192, 4096, 128256) < 8192
    assert default_chunk_size(1, 8, 131072) == 1
    assert default_chunk_size(10, 4096, 100, max_bytes=1 << 30) == 10
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(*_inputs("single", torch.float32)[:3], reduction="none")
