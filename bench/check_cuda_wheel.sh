#!/usr/bin/env bash
# Check a CUDA wheel of sharpfused without a GPU (bench/build_cuda_wheel.sh calls it after a build):
#   metadata  the version's local label names torch and CUDA (+torch2.11.cu130) and the wheel
#             requires that torch minor (Requires-Dist: torch==2.11.*)
#   archs     sharpfused/_C*.so holds SASS for every arch of TORCH_CUDA_ARCH_LIST and PTX for
#             the last one (cuobjdump --list-elf / --list-ptx)
#   links     readelf -d: NEEDED only torch's libraries, the CUDA runtime and the C/C++ runtime,
#             no RPATH/RUNPATH and no NEEDED path from the build machine; ldd with torch's
#             library folders resolves everything outside the CUDA toolkit
#   import    a venv over the build venv (same torch), the wheel installed, CUDA_VISIBLE_DEVICES="":
#             import sharpfused and sharpfused._C from the installed wheel; backend="cuda" on CPU
#             tensors raises ValueError saying it needs CUDA tensors
#   size      the wheel's size, under 64 MiB (what the device tool carries with the working tree)
#   --tests   also: the CPU test subset (tests/test_compile.py, tests/test_sam.py) with this torch
#             and the pure package (editable, SHARPFUSED_SKIP_CUDA=1) in a venv over the build venv;
#             a failure there is reported and fails the script only with WHEEL_TESTS_STRICT=1 (it
#             tells how far below the tested torch the package works, not whether the wheel is good)
#
#   PYTHON=<build venv>/bin/python bash bench/check_cuda_wheel.sh bench/wheels/<wheel> [--tests]
# Env: TORCH_CUDA_ARCH_LIST [8.0;9.0+PTX], CUOBJDUMP [the build venv's, then PATH's],
# WHEEL_TESTS_VENV [<build venv>-tests], WHEEL_TEST_FILES ["tests/test_compile.py tests/test_sam.py"].
# One "check_cuda_wheel: ok|FAIL <what>" line per check; exits non-zero when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEEL=$(readlink -f "${1:?usage: check_cuda_wheel.sh WHEEL [--tests]}")
RUN_TESTS=0
[ "${2:-}" = "--tests" ] && RUN_TESTS=1
PY=${PYTHON:-python3}
ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export PIP_DISABLE_PIP_VERSION_CHECK=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "check_cuda_wheel: ok    $*"; }
bad() { echo "check_cuda_wheel: FAIL  $*"; fail=1; }

# pins of the test subset's packages (the project's CI versions where they exist for this python)
cat >"$tmp/constraints.txt" <<'EOF'
pytest==9.2.0
numpy==2.4.6
scikit-learn==1.9.1
scipy==1.17.1
tqdm==4.70.1
setuptools==81.0.0
EOF

name=$(basename "$WHEEL")
size=$(stat -c %s "$WHEEL")
mib=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }')
if [ "$size" -lt $((64 * 1048576)) ]; then ok "size: $name is $mib MiB ($size bytes; the device tool carries 64 MiB)"
else bad "size: $name is $mib MiB, over the device tool's 64 MiB"; fi

# ------------------------------------------------------------------ metadata
"$PY" - "$WHEEL" >"$tmp/meta" 2>&1 <<'PY'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
text = z.read(meta).decode()
version = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
reqs = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
torch_reqs = [r for r in reqs if re.match(r"torch\b", r)]
label = re.fullmatch(r"[^+]+\+torch(\d+\.\d+)\.cu(\d+)", version)
sos = [n for n in z.namelist() if re.fullmatch(r"sharpfused/_C\..*\.so", n)]
print(f"version {version}, requires {', '.join(torch_reqs) or 'no torch'}; extension {', '.join(sos) or 'none'}")
if not label:
    sys.exit("the version has no +torchX.Y.cuNNN label")
if torch_reqs != [f"torch=={label.group(1)}.*"]:
    sys.exit(f"the torch requirement {torch_reqs} is not torch=={label.group(1)}.*")
if len(sos) != 1:
    sys.exit(f"expected one sharpfused/_C*.so, found {sos}")
PY
if [ $? = 0 ]; then ok "metadata: $(tail -n 1 "$tmp/meta")"; else bad "metadata: $(tr '\n' ' ' <"$tmp/meta")"; fi

site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')  # the build venv's (torch)

