#!/usr/bin/env bash
# The GPU machine's Triton (3.6) in CI, no GPU: a second venv with only triton==$TRITON_AOT_VERSION
# installed (--no-deps; torch, numpy and the project come from the main venv through a .pth file
# placed after the venv's own site-packages, so the 3.6 triton is the one imported -- checked);
# then .ci/triton_aot.py compiles every kernel variant for sm_80 and sm_90 and checks 16-byte
# access where aligned, and the interpreter tests of the kernels with data-dependent loops
# (sq_norm, bisam) run under the 3.6 interpreter.
# Env: PYTHON (the main venv's python, default python3), TRITON_AOT_VERSION (default 3.6.0),
# PIP_CONSTRAINT (kept: its triton pin is replaced by this version, every other pin stays),
# TRITON_AOT_JOBS (default: nproc), TRITON_AOT_TESTS=0 to skip the interpreter tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VERSION=${TRITON_AOT_VERSION:-3.6.0}
JOBS=${TRITON_AOT_JOBS:-$(nproc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# the constraints of the main install, triton's pin moved to $VERSION (no CUDA torch can come in)
base=${PIP_CONSTRAINT:-$ROOT/.ci/constraints.txt}
grep -v '^triton\b' "$base" >"$tmp/constraints.txt" || true
echo "triton==$VERSION" >>"$tmp/constraints.txt"
export PIP_CONSTRAINT=$tmp/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1

"$PYTHON" -m venv "$tmp/venv"
VPY=$tmp/venv/bin/python
"$VPY" -m pip install -q --no-deps "triton==$VERSION"
purelib=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" - "$purelib/zz_main_venv.pth" <<'PY'
import sys, sysconfig
dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
# addsitedir: appended after this venv's site-packages, and the main venv's .pth files run
# (the editable install's finder among them)
open(sys.argv[1], "w").write("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
PY
"$VPY" - "$VERSION" <<'PY'
import sys
import torch, triton, sharpfused.kernels
assert triton.__version__ == sys.argv[1], f"imported triton {triton.__version__} from {triton.__file__}"
print(f"triton_aot: triton {triton.__version__} ({triton.__file__}), torch {torch.__version__}, "
      f"kernels from {sharpfused.kernels.__file__}")
PY
echo "triton_aot: venv ready in $((SECONDS - start)) s"

rc=0
t=$SECONDS
"$VPY" .ci/triton_aot.py -j "$JOBS" || rc=$?
echo "triton_aot: compile check rc $rc, $((SECONDS - t)) s"

if [ "${TRITON_AOT_TESTS:-1}" != 0 ]; then
  # the loops with runtime/loaded bounds (sq_norm's per-tensor stage, bisam's sweeps) under the
  # 3.6 interpreter: range() with such a bound fails there, these tests pin the while loops
  t=$SECONDS
  trc=0
  TRITON_INTERPRET=1 "$VPY" -m pytest -p no:cacheprovider tests/test_triton_backend.py tests/test_bisam_loss.py \
    -k "sq_norm or bisam" >"$tmp/tests.out" 2>&1 || trc=$?
  tail -n 1 "$tmp/tests.out"
  if [ "$trc" -ne 0 ]; then
    grep -E '^(FAILED|ERROR)' "$tmp/tests.out" | head -40
    [ "$rc" -eq 0 ] && rc=$trc
  fi
  echo "triton_aot: interpreter tests under triton $VERSION rc $trc, $((SECONDS - t)) s"
fi
echo "triton_aot: total $((SECONDS - start)) s"
exit $rc
