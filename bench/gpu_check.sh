#!/usr/bin/env bash
# One call on a lent GPU machine (python3 with torch and Triton preinstalled, no network):
#   1. install the working tree with the CUDA extension (editable, no deps, no isolation)
#   2. the test suite (GPU tests switch on)
#   3. compute-sanitizer memcheck and racecheck over every kernel, when the tool exists
#   4. bench/run.py, when present
# and a short table of the stages last. Logs go to $OUT (or a temp dir) when set.
#   bash bench/gpu_check.sh            # everything
#   SKIP_BENCH=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
declare -a rows

stage() {  # stage NAME CMD...: run, log to $LOG/NAME.log, record status and time
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$LOG/$name.log"
  rows+=("$(printf '%-12s %-6s %5ss  %s' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL:$rc)" $((SECONDS - t0)) "$LOG/$name.log")")
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
$PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
stage install $PY -m pip install --no-deps --no-build-isolation -v -e .
stage import $PY -c 'import torch, sharpfused._C as C; from sharpfused import ops; print("sharpfused._C:", C.__file__); assert ops.unavailable_reason("cuda", torch.device("cuda")) is None, ops.unavailable_reason("cuda", torch.device("cuda"))'
stage tests $PY -m pytest tests -q -x

if command -v compute-sanitizer >/dev/null 2>&1; then
  cat >"$LOG/exercise.py" <<'PY'
# every kernel once, small sizes, aligned and unaligned, several tables
import torch
from sharpfused.backends import cuda_ops as C
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    sizes = [1, 7, 0, 4099, 65536 + 3] + [5] * 120
    r = lambda: [torch.randn(n, device="cuda", dtype=dtype) for n in sizes]  # noqa: E731
    w, g, b, m, v, s = r(), r(), r(), r(), r(), r()
    flat = torch.randn(10001, device="cuda", dtype=dtype)
    odd = [flat[1:4000], flat[4001:10001]]
    C.sq_norm(w, g, 0.01, True); C.sq_norm(odd, None, 0.0, False)
    C.perturb_(w, g, b, torch.tensor(0.1, device="cuda"), 0.01, s)
    C.perturb_(odd, [x.clone() for x in odd], None, 0.1, None, None)
    C.restore_(w, b); C.dot_norms(w, g)
    C.combine_(g, s, 0.5, torch.tensor(0.5, device="cuda"))
    C.restore_sgd_(w, b, g, m, 0.1, 0.9, 0.0, 0.01, True, False)
    C.restore_adamw_(w, b, g, m, [x.abs() for x in v], 3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
torch.cuda.synchronize()
print("exercised every kernel")
PY
  stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY "$LOG/exercise.py"
  stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY "$LOG/exercise.py"
else
  rows+=("$(printf '%-12s %-6s' sanitizer 'absent')")
fi

if [ -f bench/run.py ] && [ "${SKIP_BENCH:-0}" != 1 ]; then
  stage bench $PY bench/run.py
fi

echo
echo "stage        status  time  log"
printf '%s\n' "${rows[@]}"
