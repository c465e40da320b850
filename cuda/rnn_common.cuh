// Building blocks of the recurrent CUDA kernels (contract: rnn_cuda.h): storage/accumulation types,
// activations, the row mapping of rnn.h, the block-level matrix-vector tile and the launch plan that
// forward and backward share. Include only from cuda/rnn_*.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rnn_cuda.h"

namespace pyseqkern {
namespace rnn_cuda {

// ---- traits ---------------------------------------------------------------------------------------
// One block = kThreads threads = kWarps warps. A warp task multiplies kRT weight rows by kNB batch rows
// over one chunk of k: kRT * kNB = 32 accumulators per lane, which a 31-shuffle reduce-scatter turns
// into one finished sum per lane (lane L holds row L / kNB, batch row L % kNB).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRT = 4;
constexpr int kNB = 8;
static_assert(kRT * kNB == 32, "the reduce-scatter hands each lane exactly one (row, batch) sum");
// Blocks per SM: the persistent grid has at most one block per SM (its plan gives each a slice of
// ceil(H / SMs) units or more); the per-step grid has kStepBlocksPerSm per SM. Both kernels declare
// it as __launch_bounds__' minimum, so ptxas has 255 or 128 registers a thread to work with: given
// the thread count alone it kept the per-step kernels to 80 registers and spilled 32-52 bytes
// (nvcc 13, sm_90), the persistent ones to 128 (the float64 backward spilled 32).
constexpr int kStepBlocksPerSm = 2;
template <bool PERSIST> constexpr int kMinBlocksPerSm = PERSIST ? 1 : kStepBlocksPerSm;

// Timing only, never for results: parts of the forward kernel to leave out, so that the time each takes
// is the difference (no GPU profiler places time inside one kernel here; device/METHOD.md). Read from
// PYSEQKERN_CUDA_RNN_SKIP (an integer, 0 when unset) at every forward launch by debug_skip()
// (rnn_plan.cu); bench/gpu_phases.py sets it. Outputs are wrong whenever it is not 0.
enum SkipBits : int {
  kSkipStage = 1,     // block_gemv's staging of the activations into shared memory
  kSkipProduct = 2,   // block_gemv's multiply-adds and reduce-scatter
  kSkipEpilogue = 4,  // the gate math, x_gates reads and stores of each batch tile
  kSkipBarrier = 8,   // the persistent kernel's grid barriers between steps
};
int debug_skip();

enum class Variant : int { Lstm = 0, GruAfter = 1, GruBefore = 2, Rnn = 3 };

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// ---- activations ------------------------------------------------------------------------------------
// float activations are evaluated in double and rounded once (correctly rounded in all but rare cases),
// as the CPU kernels do: the recurrence then adds no more error than torch's own 1-2 ulp functions.
// They are O(G*H*B) per step against O(G*H*K*B) multiply-adds, so double math is cheap here.
__device__ __forceinline__ double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float act_sigmoid(float x) { return static_cast<float>(sigmoid_d(x)); }
__device__ __forceinline__ double act_sigmoid(double x) { return sigmoid_d(x); }
__device__ __forceinline__ float act_tanh(float x) { return static_cast<float>(tanh(static_cast<double>(x))); }
__device__ __forceinline__ double act_tanh(double x) { return tanh(x); }
// relu(NaN) = NaN, as torch: the NaN fails the test.
template <typename A> __device__ __forceinline__ A act_relu(A x) { return x < A(0) ? A(0) : x; }
__device__ __forceinline__ float madd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double madd(double a, double b, double c) { return fma(a, b, c); }

// ---- rows of sequence data (rnn.h) ------------------------------------------------------------------
struct SeqDev {
  int64_t steps, batch;
  const int64_t* time_offsets;  // device memory, or null
  const int64_t* lengths;       // device memory, or null
  int64_t row_stride_t, row_stride_b;
  bool reverse;
};

__device__ __forceinline__ int64_t seq_len(const SeqDev& q, int64_t b) {
  return q.lengths ? __ldg(q.lengths + b) : q.steps;
}
__device__ __forceinline__ int64_t seq_row(const SeqDev& q, int64_t s, int64_t b) {
  const int64_t t = q.reverse ? seq_len(q, b) - 1 - s : s;
  return q.time_offsets ? __ldg(q.time_offsets + t) + b : t * q.row_stride_t + b * q.row_stride_b;
}
// Rows active at step s: lengths are non-increasing, so count those above s by bisection (the same
// number as the host's batch_sizes[s], from which Python derived the lengths).
__device__ __forceinline__ int64_t seq_active(const SeqDev& q, int64_t s) {
  if (!q.lengths) return q.batch;
  int64_t lo = 0, hi = q.batch;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(q.lengths + mid) > s) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ---- the launch plan --------------------------------------------------------------------------------
// Block i owns hidden units [i*units, (i+1)*units) (all gates of them) and state columns
// [i*states, (i+1)*states) (K = P or H; without projection states == units, so a block owns the same
// columns of h as of the gates). Sums over k run in tiles of ktile columns staged in shared memory.
struct RnnPlan {
  bool persistent;
  int blocks;
  int units;      // UB
  int states;     // UK
  int ktile;      // k columns staged per tile (multiple of 32, or the whole K of the longest phase)
  int etiles;     // forward gate phase: batch tiles (kNB rows each) whose products are held at once, so
                  // that one epilogue over all their rows runs with every thread (backward: 1)
  int64_t weight_elems;  // shared-memory weight slice in elements of A (persistent only)
  int64_t smem_bytes;
};

__host__ __device__ inline int pad_rows(int R) { return (R + kRT - 1) / kRT * kRT; }
// k chunks per row group: enough warp tasks for every warp when a phase has few rows.
__host__ __device__ inline int k_chunks(int R) {
  const int rg = (R + kRT - 1) / kRT;
  return (kWarps + rg - 1) / rg;
}
// Partial-sum slots a phase of R rows needs per batch tile: k_chunks(R) * kNB * pad_rows(R) <=
// kNB * max(64, pad_rows(R)).
__host__ __device__ inline int64_t spart_elems(int Rmax) {
  const int rp = pad_rows(Rmax);
  return int64_t(kNB) * (rp > 64 ? rp : 64);
}

// ---- the block matrix-vector tile -------------------------------------------------------------------
// One halving step: lanes with bit HALF set keep the upper HALF values, the others the lower, and each
// adds its partner's copy of the half it keeps. Compile-time HALF: every index is static, so v stays
// in registers (a run-time loop bound had put it in local memory).
template <int HALF, typename A>
__device__ __forceinline__ void reduce_scatter_step(A (&v)[32], int lane) {
  const bool upper = (lane & HALF) != 0;
#pragma unroll
  for (int j = 0; j < HALF; ++j) {
    const A send = upper ? v[j] : v[j + HALF];
    const A keep = upper ? v[j + HALF] : v[j];
    v[j] = keep + __shfl_xor_sync(0xffffffffu, send, HALF);
  }
}

// Lane L of the warp ends with the warp-wide sum of v[L] (31 shuffles). Fixed exchange pattern:
// deterministic.
template <typename A>
__device__ __forceinline__ A warp_reduce_scatter32(A (&v)[32], int lane) {
  reduce_scatter_step<16>(v, lane);
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
  return v[0];
}

// 16-byte vectors of A for staging: four floats or two doubles.
template <typename A> struct Vec16;
template <> struct Vec16<float> {
  using type = float4;
  static constexpr int n = 4;
  __device__ static void store(float* d, const float4& v) { d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w; }
};
template <> struct Vec16<double> {
  using type = double2;
  static constexpr int n = 2;
  __device__ static void store(double* d, const double2& v) { d[0] = v.x; d[1] = v.y; }
};

// sX[b][k] = X[b0 + b][k0 + k] for b < nbt, k < kt, read with ld.global.cg (block_gemv's note). In
// 16-byte loads where X's rows, k0 and kt allow, so that a thread's few loads are all in flight at
// once: the staging is a chain of L2 round trips, not bandwidth (8 x 512 floats: 16 scalar loads a
// thread, or 4 vectors). Stores to shared memory stay scalar (sX need not be 16-byte aligned).
template <typename A>
__device__ __forceinline__ void stage_rows(A* sX, int ktile, const A* X, int64_t ldx, int64_t b0, int nbt,
                                           int64_t k0, int kt) {
  using V = Vec16<A>;
  const int tid = threadIdx.x;
  const A* base = X + b0 * ldx + k0;
  if ((reinterpret_cast<uintptr_t>(base) & 15) == 0 && ldx % V::n == 0 && kt % V::n == 0) {
    const int kv = kt / V::n;
#pragma unroll 4
    for (int idx = tid; idx < nbt * kv; idx += kThreads) {
      const int b = idx / kv, k = (idx - b * kv) * V::n;
      V::store(sX + b * ktile + k, __ldcg(reinterpret_cast<const typename V::type*>(base + b * ldx + k)));
    }
    return;
  }
#pragma unroll 4
  for (int idx = tid; idx < nbt * kt; idx += kThreads) {
    const int b = idx / kt, k = idx - b * kt;
    sX[b * ktile + k] = __ldcg(base + b * ldx + k);
  }
}

// spart[(kc * kNB + b) * pad_rows(R) + r] = sum over the k of chunk kc of W_r[k] * X[b0 + b][k], for
// r < R and b < nbt (<= kNB), accumulated over k tiles in a fixed order. W_r = row_of(r): a pointer to
// element 0 of weight row r (shared or global memory), or null for a zero row. X: rows of an A buffer
// in global memory that other blocks of this grid wrote before the last grid barrier, so it is read
// with ld.global.cg (L2), never through the incoherent L1. sX holds kNB * ktile elements.
// Every thread of the block must call this (it synchronizes); ends synchronized.
template <typename A, typename RowOf>
__device__ __forceinline__ void block_gemv(const RowOf& row_of, int R, int64_t K, const A* X, int64_t ldx,
                                           int64_t b0, int nbt, int ktile, A* sX, A* spart, int skip = 0) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Rp = pad_rows(R), RG = Rp / kRT, KC = k_chunks(R);
  for (int64_t k0 = 0; k0 < K; k0 += ktile) {
    const int kt = static_cast<int>(K - k0 < ktile ? K - k0 : ktile);
    if (!(skip & kSkipStage)) stage_rows(sX, ktile, X, ldx, b0, nbt, k0, kt);
    __syncthreads();
    if (skip & kSkipProduct) continue;  // (spart keeps what it held: timing only)
    const int chunk = ((kt + KC - 1) / KC + 31) / 32 * 32;
    for (int task = warp; task < RG * KC; task += kWarps) {
      const int rg = task / KC, kc = task - rg * KC;
      const int kb = kc * chunk, ke = kb + chunk < kt ? kb + chunk : kt;
      const A* w[kRT];
#pragma unroll
      for (int i = 0; i < kRT; ++i) {
        const int r = rg * kRT + i;
        const A* p = r < R ? row_of(r) : nullptr;
        w[i] = p ? p + k0 : nullptr;
      }
      A acc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) acc[i] = A(0);
      for (int k = kb + lane; k < ke; k += 32) {
        A wv[kRT];
#pragma unroll
        for (int i = 0; i < kRT; ++i) wv[i] = w[i] ? w[i][k] : A(0);
#pragma unroll
        for (int b = 0; b < kNB; ++b) {
          if (b < nbt) {
            const A xv = sX[b * ktile + k];
#pragma unroll
            for (int i = 0; i < kRT; ++i) acc[i * kNB + b] = madd(wv[i], xv, acc[i * kNB + b]);
          }
        }
      }
      const A total = warp_reduce_scatter32(acc, lane);
      const int b = lane % kNB, r = rg * kRT + lane / kNB;
      if (b < nbt) {
        A* dst = spart + (kc * kNB + b) * Rp + r;
        *dst = k0 == 0 ? total : *dst + total;
      }
    }
    __syncthreads();
  }
}

