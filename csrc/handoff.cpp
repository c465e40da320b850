// DLPack capsule -> TensorView, and the device guard (contract: pyseqkern/tensor.h).
#include "handoff.h"

#include <string>

#include "pyseqkern/dlpack_abi.h"
#ifdef PSK_WITH_CUDA
#include "pyseqkern/cuda_info.h"
#endif

namespace py = pybind11;

namespace pyseqkern {
namespace {

std::string prefix(const char* arg) { return std::string("pyseqkern: argument '") + arg + "': "; }

bool map_dtype(const dl::DataType& t, DType* out) {
  if (t.lanes != 1) return false;
  switch (t.code) {
    case dl::kFloat:
      if (t.bits == 32) { *out = DType::Float32; return true; }
      if (t.bits == 64) { *out = DType::Float64; return true; }
      if (t.bits == 16) { *out = DType::Float16; return true; }
      return false;
    case dl::kBfloat:
      if (t.bits == 16) { *out = DType::BFloat16; return true; }
      return false;
    case dl::kInt:
      if (t.bits == 32) { *out = DType::Int32; return true; }
      if (t.bits == 64) { *out = DType::Int64; return true; }
      return false;
    case dl::kBool:
      if (t.bits == 8) { *out = DType::Bool; return true; }
      return false;
    case dl::kUInt:  // older DLPack writers spell bool as uint8
    default:
      return false;
  }
}

// torch's name for a DLPack dtype (lanes 1), for messages.
std::string dl_dtype_name(const dl::DataType& t) {
  const char* kind = t.code == dl::kInt ? "int" : t.code == dl::kUInt ? "uint" : t.code == dl::kFloat ? "float" :
                     t.code == dl::kBfloat ? "bfloat" : t.code == dl::kComplex ? "complex" :
                     t.code == dl::kBool ? "bool" : nullptr;
  std::string name = kind ? kind + std::to_string(t.bits)
                          : "DLPack code " + std::to_string(t.code) + " of " + std::to_string(t.bits) + " bits";
  if (t.lanes != 1) name += " x " + std::to_string(t.lanes) + " lanes";
  return name;
}

}  // namespace

TensorView view_of(py::handle capsule, const char* arg) {
  auto* mt = static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (mt == nullptr) {
    PyErr_Clear();
    throw py::type_error(prefix(arg) + "expected an unconsumed DLPack capsule (torch.utils.dlpack.to_dlpack)");
  }
  const dl::Tensor& t = mt->dl_tensor;
  TensorView v;
  if (!map_dtype(t.dtype, &v.dtype))
    throw py::type_error(prefix(arg) + "unsupported dtype " + dl_dtype_name(t.dtype) +
                         " (pyseqkern takes float32, float64, float16, bfloat16, int32, int64 and bool tensors)");
  if (t.device.device_type == dl::kCPU) {
    v.device = DeviceKind::Cpu;
  } else if (t.device.device_type == dl::kCUDA) {
    v.device = DeviceKind::Cuda;
  } else {
    throw py::value_error(prefix(arg) + "expected a CPU or CUDA tensor (DLPack device type " +
                          std::to_string(t.device.device_type) + ")");
  }
  v.device_index = t.device.device_id;
  if (t.ndim < 0 || t.ndim > kMaxDims)
    throw py::value_error(prefix(arg) + "expected at most " + std::to_string(kMaxDims) + " dimensions, got " +
                          std::to_string(t.ndim));
  v.ndim = t.ndim;
  int64_t compact = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.sizes[i] = t.shape[i];
    v.strides[i] = t.strides ? t.strides[i] : compact;
    compact *= t.shape[i];
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  return v;
}

void require_same_device(const TensorView* const* views, const char* const* names, int count) {
  for (int i = 1; i < count; ++i) {
    if (views[i]->device != views[0]->device || views[i]->device_index != views[0]->device_index) {
      auto where = [](const TensorView& v) {
        return v.device == DeviceKind::Cpu ? std::string("cpu") : "cuda:" + std::to_string(v.device_index);
      };
      throw py::value_error(std::string("pyseqkern: argument '") + names[i] + "' is on " + where(*views[i]) +
                            " but '" + names[0] + "' is on " + where(*views[0]) + "; all must share a device");
    }
  }
}

void throw_no_cuda(const char* what) {
  throw py::value_error(std::string("pyseqkern: ") + what +
                        " got CUDA tensors, but this build of pyseqkern has no CUDA kernels "
                        "(see pyseqkern.backend_info()['cuda'])");
}

#ifdef PSK_WITH_CUDA
CudaDeviceGuard::CudaDeviceGuard(const TensorView& v) {
  if (v.device != DeviceKind::Cuda) return;
  const int current = cuda_current_device();
  if (current != v.device_index) {
    cuda_set_device(v.device_index);
    previous_ = current;
  }
}
CudaDeviceGuard::~CudaDeviceGuard() {
  if (previous_ >= 0) {
    try { cuda_set_device(previous_); } catch (...) {}
  }
}
#else
CudaDeviceGuard::CudaDeviceGuard(const TensorView&) {}
CudaDeviceGuard::~CudaDeviceGuard() {}
#endif

}  // namespace pyseqkern
