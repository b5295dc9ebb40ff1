// CUDA function and variable qualifiers as plain host C++ (the emulator's common prelude).
#pragma once

#include <cstdint>

#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif
#ifndef __constant__
#define __constant__
#endif
// Blocks run one after another on one host thread, so one static copy per instantiation is the
// block's shared memory. It starts zeroed (CUDA leaves it undefined): reads of shared memory that
// no thread wrote are not caught.
#ifndef __shared__
#define __shared__ static
#endif
