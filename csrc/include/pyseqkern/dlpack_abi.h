// The DLPack ABI (v0.x, the layout torch.utils.dlpack.to_dlpack produces), declared here so the
// core depends on no third-party header. Only the fields the handoff reads are documented; the
// layout must match the standard exactly, and the static_asserts pin it.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyseqkern::dl {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kROCM = 10 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kComplex = 5, kBool = 6 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; may be null, meaning compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

static_assert(sizeof(Device) == 8, "DLDevice layout");
static_assert(sizeof(DataType) == 4, "DLDataType layout");
static_assert(offsetof(Tensor, shape) == 24, "DLTensor layout");
static_assert(sizeof(Tensor) == 48, "DLTensor layout");

}  // namespace pyseqkern::dl