// The finished sum for (row r, batch row b) of the last block_gemv over R rows.
template <typename A>
__device__ __forceinline__ A gemv_result(const A* spart, int R, int r, int b) {
  const int Rp = pad_rows(R), KC = k_chunks(R);
  A s = spart[b * Rp + r];
  for (int kc = 1; kc < KC; ++kc) s += spart[(kc * kNB + b) * Rp + r];
  return s;
}

// ---- host side --------------------------------------------------------------------------------------
// Workspace sections (elements of A), each start rounded up to 32 elements.
inline int64_t ws_round(int64_t n) { return (n + 31) / 32 * 32; }

struct FwdWorkspace {
  int64_t hbuf0, hbuf1, c, m, rh, z, total;
};
inline FwdWorkspace fwd_workspace(int64_t B, int64_t H, int64_t K) {
  FwdWorkspace w;
  w.hbuf0 = 0;
  w.hbuf1 = w.hbuf0 + ws_round(B * K);
  w.c = w.hbuf1 + ws_round(B * K);
  w.m = w.c + ws_round(B * H);
  w.rh = w.m + ws_round(B * H);
  w.z = w.rh + ws_round(B * H);
  w.total = w.z + ws_round(B * H);
  return w;
}

struct BwdWorkspace {
  int64_t dh_rec, dh_aux, dc, dg0, dg1, total;
};
inline BwdWorkspace bwd_workspace(int64_t B, int64_t H, int64_t K, int64_t G) {
  BwdWorkspace w;
  w.dh_rec = 0;
  w.dh_aux = w.dh_rec + ws_round(B * K);
  w.dc = w.dh_aux + ws_round(B * K);
  w.dg0 = w.dc + ws_round(B * H);
  w.dg1 = w.dg0 + ws_round(B * G * H);
  w.total = w.dg1 + ws_round(B * G * H);
  return w;
}

