"""Compares the RMSNorm CUDA extension (mmfm/kernels/csrc/rms_norm.cu) with the reference on a GPU.

    python scripts/gpu_rms_norm_check.py [--out DIR]

Builds the extension, then for each shape and dtype checks y, dx, dweight and rstd against the same math in
float64 on the same inputs; the error is max|err| / max|truth|, allowed up to the dtype's tolerance or twice the
error of the eager reference (mmfm.models.ops.RMSNorm's math), whichever is larger. Also checks the
input errors and times forward and forward+backward against the eager reference. Writes DIR/rms_norm_check.json;
exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, also without pip install
from mmfm.kernels.cuda_ext import load_rms_norm_extension, rms_norm_cuda  # noqa: E402

EPS = 1e-5
SHAPES = [(1, 3), (3, 7), (4, 1000), (2, 2049), (5, 12345), (2, 33, 4096), (3, 100, 5120), (8192, 4096),
          (4096, 5120)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float16)]  # (x, weight)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TIMED = [(8192, 4096), (4096, 5120)]


def reference(x, weight, eps):  # mmfm.models.ops.RMSNorm.forward
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


def grads(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, EPS)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def truth(x, w, dy):
    """y, dx, dw and rstd in float64 on the same inputs."""
    def f64(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    y, dx, dw = grads(f64, x.double(), w.double(), dy.double())
    rstd = torch.rsqrt(x.double().pow(2).mean(-1) + EPS).reshape(-1)
    return y, dx, dw, rstd


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_case(ops, shape, dtype, wdtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(wdtype)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    names = ("y", "dx", "dw", "rstd")
    t = dict(zip(names, truth(x, w, dy)))
    ours = dict(zip(names, grads(rms_norm_cuda, x, w, dy) + (ops.forward(x, w, EPS)[1],)))
    ref = dict(zip(names, grads(reference, x, w, dy)))
    assert ours["y"].dtype == dtype and ours["dx"].dtype == dtype and ours["dw"].dtype == wdtype
    err = {k: rel_err(ours[k], t[k]) for k in names}
    ref_err = {k: rel_err(ref[k], t[k]) for k in names[:3]}
    ok = all(err[k] <= max(TOL[dtype], 2 * ref_err.get(k, 0.0)) for k in names)
    return {"shape": list(shape), "x": str(dtype), "weight": str(wdtype), "ok": ok,
            "err": err, "reference_err": ref_err}


def check_errors(ops):
    """Bad inputs refused with a ValueError before the extension runs (check_rms_norm_inputs: a failed TORCH_CHECK
    inside it ended the process on the H200), non-contiguous inputs, and empty inputs through the op."""
    x, w = torch.randn(4, 8, device="cuda"), torch.ones(8, device="cuda")
    bad = {"weight must have shape": lambda: rms_norm_cuda(x, torch.ones(7, device="cuda"), EPS),
           "float32, float16 or bfloat16": lambda: rms_norm_cuda(x.double(), w.double(), EPS),
           "dtype of x": lambda: rms_norm_cuda(x.half(), w.bfloat16(), EPS)}
    out = {}
    for expect, call in bad.items():
        try:
            call()
            out[expect] = "no error"
        except ValueError as e:
            out[expect] = "ok" if expect in str(e) else f"other error: {str(e)[:200]}"
    xt = torch.randn(8, 4, device="cuda").t()
    out["non-contiguous"] = "ok" if torch.allclose(rms_norm_cuda(xt, torch.ones(8, device="cuda"), EPS),
                                                   reference(xt, torch.ones(8, device="cuda"), EPS), atol=1e-5) else "wrong"
    e = torch.empty(0, 8, device="cuda")
    y, rstd = ops.forward(e, w, EPS)
    dx, dw = ops.backward(e, e, w, rstd)
    out["empty"] = "ok" if y.shape == e.shape and dx.shape == e.shape and not dw.any() else "wrong"
    return out


def cuda_ms(fn, iters=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def timings():
    rows = []
    for shape in TIMED:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(shape[-1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        for name, fn in (("cuda_ext", rms_norm_cuda), ("reference", reference)):
            fwd = cuda_ms(lambda: fn(x, w, EPS))
            fwd_bwd = cuda_ms(lambda: torch.autograd.grad(fn(x, w, EPS), (x, w), dy))
            rows.append({"shape": list(shape), "impl": name, "fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fwd_bwd, 4)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    ops = load_rms_norm_extension()
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
              "build_s": round(time.perf_counter() - start, 1)}
    print(f"extension built and loaded in {report['build_s']}s ({report['gpu']}, torch {torch.__version__})")
    report["cases"] = [check_case(ops, s, d, w) for s in SHAPES for d, w in DTYPES]
    for c in report["cases"]:
        errs = " ".join(f"{k}={v:.1e}" for k, v in c["err"].items())
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {str(tuple(c['shape'])):16} x={c['x']:15} w={c['weight']:15} {errs}")
    report["errors"] = check_errors(ops)
    print("input checks:", report["errors"])
    report["timings"] = timings()
    for t in report["timings"]:
        print(f"bf16 {str(tuple(t['shape'])):13} {t['impl']:9} fwd {t['fwd_ms']:.3f} ms  "
              f"fwd+bwd {t['fwd_bwd_ms']:.3f} ms")
    passed = all(c["ok"] for c in report["cases"]) and all(v == "ok" for v in report["errors"].values())
    report["passed"] = passed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rms_norm_check.json").write_text(json.dumps(report, indent=1))
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
