"""The CUDA RMSNorm extension without a GPU: its source compiles with nvcc, and its Python side fails clearly.

The comparison with the reference on a GPU is scripts/gpu_rms_norm_check.py (run by scripts/gpu_kernel_check.sh).
"""

import types

import pytest
import torch

from mmfm.kernels import cuda_ext


def test_compile_check_builds_object_file(tmp_path):
    if cuda_ext.find_nvcc() is None:  # no CUDA toolkit: compile_check must say so
        with pytest.raises(FileNotFoundError, match="nvcc not found"):
            cuda_ext.compile_check(tmp_path)
        return
    # one architecture keeps CI's compile to ~30 s; the extension builds for the device it runs on
    obj = cuda_ext.compile_check(tmp_path, archs=("90",))  # raises, failing the test, when nvcc fails
    assert obj == tmp_path / "rms_norm.o" and obj.stat().st_size > 0


def test_compile_check_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.cu"
    bad.write_text("this is not C++;\n")
    if cuda_ext.find_nvcc() is not None:
        with pytest.raises(RuntimeError, match=r"nvcc failed \(exit [1-9]"):
            cuda_ext.compile_check(tmp_path / "out", source=bad)
    with pytest.raises(cuda_ext.CudaSourceError, match="missing.cu not found: pass an existing .cu file$"):
        cuda_ext.compile_check(tmp_path, source=tmp_path / "missing.cu")
    monkeypatch.setattr(cuda_ext, "find_nvcc", lambda: None)
    with pytest.raises(FileNotFoundError, match="nvcc not found"):
        cuda_ext.compile_check(tmp_path)
    monkeypatch.setattr(cuda_ext, "SOURCE", tmp_path / "gone.cu")  # an install without its package data
    with pytest.raises(cuda_ext.CudaSourceError, match="gone.cu not found: the mmfm installation is incomplete"):
        cuda_ext.compile_check(tmp_path)


@pytest.mark.parametrize("cuda_version, gpu, needs", [(None, False, "a CUDA build of PyTorch"),
                                                      ("12.8", False, "a CUDA GPU")])
def test_load_extension_names_what_is_missing(monkeypatch, cuda_version, gpu, needs):
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cuda_ext.load_rms_norm_extension.cache_clear()
    with pytest.raises(RuntimeError, match=f"RMSNorm CUDA extension needs {needs}"):
        cuda_ext.load_rms_norm_extension()
    with pytest.raises(RuntimeError, match="needs"):
        cuda_ext.rms_norm_cuda(torch.ones(2, 4), torch.ones(4), 1e-6)


def _reference(x, weight, eps):  # mmfm.models.ops.RMSNorm
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


def _fake_ops(calls):
    """Stands in for the extension: the kernels' formulas in torch, on CPU."""

    def forward(x, weight, eps):
        calls.append(("forward", x.is_contiguous()))
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps)
        return (x.float() * rstd[..., None] * weight.float()).to(x.dtype), rstd.reshape(-1)

    def backward(dy, x, weight, rstd):
        calls.append(("backward", dy.is_contiguous()))
        xf, dyf, r = x.float(), dy.float(), rstd.view(x.shape[:-1] + (1,))
        g = dyf * weight.float()
        dx = r * (g - xf * r * r * (g * xf).mean(-1, keepdim=True))
        dw = (dyf * xf * r).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype)

    return types.SimpleNamespace(forward=forward, backward=backward)


def test_autograd_function_matches_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(cuda_ext, "load_rms_norm_extension", lambda: _fake_ops(calls))
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5).transpose(0, 1)  # non-contiguous
    w = torch.randn(5)
    dy = torch.randn(8, 3, 5)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ya, yb = cuda_ext.rms_norm_cuda(xa, wa, 1e-5), _reference(xb, wb, 1e-5)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(wa.grad, wb.grad)
    assert calls == [("forward", True), ("backward", True)]


@pytest.mark.parametrize("x, w, message", [
    (torch.ones(4, 0), torch.ones(0), "non-empty last dimension"),
    (torch.ones(4, 8), torch.ones(7), r"weight must have shape \[8\]"),
    (torch.ones(4, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), "float32, float16 or bfloat16"),
    (torch.ones(4, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.float16), "dtype of x"),
    (torch.ones(4, 8), torch.ones(8, device="meta"), "on one device"),
])
def test_bad_inputs_are_refused_before_the_extension(monkeypatch, x, w, message):
    calls = []
    monkeypatch.setattr(cuda_ext, "load_rms_norm_extension", lambda: _fake_ops(calls))
    with pytest.raises(ValueError, match=message):
        cuda_ext.rms_norm_cuda(x, w, 1e-5)
    assert calls == []
