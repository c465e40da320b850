// Recurrent CPU kernels, backward through time (contract: pyseqkern/rnn.h). Compiled once per ISA.
//
// Steps run in reverse. Each thread owns unit blocks; per step it turns dh (= dy + the recurrent
// gradient) into gate gradients for its units, then, after one barrier, the recurrent gradient
// dh_{t-1} = dG W_hh for its state blocks from every unit's dG. dG is double buffered by step parity so
// the next step's writes never meet this step's reads. Or, where the panel fits half a core's L2 and
// each thread gets a cache line's worth of rows (split_rows), each thread owns rows and every unit of
// them: a row's gradients need no other row, so the steps run without a barrier.
#include "rnn_common.h"

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {
namespace {

enum class Variant { Lstm, GruAfter, GruBefore, Rnn };

template <typename A>
struct BwdCtx {
  const RnnBwdParams* p;
  Layout l;
  int64_t reserve_cols, reserve_hprev;
  A* dh_rec;   // [B][Kp] gradient reaching h_{t-1} through the recurrence (owner: state block, or row)
  A* dh_aux;   // [B][Kp] proj: dh_t total, read by all (a row's own); GRU: the direct part dh * z (owner only)
  A* dc;       // [B][Hp] LSTM cell-state gradient; GRU reset_after: the n gate's d_gates_x (owners as dG's)
  A* dG[2];    // [B][G*H] gate gradients of the step, read by every thread's recurrent product (a row's own)
  bf16* dG2[2];  // [B][ld2] pair sections only (Layout::dot): dG rounded to bfloat16, 0 past G*H, which
                 // the recurrent product reads in pairs
  int64_t ld2;
  bool relu;
  bool split_rows;  // threads own rows (every unit of them) instead of unit blocks: no barrier per step
  bool amx_split;   // the recurrent products on the tile unit, as three bfloat16 pieces a float (Layout::split)
};

// The products of bfloat16 storage read dG's bfloat16 copy in pairs (Layout::dot, bmain2), on levels with
// bfloat16 dot products: dG rounded to bfloat16 first, as torch's oneDNN bfloat16 LSTM rounds its gate
// gradients for its GEMMs, and as the forward rounds h.
template <typename T> constexpr bool kDotOf = kBf16Dot && std::is_same<T, bf16>::value;

// dh_rec[b][blk] = base[b][blk] + sum_j dG[b][j] * W[j][blk] over the panel's K values of j (pairs of j
// for a bf16x2 panel), for rows [b0, b0 + nb) of dG (rows ld apart) and state blocks [kb_begin, kb_end).
template <typename A, typename P, typename R>
void recurrent_grad(const P* bpanel, int64_t K, int64_t bstride, int64_t kb_begin, int64_t kb_end, const R* dG,
                    int64_t ld, int64_t b0, int64_t nb, int64_t Kp, const A* base, A* out) {
  constexpr int L = lanes<A>();
  tiled_product<1>(nb, kb_begin, kb_end, bpanel, K, L, bstride, [&](int64_t b) { return dG + b * ld; },
                   [&](int64_t b, int64_t kb, const V<A>* sum, int col) {
    const int64_t at = b * Kp + kb * L;
    store<A>(out + at, base ? sum[col] + load<A>(base + at, L) : sum[col], L);
  }, b0);
}

// dst[j * ldt + row(s, b)] = src[(by_row ? row(s, b) : b) * ld + j] for j < ncols (<= 16) and the step's
// rows b0 <= b < b0 + nb: some columns of the step's values, transposed. b runs innermost so the writes are
// contiguous (a step's rows sit side by side but in reverse packed sequences); the reads stay within nb
// cache lines.
template <typename D, typename S>
void transpose_step_cols(const RnnSeq& q, int64_t s, int64_t b0, int64_t nb, int64_t ncols, D* dst, int64_t ldt,
                         const S* src, int64_t ld, bool by_row, bool stream) {
  if (nb <= 0) return;
#if defined(__AVX512F__)
  if constexpr ((std::is_same<D, float>::value || std::is_same<D, bf16>::value) && std::is_same<S, float>::value) {
    // Rows b = 0..nb-1 at row0 + b (checked at the ends: rows move monotonically with b, so equal
    // ends mean all of them): 16 x 16 blocks transposed in registers. Element by element this loop
    // was 80% of the LSTM backward's own work; gathering a column's sixteen rows, 20%. bfloat16
    // copies (from float dG and reserve) narrow each transposed register as every bfloat16 store does
    // (until stop 16 they took the element loop: 12% of a bfloat16 LSTM training step).
    const int64_t row0 = seq_row(q, s, b0);
    if (seq_row(q, s, b0 + nb - 1) == row0 + nb - 1 && ncols <= 16) {
      const float* base = src + (by_row ? row0 : b0) * ld;
      const __mmask16 cm = static_cast<__mmask16>(lane_mask(static_cast<int>(ncols)));
      auto block = [&](int64_t i0, int64_t n, __m512 r[16]) {  // r[j]: column j of rows i0..i0+n-1
        for (int64_t i = 0; i < 16; ++i)
          r[i] = i < n ? _mm512_maskz_loadu_ps(cm, base + (i0 + i) * ld) : _mm512_setzero_ps();
        transpose16(r);
      };
      if constexpr (std::is_same<D, float>::value) {
        for (int64_t i0 = 0; i0 < nb; i0 += 16) {
          const int64_t n = nb - i0 < 16 ? nb - i0 : 16;
          __m512 r[16];
          block(i0, n, r);
          // Read by the weight-gradient GEMMs after the call: past the caches where a store is whole.
          for (int64_t j = 0; j < ncols; ++j) {
            float* to = dst + j * ldt + row0 + i0;
            if (n == 16) {
              vfloat v;
              std::memcpy(&v, &r[j], sizeof(v));
              store_stream<float>(to, v, 16, stream);
            } else {
              _mm512_mask_storeu_ps(to, static_cast<__mmask16>(lane_mask(static_cast<int>(n))), r[j]);
            }
          }
        }
      } else {
        // bfloat16: a column's 32 rows are one 64-byte line, so two blocks are narrowed and joined and
        // each line is written whole, not as two halves that each read the line first.
        for (int64_t i0 = 0; i0 < nb; i0 += 32) {
          const int64_t n = nb - i0 < 32 ? nb - i0 : 32;
          __m512 r[16];
          vbf16 lo[16];
          block(i0, n < 16 ? n : 16, r);
          for (int64_t j = 0; j < ncols; ++j) {
            vfloat v;
            std::memcpy(&v, &r[j], sizeof(v));
            lo[j] = narrow(v);
          }
          if (n > 16) block(i0 + 16, n - 16, r);
          for (int64_t j = 0; j < ncols; ++j) {
            vfloat v;
            std::memcpy(&v, &r[j], sizeof(v));
            const vbf16 hi = narrow(v);
            __m256i a, b;
            std::memcpy(&a, &lo[j], sizeof(a));
            std::memcpy(&b, &hi, sizeof(b));
            const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            D* to = dst + j * ldt + row0 + i0;
            if (n == 32 && stream && (reinterpret_cast<uintptr_t>(to) & 63) == 0)
              _mm512_stream_si512(reinterpret_cast<__m512i*>(to), line);
            else
              _mm512_mask_storeu_epi16(to, n == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << n) - 1u), line);
          }
        }
      }
      return;
    }
  }
#elif defined(__AVX2__)
  if constexpr ((std::is_same<D, float>::value || std::is_same<D, bf16>::value) && std::is_same<S, float>::value) {
    // The same by 8 x 8 blocks (ncols <= 8 at this level).
    const int64_t row0 = seq_row(q, s, b0);
    if (seq_row(q, s, b0 + nb - 1) == row0 + nb - 1 && ncols <= 8) {
      const float* base = src + (by_row ? row0 : b0) * ld;
      const __m256i cm = lanes_below(ncols);
      for (int64_t i0 = 0; i0 < nb; i0 += 8) {
        const int64_t n = nb - i0 < 8 ? nb - i0 : 8;
        __m256 r[8];
        for (int64_t i = 0; i < 8; ++i)
          r[i] = i < n ? _mm256_maskload_ps(base + (i0 + i) * ld, cm) : _mm256_setzero_ps();
        transpose8(r);
        for (int64_t j = 0; j < ncols; ++j) {
          vfloat v;
          std::memcpy(&v, &r[j], sizeof(v));
          store<float>(dst + j * ldt + row0 + i0, v, static_cast<int>(n));
        }
      }
      return;
    }
  }
#endif
  for (int64_t j = 0; j < ncols; ++j) {
    D* out = dst + j * ldt;
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const int64_t row = seq_row(q, s, b);
      out[row] = from_acc<D>(to_acc(src[(by_row ? row : b) * ld + j]));
    }
  }
}

