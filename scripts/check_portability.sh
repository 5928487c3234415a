#!/usr/bin/env bash
# Runs the convergence tests (pytest -m convergence) at several seeds on several CPU code paths, and prints
# the figures each test records as one table (docs/results.md, "Convergence on every CPU path").
#   native   whatever this CPU offers (AVX-512 where present)
#   avx2     ATen, MKL and oneDNN held to AVX2, as on an AVX2-only machine
#   default  ATen's scalar kernels
# Usage: scripts/check_portability.sh            (seeds 0 1 2, all three paths; ~1 h on 2 cores)
#        SEEDS="0" CPU_PATHS="avx2" scripts/check_portability.sh  [extra pytest args, e.g. -k caption]
# Exit status: non-zero when any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
CPU_PATHS=${CPU_PATHS:-"native avx2 default"}
OUT=${OUT:-portability}
TIMEOUT=${TIMEOUT:-3600}  # seconds per test: the scalar path runs the alignment chain's fixtures several times slower
mkdir -p "$OUT"
FIGURES="$OUT/figures.jsonl"
: > "$FIGURES"
failed=()
for cpu_path in $CPU_PATHS; do
  case $cpu_path in
    native) isa=() ;;
    avx2) isa=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2) ;;
    default) isa=(ATEN_CPU_CAPABILITY=default) ;;
    *) echo "unknown CPU path '$cpu_path' (native, avx2, default)" >&2; exit 2 ;;
  esac
  for seed in $SEEDS; do
    echo "== $cpu_path, seed $seed"
    env "${isa[@]}" MMFM_TEST_SEED="$seed" MMFM_FIGURES="$FIGURES" MMFM_TEST_TIMEOUT="$TIMEOUT" HF_HUB_OFFLINE=1 \
      "$PY" -m pytest -q -m convergence -p no:cacheprovider --timeout="$TIMEOUT" "$@" > "$OUT/$cpu_path-$seed.log" 2>&1
    rc=$?
    tail -n 1 "$OUT/$cpu_path-$seed.log"
    ((rc == 0)) || failed+=("$cpu_path/seed $seed")
  done
done
"$PY" scripts/portability_table.py "$FIGURES"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "all runs passed"
