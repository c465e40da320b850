// One recurrent step from torch's own weight layout, compiled per ISA level (contract:
// pyseqkern/rnn_direct.h). Each thread owns blocks of L units (all their gates, all rows): for a block
// it forms the L dot products of every gate row with each input row as L register accumulators over k,
// sums each across its lanes into one lane of a result register (transpose_sum), and runs the gate
// epilogue on that register. A block's weight rows (L rows, 16 KB at K = 256 in float32) stay in L1
// while every batch row reads them.
#include "pyseqkern/rnn_direct.h"

#include "rnn_common.h"

PSK_ISA_NAMESPACE_BEGIN
namespace direct {
namespace {

using rnn::bf16;
using rnn::lanes;
using rnn::load;
using rnn::splat;
using rnn::store;
using rnn::V;

template <typename A> struct IdxOf;
template <> struct IdxOf<float> { typedef int32_t type __attribute__((vector_size(rnn::kVecBytes))); };
template <> struct IdxOf<double> { typedef int64_t type __attribute__((vector_size(rnn::kVecBytes))); };

// Lanes of one folding stage over blocks of W lanes: lane p of the result is x's block-local pair
// (off, off + W/2) summed where off < W/2, else y's pair (off - W/2, off). After the stages W = L, L/2,
// ..., 2 over bit-reversed inputs, lane l holds the sum of input l's lanes.
template <typename A, int W>
inline V<A> fold(V<A> x, V<A> y) {
  constexpr int L = lanes<A>();
  using I = typename IdxOf<A>::type;
  I m1, m2;
  for (int p = 0; p < L; ++p) {
    const int bb = p - p % W, off = p % W, half = W / 2;
    m1[p] = off < half ? bb + off : L + bb + off - half;
    m2[p] = off < half ? bb + off + half : L + bb + off;
  }
  return __builtin_shuffle(x, y, m1) + __builtin_shuffle(x, y, m2);
}

constexpr int bitrev(int i, int n) {
  int r = 0;
  for (int b = 1; b < n; b <<= 1, i >>= 1) r = (r << 1) | (i & 1);
  return r;
}

template <typename A, int W>
inline void stages(V<A>* v) {
  if constexpr (W >= 2) {
#pragma GCC unroll 16
    for (int i = 0; i < W / 2; ++i) v[i] = fold<A, W>(v[2 * i], v[2 * i + 1]);  // W vectors in, W / 2 out
    stages<A, W / 2>(v);
  }
}

// Lane l: the sum of acc[l]'s lanes, by a fixed tree of pairwise adds.
template <typename A>
inline V<A> transpose_sum(const V<A>* acc) {
  constexpr int L = lanes<A>();
  V<A> v[L];
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) v[i] = acc[bitrev(i, L)];
  stages<A, L>(v);
  return v[0];
}

// Lane l: row l of w (n <= L rows, ld apart) dotted with v over K; lanes from n on are zero.
template <typename A, typename SW, typename SV>
[[gnu::noinline]] V<A> dots(const SW* w, int64_t ld, int n, const SV* v, int64_t K) {
  constexpr int L = lanes<A>();
  V<A> acc[L] = {};
  int64_t k = 0;
  if (n == L) {
    for (; k + L <= K; k += L) {
      const V<A> xv = load<A, SV>(v + k, L);
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) acc[l] += load<A, SW>(w + l * ld + k, L) * xv;
    }
  } else {
    for (; k + L <= K; k += L) {
      const V<A> xv = load<A, SV>(v + k, L);
      for (int l = 0; l < n; ++l) acc[l] += load<A, SW>(w + l * ld + k, L) * xv;
    }
  }
  if (k < K) {
    const int r = static_cast<int>(K - k);
    const V<A> xv = load<A, SV>(v + k, r);
    for (int l = 0; l < n; ++l) acc[l] += load<A, SW>(w + l * ld + k, r) * xv;
  }
  return transpose_sum<A>(acc);
}

template <typename A, typename S>
struct Step {
  static constexpr int L = lanes<A>();
  static constexpr bool BF = std::is_same<S, bf16>::value;
  const RnnDirectParams& p;
  int64_t H, G;

  static V<A> sig(V<A> v) {
    if constexpr (BF) return rnn::vsigmoid_f(v);
    else return rnn::vsigmoid(v);
  }
  static V<A> tanh_(V<A> v) {
    if constexpr (BF) return rnn::vtanh_f(v);
    else return rnn::vtanh(v);
  }
  V<A> bias(const void* b, int64_t at, int n) const {
    return b ? load<A, S>(static_cast<const S*>(b) + at, n) : V<A>{};
  }
  // (W_ih x_b + b_ih) for gate row block g*H + j..j+n.
  V<A> gi(int64_t b, int g, int64_t j, int n) const {
    const S* w = static_cast<const S*>(p.w_ih) + (g * H + j) * p.ld_w_ih;
    const S* x = static_cast<const S*>(p.x) + b * p.ld_x;
    return dots<A, S, S>(w, p.ld_w_ih, n, x, p.input) + bias(p.b_ih, g * H + j, n);
  }
  // (W_hh h_b + b_hh), W_hh's product skipped where h0 is zeros.
  V<A> gh(int64_t b, int g, int64_t j, int n) const {
    const V<A> bh = bias(p.b_hh, g * H + j, n);
    if (!p.h0) return bh;
    const S* w = static_cast<const S*>(p.w_hh) + (g * H + j) * p.ld_w_hh;
    return dots<A, S, S>(w, p.ld_w_hh, n, static_cast<const S*>(p.h0) + b * H, H) + bh;
  }
  V<A> state(const void* s, int64_t at, int n) const {
    return s ? load<A, S>(static_cast<const S*>(s) + at, n) : V<A>{};
  }

