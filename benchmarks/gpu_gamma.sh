#!/usr/bin/env bash
# One command for a CUDA machine: tests of the hooks / classic rules / ViT example on the GPU
# (including the GPU-marked fused gamma-linear kernel tests), then the quick gamma benchmark
# (fused Triton vs torch op vs generic hook vs plain GEMM, bf16). About 1-2 minutes.
#   bash benchmarks/gpu_gamma.sh
# Logs go to "$OUT" if set, else benchmarks/out/. Exit code non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-benchmarks/out}"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
status=0

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee "$LOGS/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOGS/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

step gamma_gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_lrp_rules.py tests/test_hooks.py tests/test_vision.py
step bench_gamma 120 "$PY" benchmarks/bench_gamma.py --quick
grep '^{' "$LOGS/bench_gamma.log" > "$LOGS/bench_gamma.jsonl" || true
echo "gpu_gamma.sh: overall exit $status; logs in $LOGS"
exit $status
