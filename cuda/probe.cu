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
template <typename T>
__global__ void triad_kernel(TriadParams p) {
  T* out = static_cast<T*>(p.out);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T alpha = static_cast<T>(p.alpha);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
    out[i] = a[i] + alpha * b[i];
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
void triad_cuda(const TriadParams& p, void* stream) {
  if (p.n == 0) return;
  const int64_t blocks64 = (p.n + kTriadThreads - 1) / kTriadThreads;
  const int blocks = static_cast<int>(blocks64 < 65536 * 8 ? blocks64 : 65536 * 8);
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::Float64) {
    triad_kernel<double><<<blocks, kTriadThreads, 0, s>>>(p);
    PSK_CHECK_LAUNCH("triad_kernel<double>");
  } else {
    triad_kernel<float><<<blocks, kTriadThreads, 0, s>>>(p);
    PSK_CHECK_LAUNCH("triad_kernel<float>");
  }
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
