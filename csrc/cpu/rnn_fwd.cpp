// Recurrent CPU kernels, forward: sizes, weight packing and the persistent sequence forward
// (contract: pyseqkern/rnn.h). Compiled once per ISA level.
#include "rnn_common.h"

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {
namespace {

// ---- sizes ------------------------------------------------------------------------------------------
RnnSizes sizes(const RnnShape& s, int64_t B, bool is_double) {
  const int64_t L = is_double ? lanes<double>() : lanes<float>();
  const Layout l = layout_of(s, L);
  RnnSizes r;
  r.lanes = L;
  r.packed_numel = l.packed_numel;
  const int64_t Kp = l.UK * L, Hp = l.U * L;
  const int64_t fwd = 2 * B * Kp + 4 * B * Hp;                  // h (double buffer), c, m, r*h, z
  const int64_t bwd = B * (2 * Kp + Hp + 2 * l.G * l.H);        // dh_rec, dh_total, dc, dG (x2)
  r.workspace_numel = (fwd > bwd ? fwd : bwd) + 8 * L;          // + room to align each buffer
  reserve_layout(l, s.mode, &r.reserve_cols, &r.reserve_hprev);
  return r;
}

// ---- packing ----------------------------------------------------------------------------------------
// dst[u][k][g][l] = src[g * gate_stride + (u*L + l) * unit_stride + k * k_stride], 0 past `units`.
template <typename T, typename A>
void pack_section(A* dst, const T* src, int64_t units, int64_t K, int64_t G, int64_t L, int64_t gate_stride,
                  int64_t unit_stride, int64_t k_stride) {
  const int64_t U = ceil_div(units, L);
  for (int64_t u = 0; u < U; ++u)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t l = 0; l < L; ++l) {
          const int64_t j = u * L + l;
          dst[((u * K + k) * G + g) * L + l] =
              j < units ? static_cast<A>(to_acc(src[g * gate_stride + j * unit_stride + k * k_stride])) : A(0);
        }
}

template <typename T, typename A>
void pack_typed(const RnnPackParams& p) {
  const Layout l = layout_of(p.shape, lanes<A>());
  A* out = static_cast<A*>(p.out);
  const T* whh = static_cast<const T*>(p.w_hh);
  pack_section(out + l.fmain, whh, l.H, l.K, l.G, l.L, l.H * p.ld_w_hh, p.ld_w_hh, 1);
  pack_section(out + l.bmain, whh, l.K, l.G * l.H, 1, l.L, 0, 1, p.ld_w_hh);
  if (l.P > 0) {
    const T* whr = static_cast<const T*>(p.w_hr);
    pack_section(out + l.fproj, whr, l.P, l.H, 1, l.L, 0, p.ld_w_hr, 1);
    pack_section(out + l.bproj, whr, l.H, l.P, 1, l.L, 0, 1, p.ld_w_hr);
  }
}

void pack(const RnnPackParams& p) {
  if (p.dtype == DType::Float64) pack_typed<double, double>(p);
  else if (p.dtype == DType::BFloat16) pack_typed<bf16, float>(p);
  else pack_typed<float, float>(p);
}

// ---- forward ----------------------------------------------------------------------------------------
enum class Variant { Lstm, GruAfter, GruBefore, Rnn };

template <typename A>
struct FwdCtx {
  const RnnFwdParams* p;
  Layout l;
  RnnSizes sz;
  A* hbuf[2];  // [B][Kp] each: h_{t-1} is read by every thread, h_t written by the owner of each block
  A* c;        // [B][Hp] LSTM cell state (each block only ever touched by its owner)
  A* m;        // [B][Hp] LSTM proj: o * tanh(c), input of the projection
  A* rh;       // [B][Hp] GRU reset_before: r * h_{t-1}, input of the n-gate product
  A* z;        // [B][Hp] GRU reset_before: z kept between the two phases
  bool relu;
};

template <Variant VAR, typename T, typename A>
void fwd_worker(void* raw, const Team& team) {
  const int tid = team.tid, nt = team.size;
  FwdCtx<A>& c = *static_cast<FwdCtx<A>*>(raw);
  const RnnFwdParams& p = *c.p;
  const Layout& l = c.l;
  const RnnSeq& q = p.seq;
  constexpr int L = lanes<A>();
  const int64_t H = l.H, K = l.K, P = l.P, B = q.batch, Kp = l.UK * L, Hp = l.U * L;
  const int64_t rc = c.sz.reserve_cols, hprev_col = c.sz.reserve_hprev;
  int64_t u0, u1, p0, p1, k0, k1;
  split_range(l.U, tid, nt, &u0, &u1);
  split_range(l.UP, tid, nt, &p0, &p1);
  split_range(l.UK, tid, nt, &k0, &k1);
  const A* packed = static_cast<const A*>(p.packed);
  const T* xg = static_cast<const T*>(p.x_gates);
  const T* h0 = static_cast<const T*>(p.h0);
  const T* c0 = static_cast<const T*>(p.c0);
  const T* bhn = static_cast<const T*>(p.b_hn);
  T* y = static_cast<T*>(p.y);
  T* h_n = static_cast<T*>(p.h_n);
  T* c_n = static_cast<T*>(p.c_n);
  A* res = static_cast<A*>(p.reserve);

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t kb = k0; kb < k1; ++kb) {
      const int valid = static_cast<int>(K - kb * L < L ? K - kb * L : L);
      store<A>(c.hbuf[0] + b * Kp + kb * L, h0 ? load<A>(h0 + b * K + kb * L, valid) : splat(A(0)), L);
    }
    if (VAR == Variant::Lstm)
      for (int64_t u = u0; u < u1; ++u) {
        const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
        store<A>(c.c + b * Hp + u * L, c0 ? load<A>(c0 + b * H + u * L, valid) : splat(A(0)), L);
      }
  }
  team.sync();

  for (int64_t s = 0; s < q.steps; ++s) {
    const int64_t nb = seq_active(q, s);
    const A* hp = c.hbuf[s & 1];
    A* hn = c.hbuf[(s + 1) & 1];
    // Gates for own unit blocks: the tile's recurrent sums, then the state update of (row b, block u).
    auto epilogue = [&](int64_t b, int64_t u, const Tile<A>& acc, int r, int col) {
      const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
      const int64_t row = seq_row(q, s, b);
      const bool last = s == seq_len(q, b) - 1;
      const T* gx = xg + row * p.ld_gates + u * L;
      A* rr = res ? res + row * rc : nullptr;
      if (VAR == Variant::Lstm) {
        const V<A> i = vsigmoid(acc.v[r][col] + load<A>(gx, valid));
        const V<A> f = vsigmoid(acc.v[r][col + 1] + load<A>(gx + H, valid));
        const V<A> g = vtanh(acc.v[r][col + 2] + load<A>(gx + 2 * H, valid));
        const V<A> o = vsigmoid(acc.v[r][col + 3] + load<A>(gx + 3 * H, valid));
        A* cv = c.c + b * Hp + u * L;
        const V<A> cnew = f * load<A>(cv, L) + i * g;
        store<A>(cv, cnew, L);
        const V<A> h = o * vtanh(cnew);
        if (rr) {
          store<A>(rr + u * L, i, valid);
          store<A>(rr + H + u * L, f, valid);
          store<A>(rr + 2 * H + u * L, g, valid);
          store<A>(rr + 3 * H + u * L, o, valid);
          store<A>(rr + 4 * H + u * L, cnew, valid);
        }
        if (last) store<A>(c_n + b * H + u * L, cnew, valid);
        if (P > 0) {
          store<A>(c.m + b * Hp + u * L, h, L);
          if (rr) store<A>(rr + 5 * H + u * L, h, valid);
        } else {
          store<A>(hn + b * Kp + u * L, h, L);
          store<A>(y + row * p.ld_y + u * L, h, valid);
          if (rr) store<A>(rr + hprev_col + u * L, load<A>(hp + b * Kp + u * L, L), valid);
          if (last) store<A>(h_n + b * K + u * L, h, valid);
        }
      } else if (VAR == Variant::GruAfter) {
        const V<A> hprev = load<A>(hp + b * Kp + u * L, L);
        const V<A> rg = vsigmoid(acc.v[r][col] + load<A>(gx, valid));
        const V<A> zg = vsigmoid(acc.v[r][col + 1] + load<A>(gx + H, valid));
        const V<A> hng = acc.v[r][col + 2] + (bhn ? load<A>(bhn + u * L, valid) : splat(A(0)));
        const V<A> ng = vtanh(load<A>(gx + 2 * H, valid) + rg * hng);
        const V<A> h = (A(1) - zg) * ng + zg * hprev;
        store<A>(hn + b * Kp + u * L, h, L);
        store<A>(y + row * p.ld_y + u * L, h, valid);
        if (last) store<A>(h_n + b * K + u * L, h, valid);
        if (rr) {
          store<A>(rr + u * L, rg, valid);
          store<A>(rr + H + u * L, zg, valid);
          store<A>(rr + 2 * H + u * L, ng, valid);
          store<A>(rr + 3 * H + u * L, hng, valid);
          store<A>(rr + hprev_col + u * L, hprev, valid);
        }
      } else if (VAR == Variant::GruBefore) {
        const V<A> hprev = load<A>(hp + b * Kp + u * L, L);
        const V<A> rg = vsigmoid(acc.v[r][col] + load<A>(gx, valid));
        const V<A> zg = vsigmoid(acc.v[r][col + 1] + load<A>(gx + H, valid));
        const V<A> rhv = rg * hprev;
        store<A>(c.rh + b * Hp + u * L, rhv, L);
        store<A>(c.z + b * Hp + u * L, zg, L);
        if (rr) {
          store<A>(rr + u * L, rg, valid);
          store<A>(rr + H + u * L, zg, valid);
          store<A>(rr + 3 * H + u * L, rhv, valid);
          store<A>(rr + hprev_col + u * L, hprev, valid);
        }
      } else {
        const V<A> pre = acc.v[r][col] + load<A>(gx, valid);
        const V<A> h = c.relu ? vrelu(pre) : vtanh(pre);
        store<A>(hn + b * Kp + u * L, h, L);
        store<A>(y + row * p.ld_y + u * L, h, valid);
        if (last) store<A>(h_n + b * K + u * L, h, valid);
        if (rr) {
          store<A>(rr + u * L, h, valid);
          store<A>(rr + hprev_col + u * L, load<A>(hp + b * Kp + u * L, L), valid);
        }
      }
    };
    auto hrow = [&](int64_t b) { return hp + b * Kp; };
    if constexpr (VAR == Variant::Lstm) tiled_product<4, A>(nb, u0, u1, packed + l.fmain, K, 4 * L, K * 4 * L, hrow, epilogue);
    if constexpr (VAR == Variant::GruAfter) tiled_product<3, A>(nb, u0, u1, packed + l.fmain, K, 3 * L, K * 3 * L, hrow, epilogue);
    if constexpr (VAR == Variant::GruBefore) tiled_product<2, A>(nb, u0, u1, packed + l.fmain, K, 3 * L, K * 3 * L, hrow, epilogue);
    if constexpr (VAR == Variant::Rnn) tiled_product<1, A>(nb, u0, u1, packed + l.fmain, K, L, K * L, hrow, epilogue);
    if (VAR == Variant::GruBefore) {
      // Phase 2: n = tanh(x_n + W_hn (r * h_{t-1})) needs every unit's r * h_{t-1}.
      team.sync();
      tiled_product<1, A>(nb, u0, u1, packed + l.fmain + 2 * L, K, 3 * L, K * 3 * L,
                          [&](int64_t b) { return c.rh + b * Hp; },
                          [&](int64_t b, int64_t u, const Tile<A>& acc, int r, int col) {
        const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
        const int64_t row = seq_row(q, s, b);
        const V<A> ng = vtanh(acc.v[r][col] + load<A>(xg + row * p.ld_gates + 2 * H + u * L, valid));
        const V<A> zg = load<A>(c.z + b * Hp + u * L, L);
        const V<A> h = (A(1) - zg) * ng + zg * load<A>(hp + b * Kp + u * L, L);
        store<A>(hn + b * Kp + u * L, h, L);
        store<A>(y + row * p.ld_y + u * L, h, valid);
        if (s == seq_len(q, b) - 1) store<A>(h_n + b * K + u * L, h, valid);
        if (res) store<A>(res + row * rc + 2 * H + u * L, ng, valid);
      });
    }
    if (VAR == Variant::Lstm && P > 0) {
      // Projection: h_t = W_hr m_t needs every unit's m_t.
      team.sync();
      tiled_product<1, A>(nb, p0, p1, packed + l.fproj, H, L, H * L, [&](int64_t b) { return c.m + b * Hp; },
                          [&](int64_t b, int64_t pb, const Tile<A>& acc, int r, int col) {
        const int valid = static_cast<int>(P - pb * L < L ? P - pb * L : L);
        const int64_t row = seq_row(q, s, b);
        store<A>(hn + b * Kp + pb * L, acc.v[r][col], L);
        store<A>(y + row * p.ld_y + pb * L, acc.v[r][col], valid);
        if (s == seq_len(q, b) - 1) store<A>(h_n + b * K + pb * L, acc.v[r][col], valid);
        if (res) store<A>(res + row * rc + hprev_col + pb * L, load<A>(hp + b * Kp + pb * L, L), valid);
      });
    }
    team.sync();
  }
}

