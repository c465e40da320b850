// Recurrent CUDA kernels: sizes and weight packing (contract: rnn_cuda.h). The packed layout is four
// plain row-major copies in the accumulation type, so each block copies its rows with coalesced loads.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.h"
#include "rnn_common.cuh"
#include "static_switch.h"

namespace pyseqkern {
namespace rnn_cuda {
namespace {

// ---- traits ---------------------------------------------------------------------------------------
constexpr int kPackThreads = 256;

struct PackLayout {
  int64_t fmain, fproj, bmain, bproj, total;
};
PackLayout pack_layout(const RnnShape& s) {
  const int64_t G = rnn_gate_count(s.mode), H = s.hidden, K = s.state(), P = s.proj;
  PackLayout l;
  l.fmain = 0;
  l.fproj = l.fmain + G * H * K;
  l.bmain = l.fproj + P * H;
  l.bproj = l.bmain + K * G * H;
  l.total = l.bproj + H * P;
  return l;
}

// ---- kernels --------------------------------------------------------------------------------------
// out[r][c] = src[r * ld + c] (rows x cols) and out_t[c][r] = the same value, both in A.
template <typename T, typename A>
__global__ void rnn_pack_kernel(const T* __restrict__ src, int64_t ld, int64_t rows, int64_t cols,
                                A* __restrict__ out, A* __restrict__ out_t) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    const A v = static_cast<A>(to_acc(src[r * ld + c]));
    out[i] = v;
    out_t[c * rows + r] = v;
  }
}

// ---- launchers ------------------------------------------------------------------------------------
template <typename T>
void pack_typed(const RnnPackParams& p, cudaStream_t st) {
  using A = typename AccOf<T>::type;
  const PackLayout l = pack_layout(p.shape);
  A* out = static_cast<A*>(p.out);
  const int64_t G = rnn_gate_count(p.shape.mode), H = p.shape.hidden, K = p.shape.state(), P = p.shape.proj;
  auto grid = [](int64_t n) {
    const int64_t b = (n + kPackThreads - 1) / kPackThreads;
    return static_cast<unsigned>(b < 4096 ? (b < 1 ? 1 : b) : 4096);
  };
  rnn_pack_kernel<T, A><<<grid(G * H * K), kPackThreads, 0, st>>>(static_cast<const T*>(p.w_hh), p.ld_w_hh, G * H,
                                                                   K, out + l.fmain, out + l.bmain);
  PSK_CHECK_LAUNCH("rnn_pack_kernel (w_hh)");
  if (P > 0) {
    rnn_pack_kernel<T, A><<<grid(P * H), kPackThreads, 0, st>>>(static_cast<const T*>(p.w_hr), p.ld_w_hr, P, H,
                                                                 out + l.fproj, out + l.bproj);
    PSK_CHECK_LAUNCH("rnn_pack_kernel (w_hr)");
  }
}

}  // namespace
}  // namespace rnn_cuda

// ---- entries --------------------------------------------------------------------------------------
RnnSizes rnn_sizes_cuda(const RnnShape& shape, int64_t batch, bool /*is_double*/) {
  using namespace rnn_cuda;
  const int64_t G = rnn_gate_count(shape.mode), H = shape.hidden, K = shape.state(), P = shape.proj;
  RnnSizes r{};  // (ride_ring 0: the CPU kernels' one-row ride only)
  r.lanes = 1;
  r.packed_numel = pack_layout(shape).total;
  const int64_t fwd = fwd_workspace(batch, H, K).total, bwd = bwd_workspace(batch, H, K, G).total;
  r.workspace_numel = fwd > bwd ? fwd : bwd;
  // The reserve layout of rnn.h, identical to the CPU kernels'.
  switch (shape.mode) {
    case RnnMode::Lstm: r.reserve_hprev = 5 * H + (P > 0 ? H : 0); r.reserve_cols = r.reserve_hprev + K; break;
    case RnnMode::Gru: r.reserve_hprev = 4 * H; r.reserve_cols = 5 * H; break;
    default: r.reserve_hprev = H; r.reserve_cols = 2 * H; break;
  }
  return r;
}

void rnn_pack_cuda(const RnnPackParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  PSK_RNN_DTYPE_SWITCH(p.dtype, T, [&] { rnn_cuda::pack_typed<T>(p, st); });
}

}  // namespace pyseqkern
