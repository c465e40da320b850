// Recurrent CUDA kernels, backward through time (contract: rnn_cuda.h; math as csrc/cpu/rnn_bwd.cpp).
//
// Steps run in reverse. Phases of one step s ("grid" = all blocks must have finished):
//   proj   LSTM with projection: dh_s = dh_rec + dy for own state columns, into dh_aux and d_proj -> grid
//   gates  own units: dh (= dh_rec + dy, or W_hr^T dh_aux with projection) into gate gradients,
//          written to d_gates_x (/ d_gates_h) and to dG, the step's gradient rows read by everyone -> grid
//   reset  GRU reset_before: d(r*h) = W_hn^T dn for own units, then r's gradient                -> grid
//   rec    own state columns: dh_rec = (GRU: dh * z [+ d(r*h) * r]) + W_hh^T dG                -> block
// dG is double buffered by step parity: a step's rec reads dG[s & 1] while a faster block may already
// write the step s-1 gates into the other buffer. Persistent blocks keep W_hh^T[own state columns]
// (and W_hr^T[own units]) in shared memory for the whole sequence.
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
enum BwdPhase : int { kBwdInit = 0, kBwdProj = 1, kBwdGates = 2, kBwdReset = 3, kBwdRec = 4, kBwdFinal = 5 };

template <Variant V> __host__ __device__ constexpr int bwd_gates() {
  return V == Variant::Lstm ? 4 : (V == Variant::Rnn ? 1 : 3);
}

struct BwdArgs {
  SeqDev q;
  int64_t H, K, P;
  const void* dy; int64_t ld_dy;
  const void* dh_n;
  const void* dc_n;
  const void* c0;
  const void* reserve; int64_t rc, hprev_col;
  const void* packed;
  void* dgx; int64_t ld_dgx;
  void* dgh; int64_t ld_dgh;
  void* d_proj;
  void* dh0;
  void* dc0;
  void* workspace;
  BwdWorkspace wl;
  RnnPlan plan;
  bool relu;
};

// ---- kernel -----------------------------------------------------------------------------------------
template <Variant V, typename T, bool PERSIST>
struct BwdBlock {
  using A = typename AccOf<T>::type;
  static constexpr int G = bwd_gates<V>();

  const BwdArgs& a;
  int64_t H, K, P, GH, j0, k0;
  int UB, UK, nu, nk, ktile;
  const A* bmain;  // [K][G*H] w_hh^T
  const A* bproj;  // [H][P] w_hr^T
  A* sWt;   // [UK][G*H] rows k0.. of w_hh^T, zero past K
  A* sWrT;  // [UB][P] rows j0.. of w_hr^T, zero past H
  A* sX;
  A* spart;
  A* dh_rec;  // [B][K] gradient reaching h_{s-1} through the recurrence (owner: state columns)
  A* dh_aux;  // [B][K] proj: dh_s, read by every block; GRU: the direct part dh * z (owner)
  A* dc;      // [B][H] LSTM cell-state gradient (owner: units)
  A* dg0;  // [B][G*H] step gradient rows, by step parity (members, not an array: see rnn_fwd.cu)
  A* dg1;
  const A* res;

  __device__ BwdBlock(const BwdArgs& args, unsigned char* smem) : a(args) {
    H = a.H;
    K = a.K;
    P = a.P;
    GH = G * H;
    UB = a.plan.units;
    UK = a.plan.states;
    ktile = a.plan.ktile;
    j0 = int64_t(blockIdx.x) * UB;
    k0 = int64_t(blockIdx.x) * UK;
    nu = static_cast<int>(H - j0 < UB ? (H - j0 > 0 ? H - j0 : 0) : UB);
    nk = static_cast<int>(K - k0 < UK ? (K - k0 > 0 ? K - k0 : 0) : UK);
    const A* packed = static_cast<const A*>(a.packed);
    bmain = packed + GH * K + P * H;
    bproj = bmain + K * GH;
    A* sm = reinterpret_cast<A*>(smem);
    sWt = sm;
    sWrT = sm + int64_t(UK) * GH;
    sX = sm + (PERSIST ? a.plan.weight_elems : 0);
    spart = sX + int64_t(kNB) * ktile;
    A* ws = static_cast<A*>(a.workspace);
    dh_rec = ws + a.wl.dh_rec;
    dh_aux = ws + a.wl.dh_aux;
    dc = ws + a.wl.dc;
    dg0 = ws + a.wl.dg0;
    dg1 = ws + a.wl.dg1;
    res = static_cast<const A*>(a.reserve);
  }

