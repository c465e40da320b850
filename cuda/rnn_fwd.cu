// Recurrent CUDA kernels, forward: the sequence loop of LSTM (with projection), GRU (both variants)
// and RNN tanh/relu (contract: rnn_cuda.h; math and reserve contents as csrc/cpu/rnn_fwd.cpp).
//
// Phases of one step s (every block, its own units; "grid" = all blocks must have finished):
//   gates   pre = W_hh[own gate rows] h_{s-1} for the active rows, then the gate math; writes h_s
//           (LSTM with projection: m_s; GRU reset_before: only r and z, and r * h_{s-1})   -> grid
//   second  LSTM projection: h_s = W_hr[own rows] m_s; GRU reset_before: n and h_s        -> grid
// h is double buffered by step parity in the workspace, so step s+1 writes the buffer step s read only
// after the barrier that ends step s. Persistent: one cooperative launch runs every step, with each
// block's weight rows in shared memory and a grid barrier after each phase. Per-step: one launch per
// phase, weights read from global memory (L2), the launch boundary as the barrier.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "cuda_check.h"
#include "rnn_common.cuh"
#include "static_switch.h"

namespace pyseqkern {
namespace rnn_cuda {
namespace {

namespace cg = cooperative_groups;

// ---- traits ---------------------------------------------------------------------------------------
enum FwdPhase : int { kFwdInit = 0, kFwdGates = 1, kFwdSecond = 2 };

template <Variant V> __host__ __device__ constexpr int fwd_gates() {
  return V == Variant::Lstm ? 4 : (V == Variant::Rnn ? 1 : 3);
}
// Gate rows the first phase multiplies: GRU reset_before leaves n for the second phase.
template <Variant V> __host__ __device__ constexpr int fwd_phase1_gates() {
  return V == Variant::GruBefore ? 2 : fwd_gates<V>();
}

struct FwdArgs {
  SeqDev q;
  int64_t H, K, P;
  const void* x_gates; int64_t ld_gates;
  const void* b_hn;
  const void* h0;
  const void* c0;
  void* y; int64_t ld_y;
  void* h_n;
  void* c_n;
  const void* packed;
  void* reserve; int64_t rc, hprev_col;
  void* workspace;
  FwdWorkspace wl;
  RnnPlan plan;
  bool relu;
  int skip;  // SkipBits (timing only)
};

// ---- kernel -----------------------------------------------------------------------------------------
template <Variant V, typename T, bool PERSIST>
struct FwdBlock {
  using A = typename AccOf<T>::type;
  static constexpr int G = fwd_gates<V>();

  const FwdArgs& a;
  int64_t H, K, P, j0, k0;
  int UB, UK, nu, nk, ktile;
  const A* fmain;
  const A* fproj;
  A* sW;   // [G*UB][K] own gate rows (row g*UB + jj is gate g of unit j0 + jj), zero past H
  A* sWr;  // [UK][H] own projection rows, zero past P
  A* sX;   // [kNB][ktile] staged activations
  A* spart;
  A* hbuf0;  // h double buffer by step parity (two members, not an array: a run-time index into an
  A* hbuf1;  // array would keep this object in local memory)
  A* cst;  // [B][H] LSTM cell state (owner only)
  A* m;    // [B][H] LSTM proj: o * tanh(c), read by every block's projection
  A* rh;   // [B][H] GRU reset_before: r * h_{s-1}, read by every block's n product
  A* z;    // [B][H] GRU reset_before: z between the phases (owner only)
  const T* xg;
  T* y;
  A* res;

