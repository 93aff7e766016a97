#!/usr/bin/env bash
# One command for a CUDA machine, from the repo root or anywhere:
#   bash benchmarks/gpu_norm.sh
# Checks the C++ extension's CUDA kernels (csrc/norm_cuda_kernels.cuh) on the GPU:
#  1. the torch-free self-test (nvcc only; float64 host reference; fp32/fp64/bf16/fp16),
#  2. if torch has CUDA: the CUDA tests of tests/ops/test_norm.py and tests/backends/test_cpp_build.py,
#     which build the extension with its CUDA variant (cold build ~1-2 min) and compare CUDA
#     tensors with the float64 oracle.
# Logs go to "$OUT" if set, else benchmarks/out/. Exit code non-zero if any step failed.
source "$(dirname "$0")/_gpu_common.sh"
NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"

{ nvidia-smi -L; "$NVCC" --version | tail -1; "$PY" --version
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || echo "no torch"
} 2>&1 | tee "$LOGS/env_norm.log"

# 1. standalone self-test: the source is kept in the test file (one place)
BUILD="$(mktemp -d)"
"$PY" - "$BUILD/selftest.cu" <<'PYEOF'
import re, sys
src = open("tests/backends/test_cpp_build.py").read()
code = re.search(r'_CUDA_SELFTEST = r"""(.*?)"""', src, re.S).group(1)
open(sys.argv[1], "w").write(code)
PYEOF
step norm_cuda_build 300 "$NVCC" -std=c++17 -O2 --fmad=false -arch=native -I"$(ls -d lrp_kernels/csrc 2>/dev/null || echo csrc)" "$BUILD/selftest.cu" -o "$BUILD/selftest"
step norm_cuda_selftest 120 "$BUILD/selftest"

# 2. through torch, when it has CUDA
if "$PY" -c "import torch, pytest, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  step norm_gpu_tests 420 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_norm.py tests/backends/test_cpp_build.py -k "cuda"
else
  echo "torch with CUDA (and pytest) not available: skipped the extension's GPU tests" | tee -a "$LOGS/env_norm.log"
fi
exit $status