template <Variant VAR, typename T, typename A>
void bwd_worker(void* raw, const Team& team) {
  const int tid = team.tid, nt = team.size;
  BwdCtx<A>& c = *static_cast<BwdCtx<A>*>(raw);
  const RnnBwdParams& p = *c.p;
  const Layout& l = c.l;
  const RnnSeq& q = p.seq;
  constexpr int L = lanes<A>();
  constexpr bool kDot = kDotOf<T>;  // (then l.dot: backward_variant)
  const int64_t H = l.H, K = l.K, P = l.P, G = l.G, GH = G * H, B = q.batch, Kp = l.UK * L, Hp = l.U * L;
  const int64_t rc = c.reserve_cols, hprev_col = c.reserve_hprev;
  // Outputs read only after the call (d_gates_x, the transposed copies) by non-temporal stores when
  // they are large (store_stream).
  const bool stream = q.steps * q.batch * G * H * int64_t(sizeof(T)) >= kStreamBytes;
  // Own unit blocks [u0, u1) and state blocks [k0, k1) of every row; with split_rows, every block of
  // rows [rb0, rb1).
  const bool split = c.split_rows;
  int64_t u0 = 0, u1 = l.U, k0 = 0, k1 = l.UK, rb0 = 0, rb1 = B;
  if (!split) {
    split_range(l.U, tid, nt, &u0, &u1);
    split_range(l.UK, tid, nt, &k0, &k1);  // without proj K = H: the same blocks as u0..u1
  } else if (q.lengths) {
    split_rows_by_cost(q, tid, nt, &rb0, &rb1);
  } else {
    split_rows_by_tiles<1>(B, tid, nt, &rb0, &rb1);
  }
  const A* packed = static_cast<const A*>(p.packed);
  const A* res = static_cast<const A*>(p.reserve);
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh_n = static_cast<const T*>(p.dh_n);
  const T* dc_n = static_cast<const T*>(p.dc_n);
  const T* c0 = static_cast<const T*>(p.c0);
  T* dgx = static_cast<T*>(p.d_gates_x);
  T* dgh = static_cast<T*>(p.d_gates_h);
  T* dproj = static_cast<T*>(p.d_proj);
  auto valid_of = [&](int64_t blk, int64_t n) { return static_cast<int>(n - blk * L < L ? n - blk * L : L); };
  // The transposed copies of the step's own columns (rnn.h), once their values are final. The
  // d_gates_ht of GRU reset_after is dG (A) rounded to T, as d_gates_h would be.
  auto transpose_step = [&](int64_t s, int64_t b0, int64_t nb) {
    T* xt = static_cast<T*>(p.d_gates_xt);
    T* ht = static_cast<T*>(p.d_gates_ht);
    T* hpt = static_cast<T*>(p.h_prev_t);
    const A* dG = c.dG[s & 1];
    for (int64_t u = u0; u < u1 && (xt || ht); ++u)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t col = g * H + u * L;
        // From dG, the same values in A (d_gates_x went out by store_stream and is no longer cached),
        // but for GRU reset_after's n gate, where dG has r * dn: from dn's own copy in c.dc.
        if (xt && VAR == Variant::GruAfter && g == 2)
          transpose_step_cols(q, s, b0, nb, valid_of(u, H), xt + col * p.ld_t, p.ld_t, c.dc + u * L, Hp, false,
                              stream);
        else if (xt)
          transpose_step_cols(q, s, b0, nb, valid_of(u, H), xt + col * p.ld_t, p.ld_t, dG + col, GH, false, stream);
        if (ht)  // dG holds d_gates_h's values (A), which d_gates_h would round to T
          transpose_step_cols(q, s, b0, nb, valid_of(u, H), ht + col * p.ld_t, p.ld_t, dG + col, GH, false, stream);
      }
    for (int64_t kb = k0; kb < k1 && hpt; ++kb)
      transpose_step_cols(q, s, b0, nb, valid_of(kb, K), hpt + kb * L * p.ld_t, p.ld_t, res + hprev_col + kb * L, rc,
                          true, stream);
  };

  for (int64_t b = rb0; b < rb1; ++b) {
    for (int64_t kb = k0; kb < k1; ++kb)
      store<A>(c.dh_rec + b * Kp + kb * L, dh_n ? load<A>(dh_n + b * K + kb * L, valid_of(kb, K)) : splat(A(0)), L);
    if (VAR == Variant::Lstm)
      for (int64_t u = u0; u < u1; ++u)
        store<A>(c.dc + b * Hp + u * L, dc_n ? load<A>(dc_n + b * H + u * L, valid_of(u, H)) : splat(A(0)), L);
  }
  if (!split) team.sync();

  for (int64_t s = q.steps - 1; s >= 0; --s) {
    const int64_t nb = seq_active(q, s);
    // This thread's rows of the step: [r0, r0 + nr).
    const int64_t r0 = split ? rb0 : 0, r1 = split ? (nb < rb1 ? nb : rb1) : nb, nr = r1 > r0 ? r1 - r0 : 0;
    A* dG = c.dG[s & 1];
    // dG's bfloat16 copy for the pair product: own rows and units, once their values are final.
    auto narrow_dG = [&]() {
      if constexpr (kDot) {
        bf16* g2 = c.dG2[s & 1];
        for (int64_t b = r0; b < r1; ++b)
          for (int64_t g = 0; g < G; ++g)
            for (int64_t u = u0; u < u1; ++u) {
              const int64_t col = b * GH + g * H + u * L;
              store<A>(g2 + b * c.ld2 + g * H + u * L, load<A>(dG + col, valid_of(u, H)), valid_of(u, H));
            }
      }
    };
    // dh_rec = base + dG W_hh over the first J gate rows, for own state blocks.
    auto rec_grad = [&](const A* base, int64_t J) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
      if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
        if (c.amx_split && nb >= kSplitStepRows<1> &&
            split_product<1>(nr, k0, k1, reinterpret_cast<const bf16x2*>(packed + l.bsplit), l.bsplit_piece, J, L,
                             pairs_stored(GH) * L, packed + l.bmain, L, GH * L, [&](int64_t b) { return dG + b * GH; },
                             [&](int64_t b, int64_t kb, const V<A>* sum, int col) {
              const int64_t at = b * Kp + kb * L;
              store<A>(c.dh_rec + at, base ? sum[col] + load<A>(base + at, L) : sum[col], L);
            }, r0))
          return;
      }