  __device__ FwdBlock(const FwdArgs& args, unsigned char* smem) : a(args) {
    H = a.H;
    K = a.K;
    P = a.P;
    UB = a.plan.units;
    UK = a.plan.states;
    ktile = a.plan.ktile;
    j0 = int64_t(blockIdx.x) * UB;
    k0 = int64_t(blockIdx.x) * UK;
    nu = static_cast<int>(H - j0 < UB ? (H - j0 > 0 ? H - j0 : 0) : UB);
    nk = static_cast<int>(K - k0 < UK ? (K - k0 > 0 ? K - k0 : 0) : UK);
    fmain = static_cast<const A*>(a.packed);
    fproj = fmain + G * H * K;
    A* sm = reinterpret_cast<A*>(smem);
    sW = sm;
    sWr = sm + int64_t(G) * UB * K;
    sX = sm + (PERSIST ? a.plan.weight_elems : 0);
    spart = sX + int64_t(kNB) * ktile;
    A* ws = static_cast<A*>(a.workspace);
    hbuf0 = ws + a.wl.hbuf0;
    hbuf1 = ws + a.wl.hbuf1;
    cst = ws + a.wl.c;
    m = ws + a.wl.m;
    rh = ws + a.wl.rh;
    z = ws + a.wl.z;
    xg = static_cast<const T*>(a.x_gates);
    y = static_cast<T*>(a.y);
    res = static_cast<A*>(a.reserve);
  }

  // Persistent only: the block's weight rows into shared memory, once for the whole sequence.
  __device__ void load_weights() {
    const int n = G * UB * static_cast<int>(K);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int r = i / static_cast<int>(K), k = i - r * static_cast<int>(K);
      const int g = r / UB;
      const int64_t j = j0 + (r - g * UB);
      sW[i] = j < H ? fmain[(g * H + j) * K + k] : A(0);
    }
    if (V == Variant::Lstm && P > 0) {
      const int np = UK * static_cast<int>(H);
      for (int i = threadIdx.x; i < np; i += kThreads) {
        const int r = i / static_cast<int>(H), k = i - r * static_cast<int>(H);
        const int64_t p = k0 + r;
        sWr[i] = p < P ? fproj[p * H + k] : A(0);
      }
    }
  }

  __device__ void init() {
    const int64_t B = a.q.batch;
    const T* h0 = static_cast<const T*>(a.h0);
    const T* c0 = static_cast<const T*>(a.c0);
    if (nk > 0)
      for (int64_t i = threadIdx.x; i < B * nk; i += kThreads) {
        const int64_t b = i / nk, k = k0 + (i - b * nk);
        hbuf0[b * K + k] = h0 ? A(to_acc(h0[b * K + k])) : A(0);
      }
    if (V == Variant::Lstm && nu > 0)
      for (int64_t i = threadIdx.x; i < B * nu; i += kThreads) {
        const int64_t b = i / nu, j = j0 + (i - b * nu);
        cst[b * H + j] = c0 ? A(to_acc(c0[b * H + j])) : A(0);
      }
  }

  __device__ A xval(const T* p) const { return A(to_acc(*p)); }