  __device__ void load_weights() {
    const int n = UK * static_cast<int>(GH);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int r = i / static_cast<int>(GH), c = i - r * static_cast<int>(GH);
      const int64_t k = k0 + r;
      sWt[i] = k < K ? bmain[k * GH + c] : A(0);
    }
    if (V == Variant::Lstm && P > 0) {
      const int np = UB * static_cast<int>(P);
      for (int i = threadIdx.x; i < np; i += kThreads) {
        const int r = i / static_cast<int>(P), c = i - r * static_cast<int>(P);
        const int64_t j = j0 + r;
        sWrT[i] = j < H ? bproj[j * P + c] : A(0);
      }
    }
  }

  __device__ A val(const void* p, int64_t i) const { return A(to_acc(static_cast<const T*>(p)[i])); }
  __device__ void put(void* p, int64_t i, A v) const { static_cast<T*>(p)[i] = from_acc<T>(v); }

  __device__ void init() {
    const int64_t B = a.q.batch;
    if (nk > 0)
      for (int64_t i = threadIdx.x; i < B * nk; i += kThreads) {
        const int64_t b = i / nk, k = k0 + (i - b * nk);
        dh_rec[b * K + k] = a.dh_n ? val(a.dh_n, b * K + k) : A(0);
      }
    if (V == Variant::Lstm && nu > 0)
      for (int64_t i = threadIdx.x; i < B * nu; i += kThreads) {
        const int64_t b = i / nu, j = j0 + (i - b * nu);
        dc[b * H + j] = a.dc_n ? val(a.dc_n, b * H + j) : A(0);
      }
  }

  __device__ void final_states() {
    const int64_t B = a.q.batch;
    if (nk > 0)
      for (int64_t i = threadIdx.x; i < B * nk; i += kThreads) {
        const int64_t b = i / nk, k = k0 + (i - b * nk);
        put(a.dh0, b * K + k, dh_rec[b * K + k]);
      }
    if (V == Variant::Lstm && a.dc0 && nu > 0)
      for (int64_t i = threadIdx.x; i < B * nu; i += kThreads) {
        const int64_t b = i / nu, j = j0 + (i - b * nu);
        put(a.dc0, b * H + j, dc[b * H + j]);
      }
  }

  // LSTM with projection: dh_s for own state columns (everyone's units need all of it next).
  __device__ void proj(int64_t s, int64_t nb) {
    for (int64_t i = threadIdx.x; i < nb * nk; i += kThreads) {
      const int64_t b = i / nk, k = k0 + (i - b * nk);
      const int64_t row = seq_row(a.q, s, b);
      A dh = dh_rec[b * K + k];
      if (a.dy) dh += val(a.dy, row * a.ld_dy + k);
      dh_aux[b * K + k] = dh;
      put(a.d_proj, row * P + k, dh);
    }
  }

  // Gate gradients of unit j of sequence b at step s, given dh (the gradient reaching h_s there).
  __device__ void gate_math(int64_t s, int64_t b, int64_t j, A dh) {
    const int64_t row = seq_row(a.q, s, b);
    const A* rr = res + row * a.rc;
    A* dG = ((s & 1) ? dg1 : dg0) + b * GH;
    const int64_t gx = row * a.ld_dgx + j;
    if (V == Variant::Lstm) {
      const A i = rr[j], f = rr[H + j], g = rr[2 * H + j], o = rr[3 * H + j], ct = rr[4 * H + j];
      A cprev;
      if (s > 0) cprev = res[seq_row(a.q, s - 1, b) * a.rc + 4 * H + j];
      else cprev = a.c0 ? val(a.c0, b * H + j) : A(0);
      const A tc = act_tanh(ct);
      A* dcp = dc + b * H + j;
      const A dcv = *dcp + dh * o * (A(1) - tc * tc);
      const A gi = dcv * g * i * (A(1) - i), gf = dcv * cprev * f * (A(1) - f);
      const A gg = dcv * i * (A(1) - g * g), go = dh * tc * o * (A(1) - o);
      *dcp = dcv * f;
      put(a.dgx, gx, gi);
      put(a.dgx, gx + H, gf);
      put(a.dgx, gx + 2 * H, gg);
      put(a.dgx, gx + 3 * H, go);
      dG[j] = gi;
      dG[H + j] = gf;
      dG[2 * H + j] = gg;
      dG[3 * H + j] = go;
    } else if (V == Variant::Rnn) {
      const A h = rr[j];
      const A gp = a.relu ? (h <= A(0) ? A(0) : dh) : dh * (A(1) - h * h);
      put(a.dgx, gx, gp);
      dG[j] = gp;
    } else {
      const A rg = rr[j], zg = rr[H + j], ng = rr[2 * H + j], hprev = rr[a.hprev_col + j];
      const A dnp = dh * (A(1) - zg) * (A(1) - ng * ng);
      const A dzp = dh * (hprev - ng) * zg * (A(1) - zg);
      dh_aux[b * K + j] = dh * zg;
      if (V == Variant::GruAfter) {
        const A hng = rr[3 * H + j];
        const A drp = dnp * hng * rg * (A(1) - rg);
        const int64_t gh = row * a.ld_dgh + j;
        put(a.dgx, gx, drp);
        put(a.dgx, gx + H, dzp);
        put(a.dgx, gx + 2 * H, dnp);
        put(a.dgh, gh, drp);
        put(a.dgh, gh + H, dzp);
        put(a.dgh, gh + 2 * H, dnp * rg);
        dG[j] = drp;
        dG[H + j] = dzp;
        dG[2 * H + j] = dnp * rg;
      } else {
        dG[H + j] = dzp;
        dG[2 * H + j] = dnp;
      }
    }
  }

  __device__ void gates(int64_t s, int64_t nb) {
    if (nu == 0) return;
    if (V == Variant::Lstm && P > 0) {
      const int R = UB;
      auto row_of = [&](int r) -> const A* {
        if (PERSIST) return sWrT + int64_t(r) * P;
        const int64_t j = j0 + r;
        return j < H ? bproj + j * P : nullptr;
      };
      for (int64_t b0 = 0; b0 < nb; b0 += kNB) {
        const int nbt = static_cast<int>(nb - b0 < kNB ? nb - b0 : kNB);
        block_gemv<A>(row_of, R, P, dh_aux, K, b0, nbt, ktile, sX, spart);
        for (int i = threadIdx.x; i < nbt * nu; i += kThreads) {
          const int bt = i / nu, jj = i - bt * nu;
          gate_math(s, b0 + bt, j0 + jj, gemv_result(spart, R, jj, bt));
        }
      }
      return;
    }
    for (int64_t i = threadIdx.x; i < nb * nu; i += kThreads) {
      const int64_t b = i / nu, j = j0 + (i - b * nu);
      A dh = dh_rec[b * K + j];
      if (a.dy) dh += val(a.dy, seq_row(a.q, s, b) * a.ld_dy + j);
      gate_math(s, b, j, dh);
    }
  }

  // GRU reset_before: d(r * h_{s-1})[j] = sum_i dn[i] W_hn[i][j] for own units j, then r's gradient.
  __device__ void reset(int64_t s, int64_t nb) {
    if (nu == 0) return;
    A* dG = ((s & 1) ? dg1 : dg0);
    const int R = UB;
    auto row_of = [&](int r) -> const A* {
      if (PERSIST) return sWt + int64_t(r) * GH + 2 * H;
      const int64_t j = j0 + r;
      return j < H ? bmain + j * GH + 2 * H : nullptr;
    };
    for (int64_t b0 = 0; b0 < nb; b0 += kNB) {
      const int nbt = static_cast<int>(nb - b0 < kNB ? nb - b0 : kNB);
      block_gemv<A>(row_of, R, H, dG + 2 * H, GH, b0, nbt, ktile, sX, spart);
      for (int i = threadIdx.x; i < nbt * nu; i += kThreads) {
        const int bt = i / nu, jj = i - bt * nu;
        const int64_t b = b0 + bt, j = j0 + jj;
        const int64_t row = seq_row(a.q, s, b);
        const A* rr = res + row * a.rc;
        const A acc = gemv_result(spart, R, jj, bt);
        const A rg = rr[j], hprev = rr[a.hprev_col + j];
        const A drp = acc * hprev * rg * (A(1) - rg);
        dh_aux[b * K + j] += acc * rg;
        A* dGb = dG + b * GH;
        dGb[j] = drp;
        const int64_t gx = row * a.ld_dgx + j;
        put(a.dgx, gx, drp);
        put(a.dgx, gx + H, dGb[H + j]);
        put(a.dgx, gx + 2 * H, dGb[2 * H + j]);
      }
    }
  }

  // dh_rec[b][k] = base + sum_j dG[b][j] W_hh[j][k] for own state columns k (GRU reset_before: the
  // r and z rows only; its n rows went through reset()).
  __device__ void rec(int64_t s, int64_t nb) {
    if (nk == 0) return;
    const A* dG = ((s & 1) ? dg1 : dg0);
    const int64_t J = V == Variant::GruBefore ? 2 * H : GH;
    const int R = nk;
    auto row_of = [&](int r) -> const A* {
      if (PERSIST) return sWt + int64_t(r) * GH;
      return bmain + (k0 + r) * GH;
    };
    constexpr bool kGru = V == Variant::GruAfter || V == Variant::GruBefore;
    for (int64_t b0 = 0; b0 < nb; b0 += kNB) {
      const int nbt = static_cast<int>(nb - b0 < kNB ? nb - b0 : kNB);
      block_gemv<A>(row_of, R, J, dG, GH, b0, nbt, ktile, sX, spart);
      for (int i = threadIdx.x; i < nbt * nk; i += kThreads) {
        const int bt = i / nk, kk = i - bt * nk;
        const int64_t b = b0 + bt, k = k0 + kk;
        const A acc = gemv_result(spart, R, kk, bt);
        dh_rec[b * K + k] = kGru ? dh_aux[b * K + k] + acc : acc;
      }
    }
  }
};

