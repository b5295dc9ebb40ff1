#!/usr/bin/env bash
# The one call on a lent GPU machine (one H100/H200, its own python3 with torch, Triton and numpy,
# no package registry): staged, each stage under its own time cap, the whole run under TOTAL_S
# (default 480 s), and a stage that fails or runs out of time never stops the next one.
#
#   build         a prebuilt wheel from bench/wheels/ when one matches this torch, CUDA, python, GPU arch
#                 and csrc/ (bench/pick_wheel.py; carry bench/wheels with the working tree), else
#                 pip install --no-deps --no-build-isolation -e . (TORCH_CUDA_ARCH_LIST = this GPU)
#   import        sharpfused, sharpfused._C, and which backends can run on CUDA tensors
#   select        the GPU tests (pytest -m gpu, tests/conftest.py marks them): how many per file
#   tests-cuda    tests/test_cuda_backend.py -m gpu (CUDA backend, CUDA-graph capture/replay)
#   tests-gpu     the other GPU tests: compiled Triton and every backend on CUDA tensors,
#                 fp32/bf16/fp16, the optimizers on CUDA (no interpreter, no CPU-only tests, no -x)
#   exercise      every CUDA and Triton kernel once on small odd lists, checked against the torch backend
#   memcheck      compute-sanitizer --tool memcheck over the same script
#   bench         bench/run.py on GPT-2 small then ResNet-50, fp32 and bf16: the seven primitives
#                 (124M elements on GPT-2 small), SAM/ASAM/GSAM/SAM-AdamW steps, copy bandwidth
#   racecheck     compute-sanitizer --tool racecheck over the exercise script, in the time left
#
# The last lines printed are the table: stage, status (ok, FAIL:rc, TIMEOUT, skip), seconds, note.
# Logs, the CSV and the PNGs go to $OUT when set (else a fresh temp dir); the CSV also to
# bench/results/<GPU>.csv. pytest, matplotlib, ninja and compute-sanitizer are used when present
# and their stages say so when not.
#
#   bash bench/gpu_check.sh             # on the GPU machine
#   bash bench/gpu_check.sh --dry-run   # CPU: same stages, Triton under the interpreter, the
#                                       # CUDA build and the sanitizer skipped, tiny bench (CI)
# Caps (seconds) can be overridden: TOTAL_S, CAP_BUILD, CAP_TESTS_CUDA, CAP_TESTS_GPU, CAP_MEMCHECK,
# CAP_BENCH; SKIP_BENCH=1 leaves the bench out, SKIP_BUILD=1 the build (a rerun on the same machine).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
T_START=$SECONDS
if [ $DRY = 1 ]; then
  TOTAL_S=${TOTAL_S:-240}
  export CUDA_VISIBLE_DEVICES=""  # a dry run is the CPU flow even where a GPU is present
  export TRITON_INTERPRET=1
else
  TOTAL_S=${TOTAL_S:-480}
  unset TRITON_INTERPRET  # tests/conftest.py turns the interpreter off where a GPU is visible
fi
declare -a rows

note_row() {  # note_row NAME STATUS SECONDS NOTE (a note's further lines are indented under it)
  rows+=("$(printf '%-12s %-9s %5s  %s' "$1" "$2" "$3" "$4" | sed '2,$s/^/                               /')")
}

cap_for() {  # cap_for CAP RESERVE: the stage's cap, leaving RESERVE seconds for the stages after it
  local left=$((TOTAL_S - (SECONDS - T_START) - $2))
  local c=$1
  [ "$left" -lt "$c" ] && c=$left
  [ "$c" -lt 10 ] && c=10
  echo "$c"
}

