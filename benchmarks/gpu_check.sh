#!/usr/bin/env bash
# Everything the project needs to learn from one H100/H200, in one call, within 9 minutes of wall
# time on a fresh machine (Triton compiles included); most important first, each step budgeted
# with `timeout` (a step that runs out is logged and the next one runs):
#   (a) the GPU tests of the kernels (small shapes)                                    <= 120 s
#   (b) attention, 8k and 32k tokens (32 / 8 heads, d 128, bf16, causal): plain SDPA vs the
#       platform path (SDPA + AttnLRP rescalings) vs flash-AttnLRP (exact), and the max relative
#       deviation between the two AttnLRP paths                                        <=  90 s
#   (c) epsilon-linear on Llama-3-8B shapes: fused Triton vs rescale + cuBLAS vs plain GEMM <= 60 s
#   (d) model level, Llama-3-8B shape, random bf16 weights: patch vs plain input gradient (time,
#       peak memory) at 8k and 32k (all 32 layers), then one 128k-token explanation with
#       gradient checkpointing (120 s each; if 128k runs out, try fewer layers and scale)   <= 240 s
# Writes every log, one JSON line per case (results.jsonl) and a markdown table (summary.md) to
# "$OUT" (the device tool) or benchmarks/out/. Usage: bash benchmarks/gpu_check.sh
source "$(dirname "$0")/_gpu_common.sh"

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  | tee "$LOGS/env.log"
git log -1 --format='commit %h %cd' 2>/dev/null | tee -a "$LOGS/env.log" || true

step a_gpu_tests 120 env LRP_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -m gpu -x \
  tests/ops/test_linear_epsilon.py tests/ops/test_softmax.py tests/ops/test_matmul.py tests/ops/test_attention.py \
  tests/backends/test_triton_backend.py tests/backends/test_dispatch.py
step b_attention 90 "$PY" benchmarks/bench_long_context.py --kernel --seq 8192,32768
step c_linear 60 "$PY" benchmarks/bench_ops.py --quick --ops linear --views G
step d_model_8k_32k 120 "$PY" -m lrp_kernels.cli profile --model llama-3-8b-shape --seq 8192,32768 --device cuda \
  --dtype bf16 --json --no-progress
step d_model_128k 120 "$PY" -m lrp_kernels.cli profile --model llama-3-8b-shape --seq 131072 --device cuda \
  --dtype bf16 --checkpointing --json --no-progress

cat "$LOGS"/*.log | grep '^{' > "$LOGS/results.jsonl" || true
"$PY" - "$LOGS" <<'PYEOF' || true
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines() if l.strip()]
keys = ["bench", "seq", "impl", "mode", "shape", "view", "auto_choice", "fwd_bwd_s", "total_s", "peak_bytes", "time_ratio_to_sdpa",
        "time_ratio", "memory_ratio", "platform_vs_flash_rel_dev"]
cols = [k for k in keys if any(k in r for r in rows)]
lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
for r in rows:
    lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in cols) + " |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
echo "gpu_check.sh: overall exit $status; logs, results.jsonl and summary.md in $LOGS"
exit $status
