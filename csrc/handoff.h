// Reading DLPack capsules into TensorViews at the Python boundary (contract: pyseqkern/tensor.h).
#pragma once
#include <pybind11/pybind11.h>

#include "pyseqkern/tensor.h"

namespace pyseqkern {

// Reads `capsule` (from torch.utils.dlpack.to_dlpack) without consuming it. `arg` names the argument
// in error messages. Throws pybind11::type_error / value_error for anything the core cannot take.
TensorView view_of(pybind11::handle capsule, const char* arg);

// Throws pybind11::value_error unless every view lies on the same device as the first.
void require_same_device(const TensorView* const* views, const char* const* names, int count);

// Makes the views' CUDA device current for the guard's lifetime (no-op for CPU views).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const TensorView& v);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

[[noreturn]] void throw_no_cuda(const char* what);

}  // namespace pyseqkern