// What a kernel needs from its plan to size shared memory, per candidate unit slice.
struct PlanShape {
  int64_t H, K, P, G, B;
  bool backward;
  int acc_bytes;  // sizeof(A)
};

// Picks the path and slices for `kernel_persistent` / `kernel_step` (cudaLaunch-able symbols) on the
// current device; cached per (device, kernel, shape). Throws std::invalid_argument when Persistent is
// requested and impossible. Defined in rnn_plan.cu.
RnnPlan make_plan(const PlanShape& s, RnnCudaPath request, const void* kernel_persistent, const void* kernel_step);

// The device refused the persistent plan's co-resident grid at launch although the occupancy query
// allowed it (MPS or green-context SM limits, another process's carveout): replaces the cached plan for
// this key by the per-step plan, which needs no co-residency, and returns it.
RnnPlan demote_to_step(const PlanShape& s, RnnCudaPath request, const void* kernel_persistent,
                       const void* kernel_step);

// Launches `kernel` with one argument pointer array: cooperatively (grid barrier allowed) or plainly.
// Returns false only when a cooperative launch is refused as too large (cudaErrorCooperativeLaunchTooLarge,
// error state cleared: nothing ran); any other failure throws, naming the kernel.
bool launch(const void* kernel, const RnnPlan& plan, void** args, bool cooperative, cudaStream_t stream,
            const char* name);