  __device__ void gates(int64_t s, int64_t nb) {
    if (nu == 0) return;
    const A* hcur = (s & 1) ? hbuf1 : hbuf0;
    A* hnext = (s & 1) ? hbuf0 : hbuf1;
    constexpr int Ga = fwd_phase1_gates<V>();
    const int R = Ga * UB;
    auto row_of = [&](int r) -> const A* {
      if (PERSIST) return sW + int64_t(r) * K;
      const int g = r / UB;
      const int64_t j = j0 + (r - g * UB);
      return j < H ? fmain + (g * H + j) * K : nullptr;
    };
    const int64_t rc = a.rc, hcol = a.hprev_col;
    T* h_n = static_cast<T*>(a.h_n);
    // Groups of up to etiles batch tiles: each tile's products into its own partial-sum slots, then one
    // epilogue over the group's rows with every thread (block_gemv ends with a barrier, and the next
    // group's first block_gemv writes slots only after its staging barrier, which every thread reaches
    // once its epilogue is done).
    // Each thread's first element's x_gates are loaded before the products (the epilogue's loads were a
    // round trip to memory after them, in every step's critical path); further elements load in place.
    constexpr int NX = V == Variant::Lstm ? 4 : (V == Variant::GruAfter ? 3 : (V == Variant::GruBefore ? 2 : 1));
    const int64_t group = int64_t(kNB) * a.plan.etiles, slots = spart_elems(R);
    for (int64_t g0 = 0; g0 < nb; g0 += group) {
      const int64_t gn = nb - g0 < group ? nb - g0 : group;
      T xfirst[NX];
      if (!(a.skip & kSkipEpilogue) && threadIdx.x < gn * nu) {
        const int bg = threadIdx.x / nu, jj = threadIdx.x - bg * nu;
        const T* gx = xg + seq_row(a.q, s, g0 + bg) * a.ld_gates + j0 + jj;
#pragma unroll
        for (int g = 0; g < NX; ++g) xfirst[g] = gx[g * H];
      }
      for (int64_t t0 = 0; t0 < gn; t0 += kNB) {
        const int nbt = static_cast<int>(gn - t0 < kNB ? gn - t0 : kNB);
        block_gemv<A>(row_of, R, K, hcur, K, g0 + t0, nbt, ktile, sX, spart + (t0 / kNB) * slots, a.skip);
      }
      for (int i = threadIdx.x; i < (a.skip & kSkipEpilogue ? 0 : gn * nu); i += kThreads) {
        const int bg = i / nu, jj = i - bg * nu, bt = bg % kNB;
        const int64_t b = g0 + bg, j = j0 + jj;
        const int64_t row = seq_row(a.q, s, b);
        const bool last = s == seq_len(a.q, b) - 1;
        const T* gx = xg + row * a.ld_gates + j;
        A* rr = res ? res + row * rc : nullptr;
        const A* tile_part = spart + (bg / kNB) * slots;
        auto pre = [&](int g) { return gemv_result(tile_part, R, g * UB + jj, bt); };
        const bool first = i == static_cast<int>(threadIdx.x);
        auto xin = [&](int g) { return first ? A(to_acc(xfirst[g])) : xval(gx + g * H); };
        if (V == Variant::Lstm) {
          const A ig = act_sigmoid(pre(0) + xin(0));
          const A fg = act_sigmoid(pre(1) + xin(1));
          const A gg = act_tanh(pre(2) + xin(2));
          const A og = act_sigmoid(pre(3) + xin(3));
          A* cp = cst + b * H + j;
          const A c = fg * *cp + ig * gg;
          *cp = c;
          const A h = og * act_tanh(c);
          if (rr) {
            rr[j] = ig;
            rr[H + j] = fg;
            rr[2 * H + j] = gg;
            rr[3 * H + j] = og;
            rr[4 * H + j] = c;
          }
          if (last) static_cast<T*>(a.c_n)[b * H + j] = from_acc<T>(c);
          if (P > 0) {
            m[b * H + j] = h;
            if (rr) rr[5 * H + j] = h;
          } else {
            hnext[b * K + j] = h;
            y[row * a.ld_y + j] = from_acc<T>(h);
            if (rr) rr[hcol + j] = __ldcg(hcur + b * K + j);
            if (last) h_n[b * K + j] = from_acc<T>(h);
          }
        } else if (V == Variant::GruAfter) {
          const A hprev = __ldcg(hcur + b * K + j);
          const A rg = act_sigmoid(pre(0) + xin(0));
          const A zg = act_sigmoid(pre(1) + xin(1));
          const A hng = pre(2) + (a.b_hn ? xval(static_cast<const T*>(a.b_hn) + j) : A(0));
          const A ng = act_tanh(xin(2) + rg * hng);
          const A h = (A(1) - zg) * ng + zg * hprev;
          hnext[b * K + j] = h;
          y[row * a.ld_y + j] = from_acc<T>(h);
          if (last) h_n[b * K + j] = from_acc<T>(h);
          if (rr) {
            rr[j] = rg;
            rr[H + j] = zg;
            rr[2 * H + j] = ng;
            rr[3 * H + j] = hng;
            rr[hcol + j] = hprev;
          }
        } else if (V == Variant::GruBefore) {
          const A hprev = __ldcg(hcur + b * K + j);
          const A rg = act_sigmoid(pre(0) + xin(0));
          const A zg = act_sigmoid(pre(1) + xin(1));
          const A rhv = rg * hprev;
          rh[b * H + j] = rhv;
          z[b * H + j] = zg;
          if (rr) {
            rr[j] = rg;
            rr[H + j] = zg;
            rr[3 * H + j] = rhv;
            rr[hcol + j] = hprev;
          }
        } else {
          const A hprev = __ldcg(hcur + b * K + j);
          const A pv = pre(0) + xin(0);
          const A h = a.relu ? act_relu(pv) : act_tanh(pv);
          hnext[b * K + j] = h;
          y[row * a.ld_y + j] = from_acc<T>(h);
          if (last) h_n[b * K + j] = from_acc<T>(h);
          if (rr) {
            rr[j] = h;
            rr[hcol + j] = hprev;
          }
        }
      }
    }
  }

