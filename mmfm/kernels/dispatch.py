"""Which implementation an op runs: the Triton kernel or the pure-PyTorch reference.

`kernels.<op>` in the config is `auto`, `triton` or `torch`. `auto` takes Triton on CUDA tensors when
Triton imports, and the reference otherwise (on CPU a Triton kernel runs only in Triton's interpreter,
`TRITON_INTERPRET=1`, which is for tests). The first choice for each op is logged once.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """Whether an optional package (triton, flash_attn) imports here."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def triton_available() -> bool:
    return importable("triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _log_once(op: str, choice: str, why: str) -> None:
    log.info("kernel %s: %s (%s)", op, choice, why)


def choose(op: str, backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for `op` on `device`; raises ValueError when `triton` cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels.{op}={backend!r} is unknown; use one of {BACKENDS}")
    runnable = triton_available() and (device.type == "cuda" or interpreting())
    if backend == "triton" and not runnable:
        raise ValueError(f"kernels.{op}=triton needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                         f"use kernels.{op}=auto or torch")
    if backend == "auto":
        choice = "triton" if runnable and device.type == "cuda" else "torch"
        why = "auto"
    else:
        choice, why = backend, "configured"
    _log_once(op, choice, why)
    return choice
