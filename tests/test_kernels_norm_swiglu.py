"""RMSNorm and SwiGLU Triton kernels against their PyTorch references (on CPU in Triton's interpreter, see
tests/devices.py).

Tolerances: fp32 kernel vs fp32 reference atol = rtol = 1e-5. bf16: the kernel's max error against the
fp32 reference (on the same, upcast inputs) must be at most 2x the bf16 PyTorch reference's error + 1e-5.
"""

import importlib

import pytest
import torch
from devices import DEVICE

pytest.importorskip("triton")

rn = importlib.import_module("mmfm.kernels.rms_norm")  # the module: mmfm.kernels.rms_norm is the function
sw = importlib.import_module("mmfm.kernels.swiglu")

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 1), (1, 3), (4, 100), (2, 1000), (2, 5, 96), (300, 64)]  # (300, 64): dw spans programs


def check(name, out, ref32, ref_pt):
    """out and ref_pt (torch reference, same dtype as out) against ref32 (fp32 reference)."""
    err = (out.float() - ref32).abs().max().item()
    if out.dtype == torch.float32:
        print(f"{name}: fp32 err {err:.2e}")
        torch.testing.assert_close(out, ref32, atol=1e-5, rtol=1e-5)
    else:
        pt_err = (ref_pt.float() - ref32).abs().max().item()
        print(f"{name}: {out.dtype} err {err:.2e}, torch ref err {pt_err:.2e}")
        assert err <= 2 * pt_err + 1e-5, f"{name}: kernel err {err} > 2 x torch err {pt_err}"


def run(fn, inputs, dy):
    """fn(*inputs) and the gradients of its inputs for upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1])).to(DEVICE, dtype)
    dy = torch.randn(shape).to(DEVICE)
    got = run(lambda a, b: rn.rms_norm(a, b, EPS, backend="triton"), (x, w), dy)
    ref32 = run(lambda a, b: rn.rms_norm_reference(a, b, EPS), (x.float(), w.float()), dy.to(dtype).float())
    ref_pt = run(lambda a, b: rn.rms_norm_reference(a, b, EPS), (x, w), dy)
    for name, g, r, p in zip(("y", "dx", "dw"), got, ref32, ref_pt):
        assert g.dtype == dtype and g.shape == p.shape
        check(f"rms_norm {shape} {name}", g, r, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(0)
    gate, up = (3 * torch.randn(shape)).to(DEVICE, dtype), torch.randn(shape).to(DEVICE, dtype)
    dy = torch.randn(shape).to(DEVICE)
    got = run(lambda a, b: sw.swiglu(a, b, backend="triton"), (gate, up), dy)
    ref32 = run(sw.swiglu_reference, (gate.float(), up.float()), dy.to(dtype).float())
    ref_pt = run(sw.swiglu_reference, (gate, up), dy)
    for name, g, r, p in zip(("y", "d_gate", "d_up"), got, ref32, ref_pt):
        assert g.dtype == dtype and g.shape == p.shape
        check(f"swiglu {shape} {name}", g, r, p)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_backend_is_the_reference(backend):
    # On CPU tensors `auto` takes the reference too (Triton only for CUDA tensors).
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, dtype=torch.bfloat16), torch.randn(7, dtype=torch.bfloat16)
    assert torch.equal(rn.rms_norm(x, w, EPS, backend=backend), rn.rms_norm_reference(x, w, EPS))
    assert torch.equal(sw.swiglu(x, x.flip(0), backend=backend), sw.swiglu_reference(x, x.flip(0)))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError):
        rn.rms_norm(x, w, backend="triton")
    with pytest.raises(ValueError):
        sw.swiglu(x, x, backend="triton")
