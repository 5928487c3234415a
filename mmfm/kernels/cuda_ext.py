"""The RMSNorm CUDA extension (mmfm/kernels/csrc/rms_norm.cu): a JIT build for GPU machines, a compile check for CI.

`load_rms_norm_extension()` builds the source with `torch.utils.cpp_extension.load` on first use (cached in
TORCH_EXTENSIONS_DIR) and returns its ops, `torch.ops.mmfm_rms_norm.forward / .backward`; it needs a CUDA
build of PyTorch, a GPU and the CUDA toolkit. `rms_norm_cuda(x, weight, eps)` is the differentiable op.
`compile_check(out_dir)` compiles the source to an object file with nvcc alone, against the headers of any
torch wheel (the CPU one too), so a machine with nvcc but no GPU can check that the source compiles.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from mmfm.errors import MmfmError

SOURCE = Path(__file__).resolve().parent / "csrc" / "rms_norm.cu"  # package data (pyproject.toml)
NAMESPACE = "mmfm_rms_norm"  # the TORCH_LIBRARY namespace in rms_norm.cu, also the extension's name
COMPILE_ARCHS = ("80", "90")  # A100 and H100/H200
CUDA_CFLAGS = ["-O3"]


class CudaSourceError(MmfmError, FileNotFoundError):
    """The CUDA source to build or compile-check is missing."""


def _source(source: Optional[Path] = None) -> Path:
    path = Path(source) if source is not None else SOURCE
    if not path.is_file():
        fix = "pass an existing .cu file" if source is not None else "the mmfm installation is incomplete; reinstall it"
        raise CudaSourceError(f"CUDA source {path} not found: {fix}")
    return path


@functools.lru_cache(maxsize=None)
def load_rms_norm_extension():
    """Builds (once; cached in TORCH_EXTENSIONS_DIR) and loads the extension; returns torch.ops.mmfm_rms_norm."""
    from torch.utils import cpp_extension

    missing = []
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of PyTorch (this is torch {torch.__version__}, torch.version.cuda is None)")
    elif not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if cpp_extension.CUDA_HOME is None:
        missing.append("the CUDA toolkit (nvcc; set CUDA_HOME)")
    if missing:
        raise RuntimeError("the RMSNorm CUDA extension needs " + " and ".join(missing))
    cpp_extension.load(name=NAMESPACE, sources=[str(_source())], extra_cuda_cflags=CUDA_CFLAGS,
                       is_python_module=False, verbose=False)
    return getattr(torch.ops, NAMESPACE)


class _RMSNormCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        y, rstd = load_rms_norm_extension().forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = load_rms_norm_extension().backward(dy.contiguous(), x, weight, rstd)
        return dx, dweight, None


INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_rms_norm_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The extension's rules for its inputs, checked before the call: on the H200, a check failing inside the
    extension (TORCH_CHECK in rms_norm.cu) ended the process with a segmentation fault (docs/kernels.md)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm_cuda: x must have a non-empty last dimension, got shape {list(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm_cuda: weight must have shape [{x.shape[-1]}] (the last dimension of x), "
                         f"got {list(weight.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"rms_norm_cuda: x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"rms_norm_cuda: weight must have the dtype of x ({x.dtype}) or float32, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm_cuda: x and weight must be on one device, got {x.device} and {weight.device}")


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (as mmfm.models.ops.RMSNorm) with the CUDA kernels.

    x: float32, float16 or bfloat16 on a GPU; weight: x's dtype or float32. Output in x's dtype.
    """
    check_rms_norm_inputs(x, weight)
    return _RMSNormCUDA.apply(x, weight, eps)


def find_nvcc() -> Optional[str]:
    """nvcc on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return str(Path(home) / "bin" / "nvcc")
    return None


def nvcc_command(nvcc: str, source: Path, obj: Path, archs: Sequence[str] = COMPILE_ARCHS) -> list[str]:
    """The nvcc line compile_check runs: the flags torch's extension builder uses, without linking."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [nvcc, "-c", str(source), "-o", str(obj), *includes, "-std=c++20", "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *cpp_extension.COMMON_NVCC_FLAGS, *CUDA_CFLAGS]
    # CPU wheels leave out this generated header (CUDA builds ship it); on Linux it only sets
    # C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows alone.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in cpp_extension.include_paths()):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd


def compile_check(out_dir, archs: Sequence[str] = COMPILE_ARCHS, source: Optional[Path] = None) -> Path:
    """Compiles the CUDA source to `out_dir`/<name>.o with nvcc (no GPU, no CUDA torch needed); returns its path.

    Raises FileNotFoundError when there is no nvcc, RuntimeError (with nvcc's output) when compiling fails.
    """
    src = _source(source)
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (not on PATH, nor in $CUDA_HOME/bin or /usr/local/cuda/bin): "
                                f"install the CUDA toolkit to compile-check {src.name}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj = out / (src.stem + ".o")
    cmd = nvcc_command(nvcc, src, obj, archs)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not obj.is_file():
        log = (proc.stdout + proc.stderr).strip()[-4000:]
        raise RuntimeError(f"nvcc failed (exit {proc.returncode}) on {src} after {time.perf_counter() - start:.0f}s"
                           f"\ncommand: {' '.join(cmd)}\n{log}")
    return obj