run_stage() {  # run_stage NAME CAP NOTE_FN CMD...: log to $LOG/NAME.log under `timeout CAP`
  local name=$1 cap=$2 notefn=$3
  shift 3
  local t0=$SECONDS
  echo "== $name (cap ${cap}s): $*"
  # timeout runs programs: a shell function of this script runs in a child bash (export -f)
  declare -F "$1" >/dev/null && set -- bash -c '"$@"' _ "$@"
  timeout --kill-after=10 "$cap" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$LOG/$name.log"
  local st=ok
  [ $rc != 0 ] && st=FAIL:$rc
  [ $rc = 124 ] || [ $rc = 137 ] && st=TIMEOUT
  local note="$LOG/$name.log"
  [ -n "$notefn" ] && note="$($notefn "$LOG/$name.log" $rc)"
  note_row "$name" "$st" $((SECONDS - t0)) "$note"
  return $rc
}

pytest_note() {  # counts from pytest -v lines of the stage's log or its shards' (also when cut short)
  local logs=() p f s e x
  for x in "${1%.log}".[0-9]*.log; do [ -f "$x" ] && logs+=("$x"); done
  [ ${#logs[@]} = 0 ] && logs=("$1")  # else the stage log only repeats the shards' tails
  p=$(cat "${logs[@]}" | grep -c ' PASSED'); f=$(cat "${logs[@]}" | grep -c ' FAILED')
  s=$(cat "${logs[@]}" | grep -c ' SKIPPED'); e=$(cat "${logs[@]}" | grep -c ' ERROR')
  echo "passed $p, failed $f, skipped $s, errors $e$([ "$2" = 5 ] && echo ', no test collected') (${logs[*]})"
}

has() { $PY -c "import $1" >/dev/null 2>&1; }
export -f has
export PY DRY LOG

# ------------------------------------------------------------------ the machine
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu visible", torch.cuda.is_available())'
$PY -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -n 1
for m in numpy pytest matplotlib ninja; do
  if has $m; then echo "$m: present"; else echo "$m: absent"; fi
done
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
echo "compute-sanitizer: ${SANITIZER:-absent}"
if [ $DRY = 0 ] && ! $PY -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  echo "no GPU visible to $PY: the GPU stages will fail or skip (bash bench/gpu_check.sh --dry-run is the CPU flow)"
fi

# ------------------------------------------------------------------ (a) build and import
CAP_BUILD=${CAP_BUILD:-240}
# A prebuilt wheel from bench/wheels/ (bench/build_cuda_wheel.sh; the device tool's `carry` brings the
# ignored folder) is installed when bench/pick_wheel.py finds one for this torch (major.minor and CUDA),
# python tag, platform, GPU arch and this checkout's csrc/; else the extension is built here.
WHEEL_DIR=${WHEEL_DIR:-$ROOT/bench/wheels}
build_note() {  # the decision, the wheel or the build, and the time, from the stage's log
  local what secs
  what=$(grep -m 1 '^decision: ' "$1" | cut -c11-)
  secs=$(grep -m 1 '^took: ' "$1" | cut -c7-)
  echo "${what:-build}${secs:+, $secs s}$([ "$2" = 0 ] || echo ", rc $2") ($1)"
}
if [ $DRY = 1 ]; then
  # no compile on CPU: the selection itself, on fake wheels (both outcomes), and what it says here
  dry_build() {
    local pick here t0=$SECONDS
    $PY "$ROOT/bench/pick_wheel.py" --self-check --csrc "$ROOT/csrc" >"$LOG/.pick_self.out" 2>&1
    local rc=$?
    cat "$LOG/.pick_self.out"
    [ $rc = 0 ] || { echo "decision: the selection's self-check failed: $(tail -n 1 "$LOG/.pick_self.out")"; return 1; }
    pick=$($PY "$ROOT/bench/pick_wheel.py" --dir "$WHEEL_DIR" --csrc "$ROOT/csrc" 2>"$LOG/.pick.err")
    cat "$LOG/.pick.err"
    here=$(tail -n 1 "$LOG/.pick.err" | sed 's/^pick_wheel: //')
    echo "decision: dry run, no compile: selection ok ($(tail -n 1 "$LOG/.pick_self.out" | cut -c5-)); here: \
$([ -n "$pick" ] && echo "would install $(basename "$pick")" || echo "would build ($here)")"
    echo "took: $((SECONDS - t0))"
  }
  export -f dry_build
  export WHEEL_DIR ROOT
  run_stage build 60 build_note dry_build
elif [ "${SKIP_BUILD:-0}" = 1 ]; then
  note_row build skip 0 "SKIP_BUILD=1 (a rerun on the same machine: the build of the first run stays)"
else
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}
  export TORCH_CUDA_ARCH_LIST
  PICKED=$($PY bench/pick_wheel.py --dir "$WHEEL_DIR" --csrc csrc ${TORCH_CUDA_ARCH_LIST:+--arch "${TORCH_CUDA_ARCH_LIST%%;*}"} \
    2>"$LOG/.pick.err")
  sed 's/^/build: /' "$LOG/.pick.err"
  export PICKED
  if [ -n "$PICKED" ]; then
    install_wheel() {  # the prebuilt wheel: pip install, and its extension beside the checkout's sources
      local t0=$SECONDS how="pip install --no-deps --no-index"
      echo "prebuilt wheel: $PICKED"
      if ! $PY -m pip --version >/dev/null 2>&1; then
        how="pip absent: only its extension copied"
      elif ! $PY -m pip install --no-deps --no-index --force-reinstall "$PICKED"; then
        how="pip install failed, see the log: only its extension copied"
      fi
      echo "$how"
      # the stages run from the checkout, whose sharpfused/ comes first on sys.path: put the wheel's
      # sharpfused/_C*.so there (as build_ext --inplace would) and map sharpfused.kernels to kernels/
      $PY - "$PICKED" <<'PY' || return 1
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if re.fullmatch(r"sharpfused/_C\.[^/]*\.so", n):
        z.extract(n, ".")
        print("extension:", n)
PY
      [ -e sharpfused/kernels ] || ln -s ../kernels sharpfused/kernels
      $PY -c 'import sharpfused._C as C; print("sharpfused._C loads:", C.__file__)' || return 1
      echo "decision: installed prebuilt $(basename "$PICKED") ($how)"
      echo "took: $((SECONDS - t0))"
    }
    export -f install_wheel
    run_stage build "$(cap_for "$CAP_BUILD" 220)" build_note install_wheel
  else
    command -v ninja >/dev/null || has ninja || echo "ninja absent: the extension's sources compile one after another"
    PICK_WHY="$(tail -n 1 "$LOG/.pick.err" | sed 's/^pick_wheel: //')"
    first=$(grep -m 1 '^pick_wheel: refused ' "$LOG/.pick.err" | sed 's/^pick_wheel: refused //')
    export PICK_WHY="$PICK_WHY${first:+; $first}"
    build() {
      local t0=$SECONDS
      echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
      echo "decision: built here (${PICK_WHY:-no prebuilt wheel})"
      local pip_log=$LOG/.pip_install.log
      if $PY -m pip --version >/dev/null 2>&1; then
        $PY -m pip install --no-deps --no-build-isolation -v -e . 2>&1 | tee "$pip_log"
        [ "${PIPESTATUS[0]}" = 0 ] && { echo "took: $((SECONDS - t0))"; return 0; }
        # a failed compile would only fail again: fall back only when pip stopped before compiling
        # (an externally managed python, no editable support, ...)
        if grep -q 'nvcc' "$pip_log"; then return 1; fi
        echo "pip install -e . stopped before compiling"
      else
        echo "pip is absent"
      fi
      # build in place, and map sharpfused.kernels to kernels/ as the editable install would
      echo "fallback: setup.py build_ext --inplace"
      $PY setup.py build_ext --inplace || return 1
      [ -e sharpfused/kernels ] || ln -s ../kernels sharpfused/kernels
      echo "took: $((SECONDS - t0))"
    }
    export -f build
    run_stage build "$(cap_for "$CAP_BUILD" 220)" build_note build
  fi
fi
if [ "${BUILD_STAGE_ONLY:-0}" = 1 ]; then  # tests/test_cuda_wheel.py: the build stage's row alone
  printf '%s\n' "${rows[@]}"
  exit 0
fi
import_check() {
  $PY - "$DRY" <<'PY'
import sys
import torch
import sharpfused
from sharpfused import ops
dev = torch.device("cpu" if sys.argv[1] == "1" else "cuda")
print("sharpfused", sharpfused.__version__, "from", sharpfused.__file__)
why = {b: ops.unavailable_reason(b, dev) for b in ops.BACKENDS}
for b, w in why.items():
    print(f"backend {b} on {dev}: {'available' if w is None else w}")
print(f"summary: backends on {dev}: " + ", ".join(b for b, w in why.items() if w is None)
      + "".join(f"; not {b}: {w[:70]}" for b, w in why.items() if w is not None))
if sys.argv[1] != "1":
    import sharpfused._C as C
    print("sharpfused._C:", C.__file__)
    assert why["cuda"] is None and why["triton"] is None, why
PY
}
export -f import_check
import_note() {
  if [ "$2" = 0 ]; then
    grep '^summary: ' "$1" | cut -c10-
  else
    echo "$(tail -n 1 "$1" | cut -c1-150) ($1)"
  fi
}
run_stage import 60 import_note import_check

# ------------------------------------------------------------------ (b) the GPU tests
# tests/conftest.py marks a test `gpu` when it is parametrized with a cuda device or carries
# test_cuda_backend.py's `gpu` mark. These files must have GPU tests, and run first in this order
# (the CUDA backend's in its own stage); the other test files follow, for GPU tests added later.
export GPU_FILES="tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_primitives.py
  tests/test_algorithms.py tests/test_bisam_loss.py"
OTHER_FILES=$(for f in tests/test_*.py; do case " $(echo $GPU_FILES) " in *" $f "*) ;; *) echo "$f" ;; esac; done)
export TEST_FILES="$(echo $GPU_FILES $OTHER_FILES)"
# a file that fails to import is reported (an ERROR line) and the others still run
PYTEST_OPTS="-p no:cacheprovider -o addopts= -v -rfEs --continue-on-collection-errors"
PYTEST="gpu_pytest $PYTEST_OPTS"
gpu_pytest() {  # pytest; on a GPU machine a run where no test passed (all skipped) is a failure
  local out=$LOG/.pytest_$BASHPID.out
  $PY -m pytest "$@" 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  if [ "$DRY" = 0 ] && [ "$rc" = 0 ] && ! grep -q ' PASSED' "$out"; then
    echo "no GPU test passed here (all skipped: see the reasons above)"
    rc=3
  fi
  rm -f "$out"
  return "$rc"
}
export -f gpu_pytest
shards() {  # shards NAME "FILES;FILES;..." OPTS...: one pytest per group of files, all at once (each
  # process compiles its Triton kernels one at a time on the host: 16 cores), $LOG/NAME.<i>.log each
  local name=$1 groups=$2 i=0 rc=0 r p g
  shift 2
  local pids=() gs=()
  IFS=';' read -ra gs <<<"$groups"
  for g in "${gs[@]}"; do
    i=$((i + 1))
    gpu_pytest "$@" $g >"$LOG/$name.$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do
    wait "$p"
    r=$?
    [ $r != 0 ] && rc=$r
  done
  for p in $(seq 1 $i); do
    echo "-- $name shard $p: ${gs[$((p - 1))]}"
    tail -n 6 "$LOG/$name.$p.log"
  done
  return $rc
}
export -f shards
if ! has pytest; then
  for s in select tests-cuda tests-gpu; do
    note_row $s skip 0 "pytest is not installed for $PY (no registry here): GPU tests not run; exercise, memcheck and bench still check the kernels"
  done
