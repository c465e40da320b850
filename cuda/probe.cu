// Machine probes on CUDA (contract: pyseqkern/probe.h), plus the device report behind backend_info().
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.h"
#include "pyseqkern/cuda_info.h"
#include "pyseqkern/probe.h"

namespace pyseqkern {
namespace {

// ---- traits --------------------------------------------------------------------------------------
constexpr int kTriadThreads = 256;
constexpr int kPeakChains = 8;  // independent FMA chains per thread: covers the FMA pipe latency

// ---- kernels -------------------------------------------------------------------------------------
// 16-byte vectors of T: a bandwidth probe must issue the widest loads the memory system serves.
template <typename T> struct Vec16;
template <> struct Vec16<float> { using type = float4; static constexpr int width = 4; };
template <> struct Vec16<double> { using type = double2; static constexpr int width = 2; };

template <typename V, typename T>
__device__ __forceinline__ V triad_vec(const V& a, const V& b, T alpha);
template <>
__device__ __forceinline__ float4 triad_vec(const float4& a, const float4& b, float s) {
  return make_float4(a.x + s * b.x, a.y + s * b.y, a.z + s * b.z, a.w + s * b.w);
}
template <>
__device__ __forceinline__ double2 triad_vec(const double2& a, const double2& b, double s) {
  return make_double2(a.x + s * b.x, a.y + s * b.y);
}

// Elements [0, vec_count * width) go as 16-byte vectors when every pointer is 16-byte aligned
// (vec_count = 0 otherwise), the rest one by one. Each element is read before it is written by the same
// thread, so in-place (out == a or out == b) is safe.
template <typename T>
__global__ void triad_kernel(TriadParams p, int64_t vec_count) {
  using V = typename Vec16<T>::type;
  constexpr int W = Vec16<T>::width;
  T* out = static_cast<T*>(p.out);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T alpha = static_cast<T>(p.alpha);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < vec_count; i += stride)
    reinterpret_cast<V*>(out)[i] = triad_vec(reinterpret_cast<const V*>(a)[i], reinterpret_cast<const V*>(b)[i], alpha);
  for (int64_t i = vec_count * W + first; i < p.n; i += stride) out[i] = a[i] + alpha * b[i];
}

__global__ void peak_fma_kernel(PeakFmaParams p) {
  float acc[kPeakChains];
  const float m = 0.999999f, c = 1e-3f * (1 + (threadIdx.x & 7));
#pragma unroll
  for (int j = 0; j < kPeakChains; ++j) acc[j] = c * (j + 1);
  for (int64_t it = 0; it < p.iters; ++it) {
#pragma unroll
    for (int j = 0; j < kPeakChains; ++j) acc[j] = fmaf(acc[j], m, c);
  }
  float s = 0;
#pragma unroll
  for (int j = 0; j < kPeakChains; ++j) s += acc[j];
  p.sink[int64_t(blockIdx.x) * blockDim.x + threadIdx.x] = s;
}

__global__ void noop_kernel() {}

}  // namespace

// ---- launchers / entries -------------------------------------------------------------------------
template <typename T>
void launch_triad(const TriadParams& p, cudaStream_t s, const char* name) {
  constexpr int W = Vec16<T>::width;
  const bool aligned = ((reinterpret_cast<uintptr_t>(p.out) | reinterpret_cast<uintptr_t>(p.a) |
                         reinterpret_cast<uintptr_t>(p.b)) & 15) == 0;
  const int64_t vec_count = aligned ? p.n / W : 0;
  const int64_t work = vec_count > 0 ? vec_count : p.n;
  const int64_t blocks64 = (work + kTriadThreads - 1) / kTriadThreads;
  const int blocks = static_cast<int>(blocks64 < 65536 * 8 ? blocks64 : 65536 * 8);
  triad_kernel<T><<<blocks, kTriadThreads, 0, s>>>(p, vec_count);
  cuda_check(cudaGetLastError(), name);
}

void triad_cuda(const TriadParams& p, void* stream) {
  if (p.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::Float64)
    launch_triad<double>(p, s, "kernel triad_kernel<double>");
  else
    launch_triad<float>(p, s, "kernel triad_kernel<float>");
}

double peak_fma_cuda(const PeakFmaParams& p, int threads_per_block, void* stream) {
  peak_fma_kernel<<<p.num_threads, threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(p);
  PSK_CHECK_LAUNCH("peak_fma_kernel");
  return 2.0 * kPeakChains * double(p.iters) * double(p.num_threads) * threads_per_block;
}

void noop_cuda(void* stream) {
  noop_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>();
  PSK_CHECK_LAUNCH("noop_kernel");
}

CudaReport cuda_report() {
  CudaReport r;
  int v = 0;
  cudaRuntimeGetVersion(&v);
  r.runtime_version = v;
  cudaDriverGetVersion(&v);
  r.driver_version = v;
  cudaError_t err = cudaGetDeviceCount(&r.device_count);
  if (err != cudaSuccess) {
    r.device_count = 0;
    r.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return r;
  }
  for (int d = 0; d < r.device_count; ++d) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    r.devices.push_back({prop.name, prop.major, prop.minor, prop.multiProcessorCount});
  }
  return r;
}

int cuda_current_device() {
  int d = -1;
  cuda_check(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}

void cuda_set_device(int device) { cuda_check(cudaSetDevice(device), "cudaSetDevice"); }

}  // namespace pyseqkern