# ------------------------------------------------------------------ the extension's archs
mkdir -p "$tmp/x"
(cd "$tmp/x" && "$PY" -m zipfile -e "$WHEEL" .) || bad "unzip $WHEEL"
SO=$(ls "$tmp"/x/sharpfused/_C.*.so 2>/dev/null | head -n 1)
if [ -z "$SO" ]; then
  bad "no sharpfused/_C*.so in the wheel"
else
  CUOBJDUMP=${CUOBJDUMP:-$(ls "$site"/nvidia/cu*/bin/cuobjdump "$site"/nvidia/cuda_cuobjdump/bin/cuobjdump 2>/dev/null | head -n 1)}
  CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
  if [ -z "$CUOBJDUMP" ]; then
    bad "archs: no cuobjdump (pip install nvidia-cuda-cuobjdump, or set CUOBJDUMP)"
  else
    elf=$("$CUOBJDUMP" --list-elf "$SO" 2>&1 | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ')
    ptx=$("$CUOBJDUMP" --list-ptx "$SO" 2>&1 | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ')
    want_elf="" want_ptx=""
    IFS=';' read -ra archs <<<"${ARCHS// /;}"
    for a in "${archs[@]}"; do
      [ -z "$a" ] && continue
      n=${a%+PTX}
      want_elf+="sm_${n//./} "
      [ "$a" != "$n" ] && want_ptx+="sm_${n//./} "
    done
    miss=""
    for s in $want_elf; do case " $elf " in *" $s "*) ;; *) miss+="SASS $s " ;; esac; done
    for s in $want_ptx; do case " $ptx " in *" $s "*) ;; *) miss+="PTX $s " ;; esac; done
    if [ -z "$miss" ]; then ok "archs: SASS ${elf}and PTX ${ptx}for TORCH_CUDA_ARCH_LIST=$ARCHS ($(basename "$CUOBJDUMP") $("$CUOBJDUMP" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
    else bad "archs: missing ${miss}(SASS: ${elf:-none}; PTX: ${ptx:-none}; wanted $ARCHS)"; fi
  fi

  # ---------------------------------------------------------------- links
  dyn=$(readelf -d "$SO")
  needed=$(sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' <<<"$dyn" | tr '\n' ' ')
  rpath=$(grep -E '\((RPATH|RUNPATH)\)' <<<"$dyn" | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')
  odd=""
  for l in $needed; do
    case "$l" in
      */*) odd+="$l (a path) " ;;
      libc10.so | libc10_cuda.so | libtorch.so | libtorch_cpu.so | libtorch_cuda.so | libtorch_python.so) ;;
      libcudart.so.* | libstdc++.so.* | libgcc_s.so.* | libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*) ;;
      *) odd+="$l " ;;
    esac
  done
  abs_rpath=""
  for r in ${rpath//:/ }; do case "$r" in '$ORIGIN'*) ;; *) abs_rpath+="$r " ;; esac; done
  if [ -z "$odd" ] && [ -z "$abs_rpath" ]; then
    ok "links: NEEDED ${needed}; RPATH/RUNPATH ${rpath:-none}"
  else
    bad "links: unexpected NEEDED ${odd:-none}; build-machine RPATH/RUNPATH ${abs_rpath:-none} (NEEDED: $needed)"
  fi
  # resolve as torch does at import: its lib/ and the nvidia wheels' lib/ folders, no toolkit
  libdirs=$(ls -d "$site"/torch/lib "$site"/nvidia/*/lib "$site"/nvidia/cu*/lib 2>/dev/null | tr '\n' ':')
  LD_LIBRARY_PATH=$libdirs ldd "$SO" >"$tmp/ldd" 2>&1
  unresolved=$(grep 'not found' "$tmp/ldd" | awk '{print $1}' | tr '\n' ' ')
  from_toolkit=$(grep -E '=> /usr/local/cuda|=> .*/cuda-[0-9]' "$tmp/ldd" | awk '{print $1}' | tr '\n' ' ')
  cudart=$(grep -o 'libcudart[^ ]* => [^ ]*' "$tmp/ldd" | sed "s#$site/##")
  if [ -z "$unresolved" ] && [ -z "$from_toolkit" ]; then
    ok "ldd: every library resolves from torch's wheels or the system ($cudart)"
  else
    bad "ldd: not found ${unresolved:-none}; from the build machine's toolkit ${from_toolkit:-none}"
  fi
fi

# ------------------------------------------------------------------ import in a CPU-only process
base=$("$PY" -c 'import sys; print(sys.base_prefix)')
basepy=$base/bin/python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ -x "$basepy" ] || basepy=$base/bin/python3
overlay_venv() {  # overlay_venv DIR: a venv whose packages come first, then the build venv's (torch)
  [ -x "$1/bin/python" ] || "$basepy" -m venv "$1" || return 1
  local vsite
  vsite=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" >"$vsite/build-venv-site.pth"
}
if overlay_venv "$tmp/v"; then
  "$tmp/v/bin/python" -m pip install -q --no-deps --no-index "$WHEEL" >"$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log"; bad "pip install --no-deps --no-index $name"; }
  (cd "$tmp" && CUDA_VISIBLE_DEVICES="" "$tmp/v/bin/python" - >"$tmp/import.log" 2>&1 <<'PY'
import sys
import warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
import sharpfused
import sharpfused._C as C
from sharpfused import ops

assert not torch.cuda.is_available(), "this check must run with no CUDA device"
where = sharpfused.__file__
assert "/v/" in where and "/v/" in C.__file__, f"imported {where}, {C.__file__}: not the installed wheel"
print(f"import: sharpfused {sharpfused.__version__}, sharpfused._C from {C.__file__.split('site-packages/')[-1]}, "
      f"torch {torch.__version__}, no CUDA device")
assert ops.unavailable_reason("cuda", torch.device("cuda")) is None, ops.unavailable_reason("cuda", torch.device("cuda"))
w = torch.nn.Parameter(torch.randn(8))
w.grad = torch.randn(8)
try:
    opt = sharpfused.SAM([w], torch.optim.SGD, lr=0.1, backend="cuda")
    opt.first_step(zero_grad=True)
except ValueError as exc:
    msg = str(exc)
else:
    sys.exit("backend='cuda' on CPU tensors did not raise")
assert "CUDA tensors" in msg, msg
print(f"cpu tensors: ValueError: {msg}")
PY
  )
  if [ $? = 0 ]; then
    ok "$(grep '^import: ' "$tmp/import.log")"
    ok "backend=\"cuda\" on CPU tensors: $(grep '^cpu tensors: ' "$tmp/import.log" | cut -c14-)"
  else
    bad "import in a CPU-only process: $(tail -n 3 "$tmp/import.log" | tr '\n' ' ')"
  fi
