import pytest
import torch
from devices import DEVICE

from mmfm.kernels.rotary import apply_rotary, apply_rotary_reference
from mmfm.models import ops

pytest.importorskip("triton")

MAX_LEN = 32
# (B, Hq, Hkv, T, D): GQA, one head, D/2 not a power of two, T=1.
SHAPES = [(2, 4, 2, 8, 64), (1, 1, 1, 5, 6), (2, 4, 2, 7, 10), (2, 4, 4, 1, 64)]


def inputs(B, Hq, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as the model builds it: a transposed (non-contiguous) view of [B, T, H, D]; k contiguous.
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    pos = torch.randint(0, MAX_LEN, (B, T), generator=g)
    gq = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    gk = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    cos, sin = ops.rotary_tables(D, MAX_LEN, 10000.0)
    return tuple(t.to(DEVICE) for t in (q, k, cos, sin, pos, gq, gk))


def run(fn, q, k, cos, sin, pos, gq, gk, dtype=None, **kw):
    """Outputs and input grads of fn, with q, k, grads cast to dtype (default: as given)."""
    q, k = (x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k))
    oq, ok = fn(q, k, cos, sin, pos, **kw)
    torch.autograd.backward([oq, ok], [gq.to(oq.dtype), gk.to(ok.dtype)])
    return oq, ok, q.grad, k.grad


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    args = inputs(*shape, dtype)
    exact = run(apply_rotary_reference, *args, dtype=torch.float32)  # fp32 math on the same inputs
    kernel = run(apply_rotary, *args, backend="triton")
    torch_ = run(apply_rotary_reference, *args)
    for name, e, t, r in zip(("q", "k", "dq", "dk"), exact, kernel, torch_):
        assert t.dtype == dtype and t.shape == e.shape, name
        if dtype == torch.float32:
            torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-6, msg=name)
        else:  # kernel error at most 2x the bf16 torch reference's error (which rounds the same fp32 math)
            assert max_err(t, e) <= 2 * max_err(r, e) + 1e-6, (name, max_err(t, e), max_err(r, e))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_positions_restart_per_document(backend):
    q, k, cos, sin, _, _, _ = inputs(1, 4, 2, 12, 10, torch.float32)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(DEVICE)  # two documents in one row
    oq, ok = apply_rotary(q, k, cos, sin, pos, backend=backend)
    for sl in (slice(0, 5), slice(5, 12)):  # each document alone, positions from 0
        dq, dk = apply_rotary(q[:, :, sl], k[:, :, sl], cos, sin, backend=backend)
        torch.testing.assert_close(oq[:, :, sl], dq, rtol=0, atol=0)
        torch.testing.assert_close(ok[:, :, sl], dk, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_model_and_torch_backend(dtype):
    q, k, cos, sin, pos, gq, gk = inputs(2, 4, 2, 7, 10, dtype)
    ref = apply_rotary_reference(q, k, cos, sin, pos)
    model = ops.apply_rotary(q, cos[pos], sin[pos]), ops.apply_rotary(k, cos[pos], sin[pos])
    assert all(torch.equal(a, b) for a, b in zip(ref, model))
    # Default positions against the model's [T, D/2] tables.
    ref0 = apply_rotary_reference(q, k, cos, sin)
    assert torch.equal(ref0[0], ops.apply_rotary(q, cos[:7], sin[:7]))
    assert torch.equal(ref0[1], ops.apply_rotary(k, cos[:7], sin[:7]))
    # backend="torch" is the reference, gradients included.
    a = run(apply_rotary, q, k, cos, sin, pos, gq, gk, backend="torch")
    b = run(apply_rotary_reference, q, k, cos, sin, pos, gq, gk)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_shapes_raise():
    q, k, cos, sin, *_ = inputs(1, 4, 2, 3, 10, torch.float32)
    with pytest.raises(ValueError):
        apply_rotary(q, k[:, :, :, :8], cos, sin)  # head_dim mismatch
    with pytest.raises(ValueError):
        apply_rotary(q, torch.cat([k, k[:, :1]], 1), cos, sin)  # 3 kv heads do not divide 4
