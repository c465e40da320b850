// The tensor handoff between Python and the core: the contract every kernel family relies on.
//
// Python hands each tensor over as a DLPack capsule (torch.utils.dlpack.to_dlpack, about 0.4 us),
// plus, for CUDA, the integer handle of torch's current stream. bindings.cpp reads the capsule into
// a TensorView without taking ownership: the capsule (and the tensor it keeps alive) outlives the
// call because the Python caller holds it. Nothing here allocates, copies or synchronizes.
//
//   data     element pointer with the byte offset already applied
//   sizes    [ndim] elements per dimension
//   strides  [ndim] in elements (never bytes); a stride may be 0 (broadcast) or anything torch allows
//   dtype    one of DType below; other dtypes are rejected at the boundary with a Python TypeError
//   device   Cpu or Cuda, plus the device index
//
// Kernels take their own params structs built from TensorViews; a view is only valid for the
// duration of the call that received it.
#pragma once
#include <cstdint>

namespace pyseqkern {

constexpr int kMaxDims = 8;

enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int32 = 4, Int64 = 5, Bool = 6 };
enum class DeviceKind : int32_t { Cpu = 0, Cuda = 1 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::Bool: return "bool";
  }
  return "?";
}

inline int dtype_size(DType d) {
  switch (d) {
    case DType::Float64: case DType::Int64: return 8;
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Bool: return 1;
  }
  return 0;
}

struct TensorView {
  void* data = nullptr;
  int32_t ndim = 0;
  DType dtype = DType::Float32;
  DeviceKind device = DeviceKind::Cpu;
  int32_t device_index = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= sizes[i];
    return n;
  }
  // torch's rule: size-1 dimensions may have any stride, and a tensor with no elements is contiguous
  // whatever its strides (torch 2.4's DLPack export gives torch.empty(0, 7) strides (1, 1)).
  bool is_contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (sizes[i] != 1 && strides[i] != expected) return false;
      expected *= sizes[i];
    }
    return true;
  }
};

}  // namespace pyseqkern
