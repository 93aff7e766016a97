#!/usr/bin/env bash
# Every GPU check of the project in one call (estimated 12-15 minutes on an H100/H200, more than
# one 15-minute device lease leaves after the machine's start: with such a lease run the scripts
# one per call, most needed first: gpu_attention.sh (flash-AttnLRP, never run on a GPU yet),
# gpu_norm.sh, gpu_gamma.sh, gpu_ops.sh). Order here: the Triton ops, flash-AttnLRP and the
# long-context profile, the CUDA norm kernels, the gamma kernel, then the GPU-marked tests of
# the rest. Logs under "$OUT" if set.
#   bash benchmarks/gpu_all.sh
cd "$(dirname "$0")/.."
rc=0
for s in gpu_ops gpu_attention gpu_norm gpu_gamma; do
  bash "benchmarks/$s.sh" || rc=1
done
source benchmarks/_gpu_common.sh
step gpu_marked_rest 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_elementwise.py \
  tests/ops/test_networks.py tests/backends/test_dispatch.py tests/test_composite.py tests/test_patch_core.py \
  tests/test_shipped_model.py
[ "$status" -eq 0 ] || rc=1
exit $rc