#endif
      if constexpr (kDot)
        recurrent_grad<A>(reinterpret_cast<const bf16x2*>(packed + l.bmain2), ceil_div(J, 2), pairs_stored(GH) * L,
                          k0, k1, c.dG2[s & 1], c.ld2, r0, nr, Kp, base, c.dh_rec);
      else
        recurrent_grad<A>(packed + l.bmain, J, GH * L, k0, k1, dG, GH, r0, nr, Kp, base, c.dh_rec);
    };
    if (VAR == Variant::Lstm && P > 0) {
      // dh_t = dy + recurrent part, for own projection blocks; everyone needs all of it next.
      for (int64_t kb = k0; kb < k1; ++kb)
        for (int64_t b = r0; b < r1; ++b) {
          const int64_t row = seq_row(q, s, b);
          V<A> dh = load<A>(c.dh_rec + b * Kp + kb * L, L);
          if (dy) dh += load<A>(dy + row * p.ld_dy + kb * L, valid_of(kb, K));
          store<A>(c.dh_aux + b * Kp + kb * L, dh, L);
          store<A>(dproj + row * P + kb * L, dh, valid_of(kb, K));
        }
      if (!split) team.sync();
    }
    // d_gates_x is read only after the call (the GEMMs; the transposes read dG): past the caches.
    auto store_dgx = [stream](T* to, V<A> v, int valid) {
      if constexpr (std::is_same<T, A>::value) store_stream<A>(to, v, valid, stream);
      else store<A>(to, v, valid);
    };
    // Gate gradients of (row b, own block u), given dh, the gradient reaching h_t.
    auto gates = [&](int64_t b, int64_t u, V<A> dh) {
      const int valid = valid_of(u, H);
      const int64_t row = seq_row(q, s, b);
      const A* rr = res + row * rc;
      T* gxo = dgx + row * p.ld_dgx + u * L;
      A* dGb = dG + b * GH + u * L;
      if (VAR == Variant::Lstm) {
        const V<A> i = load<A>(rr + u * L, valid), f = load<A>(rr + H + u * L, valid);
        const V<A> g = load<A>(rr + 2 * H + u * L, valid), o = load<A>(rr + 3 * H + u * L, valid);
        const V<A> ct = load<A>(rr + 4 * H + u * L, valid);
        V<A> cprev;
        if (s > 0) cprev = load<A>(res + seq_row(q, s - 1, b) * rc + 4 * H + u * L, valid);
        else cprev = c0 ? load<A>(c0 + b * H + u * L, valid) : splat(A(0));
        const V<A> tc = vtanh(ct);
        A* dcv = c.dc + b * Hp + u * L;
        const V<A> dc = load<A>(dcv, L) + dh * o * (A(1) - tc * tc);
        const V<A> gi = dc * g * i * (A(1) - i), gf = dc * cprev * f * (A(1) - f);
        const V<A> gg = dc * i * (A(1) - g * g), go = dh * tc * o * (A(1) - o);
        store<A>(dcv, dc * f, L);
        store_dgx(gxo, gi, valid);
        store_dgx(gxo + H, gf, valid);
        store_dgx(gxo + 2 * H, gg, valid);
        store_dgx(gxo + 3 * H, go, valid);
        store<A>(dGb, gi, valid);
        store<A>(dGb + H, gf, valid);
        store<A>(dGb + 2 * H, gg, valid);
        store<A>(dGb + 3 * H, go, valid);
      } else if (VAR == Variant::Rnn) {
        const V<A> h = load<A>(rr + u * L, valid);
        // (relu: as torch's threshold_backward, a NaN output passes the gradient on)
        const V<A> gp = c.relu ? (h <= A(0) ? splat(A(0)) : dh) : dh * (A(1) - h * h);
        store_dgx(gxo, gp, valid);
        store<A>(dGb, gp, valid);
      } else {
        const V<A> rg = load<A>(rr + u * L, valid), zg = load<A>(rr + H + u * L, valid);
        const V<A> ng = load<A>(rr + 2 * H + u * L, valid), hprev = load<A>(rr + hprev_col + u * L, valid);
        const V<A> dnp = dh * (A(1) - zg) * (A(1) - ng * ng);
        const V<A> dzp = dh * (hprev - ng) * zg * (A(1) - zg);
        store<A>(c.dh_aux + b * Kp + u * L, dh * zg, L);
        if (VAR == Variant::GruAfter) {
          const V<A> hng = load<A>(rr + 3 * H + u * L, valid);
          const V<A> drp = dnp * hng * rg * (A(1) - rg);
          store_dgx(gxo, drp, valid);
          store_dgx(gxo + H, dzp, valid);
          store_dgx(gxo + 2 * H, dnp, valid);
          if (p.d_gates_xt) store<A>(c.dc + b * Hp + u * L, dnp, L);
          if (dgh) {
            T* gho = dgh + row * p.ld_dgh + u * L;
            store<A>(gho, drp, valid);
            store<A>(gho + H, dzp, valid);
            store<A>(gho + 2 * H, dnp * rg, valid);
          }
          store<A>(dGb, drp, valid);
          store<A>(dGb + H, dzp, valid);
          store<A>(dGb + 2 * H, dnp * rg, valid);
        } else {
          store<A>(dGb + H, dzp, valid);
          store<A>(dGb + 2 * H, dnp, valid);
        }
      }
    };
    if (VAR == Variant::Lstm && P > 0) {
      // dh_t = W_hr^T (dy + recurrent part), from every projection block.
      tiled_product<1, A>(nr, u0, u1, packed + l.bproj, P, L, P * L, [&](int64_t b) { return c.dh_aux + b * Kp; },
                          [&](int64_t b, int64_t u, const V<A>* sum, int col) { gates(b, u, sum[col]); }, r0);
    } else {
      // Rows outer: a row's reserve (G gate segments and c, rc values apart from the next row's) is read
      // a block after another, runs the L2 streamer follows; with blocks outer each block of a step
      // visited every row, 6 KB apart, and the reserve (written past the caches) came line by line
      // from memory. Stop 42, the Xeon, the backward kernel's own time a call (T, B, H) = (100, 32, 256),
      // 3 process pairs blocks / rows outer: LSTM float32 8.33 / 8.19, 8.07 / 7.78, 8.18 / 7.16 ms; under
      // autocast(bfloat16) 6.91 / 6.35, 7.17 / 6.22, 7.10 / 5.92; GRU under autocast 6.44 / 6.17, 6.29 /
      // 6.07. (Each (row, block) is on its own: the same bits either way.)
      for (int64_t b = r0; b < r1; ++b)
        for (int64_t u = u0; u < u1; ++u) {
          V<A> dh = load<A>(c.dh_rec + b * Kp + u * L, L);
          if (dy) dh += load<A>(dy + seq_row(q, s, b) * p.ld_dy + u * L, valid_of(u, H));
          gates(b, u, dh);
        }
    }
    if (VAR != Variant::GruBefore) narrow_dG();
    if (!split) team.sync();
    if (VAR != Variant::GruBefore) transpose_step(s, r0, nr);
    A* base = (VAR == Variant::GruAfter || VAR == Variant::GruBefore) ? c.dh_aux : nullptr;
    if (VAR == Variant::GruBefore) {
      // d(r * h_{t-1}) = dn_pre W_hn needs every unit's dn_pre; then r's gradient, then the rest.
      tiled_product<1, A>(nr, u0, u1, packed + l.bmain + 2 * H * L, H, L, GH * L,
                          [&](int64_t b) { return dG + b * GH + 2 * H; },
                          [&](int64_t b, int64_t u, const V<A>* sum, int col) {
        const int valid = valid_of(u, H);
        const int64_t row = seq_row(q, s, b);
        const A* rr = res + row * rc;
        const V<A> drh = sum[col];
        const V<A> rg = load<A>(rr + u * L, valid), hprev = load<A>(rr + hprev_col + u * L, valid);
        const V<A> drp = drh * hprev * rg * (A(1) - rg);
        A* aux = c.dh_aux + b * Kp + u * L;
        store<A>(aux, load<A>(aux, L) + drh * rg, L);
        A* dGb = dG + b * GH + u * L;
        store<A>(dGb, drp, valid);
        T* gxo = dgx + row * p.ld_dgx + u * L;
        store_dgx(gxo, drp, valid);
        store_dgx(gxo + H, load<A>(dGb + H, valid), valid);
        store_dgx(gxo + 2 * H, load<A>(dGb + 2 * H, valid), valid);
      }, r0);
      narrow_dG();
      if (!split) team.sync();
      transpose_step(s, r0, nr);
      rec_grad(base, 2 * H);
    } else {
      rec_grad(base, GH);
    }
  }

  // Every row's backward ends at step 0: the gradients of the initial states.
  T* dh0 = static_cast<T*>(p.dh0);
  T* dc0 = static_cast<T*>(p.dc0);
  for (int64_t b = rb0; b < rb1; ++b) {
    for (int64_t kb = k0; kb < k1; ++kb) store<A>(dh0 + b * K + kb * L, load<A>(c.dh_rec + b * Kp + kb * L, L), valid_of(kb, K));
    if (VAR == Variant::Lstm && dc0)
      for (int64_t u = u0; u < u1; ++u) store<A>(dc0 + b * H + u * L, load<A>(c.dc + b * Hp + u * L, L), valid_of(u, H));
  }
  if (stream) stream_fence();  // d_gates_x and the transposed copies went out by non-temporal stores
  amx_release();               // (the amx level's tiles, if recurrent_grad configured them: else torch's
                               // oneDNN, releasing them on this thread, left our key stale: SIGILL)
}

