# Sourced by the gpu_*.sh scripts: repo root, log folder, python, and `step`.
# Logs go to "$OUT" if set (the device tool), else benchmarks/out/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOGS="${OUT:-benchmarks/out}"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
status=0

step() {  # step NAME TIMEOUT_S CMD...: run, log to $LOGS/NAME.log, remember failures
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee "$LOGS/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOGS/$name.log"
  [ "$rc" -eq 0 ] || status=1
}