else
  select_tests() {  # collect the GPU tests; in a dry run as a GPU machine would (torch.cuda.is_available patched)
    $PY - "$DRY" "$(echo $GPU_FILES | wc -w)" $TEST_FILES <<'PY'
import collections, sys
import torch
if sys.argv[1] == "1":
    torch.cuda.is_available = lambda: True  # the fixtures then choose as on a GPU machine
import pytest

class Count:
    def __init__(self):
        self.ids = []
    def pytest_collection_finish(self, session):
        self.ids = [i.nodeid for i in session.items]

c = Count()
files, required = sys.argv[3:], sys.argv[3 : 3 + int(sys.argv[2])]
rc = pytest.main(["-p", "no:cacheprovider", "-o", "addopts=", "-q", "--collect-only", "--continue-on-collection-errors", "-m", "gpu",
                  *files], plugins=[c])
per = collections.Counter(i.split("::")[0] for i in c.ids)
shown = [f for f in files if f in required or per.get(f)]
for f in shown:
    print(f"gpu tests {f}: {per.get(f, 0)}")
print(f"gpu tests total: {len(c.ids)}: " + ", ".join(f"{f.split('test_', 1)[-1][:-3]} {per.get(f, 0)}" for f in shown))
missing = [f for f in required if not per.get(f)]
if missing:
    print("no GPU test in", ", ".join(missing))
sys.exit(1 if rc not in (0,) or missing else 0)
PY
  }
  export -f select_tests
  select_note() { echo "$(grep '^gpu tests total' "$1" | cut -c11-)$([ "$2" = 0 ] || echo " ($1)")$([ $DRY = 1 ] && echo ' (as collected on a GPU machine)')"; }
  run_stage select 60 select_note select_tests
  CAP_TESTS_CUDA=${CAP_TESTS_CUDA:-120}
  CAP_TESTS_GPU=${CAP_TESTS_GPU:-180}
  run_stage tests-cuda "$(cap_for "$CAP_TESTS_CUDA" 170)" pytest_note $PYTEST -m gpu tests/test_cuda_backend.py
  if [ $DRY = 1 ]; then
    # no GPU: the Triton tests under the interpreter, a few of each kind (the whole file is CI's job)
    run_stage tests-gpu "$(cap_for "$CAP_TESTS_GPU" 110)" pytest_note shards tests-gpu \
      "tests/test_triton_backend.py;tests/test_bisam_loss.py" $PYTEST_OPTS \
      -k "test_restore_bit_exact or test_one_launch_per_group or test_public_function_uses_kernel"
  else
    # two processes: the Triton backend's own tests, and every backend's tests on CUDA tensors
    REST=${TEST_FILES#tests/test_cuda_backend.py tests/test_triton_backend.py}
    run_stage tests-gpu "$(cap_for "$CAP_TESTS_GPU" 110)" pytest_note shards tests-gpu \
      "tests/test_triton_backend.py tests/test_bisam_loss.py;${REST/tests\/test_bisam_loss.py/}" $PYTEST_OPTS -m gpu
  fi
fi

# ------------------------------------------------------------------ (c) compute-sanitizer
cat >"$LOG/exercise.py" <<'PY'
# every kernel once on small lists (odd sizes, an empty tensor, multi-chunk, misaligned views,
# tables of 125 tensors), each result checked against the torch backend: a kernel check that
# needs no pytest, and the workload of compute-sanitizer
import os, sys
import torch
from sharpfused import ops
from sharpfused.backends import torch_ops as T
dev = torch.device(os.environ.get("EXERCISE_DEVICE", "cuda"))
mods = []
if ops.unavailable_reason("cuda", dev) is None:
    from sharpfused.backends import cuda_ops
    mods.append(("cuda", cuda_ops, (torch.float32, torch.bfloat16, torch.float16, torch.float64)))
if ops.unavailable_reason("triton", dev) is None:
    import sharpfused.kernels as K
    mods.append(("triton", K, (torch.float32, torch.bfloat16, torch.float16)))
assert mods, f"no fused backend runs on {dev}: " + "; ".join(f"{b}: {ops.unavailable_reason(b, dev)}" for b in ("cuda", "triton"))
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
bad = []

def flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for y in x for t in flat(y)] if isinstance(x, (list, tuple)) else []

