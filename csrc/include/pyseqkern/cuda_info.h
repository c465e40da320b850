// What the CUDA runtime linked into _C sees (compiled only with PSK_WITH_CUDA). Plain C++ types so
// host-only translation units can include it without cuda_runtime.h.
#pragma once
#include <string>
#include <vector>

namespace pyseqkern {

struct CudaDevice {
  std::string name;
  int major, minor;
  int multiprocessors;
};

struct CudaReport {
  int runtime_version = 0;  // e.g. 13000
  int driver_version = 0;   // 0 when no driver is installed
  int device_count = 0;
  std::string error;        // why no device is usable, from the runtime; empty when fine
  std::vector<CudaDevice> devices;
};

CudaReport cuda_report();
int cuda_current_device();
void cuda_set_device(int device);

}  // namespace pyseqkern
