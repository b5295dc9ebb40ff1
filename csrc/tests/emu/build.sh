#!/usr/bin/env bash
# Builds csrc/tests/kernels_emu_test: the kernels of csrc/*.cu compiled with g++ as host C++ under
# the CUDA emulator of this folder (see emu.h), linked with the test. No GPU, no toolkit needed.
#
# usage: csrc/tests/emu/build.sh OUT_DIR      -> OUT_DIR/kernels_emu_test
# Env: CXX (default g++), CUDA_INC (a toolkit include dir: also builds OUT_DIR/fp_check, which
# compares the emulator's half/bfloat16 conversions with the toolkit's own host implementations).
#
# The sources are copied to OUT_DIR/src and their launches `k<<<cfg>>>(args)` rewritten, with sed,
# to `k | ::emu::Launch(cfg) | ::emu::args(args)` (emu.h explains why that is the same launch).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
csrc=$(cd "$here/../.." && pwd)
out=${1:?usage: build.sh OUT_DIR}
CXX=${CXX:-g++}
mkdir -p "$out/src" "$out/obj"

# A `const __grid_constant__ T name` parameter (T one name, no commas) becomes `const T& name`:
# read-only, one copy for the grid (emu.h says why).
for f in "$csrc"/*.cu "$csrc"/*.cuh "$csrc"/*.h; do
  sed -e 's/<<</ | ::emu::Launch(/g' -e 's/>>>(/) | ::emu::args(/g' \
    -e 's/const __grid_constant__ \([A-Za-z_][A-Za-z_0-9:]*\) \([A-Za-z_][A-Za-z_0-9]*\)\([,)]\)/const \1\& \2\3/g' \
    "$f" >"$out/src/$(basename "$f")"
done
if grep -n '<<<\|>>>' "$out"/src/*.cu "$out"/src/*.cuh; then
  echo "build.sh: a launch was not rewritten (one launch per line: k<<<cfg>>>(args))" >&2
  exit 1
fi
if grep -n 'const __grid_constant__' "$out"/src/*.cu "$out"/src/*.cuh; then
  echo "build.sh: a __grid_constant__ parameter was not rewritten (write it as 'const __grid_constant__ T name', T one name)" >&2
  exit 1
fi

# -ffp-contract=off: every operation rounded on its own (host results do not depend on the ISA);
# -fno-strict-aliasing: the kernels move 16-byte packs through reinterpret_cast, as CUDA code does.
flags=(-std=c++17 -O1 -pthread -ffp-contract=off -fno-strict-aliasing -Wall -Wno-unused-function -Wno-unknown-pragmas -fsanitize=alignment -fno-sanitize-recover=alignment -I"$here" -I"$out/src")
pids=()
for f in "$out"/src/*.cu; do
  "$CXX" "${flags[@]}" -x c++ -c "$f" -o "$out/obj/$(basename "$f" .cu).o" &
  pids+=($!)
done
"$CXX" "${flags[@]}" -c "$here/emu.cpp" -o "$out/obj/emu.o" &
pids+=($!)
"$CXX" "${flags[@]}" -c "$csrc/tests/kernels_emu_test.cpp" -o "$out/obj/kernels_emu_test.o" &
pids+=($!)
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ "$fail" = 0 ] || exit 1
"$CXX" -pthread -fsanitize=alignment "$out"/obj/*.o -o "$out/kernels_emu_test"

if [ -n "${CUDA_INC:-}" ]; then
  "$CXX" -std=c++17 -O2 -I"$CUDA_INC" "$here/fp_check.cpp" -o "$out/fp_check"
fi