// The launchers' common start: where `plan` chose the persistent path, the cooperative launch of
// `kernel_persistent` (`name`), checked; true once it ran. Where the device refuses its co-resident grid:
// throws std::invalid_argument if the persistent path was requested, else `plan` becomes the per-step plan
// (demote_to_step) and it returns false, as it does where the plan chose the per-step path. `plan` is the
// one `args` carries to the kernels (their argument struct's), so the per-step launches see the demotion.
bool launch_persistent(RnnPlan& plan, const PlanShape& s, RnnCudaPath request, const void* kernel_persistent,
                       const void* kernel_step, void** args, cudaStream_t stream, const char* name);

// One per-step launch of `kernel_step` (a phase of one step), checked: `name` is named in the error.
void launch_step(const void* kernel_step, const RnnPlan& plan, void** args, cudaStream_t stream, const char* name);

// The fields the forward's and the backward's argument structs share, from their rnn.h parameters.
template <typename Args, typename Params>
void set_common_args(Args& a, const Params& p, const RnnSizes& sz) {
  a.q = SeqDev{p.seq.steps, p.seq.batch, p.seq.time_offsets, p.seq.lengths, p.seq.row_stride_t,
               p.seq.row_stride_b, p.seq.reverse};
  a.H = p.shape.hidden;
  a.K = p.shape.state();
  a.P = p.shape.proj;
  a.reserve = p.reserve;
  a.rc = sz.reserve_cols;
  a.hprev_col = sz.reserve_hprev;
  a.packed = p.packed;
  a.workspace = p.workspace;
  a.relu = p.shape.mode == RnnMode::RnnRelu;
}

}  // namespace rnn_cuda
}  // namespace pyseqkern
