#!/usr/bin/env bash
# One command for a CUDA machine (H100 / H200), from the repo root or anywhere:
#   bash benchmarks/gpu_ops.sh
# Runs the Triton kernels' tests on the GPU (bf16 / fp16 / fp32, larger shapes), `compare` on
# the GPU in float32 and bfloat16 (one fixed tile config: fast compiles), then the quick
# benchmark (autotuned kernels; it also checks their results against the torch backend). About 3-4 minutes (mostly Triton
# compiles). The repo is used in place (PYTHONPATH=., not installed). Logs go to "$OUT" if set,
# else benchmarks/out/. Exit code: non-zero if any step failed (every step still runs).
source "$(dirname "$0")/_gpu_common.sh"

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  | tee "$LOGS/env.log"
# the op files with a Triton kernel hold their CPU case tables too (~1000 quick CPU tests)
step gpu_tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_linear_epsilon.py tests/ops/test_softmax.py \
  tests/ops/test_matmul.py tests/backends/test_triton_backend.py tests/test_compare.py
step compare_fp32 60 env LRP_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m lrp_kernels.cli compare --device cuda --sizes 257,515,129 --dtype float32 --backends torch,triton
step compare_bf16 60 env LRP_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m lrp_kernels.cli compare --device cuda --sizes 257,515,129 --dtype bfloat16 --backends torch,triton
# the fused GEMM's SWAP_AB tile variants are opt-in until measured: try them here first; if that
# run fails (e.g. a compiler error on this triton), rerun with the default config list
before=$status
step bench_quick 150 env LRP_KERNELS_TRITON_SWAP_AB=1 "$PY" benchmarks/bench_ops.py --quick
if [ "$status" -ne "$before" ]; then
  status=$before
  step bench_quick 150 "$PY" benchmarks/bench_ops.py --quick
fi
grep '^{' "$LOGS/bench_quick.log" > "$LOGS/bench_quick.jsonl" || true
echo "gpu_ops.sh: overall exit $status; logs in $LOGS"
exit $status
