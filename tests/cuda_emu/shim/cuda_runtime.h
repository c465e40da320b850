// Host emulation of the CUDA runtime subset the recurrent kernels use (test harness, not product code).
// Device code compiles as plain C++; emu_rt.cpp runs each block's threads as fibers.
#pragma once
#include <math.h>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
// CUDA's 16-byte vector types (vector_types.h), as the kernels' staging loads them.
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
extern unsigned char* psk_cur_smem;  // the running block's dynamic shared memory (build.py's edit)

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorCooperativeLaunchTooLarge = 720,
                   cudaErrorLaunchFailure = 719, cudaErrorNotPermitted = 800, cudaErrorNotSupported = 801,
                   cudaErrorStreamCaptureInvalidated = 901 };
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
                      cudaDevAttrCooperativeLaunch = 95 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaLaunchAttributeID { cudaLaunchAttributeCooperative = 2 };
struct cudaLaunchAttributeValue { int cooperative; };
struct cudaLaunchAttribute { cudaLaunchAttributeID id; cudaLaunchAttributeValue val; };
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
const char* cudaGetErrorName(cudaError_t);
const char* cudaGetErrorString(cudaError_t);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int*);
cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int);
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int*, const void*, int, size_t);
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t*, const void*, void**);
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1,
                               cudaStreamCaptureStatusInvalidated = 2 };
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus*);

// ---- device intrinsics -------------------------------------------------------------------------------
void psk_syncthreads();
void psk_shfl_exchange(void* slot_value, size_t bytes, int lane_mask, unsigned mask);
inline void __syncthreads() { psk_syncthreads(); }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
// 16-byte loads fault on a GPU unless 16-byte aligned; x86 would not notice, so the emulator stops here.
void psk_misaligned(const void* p, size_t bytes);
inline float4 __ldcg(const float4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) psk_misaligned(p, 16);
  return *p;
}
inline double2 __ldcg(const double2* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) psk_misaligned(p, 16);
  return *p;
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  psk_shfl_exchange(&v, sizeof(T), lane_mask, mask);
  return v;
}

// ---- kernels: registration by host-stub address, and the <<<>>> replacement (build.py's edits) ----------
// What the last cudaLaunchKernelExC ran, for the driver's coverage report (plan fields read from any
// kernel argument that has a `plan` member).
struct PskEmuPlanNote {
  bool seen;
  bool persistent;
  int blocks, ktile, etiles;
};
void psk_emu_note_plan(const PskEmuPlanNote& n);
void psk_emu_register(const void* fn, std::function<void(void**)> thunk);
void psk_emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename X, typename = void> struct psk_has_plan : std::false_type {};
template <typename X> struct psk_has_plan<X, std::void_t<decltype(std::declval<X>().plan.ktile)>> : std::true_type {};
template <typename X> void psk_note_arg(const X& x) {
  if constexpr (psk_has_plan<X>::value)
    psk_emu_note_plan(PskEmuPlanNote{true, x.plan.persistent, x.plan.blocks, x.plan.ktile, x.plan.etiles});
}
template <typename... P, size_t... I>
void psk_emu_invoke(void (*fn)(P...), void** args, std::index_sequence<I...>) {
  (psk_note_arg(*static_cast<const std::decay_t<P>*>(args[I])), ...);
  fn(*static_cast<std::decay_t<P>*>(args[I])...);
}
// Replaces reinterpret_cast<const void*>(&kernel<...>): registers a thunk that unpacks cudaLaunchKernelExC's
// argument array into the kernel's parameters, and returns the same address.
template <typename... P> const void* psk_emu_kernel(void (*fn)(P...)) {
  const void* key = reinterpret_cast<const void*>(fn);
  psk_emu_register(key, [fn](void** args) { psk_emu_invoke(fn, args, std::index_sequence_for<P...>{}); });
  return key;
}

// ---- emulator control (driver.cpp) -------------------------------------------------------------------
// Emulated devices (emu_rt.cpp): 0 large (132 SMs, 227 KB opt-in), 1 small (4 SMs, 16 KB), 2 tiny (7 SMs,
// 6 KB), 3 large without cooperative launch, 4 two SMs (227 KB); 5 and 6 large ones that refuse cooperative
// launches although the attribute and the occupancy query allow them: 5 as too large (MPS or green-context
// limits), 6 as not supported (a virtualised runtime).
struct PskEmuStats {
  int coop_launches, plain_launches, refused;
  PskEmuPlanNote plan;  // of the last launch that ran
};
void psk_emu_set_device(int dev);
void psk_emu_seed(uint64_t seed);
void psk_emu_set_skew(bool skew);  // one block at a time runs ahead to its next grid barrier
// Starts (or ends, with None) an emulated graph capture on every stream; with `refusal_invalidates` a
// refused cooperative launch invalidates it, as an error inside a capture does on a GPU.
void psk_emu_set_capture(cudaStreamCaptureStatus status, bool refusal_invalidates);
void psk_emu_reset_stats();
PskEmuStats psk_emu_stats();
