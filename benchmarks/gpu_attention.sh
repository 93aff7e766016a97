#!/usr/bin/env bash
# One command for an H100/H200 (python3, torch, triton, transformers installed; repo copied,
# not installed; no internet), < 5 minutes:
#   1. the GPU tests of the attention / profile files (flash-AttnLRP in fp32 / bf16 / fp16),
#   2. flash-AttnLRP vs SDPA forward+backward timing (32/8 heads, d 128, bf16, causal),
#   3. the Llama-3-8B-shape explanation profile at 8k and 32k tokens, gradient checkpointing.
# Logs go to "$OUT" when set (else ./gpu_attention_logs). Usage: bash benchmarks/gpu_attention.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
LOG="${OUT:-./gpu_attention_logs}"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
status=0
echo "== 1/3 GPU tests" | tee "$LOG/tests.log"
timeout 120 $PY -m pytest tests/ops/test_attention.py tests/test_profile.py -m gpu -q -p no:cacheprovider 2>&1 \
  | tee -a "$LOG/tests.log" || status=1
echo "== 2/3 flash-AttnLRP vs SDPA" | tee "$LOG/kernel.log"
timeout 45 $PY benchmarks/bench_long_context.py --kernel --seq 4096,16384 2>&1 | tee -a "$LOG/kernel.log" || status=1
echo "== 3/3 Llama-3-8B-shape profile (8k, 32k, checkpointing)" | tee "$LOG/profile.log"
timeout 130 $PY -m lrp_kernels.cli profile --model llama-3-8b-shape --seq 8192,32768 --device cuda \
  --dtype bf16 --checkpointing --no-progress 2>&1 | tee -a "$LOG/profile.log" || status=1
echo "== done (status $status); logs in $LOG"
exit $status
