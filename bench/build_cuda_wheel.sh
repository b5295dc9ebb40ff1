#!/usr/bin/env bash
# Build a CUDA wheel of sharpfused (sharpfused._C compiled) for the lent GPU machine, without a GPU,
# and check it (bench/check_cuda_wheel.sh). The GPU machine has python 3.12 and torch 2.11 (the
# cu130 build, PyPI's default Linux wheel) and no package registry; bench/gpu_check.sh installs a
# wheel from bench/wheels/ that matches it instead of compiling there.
#
#   bash bench/build_cuda_wheel.sh            # torch 2.11.0, python 3.12, sm_80 + sm_90 + PTX
#
# Env (defaults in brackets):
#   TORCH_VERSION        torch to build against [2.11.0]; its CUDA is whatever that wheel has
#   TORCH_INDEX_URL      an index for another CUDA build of torch (e.g. PyTorch's cu126 index; it must
#                        also serve torch's nvidia-* dependencies) [pip's default index]
#   WHEEL_PY_VERSION     python to build for [3.12]; WHEEL_PYTHON: that interpreter's path [found
#                        on PATH, then ~/.pyenv/versions; else python3, with a warning]
#   TORCH_CUDA_ARCH_LIST architectures [8.0;9.0+PTX]: SASS for A100 and H100/H200, PTX for newer
#   WHEEL_VENV           the build venv, kept for the next build [/tmp/sharpfused_wheel_venv/torch<V>-py<V>]
#   WHEEL_DIR            where the wheel goes [bench/wheels] (ignored by git; the device tool's
#                        `carry` takes it to the GPU machine), with a sidecar <wheel>.txt
#   WHEEL_SRC            the commit to build, from a clean `git worktree` [HEAD]; "." builds the
#                        working tree as it is (the sidecar then says "dirty" when csrc/ etc. differ)
#   MAX_JOBS             compile jobs [CPUs, bounded by available memory / 4 GiB]
#   WHEEL_TESTS=1        also run the CPU test subset with this torch (bench/check_cuda_wheel.sh --tests;
#                        its failures are reported, and fail the script only with WHEEL_TESTS_STRICT=1)
# pip runs with this script's own constraints (PIP_CONSTRAINT is replaced: CI's pins torch 2.13).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
PY_VERSION=${WHEEL_PY_VERSION:-3.12}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
WHEEL_DIR=${WHEEL_DIR:-$ROOT/bench/wheels}
VENV=${WHEEL_VENV:-/tmp/sharpfused_wheel_venv/torch$TORCH_VERSION-py$PY_VERSION}
SRC_REF=${WHEEL_SRC:-HEAD}
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset SHARPFUSED_SKIP_CUDA  # .ci/run exports it for its CPU steps; it would make this a pure wheel
T0=$SECONDS