  // LSTM projection h_s = W_hr m_s (own state columns), or GRU reset_before's n = tanh(x_n + W_hn (r*h)).
  __device__ void second(int64_t s, int64_t nb) {
    const A* hcur = (s & 1) ? hbuf1 : hbuf0;
    A* hnext = (s & 1) ? hbuf0 : hbuf1;
    const int64_t rc = a.rc, hcol = a.hprev_col;
    T* h_n = static_cast<T*>(a.h_n);
    if (V == Variant::Lstm) {
      if (nk == 0) return;
      const int R = nk;
      auto row_of = [&](int r) -> const A* {
        if (PERSIST) return sWr + int64_t(r) * H;
        return fproj + (k0 + r) * H;
      };
      for (int64_t b0 = 0; b0 < nb; b0 += kNB) {
        const int nbt = static_cast<int>(nb - b0 < kNB ? nb - b0 : kNB);
        block_gemv<A>(row_of, R, H, m, H, b0, nbt, ktile, sX, spart);
        for (int i = threadIdx.x; i < nbt * nk; i += kThreads) {
          const int bt = i / nk, kk = i - bt * nk;
          const int64_t b = b0 + bt, k = k0 + kk;
          const int64_t row = seq_row(a.q, s, b);
          const A h = gemv_result(spart, R, kk, bt);
          hnext[b * K + k] = h;
          y[row * a.ld_y + k] = from_acc<T>(h);
          if (s == seq_len(a.q, b) - 1) h_n[b * K + k] = from_acc<T>(h);
          if (res) res[row * rc + hcol + k] = __ldcg(hcur + b * K + k);
        }
      }
    } else if (V == Variant::GruBefore) {
      if (nu == 0) return;
      const int R = UB;
      auto row_of = [&](int r) -> const A* {
        if (PERSIST) return sW + (2 * int64_t(UB) + r) * K;
        const int64_t j = j0 + r;
        return j < H ? fmain + (2 * H + j) * K : nullptr;
      };
      for (int64_t b0 = 0; b0 < nb; b0 += kNB) {
        const int nbt = static_cast<int>(nb - b0 < kNB ? nb - b0 : kNB);
        block_gemv<A>(row_of, R, H, rh, H, b0, nbt, ktile, sX, spart);
        for (int i = threadIdx.x; i < nbt * nu; i += kThreads) {
          const int bt = i / nu, jj = i - bt * nu;
          const int64_t b = b0 + bt, j = j0 + jj;
          const int64_t row = seq_row(a.q, s, b);
          const A ng = act_tanh(gemv_result(spart, R, jj, bt) + xval(xg + row * a.ld_gates + 2 * H + j));
          const A zg = z[b * H + j];
          const A h = (A(1) - zg) * ng + zg * __ldcg(hcur + b * K + j);
          hnext[b * K + j] = h;
          y[row * a.ld_y + j] = from_acc<T>(h);
          if (s == seq_len(a.q, b) - 1) h_n[b * K + j] = from_acc<T>(h);
          if (res) res[row * rc + 2 * H + j] = ng;
        }
      }
    }
  }
};

template <Variant V> __host__ __device__ inline bool fwd_has_second(int64_t P) {
  return V == Variant::GruBefore || (V == Variant::Lstm && P > 0);
}

// phase/step/nb are read only by the per-step launches; the persistent launch runs every step.
template <Variant V, typename T, bool PERSIST>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<PERSIST>)
rnn_fwd_kernel(const __grid_constant__ FwdArgs a, int phase, int64_t step, int64_t nb) {
  extern __shared__ __align__(16) unsigned char smem[];
  FwdBlock<V, T, PERSIST> blk(a, smem);
  if constexpr (PERSIST) {
    cg::grid_group grid = cg::this_grid();
    blk.load_weights();
    blk.init();
    grid.sync();
    const bool second = fwd_has_second<V>(a.P);
    for (int64_t s = 0; s < a.q.steps; ++s) {
      const int64_t n = seq_active(a.q, s);
      blk.gates(s, n);
      if (!(a.skip & kSkipBarrier)) grid.sync();
      if (second) {
        blk.second(s, n);
        if (!(a.skip & kSkipBarrier)) grid.sync();
      }
    }
  } else {
    if (phase == kFwdInit) blk.init();
    else if (phase == kFwdGates) blk.gates(step, nb);
    else blk.second(step, nb);
  }
}

// ---- launcher -----------------------------------------------------------------------------------------
template <Variant V, typename T>
RnnCudaPath forward_typed(const RnnFwdParams& p, RnnCudaPath request, cudaStream_t st) {
  using A = typename AccOf<T>::type;
  const RnnShape& sh = p.shape;
  const int64_t H = sh.hidden, K = sh.state(), P = sh.proj, B = p.seq.batch, G = fwd_gates<V>();
  FwdArgs a{};
  set_common_args(a, p, rnn_sizes_cuda(sh, B, sizeof(A) == 8));
  a.x_gates = p.x_gates;
  a.ld_gates = p.ld_gates;
  a.b_hn = p.b_hn;
  a.h0 = p.h0;
  a.c0 = p.c0;
  a.y = p.y;
  a.ld_y = p.ld_y;
  a.h_n = p.h_n;
  a.c_n = p.c_n;
  a.wl = fwd_workspace(B, H, K);
  a.skip = debug_skip();
  const void* kp = reinterpret_cast<const void*>(&rnn_fwd_kernel<V, T, true>);
  const void* ks = reinterpret_cast<const void*>(&rnn_fwd_kernel<V, T, false>);
  const PlanShape shape{H, K, P, G, B, false, static_cast<int>(sizeof(A))};
  a.plan = make_plan(shape, request, kp, ks);
  int phase = kFwdInit;
  int64_t step = 0, nb = B;
  void* args[] = {&a, &phase, &step, &nb};
  if (launch_persistent(a.plan, shape, request, kp, ks, args, st, "kernel rnn_fwd_kernel (persistent)"))
    return RnnCudaPath::Persistent;
  launch_step(ks, a.plan, args, st, "kernel rnn_fwd_kernel (step, init)");
  const bool second = fwd_has_second<V>(P);
  for (step = 0; step < p.seq.steps; ++step) {
    nb = p.seq.batch_sizes ? p.seq.batch_sizes[step] : B;
    phase = kFwdGates;
    launch_step(ks, a.plan, args, st, "kernel rnn_fwd_kernel (step, gates)");
    if (second) {
      phase = kFwdSecond;
      launch_step(ks, a.plan, args, st, "kernel rnn_fwd_kernel (step, second)");
    }
  }
  return RnnCudaPath::Step;
}

}  // namespace
}  // namespace rnn_cuda

// ---- entry ------------------------------------------------------------------------------------------
RnnCudaPath rnn_forward_cuda(const RnnFwdParams& p, RnnCudaPath request, void* stream) {
  if (p.seq.steps == 0 || p.seq.batch == 0) return RnnCudaPath::Step;
  auto st = static_cast<cudaStream_t>(stream);
  return PSK_RNN_DTYPE_SWITCH(p.dtype, T, [&] {
    return PSK_RNN_VARIANT_SWITCH(p.shape, V, [&] { return rnn_cuda::forward_typed<V, T>(p, request, st); });
  });
}

}  // namespace pyseqkern
