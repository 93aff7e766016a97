#!/usr/bin/env bash
# One command for a CUDA machine: tests of the hooks / classic rules / ViT example on the GPU
# (including the GPU-marked fused gamma-linear kernel tests), then the quick gamma benchmark
# (fused Triton vs torch op vs generic hook vs plain GEMM, bf16). About 1-2 minutes.
#   bash benchmarks/gpu_gamma.sh
# Logs go to "$OUT" if set, else benchmarks/out/. Exit code non-zero if any step failed.
source "$(dirname "$0")/_gpu_common.sh"

step gamma_gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_linear_gamma.py tests/test_lrp_rules.py \
  tests/test_hooks.py tests/test_vision.py
step bench_gamma 120 "$PY" benchmarks/bench_gamma.py --quick
grep '^{' "$LOGS/bench_gamma.log" > "$LOGS/bench_gamma.jsonl" || true
echo "gpu_gamma.sh: overall exit $status; logs in $LOGS"
exit $status
