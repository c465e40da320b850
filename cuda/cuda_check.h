// Turning CUDA errors into exceptions that name the kernel; bindings turn those into Python errors.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pyseqkern {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pyseqkern: CUDA error in ") + what + ": " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
}

// After every launch: catches bad configurations and earlier asynchronous faults without a sync.
#define PSK_CHECK_LAUNCH(kernel_name) ::pyseqkern::cuda_check(cudaGetLastError(), "kernel " kernel_name)

}  // namespace pyseqkern
