// Emulator stand-in for the toolkit's cuda_runtime_api.h: error codes, streams, launch errors.
// Nothing here talks to a GPU; "device" memory is host memory. See emu.h.
#pragma once

#include "emu_defs.h"

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;

// The toolkit version the emulator stands in for (>= 12.1: kernels may take up to 32764 bytes of
// parameters). Whether the emulated driver and device take them is set by emu::set_device.
#define CUDART_VERSION 12080

enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

typedef struct CUstream_st* cudaStream_t;

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// The error of the last launch (an invalid configuration), reset by the call.
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaDeviceSynchronize();  // launches are synchronous: always cudaSuccess
// One emulated device, 0; its driver version and compute capability are emu::set_device's.
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device);
