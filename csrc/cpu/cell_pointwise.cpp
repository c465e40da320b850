// Pointwise parts of a recorded cell step, compiled per ISA level (contract: pyseqkern/cell_pointwise.h).
// One register of units at a time, the tail of a row zero-padded; the activations are the recurrent
// kernels' (rnn_activations.h), so a step's gates carry the same error class as a sequence's.
#include "pyseqkern/cell_pointwise.h"

#include "rnn_activations.h"

PSK_ISA_NAMESPACE_BEGIN
namespace cell {
namespace {

using rnn::lanes;
using rnn::V;
using rnn::vsigmoid;
using rnn::vtanh;

// n (<= L) elements from p + at, zeros beyond them or where p is null (a state or gradient not given).
template <typename A>
inline V<A> ld(const void* p, int64_t at, int n) {
  return p ? rnn::load<A, A>(static_cast<const A*>(p) + at, n) : V<A>{};
}
template <typename A>
inline void st(void* p, int64_t at, V<A> v, int n) { rnn::store<A, A>(static_cast<A*>(p) + at, v, n); }

// body(b, j, n) for each register of units j..j+n of each row b.
template <typename A, typename Body>
inline void each(int64_t batch, int64_t hidden, Body&& body) {
  constexpr int L = lanes<A>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < hidden; j += L) body(b, j, static_cast<int>(hidden - j < L ? hidden - j : L));
}

template <typename A>
void lstm_forward_t(int64_t batch, int64_t H, void* gates, const void* c, void* c_n, void* tanh_c, void* h_n) {
  each<A>(batch, H, [&](int64_t b, int64_t j, int n) {
    const int64_t g = b * 4 * H + j, k = b * H + j;
    const V<A> i = vsigmoid(ld<A>(gates, g, n)), f = vsigmoid(ld<A>(gates, g + H, n));
    const V<A> gg = vtanh(ld<A>(gates, g + 2 * H, n)), o = vsigmoid(ld<A>(gates, g + 3 * H, n));
    st<A>(gates, g, i, n);
    st<A>(gates, g + H, f, n);
    st<A>(gates, g + 2 * H, gg, n);
    st<A>(gates, g + 3 * H, o, n);
    const V<A> cn = f * ld<A>(c, k, n) + i * gg;
    const V<A> tc = vtanh(cn);
    st<A>(c_n, k, cn, n);
    st<A>(tanh_c, k, tc, n);
    st<A>(h_n, k, o * tc, n);
  });
}

template <typename A>
void lstm_backward_t(int64_t batch, int64_t H, const void* act, const void* c, const void* tanh_c, const void* dh_n,
                     const void* dc_n, void* d_gates, void* dc) {
  const V<A> one = rnn::splat(A(1));
  each<A>(batch, H, [&](int64_t b, int64_t j, int n) {
    const int64_t g = b * 4 * H + j, k = b * H + j;
    const V<A> i = ld<A>(act, g, n), f = ld<A>(act, g + H, n), gg = ld<A>(act, g + 2 * H, n);
    const V<A> o = ld<A>(act, g + 3 * H, n), tc = ld<A>(tanh_c, k, n), dh = ld<A>(dh_n, k, n);
    const V<A> dcn = ld<A>(dc_n, k, n) + dh * o * (one - tc * tc);
    st<A>(d_gates, g, dcn * gg * i * (one - i), n);
    st<A>(d_gates, g + H, dcn * ld<A>(c, k, n) * f * (one - f), n);
    st<A>(d_gates, g + 2 * H, dcn * i * (one - gg * gg), n);
    st<A>(d_gates, g + 3 * H, dh * tc * o * (one - o), n);
    if (dc) st<A>(dc, k, dcn * f, n);
  });
}

template <typename A>
void gru_forward_t(int64_t batch, int64_t H, const void* gi, const void* gh, const void* h, void* act, void* h_n) {
  each<A>(batch, H, [&](int64_t b, int64_t j, int n) {
    const int64_t g = b * 3 * H + j, k = b * H + j;
    const V<A> r = vsigmoid(ld<A>(gi, g, n) + ld<A>(gh, g, n));
    const V<A> z = vsigmoid(ld<A>(gi, g + H, n) + ld<A>(gh, g + H, n));
    const V<A> nn = vtanh(ld<A>(gi, g + 2 * H, n) + r * ld<A>(gh, g + 2 * H, n));
    st<A>(act, g, r, n);
    st<A>(act, g + H, z, n);
    st<A>(act, g + 2 * H, nn, n);
    st<A>(h_n, k, nn + z * (ld<A>(h, k, n) - nn), n);
  });
}

template <typename A>
void gru_backward_t(int64_t batch, int64_t H, const void* act, const void* gh, const void* h, const void* dh_n,
                    void* d_gi, void* d_gh, void* dh) {
  const V<A> one = rnn::splat(A(1));
  each<A>(batch, H, [&](int64_t b, int64_t j, int n) {
    const int64_t g = b * 3 * H + j, k = b * H + j;
    const V<A> r = ld<A>(act, g, n), z = ld<A>(act, g + H, n), nn = ld<A>(act, g + 2 * H, n);
    const V<A> d = ld<A>(dh_n, k, n);
    const V<A> dn = d * (one - z) * (one - nn * nn);
    const V<A> dr = dn * ld<A>(gh, g + 2 * H, n) * r * (one - r);
    const V<A> dz = d * (ld<A>(h, k, n) - nn) * z * (one - z);
    st<A>(d_gi, g, dr, n);
    st<A>(d_gh, g, dr, n);
    st<A>(d_gi, g + H, dz, n);
    st<A>(d_gh, g + H, dz, n);
    st<A>(d_gi, g + 2 * H, dn, n);
    st<A>(d_gh, g + 2 * H, dn * r, n);
    if (dh) st<A>(dh, k, d * z, n);
  });
}

template <typename A>
void rnn_forward_t(int64_t batch, int64_t H, void* pre, bool relu) {
  each<A>(batch, H, [&](int64_t b, int64_t j, int n) {
    const int64_t k = b * H + j;
    const V<A> a = ld<A>(pre, k, n);
    st<A>(pre, k, relu ? (a < A(0) ? V<A>{} : a) : vtanh(a), n);  // (a NaN fails a < 0: stays NaN)
  });
}

template <typename A>
void rnn_backward_t(int64_t batch, int64_t H, const void* act, const void* dy, void* d_pre, bool relu) {
  const V<A> one = rnn::splat(A(1));
  each<A>(batch, H, [&](int64_t b, int64_t j, int n) {
    const int64_t k = b * H + j;
    const V<A> y = ld<A>(act, k, n), d = ld<A>(dy, k, n);
    st<A>(d_pre, k, relu ? (y <= A(0) ? V<A>{} : d) : d * (one - y * y), n);  // (as torch: a NaN passes d)
  });
}

void lstm_forward(bool f64, int64_t batch, int64_t hidden, void* gates, const void* c, void* c_n, void* tanh_c,
                  void* h_n) {
  if (f64) lstm_forward_t<double>(batch, hidden, gates, c, c_n, tanh_c, h_n);
  else lstm_forward_t<float>(batch, hidden, gates, c, c_n, tanh_c, h_n);
}
void lstm_backward(bool f64, int64_t batch, int64_t hidden, const void* act, const void* c, const void* tanh_c,
                   const void* dh_n, const void* dc_n, void* d_gates, void* dc) {
  if (f64) lstm_backward_t<double>(batch, hidden, act, c, tanh_c, dh_n, dc_n, d_gates, dc);
  else lstm_backward_t<float>(batch, hidden, act, c, tanh_c, dh_n, dc_n, d_gates, dc);
}
void gru_forward(bool f64, int64_t batch, int64_t hidden, const void* gi, const void* gh, const void* h, void* act,
                 void* h_n) {
  if (f64) gru_forward_t<double>(batch, hidden, gi, gh, h, act, h_n);
  else gru_forward_t<float>(batch, hidden, gi, gh, h, act, h_n);
}
void gru_backward(bool f64, int64_t batch, int64_t hidden, const void* act, const void* gh, const void* h,
                  const void* dh_n, void* d_gi, void* d_gh, void* dh) {
  if (f64) gru_backward_t<double>(batch, hidden, act, gh, h, dh_n, d_gi, d_gh, dh);
  else gru_backward_t<float>(batch, hidden, act, gh, h, dh_n, d_gi, d_gh, dh);
}
void rnn_forward(bool f64, int64_t batch, int64_t hidden, void* pre, bool relu) {
  if (f64) rnn_forward_t<double>(batch, hidden, pre, relu);
  else rnn_forward_t<float>(batch, hidden, pre, relu);
}
void rnn_backward(bool f64, int64_t batch, int64_t hidden, const void* act, const void* dy, void* d_pre, bool relu) {
  if (f64) rnn_backward_t<double>(batch, hidden, act, dy, d_pre, relu);
  else rnn_backward_t<float>(batch, hidden, act, dy, d_pre, relu);
}

}  // namespace
}  // namespace cell
PSK_ISA_NAMESPACE_END

#define PSK_CELL(fn) &PSK_CONCAT(isa_, PSK_ISA)::cell::fn
PSK_DEFINE_CPU_KERNELS(CellCpuKernels, cell,
                       {PSK_CELL(lstm_forward), PSK_CELL(lstm_backward), PSK_CELL(gru_forward),
                        PSK_CELL(gru_backward), PSK_CELL(rnn_forward), PSK_CELL(rnn_backward)})
#undef PSK_CELL
