#!/usr/bin/env bash
# The kernels' GPU checks, for a machine with an NVIDIA GPU (the lent H200 included). From the repo root:
#   bash scripts/gpu_kernel_check.sh
# Steps: the RMSNorm CUDA extension against the reference (scripts/gpu_rms_norm_check.py), the kernel tests
# (tests/test_kernels_*.py) on the GPU (MMFM_TEST_DEVICE=cuda, no TRITON_INTERPRET), then the benchmark
# (`python -m mmfm.kernels.bench`: time table, torch.compile'd references, fused-loss memory), then a 0.9B
# model's training step (benchmarks/gpu_train_mfu.py: MFU, eager against the kernels, beside the planner). Logs and
# summary.txt go to $OUT (default ./gpu_check_out); each step has a time limit (~7 min in all on the H200,
# docs/kernels.md). ONLY="rms tests time compiled memory mfu" (any subset) runs just those steps. Exits 1 when
# any step fails.
#
# Python: $PYTHON or python3 where it has a CUDA torch that sees the GPU (the lent machine's python3 does);
# else a venv .venv-gpu with PyPI's torch==$TORCH_VERSION (PyPI's Linux wheel is the CUDA build; needs the
# network). mmfm runs from the checkout (PYTHONPATH). Its dependencies that the tests import (hydra, omegaconf,
# antlr4, webdataset, braceexpand; pure Python) are taken from the carried .venv/lib/python3*/site-packages/
# where the machine is offline, else installed with `pip install -e .[dev]`. Wheels in .whl/ (e.g. liger-kernel,
# for the benchmark's comparison) are installed first.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/mmfm_torch_extensions}
unset TRITON_INTERPRET
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
failed=0

step() {  # step KEY NAME LIMIT_S LOG CMD...: runs CMD under a time limit, logging to $OUT/LOG
  local key=$1 name=$2 limit=$3 log=$4 start=$SECONDS rc
  shift 4
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $key "* ]]; then return; fi
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  rc=$?
  [ "$rc" -eq 0 ] || failed=1
  echo "$name: rc=$rc ($((SECONDS - start))s, limit ${limit}s)" | tee -a "$SUMMARY"
}

setup() {
  nvidia-smi || echo "nvidia-smi failed"
  PY=${PYTHON:-python3}
  if ! "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None or not torch.cuda.is_available())'; then
    echo "no CUDA torch with a GPU in $PY: making .venv-gpu with torch==${TORCH_VERSION:-2.13.0}"
    [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu || return 1
    .venv-gpu/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}" || return 1
    PY=$PWD/.venv-gpu/bin/python
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  # ninja, which torch's extension builder needs, sits beside the interpreter in a venv
  PATH=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/mmfm_gpu_wheels .whl/*.whl || return 1
    export PYTHONPATH=$PYTHONPATH:/tmp/mmfm_gpu_wheels
  fi
  if ! "$PY" -c 'import hydra, omegaconf, webdataset, pytest' 2>/dev/null; then
    local carried deps=/tmp/mmfm_gpu_deps
    carried=$(ls -d .venv/lib/python3*/site-packages 2>/dev/null | head -1)
    if [ -n "$carried" ] && [ -d "$carried/hydra" ]; then
      # Copy only these packages: the carried site-packages may also hold a CPU torch.
      mkdir -p "$deps" && cp -r "$carried"/{hydra,omegaconf,antlr4,webdataset,braceexpand} "$deps"/ && export PYTHONPATH=$PYTHONPATH:$deps
    else
      "$PY" -m pip install -q -e ".[dev]" || return 1
    fi
  fi
  "$PY" -c 'import torch, triton, hydra, omegaconf, pytest
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("triton", triton.__version__)'
}

start=$SECONDS
echo "== setup"
setup >"$OUT/setup.log" 2>&1  # in this shell: PY and PYTHONPATH stay set
rc=$?
cat "$OUT/setup.log"
echo "setup: rc=$rc ($((SECONDS - start))s)" | tee -a "$SUMMARY"
[ "$rc" -eq 0 ] || exit 1

step rms "rms_norm cuda extension vs reference" 100 rms_norm_check.log \
  "$PY" -X faulthandler scripts/gpu_rms_norm_check.py --out "$OUT"
step tests "kernel tests (MMFM_TEST_DEVICE=cuda: CUDA tensors, compiled kernels)" 300 kernel_tests.log \
  env MMFM_TEST_DEVICE=cuda "$PY" -m pytest -v --tb=short --timeout=60 -p no:cacheprovider --durations=10 \
  tests/test_kernels_*.py
step time "bench: kernels, eager, Liger, attention backends (7B, 70B)" 120 bench_time.log \
  "$PY" -m mmfm.kernels.bench --time --impls kernel eager liger flex
step compiled "bench: torch.compile'd references (7B, 70B)" 100 bench_compiled.log \
  "$PY" -m mmfm.kernels.bench --time --impls compiled eager --ops rms_norm swiglu rotary linear_cross_entropy
step memory "bench: fused linear CE memory, 8192 x 128256 x 4096 fp32" 150 bench_memory.log \
  "$PY" -m mmfm.kernels.bench --memory --full --device cuda
step mfu "bench: 0.9B training step, MFU against the planner" 90 train_mfu.log \
  "$PY" benchmarks/gpu_train_mfu.py --json "$OUT/train_mfu.json"
echo "total: $((SECONDS - start))s, $([ "$failed" -eq 0 ] && echo passed || echo FAILED)" | tee -a "$SUMMARY"
exit "$failed"