template <Variant V, typename T, bool PERSIST>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<PERSIST>)
rnn_bwd_kernel(const __grid_constant__ BwdArgs a, int phase, int64_t step, int64_t nb) {
  extern __shared__ __align__(16) unsigned char smem[];
  BwdBlock<V, T, PERSIST> blk(a, smem);
  if constexpr (PERSIST) {
    cg::grid_group grid = cg::this_grid();
    blk.load_weights();
    blk.init();
    grid.sync();
    for (int64_t s = a.q.steps - 1; s >= 0; --s) {
      const int64_t n = seq_active(a.q, s);
      if (V == Variant::Lstm && a.P > 0) {
        blk.proj(s, n);
        grid.sync();
      }
      blk.gates(s, n);
      grid.sync();
      if (V == Variant::GruBefore) {
        blk.reset(s, n);
        grid.sync();
      }
      blk.rec(s, n);
      __syncthreads();  // rec's outputs are this block's own columns: the next step reads them here
    }
    blk.final_states();
  } else {
    switch (phase) {
      case kBwdInit: blk.init(); break;
      case kBwdProj: blk.proj(step, nb); break;
      case kBwdGates: blk.gates(step, nb); break;
      case kBwdReset: blk.reset(step, nb); break;
      case kBwdRec: blk.rec(step, nb); break;
      default: blk.final_states(); break;
    }
  }
}

