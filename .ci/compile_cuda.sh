#!/usr/bin/env bash
# Compile the CUDA extension's sources, one file at a time: every csrc/*.cu with nvcc for sm_80
# and sm_90, and csrc/bindings.cpp with g++ against the installed (possibly CPU-only) torch
# headers; then run the kernels on the host under a CUDA emulator (csrc/tests/emu, no GPU).
# One line per file or test; exits non-zero if any fails.
# Env: PYTHON (default python3), NVCC (default nvcc), CXX (default g++).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found ($NVCC)" >&2
  exit 1
fi
cuda_home=$(dirname "$(dirname "$(command -v "$NVCC")")")
cuda_inc=${CUDA_HOME:-$cuda_home}/include
[ -f "$cuda_inc/cuda_runtime_api.h" ] || cuda_inc=/usr/local/cuda/include

fail=0
for f in csrc/*.cu; do
  start=$SECONDS
  if "$NVCC" -std=c++17 -O3 -Xcompiler -Wall \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -c "$f" -o "$tmp/$(basename "$f").o" 2>"$tmp/log"; then
    echo "ok    $f  (nvcc sm_80+sm_90, $((SECONDS - start)) s)"
  else
    echo "FAIL  $f"; sed 's/^/      /' "$tmp/log" | head -40; fail=1
  fi
done

# The table packing is host code: build and run its test (no GPU needed).
start=$SECONDS
if "$NVCC" -std=c++17 -O1 -Icsrc csrc/tests/pack_tables_test.cu -o "$tmp/pack_tables_test" 2>"$tmp/log" \
    && "$tmp/pack_tables_test" >"$tmp/out" 2>&1; then
  echo "ok    csrc/tests/pack_tables_test.cu  (built and run on the host, $((SECONDS - start)) s)"
else
  echo "FAIL  csrc/tests/pack_tables_test.cu"; cat "$tmp/log" "$tmp/out" 2>/dev/null | grep -v ' ok$' | sed 's/^/      /' | head -40; fail=1
fi

# The kernels themselves, executed on the host: csrc/*.cu built with g++ under the CUDA emulator
# of csrc/tests/emu and checked launcher by launcher against a long-double reference (no GPU
# needed). fp_check first compares the emulator's half/bfloat16 conversions with the toolkit's.
start=$SECONDS
fp_inc=""
[ -f "$cuda_inc/cuda_fp16.h" ] && fp_inc=$cuda_inc
if CXX="$CXX" CUDA_INC="$fp_inc" bash csrc/tests/emu/build.sh "$tmp/emu" >"$tmp/log" 2>&1 \
    && { [ -z "$fp_inc" ] || "$tmp/emu/fp_check" >"$tmp/out" 2>&1; } \
    && "$tmp/emu/kernels_emu_test" >>"$tmp/out" 2>&1; then
  echo "ok    csrc/tests/kernels_emu_test.cpp  (every launcher run on the host under csrc/tests/emu," \
    "$(grep -c '^ok ' "$tmp/out") cases, $((SECONDS - start)) s)"
else
  echo "FAIL  csrc/tests/kernels_emu_test.cpp"
  cat "$tmp/log" "$tmp/out" 2>/dev/null | grep -v '^ok ' | sed 's/^/      /' | head -60; fail=1
fi

# A CPU wheel of torch lacks the CUDA build's generated config header: a stub in a temp dir
# stands in for it (only the binding includes torch headers).
mkdir -p "$tmp/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
flags=$("$PYTHON" - <<'PY'
import sysconfig
from torch.utils import cpp_extension as c
import torch
inc = c.include_paths() + [sysconfig.get_paths()["include"]]
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
print(" ".join(f"-I{p}" for p in inc), f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
PY
) || { echo "FAIL  csrc/bindings.cpp (could not ask $PYTHON for torch's include paths)"; exit 1; }
start=$SECONDS
# shellcheck disable=SC2086
if "$CXX" -std=c++17 -O1 -fPIC -Wall -Wno-unused-function -c csrc/bindings.cpp -o "$tmp/bindings.o" \
    -I"$tmp/stub" -Icsrc -I"$cuda_inc" $flags -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    2>"$tmp/log"; then
  echo "ok    csrc/bindings.cpp  ($CXX against torch headers, $((SECONDS - start)) s)"
else
  echo "FAIL  csrc/bindings.cpp"; sed 's/^/      /' "$tmp/log" | head -40; fail=1
fi
exit $fail