def same(what, a, b):
    """Relative error over each result list as a whole (one tensor of a few elements can show a large
    relative error in bf16 where one path rounds per op and the other once); non-finite must match."""
    num = den = 0.0
    for x, y in zip(flat(a), flat(b)):
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        if not bool((torch.isfinite(y) | (x.isnan() == y.isnan())).all()):
            bad.append(f"{name} {what} {str(dtype)[6:]}: non-finite values differ")
            return
        x, y = x[torch.isfinite(y)], y[torch.isfinite(y)]
        num, den = num + float((x - y).square().sum()), den + float(y.square().sum())
    err = (num / max(den, 1e-300)) ** 0.5
    if err > TOL[dtype]:
        bad.append(f"{name} {what} {str(dtype)[6:]}: rel err {err:.2e}")

cl = lambda xs: [x.clone() for x in xs]  # noqa: E731
torch.manual_seed(0)
for name, C, dtypes in mods:
    for dtype in dtypes:
        sizes = [1, 7, 0, 4099, 65536 + 3] + [5] * 120
        r = lambda: [torch.randn(n, device=dev, dtype=dtype) for n in sizes]  # noqa: E731
        w, g, b, m, v, s = r(), r(), r(), r(), r(), r()
        v = [x.abs() for x in v]
        buf = torch.randn(10001, device=dev, dtype=dtype)
        odd = [buf[1:4000], buf[4001:10001]]  # 4-byte (fp32) or 2-byte (bf16) misaligned views
        keep = [x > 0 for x in s]
        mask = [x.to(dtype) for x in keep] if name == "cuda" else keep  # the mask each backend takes
        scale = torch.tensor(0.1, device=dev)
        same("sq_norm", C.sq_norm(w, g, 0.01, True), T.sq_norm(w, g, 0.01, True))
        same("sq_norm odd", C.sq_norm(odd, None, 0.0, False), T.sq_norm(odd, None, 0.0, False))
        x1, b1, x2, b2 = cl(w), cl(b), cl(w), cl(b)
        C.perturb_(x1, g, b1, scale, 0.01, mask); T.perturb_(x2, g, b2, scale, 0.01, keep)
        same("perturb_", [x1, b1], [x2, b2])
        o1, o2 = cl(odd), cl(odd)
        C.perturb_(o1, cl(odd), None, 0.1, None, None); T.perturb_(o2, cl(odd), None, 0.1, None, None)
        same("perturb_ odd", o1, o2)
        x1 = cl(w); C.restore_(x1, b); same("restore_", x1, b)
        same("dot_norms", C.dot_norms(w, g), T.dot_norms(w, g))
        g1, g2 = cl(g), cl(g)
        C.combine_(g1, s, 0.5, torch.tensor(0.5, device=dev)); T.combine_(g2, s, 0.5, torch.tensor(0.5, device=dev))
        same("combine_", g1, g2)
        x1, m1, x2, m2 = cl(w), cl(m), cl(w), cl(m)
        C.restore_sgd_(x1, b, g, m1, 0.1, 0.9, 0.0, 0.01, True, False)
        T.restore_sgd_(x2, b, g, m2, 0.1, 0.9, 0.0, 0.01, True, False)
        same("restore_sgd_", [x1, m1], [x2, m2])
        x1, m1, v1, x2, m2, v2 = cl(w), cl(m), cl(v), cl(w), cl(m), cl(v)
        C.restore_adamw_(x1, b, g, m1, v1, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        T.restore_adamw_(x2, b, g, m2, v2, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        same("restore_adamw_", [x1, m1, v1], [x2, m2, v2])
    print(f"exercised every {name} kernel on {dev}: {', '.join(str(d)[6:] for d in dtypes)}")
if dev.type == "cuda":
    torch.cuda.synchronize()
for line in bad:
    print("MISMATCH", line)
print(f"{len(bad)} mismatches against the torch backend")
sys.exit(1 if bad else 0)
PY
CAP_MEMCHECK=${CAP_MEMCHECK:-90}
exercise_note() {
  if ! grep -q 'mismatches against' "$1"; then  # it stopped before the checks
    echo "$(tail -n 1 "$1" | cut -c1-150) ($1)"
    return
  fi
  echo "$(grep '^exercised' "$1" | cut -c11- | paste -sd ';' - | cut -c1-110); $(grep 'mismatches against' "$1")"
  grep '^MISMATCH' "$1" | head -n 5 | cut -c10-
  grep -m 1 'ERROR SUMMARY' "$1" | sed 's/^=* *//'
  [ "$2" = 0 ] || echo "($1)"
}
# first plainly (a kernel check without pytest; it also fills Triton's cache for memcheck), then
# under the sanitizer
if [ $DRY = 1 ]; then
  EXERCISE_DEVICE=cpu run_stage exercise 60 exercise_note $PY "$LOG/exercise.py"
else
  run_stage exercise "$(cap_for 60 110)" exercise_note $PY "$LOG/exercise.py"
fi
SAN_WHY=""  # why compute-sanitizer cannot run here (empty: it can)
if [ $DRY = 1 ]; then
  SAN_WHY="dry run: no GPU for compute-sanitizer (the exercise script ran on CPU, Triton interpreted)"
elif [ -z "$SANITIZER" ]; then
  SAN_WHY="compute-sanitizer not found on PATH or in /usr/local/cuda*/bin"
elif ! "$SANITIZER" --version >/dev/null 2>&1; then
  SAN_WHY="$SANITIZER --version fails here: $("$SANITIZER" --version 2>&1 | tail -n 1 | cut -c1-80)"
fi
if [ -n "$SAN_WHY" ]; then
  note_row memcheck skip 0 "$SAN_WHY"
else
  # without the caching allocator every tensor is its own allocation: an access past a tensor's
  # end is then outside any allocation, which memcheck reports
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage memcheck "$(cap_for "$CAP_MEMCHECK" 90)" exercise_note \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes application-only $PY "$LOG/exercise.py"
fi

# ------------------------------------------------------------------ (d) the benchmark subset
CAP_BENCH=${CAP_BENCH:-240}
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  note_row bench skip 0 "SKIP_BENCH=1"
else
  if [ $DRY = 1 ]; then
    RESULTS=$LOG/results  # CPU figures of a dry run stay out of bench/results
    BENCH_ARGS="--device cpu --scale 64 --repeat 2 --results $RESULTS"
  else
    RESULTS=$ROOT/bench/results
    BENCH_ARGS="--repeat 30 --results $RESULTS"
  fi
  export RESULTS BENCH_ARGS
  bench() {  # one process per (set, dtype), most important first: a cut-short run keeps the rest
    local set dt rc=0
    for set in gpt2-small resnet50; do
      for dt in float32 bfloat16; do
        local left=$((BENCH_END - $(date +%s)))  # a child bash: its own $SECONDS starts at 0
        if [ $left -lt 15 ]; then
          echo "bench $set $dt: not run, the bench's time is spent"
          rc=124
          continue
        fi
        echo "bench $set $dt (cap ${left}s)"
        # GPT-2 small also with fresh gradients every step and every launch table rebuilt
        timeout --kill-after=5 $left $PY bench/run.py --sets $set --dtypes $dt --no-plot $BENCH_ARGS \
          $([ $set = gpt2-small ] && echo --fresh-grads) || rc=$?
      done
    done
    if has matplotlib; then
      for csv in $(find "$RESULTS" -maxdepth 1 -name '*.csv' ! -name '*.old.csv' -newer "$LOG/.bench_start"); do
        $PY bench/plot.py "$csv" && echo "plot: ${csv%.csv}_*.png"
      done
    else
      echo "matplotlib absent: no PNG (the CSV is the record)"
    fi
    return $rc
  }
  bench_note() { $PY - "$1" <<'PY'
import sys
# key ratios of this run, from its markdown rows: the best sharpfused SAM step against the eager
# baselines, and the primitive furthest below the copy bandwidth on its best sharpfused backend
best, prim, fresh = {}, {}, {}
for ln in open(sys.argv[1]):
    c = [x.strip() for x in ln.strip().strip("|").split("|")]
    if len(c) < 15 or c[0] not in ("step", "primitive") or not c[6].startswith("sharpfused"):
        continue
    key = (c[2].split("/")[0], c[3])
    if c[0] == "step" and c[1] == "SAM":
        loop, fe = (float(x.rstrip("x")) if x != "-" else 0.0 for x in (c[10], c[11]))
        if loop > best.get(key, (0, 0, ""))[0]:
            best[key] = (loop, fe, c[6])
    elif c[0] == "step" and c[1] == "SAM fresh-grads":
        fresh[key] = max(fresh.get(key, 0.0), float(c[10].rstrip("x")) if c[10] != "-" else 0.0)
    elif c[0] == "primitive":
        frac = float(c[-1].rstrip("%"))
        ops_ = prim.setdefault(key, {})
        if frac > ops_.get(c[1], (-1.0, ""))[0]:
            ops_[c[1]] = (frac, c[6])
worst = {k: min((f, f"{op}, {p}") for op, (f, p) in v.items()) for k, v in prim.items()}
parts = []
for key in sorted(set(best) | set(worst), key=lambda k: (k[0] != "gpt2-small", k[0], k[1] != "float32")):
    s = f"{key[0]} {key[1]}:"
    if key in best:
        s += f" SAM {best[key][0]:.1f}x loop {best[key][1]:.1f}x foreach ({best[key][2]});"
    if key in fresh:
        s += f" fresh grads {fresh[key]:.1f}x loop;"
    if key in worst:
        s += f" primitives >= {worst[key][0]:.0f}% of copy BW (lowest: {worst[key][1]})"
    parts.append(s)
print("\n".join(parts) or "no rows")
PY
  }
  export -f bench
  BENCH_CAP=$(cap_for "$CAP_BENCH" 5)
  export BENCH_END=$(($(date +%s) + BENCH_CAP))
  mkdir -p "$RESULTS"
  touch "$LOG/.bench_start"
  run_stage bench $((BENCH_CAP + 20)) bench_note bench
  if [ $DRY = 0 ]; then  # this run's CSV and PNGs beside the logs
    find "$RESULTS" -maxdepth 1 -type f -newer "$LOG/.bench_start" -exec cp {} "$LOG/" \;
  fi
fi

# ------------------------------------------------------------------ racecheck, with what is left
# (shared-memory races of the reductions); after the bench, which must not be crowded out
LEFT=$((TOTAL_S - (SECONDS - T_START) - 5))
if [ -n "$SAN_WHY" ]; then
  note_row racecheck skip 0 "$SAN_WHY"
elif [ $LEFT -lt 30 ]; then
  note_row racecheck skip 0 "${LEFT}s of the ${TOTAL_S}s left: too little for racecheck"
else
  [ $LEFT -gt 120 ] && LEFT=120
  run_stage racecheck $LEFT exercise_note \
    "$SANITIZER" --tool racecheck --error-exitcode 1 --target-processes application-only $PY "$LOG/exercise.py"
fi

# ------------------------------------------------------------------ the table
echo
echo "gpu_check$([ $DRY = 1 ] && echo ' --dry-run'): $((SECONDS - T_START))s of ${TOTAL_S}s; logs and results in $LOG"
echo "stage        status      sec  note"
printf '%s\n' "${rows[@]}"
for r in "${rows[@]}"; do
  case $r in *" FAIL"* | *" TIMEOUT"*) exit 1 ;; esac
done
exit 0