else
  bad "could not make a venv with $basepy"
fi

# ------------------------------------------------------------------ the CPU test subset with this torch
if [ $RUN_TESTS = 1 ]; then
  TV=${WHEEL_TESTS_VENV:-$(dirname "$(dirname "$PY")")-tests}
  TESTS=${WHEEL_TEST_FILES:-tests/test_compile.py tests/test_sam.py}
  if overlay_venv "$TV" && PIP_CONSTRAINT=$tmp/constraints.txt "$TV/bin/python" -m pip install -q pytest numpy scikit-learn tqdm \
      >"$tmp/pip_tests.log" 2>&1 && SHARPFUSED_SKIP_CUDA=1 PIP_CONSTRAINT=$tmp/constraints.txt "$TV/bin/python" -m pip install \
      -q --no-deps --no-build-isolation -e "$ROOT" >>"$tmp/pip_tests.log" 2>&1; then
    tv=$("$TV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)
    # shellcheck disable=SC2086
    (cd "$ROOT" && CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 "$TV/bin/python" -m pytest -p no:cacheprovider -o addopts= \
      -q -rfE $TESTS) >"$tmp/tests.log" 2>&1
    trc=$?
    summary=$(tail -n 1 "$tmp/tests.log")
    grep -E '^(FAILED|ERROR) ' "$tmp/tests.log" | head -n 40
    if [ $trc = 0 ]; then ok "tests with torch $tv (CPU, pure package): $TESTS: $summary"
    elif [ "${WHEEL_TESTS_STRICT:-0}" = 1 ]; then bad "tests with torch $tv (CPU, pure package): $TESTS: $summary (rc $trc)"
    else
      echo "check_cuda_wheel: FAIL  tests with torch $tv (CPU, pure package): $TESTS: $summary (rc $trc;" \
        "reported, not counted: WHEEL_TESTS_STRICT=1 counts it)"
    fi
    cp "$tmp/tests.log" "${WHEEL%.whl}.tests.log" 2>/dev/null && echo "check_cuda_wheel: test log ${WHEEL%.whl}.tests.log"
  else
    cat "$tmp/pip_tests.log"; bad "could not set up the test venv $TV"
  fi
fi
[ $fail = 0 ] && echo "check_cuda_wheel: all checks passed for $name" || echo "check_cuda_wheel: some checks FAILED for $name"
exit $fail