// ---- launcher -----------------------------------------------------------------------------------------
template <Variant V, typename T>
RnnCudaPath backward_typed(const RnnBwdParams& p, RnnCudaPath request, cudaStream_t st) {
  using A = typename AccOf<T>::type;
  const RnnShape& sh = p.shape;
  const int64_t H = sh.hidden, K = sh.state(), P = sh.proj, B = p.seq.batch, G = bwd_gates<V>();
  BwdArgs a{};
  set_common_args(a, p, rnn_sizes_cuda(sh, B, sizeof(A) == 8));
  a.dy = p.dy;
  a.ld_dy = p.ld_dy;
  a.dh_n = p.dh_n;
  a.dc_n = p.dc_n;
  a.c0 = p.c0;
  a.dgx = p.d_gates_x;
  a.ld_dgx = p.ld_dgx;
  a.dgh = p.d_gates_h;
  a.ld_dgh = p.ld_dgh;
  a.d_proj = p.d_proj;
  a.dh0 = p.dh0;
  a.dc0 = p.dc0;
  a.wl = bwd_workspace(B, H, K, G);
  const void* kp = reinterpret_cast<const void*>(&rnn_bwd_kernel<V, T, true>);
  const void* ks = reinterpret_cast<const void*>(&rnn_bwd_kernel<V, T, false>);
  const PlanShape shape{H, K, P, G, B, true, static_cast<int>(sizeof(A))};
  a.plan = make_plan(shape, request, kp, ks);
  int phase = kBwdInit;
  int64_t step = 0, nb = B;
  void* args[] = {&a, &phase, &step, &nb};
  if (launch_persistent(a.plan, shape, request, kp, ks, args, st, "kernel rnn_bwd_kernel (persistent)"))
    return RnnCudaPath::Persistent;
  auto run = [&](int ph, const char* name) {
    phase = ph;
    launch_step(ks, a.plan, args, st, name);
  };
  run(kBwdInit, "kernel rnn_bwd_kernel (step, init)");
  for (step = p.seq.steps - 1; step >= 0; --step) {
    nb = p.seq.batch_sizes ? p.seq.batch_sizes[step] : B;
    if (V == Variant::Lstm && P > 0) run(kBwdProj, "kernel rnn_bwd_kernel (step, proj)");
    run(kBwdGates, "kernel rnn_bwd_kernel (step, gates)");
    if (V == Variant::GruBefore) run(kBwdReset, "kernel rnn_bwd_kernel (step, reset)");
    run(kBwdRec, "kernel rnn_bwd_kernel (step, rec)");
  }
  run(kBwdFinal, "kernel rnn_bwd_kernel (step, final)");
  return RnnCudaPath::Step;
}

}  // namespace
}  // namespace rnn_cuda

// ---- entry ------------------------------------------------------------------------------------------
RnnCudaPath rnn_backward_cuda(const RnnBwdParams& p, RnnCudaPath request, void* stream) {
  if (p.seq.batch == 0) return RnnCudaPath::Step;
  auto st = static_cast<cudaStream_t>(stream);
  return PSK_RNN_DTYPE_SWITCH(p.dtype, T, [&] {
    return PSK_RNN_VARIANT_SWITCH(p.shape, V, [&] { return rnn_cuda::backward_typed<V, T>(p, request, st); });
  });
}

}  // namespace pyseqkern