template <Variant VAR, typename T, typename A>
void forward_variant(const RnnFwdParams& p) {
  FwdCtx<A> c;
  c.p = &p;
  c.l = layout_of(p.shape, lanes<A>());
  c.sz = sizes(p.shape, p.seq.batch, std::is_same<A, double>::value);
  const int64_t L = c.l.L, B = p.seq.batch, Kp = c.l.UK * L, Hp = c.l.U * L;
  A* ws = static_cast<A*>(p.workspace);
  c.hbuf[0] = ws;
  c.hbuf[1] = c.hbuf[0] + B * Kp;
  c.c = c.hbuf[1] + B * Kp;
  c.m = c.c + B * Hp;
  c.rh = c.m + B * Hp;
  c.z = c.rh + B * Hp;
  c.relu = p.shape.mode == RnnMode::RnnRelu;
  int64_t blocks = c.l.U;
  const int64_t macs = B * c.l.G * c.l.H * c.l.K + B * c.l.P * c.l.H;
  const int nt = choose_threads(p.num_threads, blocks, macs, p.seq.steps);
  parallel_run(nt, fwd_worker<VAR, T, A>, &c);
}

template <typename T, typename A>
void forward_typed(const RnnFwdParams& p) {
  switch (p.shape.mode) {
    case RnnMode::Lstm: forward_variant<Variant::Lstm, T, A>(p); break;
    case RnnMode::Gru:
      if (p.shape.reset_after) forward_variant<Variant::GruAfter, T, A>(p);
      else forward_variant<Variant::GruBefore, T, A>(p);
      break;
    default: forward_variant<Variant::Rnn, T, A>(p); break;
  }
}

void forward(const RnnFwdParams& p) {
  if (p.seq.steps == 0 || p.seq.batch == 0) return;
  if (p.dtype == DType::Float64) forward_typed<double, double>(p);
  else if (p.dtype == DType::BFloat16) forward_typed<bf16, float>(p);
  else forward_typed<float, float>(p);
}

}  // namespace
}  // namespace rnn
PSK_ISA_NAMESPACE_END

// Defined in rnn_bwd.cpp (same ISA compilation).
PSK_ISA_NAMESPACE_BEGIN
namespace rnn {
void backward(const RnnBwdParams& p);
}
PSK_ISA_NAMESPACE_END

PSK_DEFINE_CPU_KERNELS(RnnCpuKernels, rnn,
                       {&PSK_CONCAT(isa_, PSK_ISA)::rnn::sizes, &PSK_CONCAT(isa_, PSK_ISA)::rnn::pack,
                        &PSK_CONCAT(isa_, PSK_ISA)::rnn::forward, &PSK_CONCAT(isa_, PSK_ISA)::rnn::backward})