// The fewest bytes of rows per thread, per column of the transposed copies, for the backward's threads
// to own rows: each writes its rows of every column, and with fewer than a cache line's worth (16
// floats, 32 bfloat16) two threads' rows share every line they write.
constexpr int64_t kBwdRowBytesPerThread = 64;

template <Variant VAR, typename T, typename A>
void backward_variant(const RnnBwdParams& p) {
  BwdCtx<A> c;
  c.p = &p;
  constexpr bool kDot = kDotOf<T>;
  c.l = layout_of(p.shape, lanes<A>(), kDot, uses_split(p.dtype));
  c.amx_split = c.l.split && p.seq.batch >= kSplitRows;
  const int64_t L = c.l.L, B = p.seq.batch, Kp = c.l.UK * L, Hp = c.l.U * L, GH = c.l.G * c.l.H;
  reserve_layout(c.l, p.shape.mode, &c.reserve_cols, &c.reserve_hprev);
  A* ws = static_cast<A*>(p.workspace);
  c.dh_rec = ws;
  c.dh_aux = c.dh_rec + B * Kp;
  c.dc = c.dh_aux + B * Kp;
  c.dG[0] = c.dc + B * Hp;
  c.dG[1] = c.dG[0] + B * GH;
  c.ld2 = 2 * pairs_stored(GH);
  c.dG2[0] = c.dG2[1] = nullptr;
  if (kDot) {
    c.dG2[0] = reinterpret_cast<bf16*>(c.dG[1] + B * GH);
    c.dG2[1] = c.dG2[0] + B * c.ld2;
    for (bf16* g2 : c.dG2)  // (the pairs past G*H: their weights are 0, but 0 x NaN is not)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = GH; j < c.ld2; ++j) g2[b * c.ld2 + j].bits = 0;
  }
  c.relu = p.shape.mode == RnnMode::RnnRelu;
  const int64_t macs = B * GH * c.l.K + B * c.l.P * c.l.H;
  int nt = choose_threads(p.num_threads, c.l.U < c.l.UK ? c.l.U : c.l.UK, macs, p.seq.steps);
  // Rows instead of units (as the forward's split_rows) where half a core's L2 holds the whole panel:
  // no barrier per step, and no thread idles while another finishes a larger share of blocks (H = 37:
  // 3 blocks, split 2 + 1). In-process, 9 A B B A rounds, training step time by rows / by units (T, B,
  // I, H): LSTM (150,33,13,37) 0.91, (100,32,64,64) 0.97, (100,32,128,128) 1.01; GRU (150,33,13,37) 0.94,
  // (100,32,64,64) 0.99; RNN (100,32,64,64) 0.96, (100,32,256,256) 0.96; packed (lengths T..T/10) LSTM
  // (150,33,13,37) 0.83, (100,32,64,64) 0.97, GRU (100,32,128,128) 0.96, RNN (100,32,256,256) 0.95. With
  // the whole L2, LSTM and GRU at H=256 B=8 lost (1.05 and 1.07), and at H=128 B=8 too (1.04 and 1.08)
  // until threads needed 16 float rows each (kBwdRowBytesPerThread).
  const int by_rows = choose_threads(p.num_threads, B * int64_t(sizeof(T)) / kBwdRowBytesPerThread, macs,
                                     p.seq.steps);
  const int64_t panel_bytes = (GH * Kp + c.l.H * c.l.UP * L) * int64_t(sizeof(A));
  c.split_rows = by_rows > 1 && panel_bytes <= cpu_l2_bytes() / 2;
  if (c.split_rows) nt = by_rows;
  parallel_run(nt, bwd_worker<VAR, T, A>, &c);
}

template <typename T, typename A>
void backward_typed(const RnnBwdParams& p) {
  switch (p.shape.mode) {
    case RnnMode::Lstm: backward_variant<Variant::Lstm, T, A>(p); break;
    case RnnMode::Gru:
      if (p.shape.reset_after) backward_variant<Variant::GruAfter, T, A>(p);
      else backward_variant<Variant::GruBefore, T, A>(p);
      break;
    default: backward_variant<Variant::Rnn, T, A>(p); break;
  }
}

}  // namespace

void backward(const RnnBwdParams& p) {
  if (p.seq.batch == 0) return;
  if (p.dtype == DType::Float64) backward_typed<double, double>(p);
  else if (p.dtype == DType::BFloat16) backward_typed<bf16, float>(p);
  else backward_typed<float, float>(p);
}

}  // namespace rnn
PSK_ISA_NAMESPACE_END