  void block(int64_t b, int64_t j, int n) const {
    const int64_t at = b * H + j;
    S* h_n = static_cast<S*>(p.h_n);
    switch (p.shape.mode) {
      case RnnMode::Lstm: {
        const V<A> i = sig(gi(b, 0, j, n) + gh(b, 0, j, n)), f = sig(gi(b, 1, j, n) + gh(b, 1, j, n));
        const V<A> g = tanh_(gi(b, 2, j, n) + gh(b, 2, j, n)), o = sig(gi(b, 3, j, n) + gh(b, 3, j, n));
        const V<A> c = f * state(p.c0, at, n) + i * g;
        store<A, S>(static_cast<S*>(p.c_n) + at, c, n);
        store<A, S>(h_n + at, o * tanh_(c), n);
        break;
      }
      case RnnMode::Gru: {
        const V<A> r = sig(gi(b, 0, j, n) + gh(b, 0, j, n)), z = sig(gi(b, 1, j, n) + gh(b, 1, j, n));
        const V<A> h = state(p.h0, at, n);
        if (p.shape.reset_after) {
          const V<A> nn = tanh_(gi(b, 2, j, n) + r * gh(b, 2, j, n));
          store<A, S>(h_n + at, nn + z * (h - nn), n);
        } else {  // the n gates wait for every unit's r * h (phase two)
          A* ws = static_cast<A*>(p.workspace);
          const int64_t BH = p.batch * H;
          store<A, A>(ws + at, z, n);
          store<A, A>(ws + BH + at, gi(b, 2, j, n), n);
          store<A, A>(ws + 2 * BH + at, r * h, n);
        }
        break;
      }
      default: {
        const V<A> pre = gi(b, 0, j, n) + gh(b, 0, j, n);
        store<A, S>(h_n + at, p.shape.mode == RnnMode::RnnRelu ? rnn::vrelu(pre) : tanh_(pre), n);
      }
    }
  }

  // GRU reset_before's second phase: n = tanh((W_in x + b_in) + (W_hn (r * h) + b_hn)).
  void reset_before_n(int64_t b, int64_t j, int n) const {
    const int64_t at = b * H + j, BH = p.batch * H;
    const A* ws = static_cast<const A*>(p.workspace);
    const S* w = static_cast<const S*>(p.w_hh) + (2 * H + j) * p.ld_w_hh;
    const V<A> hn = dots<A, S, A>(w, p.ld_w_hh, n, ws + 2 * BH + b * H, H) + bias(p.b_hh, 2 * H + j, n);
    const V<A> nn = tanh_(load<A, A>(ws + BH + at, n) + hn);
    store<A, S>(static_cast<S*>(p.h_n) + at, nn + load<A, A>(ws + at, n) * (state(p.h0, at, n) - nn), n);
  }

  void run(const Team& team) const {
    const int64_t blocks = rnn::ceil_div(H, L);
    int64_t u0, u1;
    split_range(blocks, team.tid, team.size, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
      const int n = static_cast<int>(H - u * L < L ? H - u * L : L);
      for (int64_t b = 0; b < p.batch; ++b) block(b, u * L, n);
    }
    if (p.shape.mode == RnnMode::Gru && !p.shape.reset_after) {
      team.sync();
      for (int64_t u = u0; u < u1; ++u) {
        const int n = static_cast<int>(H - u * L < L ? H - u * L : L);
        for (int64_t b = 0; b < p.batch; ++b) reset_before_n(b, u * L, n);
      }
    }
  }
};

template <typename A, typename S>
void step_t(const RnnDirectParams& p) {
  Step<A, S> s{p, p.shape.hidden, rnn_gate_count(p.shape.mode)};
  // Threads: at most one per unit block, and one alone for a small step: under 128 KB of weights (a
  // thread wakes in ~1-3 us, about what such a step streams in), counted 4x past 8 rows, where each
  // weight feeds that many FMAs (compute, not streaming, then sets the step's time).
  const int64_t bytes = s.G * s.H * (p.input + s.H) * static_cast<int64_t>(sizeof(S)) * (p.batch > 8 ? 4 : 1);
  int64_t nt = p.num_threads < 1 ? 1 : p.num_threads;
  if (nt > rnn::ceil_div(s.H, Step<A, S>::L)) nt = rnn::ceil_div(s.H, Step<A, S>::L);
  if (bytes < (128 << 10)) nt = 1;
  parallel_run(static_cast<int>(nt), [](void* ctx, const Team& team) {
    static_cast<const Step<A, S>*>(ctx)->run(team);
  }, &s);
}

void step(const RnnDirectParams& p) {
  switch (p.dtype) {
    case DType::Float64: return step_t<double, double>(p);
    case DType::BFloat16: return step_t<float, bf16>(p);
    default: return step_t<float, float>(p);
  }
}

}  // namespace
}  // namespace direct
PSK_ISA_NAMESPACE_END

PSK_DEFINE_CPU_KERNELS(RnnDirectCpuKernels, rnn_direct, {&PSK_CONCAT(isa_, PSK_ISA)::direct::step})
