// Machine probes: the ceilings every benchmark reports against, and the handoff smoke test.
//
// peak_fma: each of num_threads threads runs `iters` rounds of independent FMA chains held in
//   registers (acc = acc * m + c); returns the float32 FLOPs done (2 per lane per chain per round).
//   sink [num_threads] float32, written with one finite value per thread so the work cannot be elided.
// peak_bf16: the same for the level's bfloat16 arithmetic, FLOPs done returned: AMX tile products
//   (amx: 4 independent C tiles, 16 x 16 x 32 multiply-adds each), vdpbf16ps chains (avx512bf16), and
//   on other levels, which compute bfloat16 layers in float32, peak_fma itself.
// triad (STREAM): out[i] = a[i] + alpha * b[i], i < n.
//   out, a, b [n] contiguous, same dtype (float32 or float64), same device. out must not overlap a or
//   b unless it is exactly equal to one of them (in-place is allowed: each element is read before it
//   is written by the same thread). Deterministic: elementwise, no reductions.
// CPU entries take num_threads (>= 1); CUDA entries take the caller's stream as a void* (cudaStream_t)
// and must be called with the tensors' device current. Nothing allocates; CUDA entries never sync.
#pragma once
#include <cstdint>

#include "pyseqkern/cpu_dispatch.h"
#include "pyseqkern/tensor.h"

namespace pyseqkern {

struct TriadParams {
  void* out;
  const void* a;
  const void* b;
  double alpha;
  int64_t n;
  DType dtype;
  int num_threads;  // CPU only
};

struct PeakFmaParams {
  float* sink;       // [num_threads] on CPU, [blocks * threads_per_block] on CUDA
  int64_t iters;
  int num_threads;   // CPU threads, or CUDA blocks
};

struct ProbeCpuKernels {
  double (*peak_fma)(const PeakFmaParams& p);
  double (*peak_bf16)(const PeakFmaParams& p);
  void (*triad)(const TriadParams& p);
  int vector_bits;  // register width the level's kernels were compiled for
};
PSK_DECLARE_CPU_KERNELS(ProbeCpuKernels, probe)

// CUDA (compiled only with PSK_WITH_CUDA). Each throws std::runtime_error naming the kernel on a
// launch error.
double peak_fma_cuda(const PeakFmaParams& p, int threads_per_block, void* stream);
void triad_cuda(const TriadParams& p, void* stream);
void noop_cuda(void* stream);  // an empty kernel: the launch cost floor for handoff benchmarks

}  // namespace pyseqkern