tmp=$(mktemp -d)
worktree=""
cleanup() {
  [ -n "$worktree" ] && git -C "$ROOT" worktree remove --force "$worktree" >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT

# Pins for every pip call of the build (the build tools; torch at the version asked for).
cat >"$tmp/constraints.txt" <<EOF
torch==$TORCH_VERSION
setuptools==81.0.0
wheel==0.45.1
ninja==1.13.0
nvidia-cuda-cuobjdump==13.2.51
EOF
export PIP_CONSTRAINT=$tmp/constraints.txt

# ------------------------------------------------------------------ the interpreter
find_python() {
  local c v
  for c in ${WHEEL_PYTHON:-} "python$PY_VERSION" "$HOME"/.pyenv/versions/"$PY_VERSION"*/bin/"python$PY_VERSION" \
      /usr/local/bin/"python$PY_VERSION"; do
    v=$("$c" -c 'import sys, venv; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    [ "$v" = "$PY_VERSION" ] && { command -v "$c"; return 0; }
  done
  return 1
}
if ! BASE_PY=$(find_python); then
  BASE_PY=$(command -v python3)
  echo "build_cuda_wheel: WARNING: no python$PY_VERSION here (found: $(ls /usr/bin/python3* 2>/dev/null | tr '\n' ' '))"
  echo "build_cuda_wheel: WARNING: building with $BASE_PY ($("$BASE_PY" -V)): the wheel is not for python $PY_VERSION" \
    "and bench/pick_wheel.py will not pick it on a machine whose python is $PY_VERSION"
fi
echo "build_cuda_wheel: python $BASE_PY ($("$BASE_PY" -V 2>&1)), torch $TORCH_VERSION, archs $TORCH_CUDA_ARCH_LIST"

# ------------------------------------------------------------------ the build venv (kept between builds)
VPY=$VENV/bin/python
have=$("$VPY" -c 'import sys, torch; print("%d.%d" % sys.version_info[:2], torch.__version__.split("+")[0])' 2>/dev/null || true)
want_py=$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have" != "$want_py $TORCH_VERSION" ]; then
  echo "build_cuda_wheel: creating $VENV (torch $TORCH_VERSION: a download of several GB)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$BASE_PY" -m venv "$VENV"
  t=$SECONDS
  "$VPY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  echo "build_cuda_wheel: torch installed in $((SECONDS - t)) s"
fi
"$VPY" -m pip install -q setuptools wheel ninja nvidia-cuda-cuobjdump
TORCH_INFO=$("$VPY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null | tail -n 1) \
  || { echo "build_cuda_wheel: FAIL: torch does not import in $VENV" >&2; exit 1; }
read -r TORCH_FULL TORCH_CUDA <<<"$TORCH_INFO"
if [ "$TORCH_CUDA" = None ]; then
  echo "build_cuda_wheel: FAIL: torch $TORCH_FULL in $VENV is a CPU build (no CUDA)" >&2
  exit 1
fi

# ------------------------------------------------------------------ the toolkit
# the toolkit's root: CUDA_HOME, else the one holding nvcc (PATH's nvcc may be a wrapper), else /usr/local/cuda
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  n=$(command -v nvcc || true)
  [ -n "$n" ] && [ -f "$(dirname "$(dirname "$(readlink -f "$n")")")/include/cuda_runtime.h" ] \
    && CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$n")")")
fi
export CUDA_HOME
NVCC=$CUDA_HOME/bin/nvcc
[ -x "$NVCC" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] \
  || { echo "build_cuda_wheel: FAIL: no CUDA toolkit at $CUDA_HOME (set CUDA_HOME)" >&2; exit 1; }
export PATH=$CUDA_HOME/bin:$VENV/bin:$PATH
NVCC_VER=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
if [ "${NVCC_VER%%.*}" != "${TORCH_CUDA%%.*}" ]; then
  echo "build_cuda_wheel: FAIL: nvcc $NVCC_VER and torch's CUDA $TORCH_CUDA differ in major version" >&2
  exit 1
fi
if [ -z "${MAX_JOBS:-}" ]; then
  avail_gib=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
  MAX_JOBS=$(nproc)
  [ $((avail_gib / 4)) -lt "$MAX_JOBS" ] && MAX_JOBS=$((avail_gib / 4))
  [ "$MAX_JOBS" -lt 1 ] && MAX_JOBS=1
fi
export MAX_JOBS

# ------------------------------------------------------------------ the sources
if [ "$SRC_REF" = "." ]; then
  SRC=$ROOT
  COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain -- csrc setup.py sharpfused kernels pyproject.toml 2>/dev/null)" ]; then
    COMMIT="$COMMIT-dirty"
  fi
else
  COMMIT=$(git rev-parse "$SRC_REF^{commit}")
  worktree=$tmp/src
  git worktree add --detach "$worktree" "$COMMIT" >/dev/null 2>&1
  SRC=$worktree
fi
echo "build_cuda_wheel: sources from $([ "$SRC_REF" = . ] && echo 'the working tree' || echo "a clean worktree"), commit $COMMIT"

# ------------------------------------------------------------------ build
echo "build_cuda_wheel: nvcc $NVCC_VER ($CUDA_HOME), MAX_JOBS=$MAX_JOBS, log $WHEEL_DIR/build.log"
mkdir -p "$WHEEL_DIR"
t=$SECONDS
if ! (cd "$SRC" && rm -rf build && SHARPFUSED_FORCE_CUDA=1 "$VPY" -m pip wheel -v --no-deps --no-build-isolation \
    -w "$tmp/dist" . >"$WHEEL_DIR/build.log" 2>&1); then
  grep -E 'error|Error' "$WHEEL_DIR/build.log" | head -n 30
  tail -n 20 "$WHEEL_DIR/build.log"
  echo "build_cuda_wheel: FAIL: the build failed (log $WHEEL_DIR/build.log)" >&2
  exit 1
fi
BUILD_S=$((SECONDS - t))
built=$(ls "$tmp"/dist/sharpfused-*.whl)
name=$(basename "$built")
mv -f "$built" "$WHEEL_DIR/$name"
WHEEL=$WHEEL_DIR/$name
cat >"$WHEEL.txt" <<EOF
wheel: $name
commit: $COMMIT
torch: $TORCH_FULL
cuda: $TORCH_CUDA
nvcc: $NVCC_VER
python: $("$VPY" -c 'import sys; print(sys.version.split()[0])')
arch_list: $TORCH_CUDA_ARCH_LIST
max_jobs: $MAX_JOBS
build_seconds: $BUILD_S
built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) CPUs, no GPU
EOF
echo "build_cuda_wheel: built $name in $BUILD_S s ($(du -h "$WHEEL" | cut -f1))"

# ------------------------------------------------------------------ check
check_args=()
[ "${WHEEL_TESTS:-0}" = 1 ] && check_args+=(--tests)
PYTHON=$VPY bash "$ROOT/bench/check_cuda_wheel.sh" "$WHEEL" "${check_args[@]}"
echo "build_cuda_wheel: done in $((SECONDS - T0)) s: $WHEEL"
