#!/usr/bin/env bash
# Build a pure wheel (SHARPFUSED_SKIP_CUDA=1), install it into a fresh venv, and check that
# it holds the Triton kernels package and the CUDA sources, and that `import sharpfused` works
# with no extension built. The venv sees the CI venv's site-packages (torch) so nothing is
# downloaded. Env: PYTHON (default python3). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Without setuptools in $PYTHON's environment (a fresh Python 3.12 venv has none), let pip
# build in isolation: with SKIP the build needs no torch.
isolation=--no-build-isolation
"$PYTHON" -c 'import setuptools' 2>/dev/null || isolation=
SHARPFUSED_SKIP_CUDA=1 "$PYTHON" -m pip wheel -q --no-deps $isolation -w "$tmp/dist" . >"$tmp/build.log" 2>&1 \
  || { cat "$tmp/build.log"; echo "wheel_check: FAIL building the wheel"; exit 1; }
wheel=$(ls "$tmp"/dist/sharpfused-*.whl)
echo "wheel_check: built $(basename "$wheel")"

"$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["sharpfused/__init__.py", "sharpfused/kernels/__init__.py", "sharpfused/backends/cuda_ops.py",
        "sharpfused/_build.py", "sharpfused/csrc/bindings.cpp", "sharpfused/csrc/multi_tensor.cuh",
        "sharpfused/csrc/sharpfused.h"]
missing = [n for n in need if n not in names]
bad = [n for n in names if n.startswith("kernels/") or n.startswith("csrc/") or n.endswith(".so")]
if missing or bad:
    sys.exit(f"wheel_check: FAIL: missing {missing}, misplaced or unexpected {bad}")
print(f"wheel_check: wheel has {len(names)} files, kernels and csrc inside sharpfused/, no extension")
PY

# A venv on top of the CI interpreter's packages: torch without a download. Its site-packages
# come first, so the installed wheel (not the checkout) is what gets imported.
site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base=$("$PYTHON" -c 'import sys; print(sys.base_prefix)')
"$base/bin/python3" -m venv "$tmp/v" 2>/dev/null || "$PYTHON" -m venv --without-pip "$tmp/v"
vsite=$("$tmp/v/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" >"$vsite/ci-site.pth"  # after the venv's own site-packages on sys.path
"$PYTHON" -m pip --python "$tmp/v/bin/python" install -q --no-deps "$wheel" 2>/dev/null \
  || "$tmp/v/bin/python" -m pip install -q --no-deps "$wheel"
cd "$tmp"  # away from the checkout, so `import sharpfused` cannot pick it up
"$tmp/v/bin/python" - <<'PY'
import sys
import sharpfused
import sharpfused.kernels  # noqa: F401
from sharpfused import ops
import torch

where = sharpfused.__file__
if "/v/" not in where:
    sys.exit(f"wheel_check: FAIL: sharpfused imported from {where}, not from the fresh venv")
why = ops.unavailable_reason("cuda", torch.device("cuda"))
if why is None or "not built" not in why:
    sys.exit(f"wheel_check: FAIL: a pure wheel should report the extension as not built, got {why!r}")
from sharpfused._build import csrc_dir

if not str(csrc_dir()).startswith(where.rsplit("/", 1)[0]):
    sys.exit(f"wheel_check: FAIL: build_extension would use sources at {csrc_dir()}, not the wheel's")
w = torch.randn(1000)
got, ref = ops.sq_norm([w], backend="torch"), (w.double() ** 2).sum()
if abs(got.double() - ref) > 1e-5 * ref:
    sys.exit(f"wheel_check: FAIL: sq_norm {got} != {ref}")
print(f"wheel_check: ok: import sharpfused from {where}; cuda backend: {why}")
PY
