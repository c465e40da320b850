// Recurrent CPU kernels, forward: sizes, weight packing and the persistent sequence forward
// (contract: pyseqkern/rnn.h). Compiled once per ISA level.
#include "rnn_common.h"

#include <stdexcept>
#include <string>

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {
namespace {

// ---- sizes ------------------------------------------------------------------------------------------
// The forward reads bfloat16 pair sections (Layout::dot) for bfloat16 storage where the level has
// bfloat16 dot products.
inline bool uses_dot(DType dtype) { return kBf16Dot && dtype == DType::BFloat16; }

// Where the ride runs: float32 and float64 on levels with 32 vector registers (AVX2's 16 hold one part
// only), and bfloat16 storage where the products are bf16 dot products on those registers (not amx,
// whose tile unit does a step's product).
template <typename T, typename A> constexpr bool rides() {
#if defined(__AVX512F__)
  return std::is_same<T, A>::value || (std::is_same<T, bf16>::value && kBf16Dot && !kAmx);
#else
  return false;
#endif
}

RnnSizes sizes(const RnnShape& s, int64_t B, DType dtype) {
  const int64_t L = dtype == DType::Float64 ? lanes<double>() : lanes<float>();
  const Layout l = layout_of(s, L, uses_dot(dtype), uses_split(dtype));
  RnnSizes r{};
  r.lanes = L;
  r.packed_numel = l.packed_numel;
  const int64_t Kp = l.UK * L, Hp = l.U * L;
  // h (double buffer), c, m, r*h, z; with pair sections, bfloat16 copies of h (x2), m and r*h.
  const int64_t fwd = 2 * B * Kp + 4 * B * Hp + (l.dot ? B * (Kp + Hp) : 0);
  // dh_rec, dh_total, dc, dG (x2); with pair sections, dG's bfloat16 copies (x2, 2 * GH2 values a row).
  const int64_t bwd = B * (2 * Kp + Hp + 2 * l.G * l.H + (l.dot ? 2 * pairs_stored(l.G * l.H) : 0));
  r.workspace_numel = (fwd > bwd ? fwd : bwd) + 8 * L;          // + room to align each buffer
  reserve_layout(l, s.mode, &r.reserve_cols, &r.reserve_hprev);
  const bool ride = dtype == DType::Float64    ? rides<double, double>()
                    : dtype == DType::BFloat16 ? rides<bf16, float>() && l.dot
                                               : rides<float, float>();
  r.ride_ring = B == 1 && ride ? kRnnRideRing : 0;
  r.split_rows = l.split ? kSplitRows : 0;
  return r;
}

// ---- packing ----------------------------------------------------------------------------------------
// dst[u][k][g][l] = src[g * gate_stride + (u*L + l) * unit_stride + k * k_stride], 0 past `units`, for
// the unit blocks u in [ub0, ub1) (-1: to the last).
template <typename T, typename A>
void pack_section(A* dst, const T* src, int64_t units, int64_t K, int64_t G, int64_t L, int64_t gate_stride,
                  int64_t unit_stride, int64_t k_stride, int64_t ub0 = 0, int64_t ub1 = -1) {
  const int64_t U = ub1 < 0 ? ceil_div(units, L) : ub1;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
    if (k_stride == 1 && L == 16) {
      // Rows of the source run along k, the destination along units: 16 x 16 register transposes
      // (element by element the read strides a whole row per unit; training packs every call).
      for (int64_t u = ub0; u < U; ++u)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t k0 = 0; k0 < K; k0 += 16) {
            const int64_t nk = K - k0 < 16 ? K - k0 : 16;
            const __mmask16 km = static_cast<__mmask16>(lane_mask(static_cast<int>(nk)));
            __m512 r[16];
            for (int64_t l = 0; l < 16; ++l) {
              const int64_t j = u * 16 + l;
              r[l] = j < units ? _mm512_maskz_loadu_ps(km, src + g * gate_stride + j * unit_stride + k0)
                               : _mm512_setzero_ps();
            }
            transpose16(r);
            for (int64_t kk = 0; kk < nk; ++kk) _mm512_storeu_ps(dst + ((u * K + k0 + kk) * G + g) * 16, r[kk]);
          }
      return;
    }
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
    if (k_stride == 1 && L == 8) {  // the same by 8 x 8 blocks
      for (int64_t u = ub0; u < U; ++u)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t k0 = 0; k0 < K; k0 += 8) {
            const int64_t nk = K - k0 < 8 ? K - k0 : 8;
            const __m256i km = lanes_below(nk);
            __m256 r[8];
            for (int64_t l = 0; l < 8; ++l) {
              const int64_t j = u * 8 + l;
              r[l] = j < units ? _mm256_maskload_ps(src + g * gate_stride + j * unit_stride + k0, km) : _mm256_setzero_ps();
            }
            transpose8(r);
            for (int64_t kk = 0; kk < nk; ++kk) _mm256_storeu_ps(dst + ((u * K + k0 + kk) * G + g) * 8, r[kk]);
          }
      return;
    }
  }
#endif
  if (unit_stride == 1) {
    // Units run along the source rows (the backward sections): each (u, k, g) is a run of L adjacent
    // values. With the bounds test hoisted out of the run the loop vectorizes; element by element it
    // was most of a pack, and training packs every call (a cell in a training loop, every step).
    for (int64_t u = ub0; u < U; ++u) {
      const int64_t n = units - u * L < L ? units - u * L : L;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t g = 0; g < G; ++g) {
          A* d = dst + ((u * K + k) * G + g) * L;
          const T* s = src + g * gate_stride + u * L + k * k_stride;
          for (int64_t l = 0; l < n; ++l) d[l] = static_cast<A>(to_acc(s[l]));
          for (int64_t l = n; l < L; ++l) d[l] = A(0);
        }
    }
    return;
  }
  for (int64_t u = ub0; u < U; ++u)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t l = 0; l < L; ++l) {
          const int64_t j = u * L + l;
          dst[((u * K + k) * G + g) * L + l] =
              j < units ? static_cast<A>(to_acc(src[g * gate_stride + j * unit_stride + k * k_stride])) : A(0);
        }
}

// Pair sections: dst[u][j][g][l] holds src at k = 2j (low half) and 2j + 1 (high half), 0 past `units`
// and past K (j < pairs_stored(K)); src at (g, unit n, k) is src[g * gate_stride + n * unit_stride + k *
// k_stride]. Units run innermost: with unit_stride 1 (the backward's transposed section) each pair reads
// two rows of w_hh along their length.
void pack_pairs(bf16x2* dst, const bf16* src, int64_t units, int64_t K, int64_t G, int64_t L, int64_t gate_stride,
                int64_t unit_stride, int64_t k_stride = 1, int64_t ub0 = 0, int64_t ub1 = -1) {
  const int64_t U = ub1 < 0 ? ceil_div(units, L) : ub1, K2 = pairs_stored(K);
  for (int64_t u = ub0; u < U; ++u)
    for (int64_t j = 0; j < K2; ++j)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t l = 0; l < L; ++l) {
          const int64_t n = u * L + l, k = 2 * j;
          uint32_t v = 0;
          if (n < units && k < K) {
            const bf16* s = src + g * gate_stride + n * unit_stride;
            v = uint32_t(s[k * k_stride].bits) | (k + 1 < K ? uint32_t(s[(k + 1) * k_stride].bits) << 16 : 0u);
          }
          dst[((u * K2 + j) * G + g) * L + l].bits = v;
        }
}

// The piece sections (Layout::split): three pair sections as pack_pairs lays them out, `piece`
// elements apart, of the hi, mid and lo pieces of float weights (split_values). Only the amx level has
// them (uses_split), so only its build has this body: 16 lanes, and either each unit's weights along k
// (k_stride 1: the forward's section, the input panel) or the units along the source rows (unit_stride
// 1: the backward's W_hh transposed). A register a (piece, pair of k, 16 units): a block's 16 units of
// 32 values of k split at a time, a unit's 16 pairs of each piece a register, transposed to a register of
// the 16 units' pairs at each j; or the 16 units of rows 2j and 2j + 1 interleaved by halves. Element by
// element (until stop 45), three scalar stores a pair, the pieces were most of a float32 pack on amx
// (LSTM W_hh at H=256: 0.52 ms a pack against 0.28 now).
void pack_split(bf16x2* dst, const float* src, int64_t units, int64_t K, int64_t G, int64_t L, int64_t gate_stride,
                int64_t unit_stride, int64_t piece, int64_t k_stride = 1, int64_t ub0 = 0, int64_t ub1 = -1) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  const int64_t U = ub1 < 0 ? ceil_div(units, L) : ub1, K2 = pairs_stored(K);
  if (L != 16 || (k_stride != 1 && unit_stride != 1)) std::abort();  // (no caller: see above)
  alignas(64) bf16 t[3][32];
  if (k_stride == 1) {
    for (int64_t u = ub0; u < U; ++u)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j0 = 0; j0 < K2; j0 += 16) {  // (K2 counts whole tiles of 16 pairs here)
          const int64_t k0 = 2 * j0, nk = k0 >= K ? 0 : K - k0 < 32 ? K - k0 : 32;
          __m512 pc[3][16];
          for (int64_t l = 0; l < 16; ++l) {
            const int64_t n = u * 16 + l, valid = n < units ? nk : 0;
            if (valid > 0) split_values(src + g * gate_stride + n * unit_stride + k0, valid, t[0], t[1], t[2]);
            for (int q = 0; q < 3; ++q) {
              for (int64_t k = valid; k < 32; ++k) t[q][k] = bf16{0};
              pc[q][l] = _mm512_load_ps(reinterpret_cast<const float*>(t[q]));
            }
          }
          for (int q = 0; q < 3; ++q) {
            transpose16(pc[q]);
            for (int64_t jj = 0; jj < 16; ++jj)
              _mm512_storeu_ps(reinterpret_cast<float*>(dst + q * piece + ((u * K2 + j0 + jj) * G + g) * 16),
                               pc[q][jj]);
          }
        }
    return;
  }
  // (the pair's low half from row 2j, its high half from row 2j + 1: halves 0-15 and 16-31 of t[q])
  const __m512i mix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                       6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  alignas(64) float row[32];
  for (int64_t u = ub0; u < U; ++u)
    for (int64_t j = 0; j < K2; ++j)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t n = units - u * 16 < 16 ? units - u * 16 : 16;
        for (int e = 0; e < 2; ++e) {
          const int64_t k = 2 * j + e;
          const __mmask16 m = k < K ? static_cast<__mmask16>(lane_mask(static_cast<int>(n))) : __mmask16(0);
          _mm512_store_ps(row + 16 * e,
                          _mm512_maskz_loadu_ps(m, src + g * gate_stride + u * 16 * unit_stride + k * k_stride));
        }
        split_values(row, 32, t[0], t[1], t[2]);
        for (int q = 0; q < 3; ++q)
          _mm512_storeu_si512(dst + q * piece + ((u * K2 + j) * G + g) * 16,
                              _mm512_permutexvar_epi16(mix, _mm512_load_si512(t[q])));
      }
#else
  (void)dst, (void)src, (void)units, (void)K, (void)G, (void)L, (void)gate_stride, (void)unit_stride,
      (void)piece, (void)k_stride, (void)ub0, (void)ub1;
  std::abort();  // (no piece sections below the amx level: Layout::split is false there)
#endif
}

// Each thread packs its share of every section's unit blocks (a copy: the same bytes at any thread
// count). Training packs on every call; one thread took 0.47 ms of a float32 LSTM step at
// (100, 32, 256) and 0.56 ms of the forward's 6.1 under autocast(bfloat16) (stop 43, the Xeon).
template <typename T, typename A>
void pack_worker(void* raw, const Team& team) {
  const RnnPackParams& p = *static_cast<const RnnPackParams*>(raw);
  const Layout l = layout_of(p.shape, lanes<A>(), uses_dot(p.dtype), uses_split(p.dtype));
  A* out = static_cast<A*>(p.out);
  const T* whh = static_cast<const T*>(p.w_hh);
  const T* whr = static_cast<const T*>(p.w_hr);
  // [b0, b1) of a section's ceil(units / L) blocks for this thread.
  int64_t b0 = 0, b1 = 0;
  auto share = [&](int64_t units) {
    split_range(ceil_div(units, l.L), team.tid, team.size, &b0, &b1);
    return b1 > b0;
  };
  if (share(l.H)) pack_section(out + l.fmain, whh, l.H, l.K, l.G, l.L, l.H * p.ld_w_hh, p.ld_w_hh, 1, b0, b1);
  if (share(l.K)) pack_section(out + l.bmain, whh, l.K, l.G * l.H, 1, l.L, 0, 1, p.ld_w_hh, b0, b1);
  if (l.P > 0) {
    if (share(l.P)) pack_section(out + l.fproj, whr, l.P, l.H, 1, l.L, 0, p.ld_w_hr, 1, b0, b1);
    if (share(l.H)) pack_section(out + l.bproj, whr, l.H, l.P, 1, l.L, 0, 1, p.ld_w_hr, b0, b1);
  }
  if constexpr (std::is_same<T, bf16>::value) {
    if (l.dot) {
      if (share(l.H))
        pack_pairs(reinterpret_cast<bf16x2*>(out + l.fmain2), whh, l.H, l.K, l.G, l.L, l.H * p.ld_w_hh, p.ld_w_hh,
                   1, b0, b1);
      if (l.P > 0 && share(l.P))
        pack_pairs(reinterpret_cast<bf16x2*>(out + l.fproj2), whr, l.P, l.H, 1, l.L, 0, p.ld_w_hr, 1, b0, b1);
      if (share(l.K))
        pack_pairs(reinterpret_cast<bf16x2*>(out + l.bmain2), whh, l.K, l.G * l.H, 1, l.L, 0, 1, p.ld_w_hh, b0, b1);
    }
  }
  if constexpr (std::is_same<T, float>::value) {
    if (p.skip_pieces) return;
    if (l.split && share(l.H))
      pack_split(reinterpret_cast<bf16x2*>(out + l.fmain2), whh, l.H, l.K, l.G, l.L, l.H * p.ld_w_hh, p.ld_w_hh,
                 l.split_piece, 1, b0, b1);
    if (l.split && share(l.K))
      pack_split(reinterpret_cast<bf16x2*>(out + l.bsplit), whh, l.K, l.G * l.H, 1, l.L, 0, 1, l.bsplit_piece,
                 p.ld_w_hh, b0, b1);
  }
}

// Packs of fewer weights than this take one thread: waking a second costs a few microseconds.
constexpr int64_t kPackOneThreadWeights = 1 << 16;

template <typename T, typename A>
void pack_typed(const RnnPackParams& p) {
  const int64_t weights = rnn_gate_count(p.shape.mode) * p.shape.hidden * p.shape.state() +
                          p.shape.proj * p.shape.hidden;
  const int nt = weights < kPackOneThreadWeights || p.num_threads < 1 ? 1 : p.num_threads;
  parallel_run(nt, pack_worker<T, A>, const_cast<RnnPackParams*>(&p));
}

// Input panel: [U][I][G][L] of A (w_ih as fmain packs w_hh), then for bfloat16 on levels with dot
// products the pairs [U][ceil(I/2)][G][L], for float32 on the amx level the pieces [3][U][ceil(I/2)][G][L]
// (input_split_piece elements apart).
int64_t input_split_piece(const Layout& l, int64_t input) { return l.U * pairs_stored(input) * l.G * l.L; }
int64_t input_panel_numel(const RnnShape& s, int64_t input, DType dtype) {
  // bfloat16 rows are read as pairs of k: a level with dot products, and an even I (no pair past a row).
  if (dtype == DType::BFloat16 && (!uses_dot(dtype) || input % 2)) return 0;
  const Layout l = layout_of(s, dtype == DType::Float64 ? lanes<double>() : lanes<float>());
  return l.U * input * l.G * l.L + (uses_dot(dtype) ? input_split_piece(l, input) : 0) +
         (uses_split(dtype) ? 3 * input_split_piece(l, input) : 0);
}

template <typename T, typename A>
void pack_input_typed(const RnnPackInputParams& p) {
  const Layout l = layout_of(p.shape, lanes<A>());
  A* out = static_cast<A*>(p.out);
  const T* w = static_cast<const T*>(p.w_ih);
  pack_section(out, w, l.H, p.input, l.G, l.L, l.H * p.ld_w_ih, p.ld_w_ih, 1);
  if constexpr (std::is_same<T, bf16>::value)
    pack_pairs(reinterpret_cast<bf16x2*>(out + l.U * p.input * l.G * l.L), w, l.H, p.input, l.G, l.L,
               l.H * p.ld_w_ih, p.ld_w_ih);
  if constexpr (std::is_same<T, float>::value)
    if (uses_split(p.dtype))
      pack_split(reinterpret_cast<bf16x2*>(out + l.U * p.input * l.G * l.L), w, l.H, p.input, l.G, l.L,
                 l.H * p.ld_w_ih, p.ld_w_ih, input_split_piece(l, p.input));
}

void pack_input(const RnnPackInputParams& p) {
  if (p.dtype == DType::Float64) pack_input_typed<double, double>(p);
  else if (p.dtype == DType::BFloat16) pack_input_typed<bf16, float>(p);
  else pack_input_typed<float, float>(p);
}

void pack(const RnnPackParams& p) {
  if (p.dtype == DType::Float64) pack_typed<double, double>(p);
  else if (p.dtype == DType::BFloat16) pack_typed<bf16, float>(p);
  else pack_typed<float, float>(p);
}

// A backward section (pack_section with unit_stride 1, one gate: packed[u][k][l] = src[k * ld + u*L + l])
// still holding src's values, bit for bit. That section is a copy of every weight, so where it matches,
// the weights are those the whole pack was made from (to_acc widens bfloat16 one to one).
// The bits in which a weight (widened as the pack widens it) and its packed copy differ.
template <typename Bits, typename T, typename A>
inline Bits differing_bits(T s, const A* d) {
  const A v = static_cast<A>(to_acc(s));
  Bits a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, d, sizeof b);
  return a ^ b;
}

template <typename T, typename A>
bool section_current(const A* packed, const T* src, int64_t units, int64_t K, int64_t L, int64_t ld) {
  using Bits = typename std::conditional<sizeof(A) == 8, uint64_t, uint32_t>::type;
  constexpr int CL = lanes<A>();
  const int64_t U = ceil_div(units, L);
  for (int64_t u = 0; u < U; ++u) {
    const int64_t n = units - u * L < L ? units - u * L : L;
    Bits diff = 0;  // (or-ed over a whole block, so the loops vectorize)
    if (n == CL) {  // full blocks of one vector: a fixed-width body (LSTM H=256: 37 -> 27 us)
      Bits acc[CL] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T* s = src + k * ld + u * L;
        const A* d = packed + (u * K + k) * L;
        for (int l = 0; l < CL; ++l) acc[l] |= differing_bits<Bits>(s[l], d + l);
      }
      for (int l = 0; l < CL; ++l) diff |= acc[l];
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const T* s = src + k * ld + u * L;
        const A* d = packed + (u * K + k) * L;
        for (int64_t l = 0; l < n; ++l) diff |= differing_bits<Bits>(s[l], d + l);
      }
    }
    if (diff) return false;
  }
  return true;
}

template <typename T, typename A>
bool pack_current_typed(const RnnPackParams& p) {
  const Layout l = layout_of(p.shape, lanes<A>(), uses_dot(p.dtype));
  const A* packed = static_cast<const A*>(p.out);
  if (!section_current(packed + l.bmain, static_cast<const T*>(p.w_hh), l.K, l.G * l.H, l.L, p.ld_w_hh)) return false;
  return l.P == 0 || section_current(packed + l.bproj, static_cast<const T*>(p.w_hr), l.H, l.P, l.L, p.ld_w_hr);
}

bool pack_current(const RnnPackParams& p) {
  if (p.dtype == DType::Float64) return pack_current_typed<double, double>(p);
  if (p.dtype == DType::BFloat16) return pack_current_typed<bf16, float>(p);
  return pack_current_typed<float, float>(p);
}

// ---- forward ----------------------------------------------------------------------------------------
enum class Variant { Lstm, GruAfter, GruBefore, Rnn };
// Gates of x_gates and of the forward panel.
template <Variant VAR> constexpr int gates_of() { return VAR == Variant::Lstm ? 4 : VAR == Variant::Rnn ? 1 : 3; }

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
  bf16* h2[2]; // [B][Kp] each, Layout::dot: hbuf rounded to bfloat16, the rows of the pair products
  bf16* m2;    // [B][Hp] Layout::dot: m rounded
  bf16* rh2;   // [B][Hp] Layout::dot: r * h rounded
  void* xg_own;  // T [B][G][Hp] with RnnFwdParams::x: the step's x_gates, each block made by its owner
  bool relu;
  bool split_rows;  // threads own row tiles (all units of them) instead of unit blocks: no barrier per step
  bool amx_split;  // the products on the tile unit, as three bfloat16 pieces a float (Layout::split)
  bool project_own_rows;  // with split_rows, the projection before the steps by rows too (forward_variant)
  bool ride;  // a one-row sequence's projection rides in the steps' recurrent tiles (forward_variant)
  bool project_split;  // the projection before the steps on the tile unit, by its rows (forward_variant)
};

// Below this many multiply-adds a whole call whose panels fit one core's cache runs on one thread
// (forward_variant): at a single core's ~100-150 GFLOP/s that is under ~10 us of work, about twice
// what waking and joining a second thread costs.
constexpr int64_t kOneThreadMacs = int64_t(1) << 19;

// Rows of h_{t-1} a unit-splitting thread prefetches whole at the start of a step (more would queue
// behind the line fill buffers, and with more rows each line feeds a row tile's worth of work anyway).
constexpr int64_t kPrefetchRows = 8;

// The most rows split_rows_by_tiles gives one of nt threads.
template <int G> int64_t busiest_rows(int64_t B, int nt) {
  int64_t most = 0;
  for (int t = 0; t < nt; ++t) {
    int64_t r0, r1;
    split_rows_by_tiles<G>(B, t, nt, &r0, &r1);
    most = r1 - r0 > most ? r1 - r0 : most;
  }
  return most;
}

// ---- one-row sequences: the recurrent tile carrying later rows' projection ---------------------------
// At B = 1 a step's product streams the thread's recurrent panel from L2 with one FMA per weight
// vector: it runs at the L2's rate with the FMA unit half idle, while the projection of every row
// before the steps (`first`) ran FMA-bound with the L2 idle (LSTM (100,1,256): 52% and 22% of a call's
// samples). ride_tile does both in one pass over k: gemm_tile<1, NB, G>'s sums of the step's row
// (acc.v[0][b * G + g]) and kRideRows later rows' sums of one gate column of one unit block of the
// input panel (pacc[r]; in_col points at that column's k = 0, in_kstride apart). Each sum runs over k
// as gemm_tile's do (blocks of kSumBlock from zero, added in order), so both come out with the bits
// their own tiles give. K and KI (the state and the input width) may differ: the shorter one's blocks
// end first. Registers: NB * G + kRideRows sums (16; GRU 14), a row value, a weight vector; the
// recurrent weights are FMA memory operands (disassembly: per k, NB * G of those, one input-panel load,
// kRideRows FMAs with broadcast operands).
constexpr int kRideRows = 8;
// The k loop both ride tiles run: blocks of KB from k = 0 over the longer of K and KI, each part only
// while its own k lasts. Per block: begin() zeroes the block sums, rec_k(k) / prj_k(k) add one k of
// each part, end(first, rec, prj) adds the block sums of the parts that ran to the totals.
template <typename Begin, typename RecK, typename PrjK, typename End>
inline __attribute__((always_inline)) void ride_k_blocks(int64_t K, int64_t KI, int64_t KB, Begin begin, RecK rec_k,
                                                         PrjK prj_k, End end) {
  const int64_t KM = K > KI ? K : KI;
  for (int64_t k0 = 0; k0 < KM || k0 == 0; k0 += KB) {
    const bool rec = k0 < K || k0 == 0, prj = k0 < KI || k0 == 0;
    const int64_t kr = !rec ? k0 : K - k0 < KB ? K : k0 + KB;
    const int64_t kp = !prj ? k0 : KI - k0 < KB ? KI : k0 + KB;
    begin();
    const int64_t kb = kr < kp ? kr : kp;
    int64_t k = k0;
    for (; k < kb; ++k) {
      rec_k(k);
      prj_k(k);
    }
    for (int64_t j = k; j < kr; ++j) rec_k(j);
    for (int64_t j = k; j < kp; ++j) prj_k(j);
    end(k0 == 0, rec, prj);
  }
}
template <int NB, int G, typename A>
__attribute__((noinline)) void ride_tile(const A* row, const A* panel, int64_t K, int64_t kstride, int64_t bstride,
                                         Tile<A>& acc, const A* const* xrows, const A* in_col, int64_t KI,
                                         int64_t in_kstride, V<A>* pacc) {
  constexpr int L = lanes<A>(), C = NB * G, R = kRideRows;
  const A* x[R];
  for (int r = 0; r < R; ++r) x[r] = xrows[r];
  V<A> sum[C], ps[R];
  ride_k_blocks(
      K, KI, kSumBlock,
      [&]() __attribute__((always_inline)) {
        for (int c = 0; c < C; ++c) sum[c] = splat(A(0));
        for (int r = 0; r < R; ++r) ps[r] = splat(A(0));
      },
      [&](int64_t k) __attribute__((always_inline)) {
        const A* w = panel + k * kstride;
        const V<A> hb = splat(row[k]);
        for (int b = 0; b < NB; ++b)
          for (int g = 0; g < G; ++g) sum[b * G + g] += hb * load<A>(w + b * bstride + g * L, L);
      },
      [&](int64_t k) __attribute__((always_inline)) {
        const V<A> wv = load<A>(in_col + k * in_kstride, L);
        for (int r = 0; r < R; ++r) ps[r] += splat(x[r][k]) * wv;
      },
      [&](bool first, bool rec, bool prj) __attribute__((always_inline)) {
        if (rec)
          for (int c = 0; c < C; ++c) acc.v[0][c] = first ? sum[c] : acc.v[0][c] + sum[c];
        if (prj)
          for (int r = 0; r < R; ++r) pacc[r] = first ? ps[r] : pacc[r] + ps[r];
      });
}
#if defined(__AVX512BF16__)
// ride_tile for bfloat16 storage on levels with bf16 dot products: the same two parts over pairs of k
// (K2 and KI2 pairs; rows are bf16, panels bf16x2, sums float), each as the pair gemm_tile sums
// (blocks of kSumBlock / 2 pairs from zero, added in order).
template <int NB, int G>
__attribute__((noinline)) void ride_tile(const bf16* row, const bf16x2* panel, int64_t K2, int64_t kstride,
                                         int64_t bstride, Tile<float>& acc, const bf16* const* xrows,
                                         const bf16x2* in_col, int64_t KI2, int64_t in_kstride, vfloat* pacc) {
  constexpr int C = NB * G, R = kRideRows, KB = kSumBlock / 2;
  const bf16* x[R];
  for (int r = 0; r < R; ++r) x[r] = xrows[r];
  __m512 sum[C], ps[R];
  ride_k_blocks(
      K2, KI2, KB,
      [&]() __attribute__((always_inline)) {
        for (int c = 0; c < C; ++c) sum[c] = _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) ps[r] = _mm512_setzero_ps();
      },
      [&](int64_t k) __attribute__((always_inline)) {
        const bf16x2* w = panel + k * kstride;
        const __m512bh hb = pair_at(row, k);
        for (int b = 0; b < NB; ++b)
          for (int g = 0; g < G; ++g)
            sum[b * G + g] = _mm512_dpbf16_ps(sum[b * G + g], hb, (__m512bh)_mm512_loadu_si512(w + b * bstride + g * 16));
      },
      [&](int64_t k) __attribute__((always_inline)) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(in_col + k * in_kstride);
        for (int r = 0; r < R; ++r) ps[r] = _mm512_dpbf16_ps(ps[r], pair_at(x[r], k), wv);
      },
      [&](bool first, bool rec, bool prj) __attribute__((always_inline)) {
        if (rec)
          for (int c = 0; c < C; ++c) add_block(acc.v[0][c], sum[c], first);
        if (prj)
          for (int r = 0; r < R; ++r) add_block(pacc[r], ps[r], first);
      });
}
#endif
// Blocks of a ride tile: 8 / G, at least 2 (with the projection's 8 sums, at most 16).
template <int G> constexpr int ride_blocks() { return G == 1 ? 8 : 2; }

template <Variant VAR, typename T, typename A>
void fwd_worker(void* raw, const Team& team) {
  const int tid = team.tid, nt = team.size;
  FwdCtx<A>& c = *static_cast<FwdCtx<A>*>(raw);
  const RnnFwdParams& p = *c.p;
  const Layout& l = c.l;
  const RnnSeq& q = p.seq;
  constexpr int L = lanes<A>();
  // bfloat16 storage: pair products where the level has them (l.dot), and the float activations.
  constexpr bool BF = std::is_same<T, bf16>::value;
  constexpr int G = gates_of<VAR>(), M = rows_per_tile<G>();
  using GI = std::integral_constant<int, G>;
  const bool dot = l.dot;
  auto tanh_ = [](V<A> v) {
    if constexpr (BF) return vtanh_f(v);
    else return vtanh(v);
  };
  auto sigmoid_ = [](V<A> v) {
    if constexpr (BF) return vsigmoid_f(v);
    else return vsigmoid(v);
  };
  const int64_t H = l.H, K = l.K, P = l.P, B = q.batch, Kp = l.UK * L, Hp = l.U * L;
  const int64_t rc = c.sz.reserve_cols, hprev_col = c.sz.reserve_hprev;
  // x given: x_gates come from the thread's own projection, either of each step's rows inside the step
  // (fused: xgo, rows b, gates Hp apart) or of every row before the steps (first: into x_gates_buf,
  // read as x_gates); p.x_gates is then the bias row. Else from x_gates (rows of sequence data, gates
  // H apart).
  const bool first = p.x != nullptr && p.x_gates_buf != nullptr;
  const bool fused = p.x != nullptr && !first;
  // The reserve by non-temporal stores when it is large (store_stream).
  const bool stream = p.reserve != nullptr && q.steps * q.batch * rc * int64_t(sizeof(A)) >= kStreamBytes;
  T* xgo = static_cast<T*>(c.xg_own);
  const int64_t gs = fused ? Hp : H;
  // x_gates of gate g at gx (that gate's row segment at gx + g * gs), plus x_bias's where torch's GEMM
  // left the bias out (rnn.h): the GEMM's float sum plus the bias, rounded once.
  const T* xb = static_cast<const T*>(p.x_bias);
  auto gate_in = [&](const T* gx, int g, int64_t u, int valid) __attribute__((always_inline)) {
    const V<A> v = load<A>(gx + g * gs, valid);
    return xb ? v + load<A>(xb + g * H + u * L, valid) : v;
  };
  // Own rows [rb0, rb1) and unit, projection and state blocks: with split_rows a range of row tiles and
  // every block, else every row and a range of blocks.
  int64_t u0 = 0, u1 = l.U, p0 = 0, p1 = l.UP, k0 = 0, k1 = l.UK, rb0 = 0, rb1 = q.batch;
  const bool split = c.split_rows;
  if (split) {
    if (q.lengths) {
      split_rows_by_cost(q, tid, nt, &rb0, &rb1);
    } else {
      split_rows_by_tiles<G>(q.batch, tid, nt, &rb0, &rb1);
    }
  } else {
    split_range(l.U, tid, nt, &u0, &u1);
    split_range(l.UP, tid, nt, &p0, &p1);
    split_range(l.UK, tid, nt, &k0, &k1);
  }
  // This thread's rows active at step s (a packed batch's active rows are a prefix of its rows).
  auto own_rows = [&](int64_t s) {
    const int64_t n = seq_active(q, s) < rb1 ? seq_active(q, s) : rb1;
    return n > rb0 ? n - rb0 : int64_t(0);
  };
  const A* packed = static_cast<const A*>(p.packed);
  const T* xg = static_cast<const T*>(first ? p.x_gates_buf : p.x_gates);
  const T* h0 = static_cast<const T*>(p.h0);
  const T* c0 = static_cast<const T*>(p.c0);
  const T* bhn = static_cast<const T*>(p.b_hn);
  T* y = static_cast<T*>(p.y);
  // y's rows: x's, or a padded sequence's own (RnnFwdParams::y_row_stride_t/b: a batch-major input read
  // in place whose output is laid out time-major, as torch.nn's batch_first output is).
  RnnSeq qy = q;
  if (p.y_row_stride_t != 0 && q.time_offsets == nullptr) {
    qy.row_stride_t = p.y_row_stride_t;
    qy.row_stride_b = p.y_row_stride_b;
  }
  T* h_n = static_cast<T*>(p.h_n);
  T* c_n = static_cast<T*>(p.c_n);
  A* res = static_cast<A*>(p.reserve);

  // The products: sums for rows [row0, row0 + nr) and own blocks [b0, b1) of GN of the panel's GP gates
  // from gate g0, over rows of KK values: the section at base + off against rows row_a(b) in A, or,
  // with pair sections, the one at base + off2 against row_2(b) in bf16 pairs. (bf16 rows never meet
  // an A panel: bf16 x without pair sections is refused, so x products pass row_a only where T is A.)
  // The tile unit's float32 products for this call (amx_split) and, within the steps, this step's rows.
  bool split_now = c.amx_split;
  auto product_rows = [&](int64_t nr, int64_t row0, auto gates, const A* base, int64_t GP, int64_t g0, int64_t b0,
                          int64_t b1, int64_t off, int64_t off2, int64_t KK, auto row_a, auto row_2, auto epi) {
    constexpr int GN = decltype(gates)::value;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if constexpr (kAmx && std::is_same<T, float>::value && std::is_same<A, float>::value) {
      // The piece sections: the recurrent panel's (fmain2 of the pack) and the input panel's (after its
      // float section, as the pairs of bfloat16); the projection's (fproj) has none.
      const bool rec = base == packed && off2 == l.fmain2;
      const int64_t piece = rec ? l.split_piece
                            : base == static_cast<const A*>(p.packed_in) ? input_split_piece(l, p.input) : 0;
      if (split_now && piece > 0) {
        const bf16x2* panel = reinterpret_cast<const bf16x2*>(base + off2) + g0 * L;
        if (split_product<GN>(nr, b0, b1, panel, piece, KK, GP * L, pairs_stored(KK) * GP * L, base + off + g0 * L,
                              GP * L, KK * GP * L, row_a, epi, row0))
          return;
      }
    }
#endif
    if constexpr (BF && kBf16Dot) {
      if (dot) {
        const bf16x2* panel = reinterpret_cast<const bf16x2*>(base + off2) + g0 * L;
        return tiled_product<GN>(nr, b0, b1, panel, ceil_div(KK, 2), GP * L, pairs_stored(KK) * GP * L, row_2, epi,
                                 row0);
      }
    }
    if constexpr (std::is_same<std::remove_cv_t<std::remove_pointer_t<decltype(row_a(0))>>, A>::value)
      tiled_product<GN>(nr, b0, b1, base + off + g0 * L, KK, GP * L, KK * GP * L, row_a, epi, row0);
  };
  // One-row sequences projecting first: only the first kRideRows rows before the steps, the rest
  // inside the steps' recurrent tiles (ride_tile, ride_product below), into a ring of kRnnRideRing
  // rows of the buffer (two groups: the steps read one while their tiles fill the next).
  const bool ride = c.ride;
  // The buffer row of step s's x_gates for row b.
  auto xg_row = [&](int64_t s_, int64_t b) __attribute__((always_inline)) {
    return ride ? s_ % kRnnRideRing : seq_row(q, s_, b);
  };
  if (first) {
    // Every row's x_gates before the steps: own gate columns (unit blocks, whichever way the steps
    // split), so this thread's part of the input panel stays in its cache across all rows; or, with
    // project_own_rows, every column of this thread's own rows. The sync after the initial states
    // orders these stores before any step reads them.
    const T* xin = static_cast<const T*>(p.x);
    const T* bias = static_cast<const T*>(p.x_gates);
    T* buf = static_cast<T*>(p.x_gates_buf);
    // A buffer larger than the caches (13 MB for an LSTM at T=100, B=32, H=256) is read back from
    // memory by the steps anyway: written past the caches, it costs no line reads and does not evict
    // the input panel this loop streams.
    const bool stream_xg =
        std::is_same<T, A>::value && !ride && p.x_rows * p.ld_gates * int64_t(sizeof(T)) >= kStreamBytes;
    // Rows r of the product are rows row_of(r) of x and of the buffer.
    auto project = [&](int64_t nr, auto row_of, int64_t x0, int64_t x1, auto buf_row_of) {
      auto xrow = [&](int64_t r) { return xin + row_of(r) * p.ld_x; };
      product_rows(nr, 0, GI(), static_cast<const A*>(p.packed_in), G, 0, x0, x1, 0, l.U * p.input * G * L,
                   p.input, xrow, xrow, [&](int64_t r, int64_t u, const V<A>* sum, int col) {
        const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
        T* dst = buf + buf_row_of(r) * p.ld_gates + u * L;
        for (int g = 0; g < G; ++g) {
          const V<A> v = sum[col + g] + (bias ? load<A>(bias + g * H + u * L, valid) : splat(A(0)));
          if constexpr (std::is_same<T, A>::value) store_stream<A>(dst + g * H, v, valid, stream_xg);
          else store<A>(dst + g * H, v, valid);
        }
      });
    };
    // (On the tile unit by the call's rows, project_split, whichever way the threads share them: a row's
    // sums on the tile unit do not depend on the rows beside it, so the bits do not depend on the
    // thread count, which decides project_own_rows.)
    split_now = c.amx_split || c.project_split;
    if (c.project_own_rows) {
      const int64_t own = rb1 - rb0;
      auto row_of = [&](int64_t r) { return (r / own) * q.row_stride_t + (rb0 + r % own) * q.row_stride_b; };
      if (own > 0) project(own * q.steps, row_of, 0, l.U, row_of);
    } else if (ride) {
      project(kRideRows, [&](int64_t r) { return seq_row(q, r, 0); }, u0, u1, [&](int64_t r) { return xg_row(r, 0); });
    } else {
      int64_t x0, x1;
      split_range(l.U, tid, nt, &x0, &x1);
      auto row_of = [](int64_t r) { return r; };
      project(p.x_rows, row_of, x0, x1, row_of);
    }
    split_now = c.amx_split;
    if (stream_xg) stream_fence();  // before the sync below publishes the buffer
  }
  for (int64_t b = rb0; b < rb1; ++b) {
    for (int64_t kb = k0; kb < k1; ++kb) {
      const int valid = static_cast<int>(K - kb * L < L ? K - kb * L : L);
      const V<A> h = h0 ? load<A>(h0 + b * K + kb * L, valid) : splat(A(0));
      store<A>(c.hbuf[0] + b * Kp + kb * L, h, L);
      if constexpr (BF) if (dot) store<A>(c.h2[0] + b * Kp + kb * L, h, L);
    }
    if (VAR == Variant::Lstm)
      for (int64_t u = u0; u < u1; ++u) {
        const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
        store<A>(c.c + b * Hp + u * L, c0 ? load<A>(c0 + b * H + u * L, valid) : splat(A(0)), L);
      }
  }
  team.sync();

  // Step s2's x_gates for own blocks (fused): x W_ih^T + the bias row, rounded to the storage dtype as
  // torch's projection GEMM rounds its output. The input panel is laid out as fmain (then pairs).
  auto project_step = [&](int64_t s2) {
    const bool saved = split_now;
    split_now = c.amx_split && seq_active(q, s2) >= kSplitStepRows<G>;
    const T* xin = static_cast<const T*>(p.x);
    auto xrow = [&](int64_t b) { return xin + seq_row(q, s2, b) * p.ld_x; };
    auto xepi = [&](int64_t b, int64_t u, const V<A>* sum, int col) {
      const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
      T* dst = xgo + b * G * Hp + u * L;
      for (int g = 0; g < G; ++g)
        store<A>(dst + g * Hp, sum[col + g] + (xg ? load<A>(xg + g * H + u * L, valid) : splat(A(0))), L);
    };
    product_rows(own_rows(s2), rb0, GI(), static_cast<const A*>(p.packed_in), G, 0, u0, u1, 0,
                 l.U * p.input * G * L, p.input, xrow, xrow, xepi);
    split_now = saved;
  };
  // Threads that split units wait for each other at the end of every step; the next step's projection
  // reads only x and writes only the thread's own x_gates, so it runs between arriving and waiting (a
  // thread ahead of the other projects instead of spinning). In-process, 15-25 pairs, time with / without:
  // GRU (100,8,256) 0.95-0.97, LSTM 0.98-0.99, packed B=8 / 32 LSTM 0.96 / 0.97, GRU 0.995, B=32 0.99-1.00.
  const bool overlap = fused && !split;
  if (overlap) project_step(0);

  for (int64_t s = 0; s < q.steps; ++s) {
    const int64_t nrows = own_rows(s);
    split_now = c.amx_split && seq_active(q, s) >= kSplitStepRows<G>;
    const A* hp = c.hbuf[s & 1];
    // Threads that split units read rows of h_{t-1} that the other threads wrote last step, so those
    // lines come from other cores. The product reads each row in k order, a line per 16 values, and
    // the out-of-order window reaches about one line ahead: each of those lines stalled it once
    // (8 lines a step at H=256, B=1). All of them are requested at once here: RNN (100,1,256) 3.09 ->
    // 3.34x torch.nn; LSTM's longer steps hid the stalls. (Threads that split rows wrote their own.)
    if (!split && nrows <= kPrefetchRows)
      for (int64_t b = rb0; b < rb0 + nrows; ++b)
        for (int64_t i = 0; i < Kp * int64_t(sizeof(A)); i += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(hp + b * Kp) + i);
    A* hn = c.hbuf[(s + 1) & 1];
    bf16* hn2 = c.h2[(s + 1) & 1];
    // h_t of (row b, block blk) for the next step's product.
    auto put_h = [&](int64_t b, int64_t blk, V<A> h) {
      store<A>(hn + b * Kp + blk * L, h, L);
      if constexpr (BF) if (dot) store<A>(hn2 + b * Kp + blk * L, h, L);
    };
    // x_gates of (row b + d, block u), the row this thread's next row tile uses (wrapping into the next
    // step's first rows): d a full tile's rows, or all of the thread's rows where it has fewer (then it
    // wraps to the same row of the next step; with d = 6 for 4 own rows, half of them found no row to
    // prefetch and RNN B=8 lost 9%). The projection GEMM wrote all of x_gates before the call (13 MB for an
    // LSTM at T=100, B=32, H=256), so its rows come from memory, in a pattern (G short segments per
    // row) the hardware prefetcher misses. Waiting for them took as long as the bfloat16 product;
    // prefetched a whole step ahead they were evicted again before use (a third of the float32 LSTM
    // epilogue still waited on them). A row tile ahead is a few microseconds: in time, and still close.
    auto prefetch_ahead = [&](int64_t b, int64_t u) __attribute__((always_inline)) {
      if (fused) return;
      int64_t ns = s, nbr = b + (nrows <= M ? nrows : M);
      if (nbr >= rb0 + nrows) {
        ns = s + 1;
        nbr -= nrows;
      }
      if (ns < q.steps && nbr < rb0 + own_rows(ns) && ns < seq_len(q, nbr)) {
        const T* next = xg + xg_row(ns, nbr) * p.ld_gates + u * L;
        for (int g = 0; g < G; ++g) __builtin_prefetch(next + g * H);
      }
    };
    // Gates for own unit blocks: the tile's recurrent sums, then the state update of (row b, block u).
    auto epilogue = [&](int64_t b, int64_t u, const V<A>* sum, int col) __attribute__((always_inline)) {
      const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
      const int64_t row = seq_row(q, s, b);
      const bool last = s == seq_len(q, b) - 1;
      const T* gx = fused ? xgo + b * G * Hp + u * L : xg + xg_row(s, b) * p.ld_gates + u * L;
      A* rr = res ? res + row * rc : nullptr;
      prefetch_ahead(b, u);
      auto xin = [&](int g) __attribute__((always_inline)) { return gate_in(gx, g, u, valid); };
      if (VAR == Variant::GruAfter) {  // (LSTM: lstm_tile below)
        const V<A> hprev = load<A>(hp + b * Kp + u * L, L);
        const V<A> rg = sigmoid_(sum[col] + xin(0));
        const V<A> zg = sigmoid_(sum[col + 1] + xin(1));
        const V<A> hng = sum[col + 2] + (bhn ? load<A>(bhn + u * L, valid) : splat(A(0)));
        const V<A> ng = tanh_(xin(2) + rg * hng);
        const V<A> h = (A(1) - zg) * ng + zg * hprev;
        put_h(b, u, h);
        store<A>(y + seq_row(qy, s, b) * p.ld_y + u * L, h, valid);
        if (last) store<A>(h_n + b * K + u * L, h, valid);
        if (rr) {
          store_stream<A>(rr + u * L, rg, valid, stream);
          store_stream<A>(rr + H + u * L, zg, valid, stream);
          store_stream<A>(rr + 2 * H + u * L, ng, valid, stream);
          store_stream<A>(rr + 3 * H + u * L, hng, valid, stream);
          store_stream<A>(rr + hprev_col + u * L, hprev, valid, stream);
        }
      } else if (VAR == Variant::GruBefore) {
        const V<A> hprev = load<A>(hp + b * Kp + u * L, L);
        const V<A> rg = sigmoid_(sum[col] + xin(0));
        const V<A> zg = sigmoid_(sum[col + 1] + xin(1));
        const V<A> rhv = rg * hprev;
        store<A>(c.rh + b * Hp + u * L, rhv, L);
        if constexpr (BF) if (dot) store<A>(c.rh2 + b * Hp + u * L, rhv, L);
        store<A>(c.z + b * Hp + u * L, zg, L);
        if (rr) {
          store_stream<A>(rr + u * L, rg, valid, stream);
          store_stream<A>(rr + H + u * L, zg, valid, stream);
          store_stream<A>(rr + 3 * H + u * L, rhv, valid, stream);
          store_stream<A>(rr + hprev_col + u * L, hprev, valid, stream);
        }
      } else if (VAR == Variant::Rnn) {
        const V<A> pre = sum[col] + xin(0);
        const V<A> h = c.relu ? vrelu(pre) : tanh_(pre);
        put_h(b, u, h);
        store<A>(y + seq_row(qy, s, b) * p.ld_y + u * L, h, valid);
        if (last) store<A>(h_n + b * K + u * L, h, valid);
        if (rr) {
          store_stream<A>(rr + u * L, h, valid, stream);
          store_stream<A>(rr + hprev_col + u * L, load<A>(hp + b * Kp + u * L, L), valid, stream);
        }
      }
    };
    // LSTM: the epilogue of a whole row tile of block u, phase by phase over its rows. The activations
    // are chains of ~20 dependent operations; one row at a time they ran at half their throughput
    // (a quarter of a bfloat16 step), several rows side by side fill the pipelines. The output gate's
    // sigmoid waits for the last phase, beside tanh(c): that phase had only MR chains (3 on AVX2) left to
    // overlap. Same bits; on a Zen 3, 5 alternating processes: LSTM (100,32,256) and (100,8,256) 1.017x,
    // (100,16,128) 1.018x faster.
    // MR rows are computed: a full tile's, the rows past mr repeating the tile's first (never stored), or
    // exactly one (B=1 and a last single row would otherwise pay a full tile of activations).
    auto lstm_rows = [&](auto mrc, int64_t r0, int mr, int64_t u, const V<A>* sum, int col)
                         __attribute__((always_inline)) {
      constexpr int MR = decltype(mrc)::value;
      const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
      V<A> gi[MR], gf[MR], gg[MR], go[MR], cn[MR];
      int64_t bb[MR], row[MR];
      for (int r = 0; r < MR; ++r) {
        const int64_t b = bb[r] = r0 + (r < mr ? r : 0);
        row[r] = seq_row(q, s, b);
        const T* gx = fused ? xgo + b * G * Hp + u * L : xg + xg_row(s, b) * p.ld_gates + u * L;
        if (r < mr) prefetch_ahead(b, u);
        const int ra = r < mr ? r : 0;  // rows past the tile repeat its first: computed, never stored
        gi[r] = sum[ra * kAcc + col] + gate_in(gx, 0, u, valid);
        gf[r] = sum[ra * kAcc + col + 1] + gate_in(gx, 1, u, valid);
        gg[r] = sum[ra * kAcc + col + 2] + gate_in(gx, 2, u, valid);
        go[r] = sum[ra * kAcc + col + 3] + gate_in(gx, 3, u, valid);
      }
      for (int r = 0; r < MR; ++r) {
        gi[r] = sigmoid_(gi[r]);
        gf[r] = sigmoid_(gf[r]);
        gg[r] = tanh_(gg[r]);
      }
      for (int r = 0; r < MR; ++r) cn[r] = gf[r] * load<A>(c.c + bb[r] * Hp + u * L, L) + gi[r] * gg[r];
      V<A> hv[MR];
      for (int r = 0; r < MR; ++r) {
        go[r] = sigmoid_(go[r]);
        hv[r] = go[r] * tanh_(cn[r]);
      }
      for (int r = 0; r < mr; ++r) {
        const int64_t b = r0 + r;
        const bool last = s == seq_len(q, b) - 1;
        A* rr = res ? res + row[r] * rc : nullptr;
        store<A>(c.c + b * Hp + u * L, cn[r], L);
        if (rr) {
          store_stream<A>(rr + u * L, gi[r], valid, stream);
          store_stream<A>(rr + H + u * L, gf[r], valid, stream);
          store_stream<A>(rr + 2 * H + u * L, gg[r], valid, stream);
          store_stream<A>(rr + 3 * H + u * L, go[r], valid, stream);
          store_stream<A>(rr + 4 * H + u * L, cn[r], valid, stream);
        }
        if (last) store<A>(c_n + b * H + u * L, cn[r], valid);
        if (P > 0) {
          store<A>(c.m + b * Hp + u * L, hv[r], L);
          if constexpr (BF) if (dot) store<A>(c.m2 + b * Hp + u * L, hv[r], L);
          if (rr) store_stream<A>(rr + 5 * H + u * L, hv[r], valid, stream);
        } else {
          put_h(b, u, hv[r]);
          store<A>(y + seq_row(qy, s, b) * p.ld_y + u * L, hv[r], valid);
          if (rr) store_stream<A>(rr + hprev_col + u * L, load<A>(hp + b * Kp + u * L, L), valid, stream);
          if (last) store<A>(h_n + b * K + u * L, hv[r], valid);
        }
      }
    };
    auto lstm_tile = [&](RowTile, int64_t r0, int mr, int64_t u, const V<A>* sum, int col)
                         __attribute__((always_inline)) {
      // Up to rows_per_tile<4>() rows from a register tile, up to 32 from the amx level's tile scratch.
      // Rows are computed in groups of 8 (amx: twice the independent activation chains of 4, whose last
      // phase, tanh(c), ran latency bound), of a full tile's, of kRowQuantum (2 to 4 left: a thread with
      // 4 rows paid 6 rows of activations as one group, 20% of a float64 LSTM call), or of one.
      constexpr int Q = kRowQuantum;
      int i = 0;
      if constexpr (kAmx)
        for (; mr - i >= 8; i += 8) lstm_rows(std::integral_constant<int, 8>(), r0 + i, 8, u, sum + i * kAcc, col);
      if constexpr (M > Q)
        for (; mr - i > Q; i += M)
          lstm_rows(std::integral_constant<int, M>(), r0 + i, mr - i < M ? mr - i : M, u, sum + i * kAcc, col);
      for (; mr - i > 1; i += Q)
        lstm_rows(std::integral_constant<int, Q>(), r0 + i, mr - i < Q ? mr - i : Q, u, sum + i * kAcc, col);
      if (mr - i == 1) lstm_rows(std::integral_constant<int, 1>(), r0 + i, 1, u, sum + i * kAcc, col);
    };
    auto product = [&](auto... a) { product_rows(nrows, rb0, a...); };
    using G1 = std::integral_constant<int, 1>;
    auto hrow = [&](int64_t b) { return hp + b * Kp; };
    auto hrow2 = [&, hp2 = c.h2[s & 1]](int64_t b) { return hp2 + b * Kp; };
    // ride: the step's product over own blocks in tiles that also project this thread's columns of
    // the next group of kRideRows rows (steps t0..): unit w is block u0 + w / G, gate w % G; a group's
    // units spread evenly over its kRideRows steps, one per tile. A step's share, ceil(n * G / 8) of
    // n own blocks, never exceeds its tiles: ceil(n / 2) for G = 3 and 4 (2-block tiles), at least
    // ceil(n / 8) for RNN (tiles of 8, 4, 2, 1 blocks). The rows a step's epilogues read were projected
    // by this thread in an earlier group (or before the steps). The tiles sum the panel's first GR of
    // its G gates (GRU reset_before: r and z, its first phase).
    auto ride_product = [&](auto grc, auto& epi) {
      if constexpr (rides<T, A>()) {
        constexpr int GR = decltype(grc)::value, NBR = ride_blocks<GR>();
        const int64_t t0 = (s / kRideRows + 1) * kRideRows, units = (u1 - u0) * G;
        const int64_t quota = ceil_div(units, kRideRows);
        int64_t w = t0 < q.steps ? (s % kRideRows) * quota : units;
        const int64_t w1 = w + quota < units ? w + quota : units;
        const int64_t nr = q.steps - t0 < kRideRows ? q.steps - t0 : kRideRows;
        const T* xin = static_cast<const T*>(p.x);
        const T* bias = static_cast<const T*>(p.x_gates);
        T* buf = static_cast<T*>(p.x_gates_buf);
        const T* xr[kRideRows];  // rows past the sequence repeat its last (computed, never stored)
        for (int r = 0; r < kRideRows && w < w1; ++r) xr[r] = xin + seq_row(q, t0 + (r < nr ? r : nr - 1), 0) * p.ld_x;
        // The panels and rows the products read: A sections against h, or (bfloat16) pair sections
        // against its bf16 copy, k counted in pairs (as product_rows picks them). Rows are T either way.
        using P = std::conditional_t<BF, bf16x2, A>;
        const int64_t KR = BF ? ceil_div(K, 2) : K, KI = BF ? ceil_div(p.input, 2) : p.input;
        const int64_t rec_bs = (BF ? pairs_stored(K) : K) * G * L, in_bs = (BF ? pairs_stored(p.input) : p.input) * G * L;
        const P* panel = reinterpret_cast<const P*>(packed + (BF ? l.fmain2 : l.fmain));
        const P* in_panel = reinterpret_cast<const P*>(static_cast<const A*>(p.packed_in) + (BF ? l.U * p.input * G * L : 0));
        const T* hrow0 = BF ? reinterpret_cast<const T*>(c.h2[s & 1]) : reinterpret_cast<const T*>(hp);
        auto in_col = [&](int64_t unit) { return in_panel + (u0 + unit / G) * in_bs + (unit % G) * L; };
        V<A> pacc[kRideRows];
        auto put_x = [&](int64_t unit) {  // as `project` stores: the sum plus the bias row, rounded once
          const int64_t u = u0 + unit / G;
          const int g = static_cast<int>(unit % G), valid = static_cast<int>(H - u * L < L ? H - u * L : L);
          const V<A> bv = bias ? load<A>(bias + g * H + u * L, valid) : splat(A(0));
          for (int64_t r = 0; r < nr; ++r) store<A>(buf + xg_row(t0 + r, 0) * p.ld_gates + g * H + u * L, pacc[r] + bv, valid);
        };
        const T* row[1] = {hrow0};
        auto tile = [&](auto nbc, int64_t blk) {
          constexpr int NB = decltype(nbc)::value;
          Tile<A> acc;
          if (w < w1) {
            ride_tile<NB, GR>(hrow0, panel + blk * rec_bs, KR, G * L, rec_bs, acc, xr, in_col(w), KI, G * L, pacc);
            put_x(w++);
          } else {
            gemm_tile<1, NB, GR>(row, panel + blk * rec_bs, KR, G * L, rec_bs, acc);
          }
          for (int bi = 0; bi < NB; ++bi) call_epilogue<A>(epi, rb0, 1, blk + bi, acc.v[0], bi * GR);
        };
        for (int64_t blk = u0; blk < u1;) {
          const int64_t left = u1 - blk;
          if constexpr (NBR >= 8) if (left >= 8) { tile(std::integral_constant<int, 8>(), blk); blk += 8; continue; }
          if constexpr (NBR >= 4) if (left >= 4) { tile(std::integral_constant<int, 4>(), blk); blk += 4; continue; }
          if (left >= 2) { tile(std::integral_constant<int, 2>(), blk); blk += 2; continue; }
          tile(std::integral_constant<int, 1>(), blk++);
        }
      }
    };
    if (fused && !overlap) project_step(s);
    if constexpr (VAR == Variant::GruBefore) {
      using G2 = std::integral_constant<int, 2>;
      if (ride) ride_product(G2(), epilogue);
      else product(G2(), packed, 3, 0, u0, u1, l.fmain, l.fmain2, K, hrow, hrow2, epilogue);
    } else if constexpr (VAR == Variant::Lstm) {
      if (ride) ride_product(GI(), lstm_tile);
      else product(GI(), packed, G, 0, u0, u1, l.fmain, l.fmain2, K, hrow, hrow2, lstm_tile);
    } else {
      if (ride) ride_product(GI(), epilogue);
      else product(GI(), packed, G, 0, u0, u1, l.fmain, l.fmain2, K, hrow, hrow2, epilogue);
    }
    if (VAR == Variant::GruBefore) {
      // Phase 2: n = tanh(x_n + W_hn (r * h_{t-1})) needs every unit's r * h_{t-1}.
      if (!split) team.sync();
      product(G1(), packed, 3, 2, u0, u1, l.fmain, l.fmain2, K, [&](int64_t b) { return c.rh + b * Hp; },
              [&](int64_t b) { return c.rh2 + b * Hp; },
              [&](int64_t b, int64_t u, const V<A>* sum, int col) {
        const int valid = static_cast<int>(H - u * L < L ? H - u * L : L);
        const int64_t row = seq_row(q, s, b);
        const T* gx = fused ? xgo + b * G * Hp + u * L : xg + xg_row(s, b) * p.ld_gates + u * L;
        const V<A> ng = tanh_(sum[col] + gate_in(gx, 2, u, valid));
        const V<A> zg = load<A>(c.z + b * Hp + u * L, L);
        const V<A> h = (A(1) - zg) * ng + zg * load<A>(hp + b * Kp + u * L, L);
        put_h(b, u, h);
        store<A>(y + seq_row(qy, s, b) * p.ld_y + u * L, h, valid);
        if (s == seq_len(q, b) - 1) store<A>(h_n + b * K + u * L, h, valid);
        if (res) store_stream<A>(res + row * rc + 2 * H + u * L, ng, valid, stream);
      });
    }
    if (VAR == Variant::Lstm && P > 0) {
      // Projection: h_t = W_hr m_t needs every unit's m_t.
      if (!split) team.sync();
      product(G1(), packed, 1, 0, p0, p1, l.fproj, l.fproj2, H, [&](int64_t b) { return c.m + b * Hp; },
              [&](int64_t b) { return c.m2 + b * Hp; },
              [&](int64_t b, int64_t pb, const V<A>* sum, int col) {
        const int valid = static_cast<int>(P - pb * L < L ? P - pb * L : L);
        const int64_t row = seq_row(q, s, b);
        put_h(b, pb, sum[col]);
        store<A>(y + seq_row(qy, s, b) * p.ld_y + pb * L, sum[col], valid);
        if (s == seq_len(q, b) - 1) store<A>(h_n + b * K + pb * L, sum[col], valid);
        if (res) store_stream<A>(res + row * rc + hprev_col + pb * L, load<A>(hp + b * Kp + pb * L, L), valid, stream);
      });
    }
    if (overlap) {
      const int token = team.arrive();
      if (s + 1 < q.steps) project_step(s + 1);
      team.wait_for(token);
    } else if (!split) {
      team.sync();
    }
  }
  if (stream) stream_fence();  // the reserve went out by store_stream
  amx_release();               // (the amx level's tiles, if this thread configured them)
}

// Row tiles (passes over the panel) a product over n rows makes, for the variant's gates.
template <Variant VAR> int64_t tile_passes(int64_t n) {
  constexpr int G = gates_of<VAR>();
  int64_t t = 0;
  for (int64_t left = n; left > 0; left -= next_tile_rows<G>(left)) ++t;
  return t;
}

template <Variant VAR, typename T, typename A>
void forward_variant(const RnnFwdParams& p) {
  FwdCtx<A> c;
  c.p = &p;
  c.l = layout_of(p.shape, lanes<A>(), uses_dot(p.dtype), uses_split(p.dtype));
  c.sz = sizes(p.shape, p.seq.batch, p.dtype);
  c.amx_split = c.l.split && p.seq.batch >= kSplitRows;
  const int64_t L = c.l.L, B = p.seq.batch, Kp = c.l.UK * L, Hp = c.l.U * L;
  A* ws = static_cast<A*>(p.workspace);
  c.hbuf[0] = ws;
  c.hbuf[1] = c.hbuf[0] + B * Kp;
  c.c = c.hbuf[1] + B * Kp;
  c.m = c.c + B * Hp;
  c.rh = c.m + B * Hp;
  c.z = c.rh + B * Hp;
  bf16* w2 = reinterpret_cast<bf16*>(c.z + B * Hp);  // Layout::dot only (sizes() counts it then)
  c.h2[0] = w2;
  c.h2[1] = w2 + B * Kp;
  c.m2 = c.h2[1] + B * Kp;
  c.rh2 = c.m2 + B * Hp;
  // After the forward's region as sizes() counts it (pair buffers included only when they exist).
  c.xg_own = c.z + B * Hp + (c.l.dot ? B * (Kp + Hp) : 0);
  c.relu = p.shape.mode == RnnMode::RnnRelu;
  const int64_t macs = B * c.l.G * c.l.H * c.l.K + B * c.l.P * c.l.H;
  int nt = choose_threads(p.num_threads, c.l.U, macs, p.seq.steps);
  // Rows instead of units (split_rows) where each core's cache holds the whole forward panel (so each
  // thread can own every unit of its rows): then rows never meet across threads, and a step needs no
  // barrier, which on a shared machine cost a fifth of a bfloat16 LSTM step (one thread waiting out
  // the other's stalls). Packed batches split their rows by cost (split_rows_by_cost; by valid steps in
  // quanta until stop 20), so the rows that stop early do not leave their thread idle: in-process, 8
  // alternations (stop 12, the quanta), packed B=32 (lengths 100..10) RNN H=256 1.51 -> 1.71x torch.nn, LSTM H=128 (B=64) 1.62 -> 1.74x, LSTM and
  // GRU H=256 within noise. Where the kernel projects each step's input inside the step: below.
  // "Holds" meant half the L2 until stop 20; on a 1 MB-L2 Zen 4 the whole of it measured better for the
  // panels in between (LSTM and GRU at H=256: 1 MB and 768 KB), time by units / by rows, in-process, 15
  // rotations: LSTM inference (100,64,256) 1.13, (100,48,256) 1.17 (0.82 -> 0.95x torch.nn); training
  // (forward and backward) LSTM (100,32,256) 1.10, GRU 1.03, GRU (100,8,256) 1.18, LSTM 1.03. (On a
  // 2 MB-L2 machine half the L2 already took those panels by rows.)
  // Bytes of one lane's column of a panel over k < n (pair sections where they are used).
  auto col_bytes = [&](int64_t n) { return c.l.dot ? 4 * pairs_stored(n) : int64_t(sizeof(A)) * n; };
  const int64_t panel_bytes = col_bytes(c.l.K) * c.l.U * c.l.G * L + col_bytes(c.l.H) * c.l.UP * L;
  const int by_rows = choose_threads(p.num_threads, B / kRowQuantum, macs, p.seq.steps);
  // The input panel (bytes), where the kernel projects.
  const int64_t in_bytes = p.x ? col_bytes(p.input) * c.l.U * c.l.G * L : 0;
  // Projecting each step inside the step (fused), threads own rows too where both panels fit a core's
  // L2, unless the busiest thread's rows make over half again the passes over the panels that
  // splitting units makes (GRU B=8: one 8-row tile by units, 4-row tiles by rows: 1.03x the time).
  // In-process, 31 pairs, time by rows / by units: LSTM (50,16,128) 0.89, (100,32,128) 0.90, packed
  // B=32 H=128 0.85; GRU (50,16,128) 0.89, packed 1.00. (H=256 LSTM and GRU panels do not fit.)
  // Both panels within a core's whole L2 since stop 20 (half before): on a 1 MB-L2 Zen 4 that takes
  // bfloat16 LSTM and GRU at H=256 (1 MB and 768 KB) by rows, time by units / by rows, in-process, 17
  // rotations: LSTM (100,32,256) 1.26 (0.84 -> 1.06x torch.nn's bfloat16), B=16 1.13, B=8 1.14; GRU B=32
  // 1.05, B=8 1.03; float32 panels in between: GRU H=192 B=8 / 32 1.04 / 1.00, LSTM H=160 1.07 / 1.03.
  // A whole L2 where the core's L3 streams fast (cpu_l3_streams_fast: AMD), half of it elsewhere: a
  // Granite Rapids-class Xeon (2 MB L2) streams 189 GB/s a core from 1 MB, 121 from 1.5 MB, 75 from 2 MB
  // and 29 from its L3, and ran LSTM H=256 each step by rows (2 MB of panels) at half the speed of
  // units. In-process, 7-9 rotations, ratio to torch.nn by rows -> by units: LSTM (100,8,256) 0.78 ->
  // 1.16x, (100,16,256) 0.76 -> 1.00x, (100,32,256) 0.82 -> 0.94x; H=240 (1.8 MB) B=8 0.86 -> 1.07x,
  // H=224 (1.6 MB) 1.12 -> 1.26x; GRU H=256 (1.5 MB) packed B=32 (lengths 100..10) 1.45 -> 1.66x, padded
  // B=8 / 32 2.04 / 1.61 -> 2.06 / 1.58x; LSTM H=208 (1.4 MB) B=8 / 32 1.19 / 1.01 -> 1.16 / 0.94x.
  const int64_t l2_rows = cpu_l3_streams_fast() ? cpu_l2_bytes() : cpu_l2_bytes() / 2;
  // Where the L2 streams at twice the L3's rate (cpu_l2_outpaces_l3: Zen 5), a thread's whole panel past
  // three quarters of the L2 comes back from the L3 every step, while split by units each thread reads
  // its half from the L2: rows then only where each thread has kStreamHidingRows rows or more, enough
  // products to hide that stream. On the 2-vCPU Zen 5 (1 MB L2), in-process, 11-13 alternations, time
  // by units / by rows, LSTM H=256 projected before the steps (1 MB recurrent panel): (100,8,256) 0.95,
  // packed B=8 (lengths 100..10) about 0.83 (against each step: by units 0.86-0.87, by rows 1.01-1.04, in
  // separate runs); B=16 1.02, B=32 1.05 (rows kept). By the batch (a packed batch's
  // first step), not the rows on average as rnn_paths._projects_each_step counts them: packed B=16 of
  // lengths 60..2 (8.3 rows a step on average) by rows 1.43-1.69 ms a call, by units 1.49-1.62.
  constexpr int64_t kStreamHidingRows = 8;
  const bool stream_hidden = !cpu_l2_outpaces_l3() || B >= kStreamHidingRows * by_rows;
  auto rows_keep = [&](int64_t bytes) { return 4 * bytes <= 3 * cpu_l2_bytes() || stream_hidden; };
  const bool fused_rows =
      by_rows > 1 && panel_bytes + in_bytes <= l2_rows && rows_keep(panel_bytes + in_bytes) &&
      2 * by_rows * tile_passes<VAR>(busiest_rows<gates_of<VAR>()>(B, by_rows)) <=
          3 * tile_passes<VAR>(B);
  c.split_rows = by_rows > 1 && (p.x == nullptr || p.x_gates_buf != nullptr || fused_rows) &&
                 panel_bytes <= l2_rows && rows_keep(panel_bytes);
  if (c.split_rows) nt = by_rows;
  // With rows split, and both panels in half a core's L2 (an RNN at H=256: 512 KB), each thread also
  // projects its own rows (every unit) before the steps: the steps then read only x_gates their own
  // core wrote. Split by units, half of each row's x_gates came from the other core. Plain padded
  // sequences only (the rows are t * row_stride_t + b * row_stride_b).
  c.project_own_rows = c.split_rows && p.x != nullptr && p.x_gates_buf != nullptr && p.seq.lengths == nullptr &&
                       p.seq.time_offsets == nullptr && in_bytes + panel_bytes <= cpu_l2_bytes() / 2;
  // Every step has its one row (seq_len 0 == steps; the ring's arithmetic counts steps, not rows).
  const bool first = p.x != nullptr && p.x_gates_buf != nullptr;
  c.ride = p.ride;
  if (c.ride && !(c.sz.ride_ring > 0 && first && !c.split_rows && p.seq.steps > kRideRows &&
                  seq_len(p.seq, 0) == p.seq.steps))
    throw std::invalid_argument(
        "pyseqkern: rnn_forward: 'ride' projects a one-row sequence inside its steps: x and x_gates_buf given, "
        "B = 1, more than " + std::to_string(kRideRows) + " steps, a level and dtype whose sizes report a "
        "ride ring; this call has B = " + std::to_string(B) + ", " + std::to_string(p.seq.steps) + " steps");
  static_assert(kRnnRideRing == 2 * kRideRows, "the ring holds the group the steps read and the one they fill");
  // The projection before the steps (every row, by unit blocks) runs on the tile unit where its rows fill
  // the unit's row groups, as a call of kSplitRows rows does at every step, whatever the call's batch: the
  // tile unit runs that product at 1.5-2x the FMA tiles' rate. Since stop 52; until then only calls of
  // kSplitRows rows a step took it. In-process, 5-9 alternating processes, time tile unit / FMA tiles:
  // GRU (100,8,384) 0.91, (100,8,512) 0.89, (100,16,512) 0.90, (4,8,512) 0.91, (100,4,384) 0.89; RNN
  // (50,8,1024) 0.88, (50,2,1024) 0.91; LSTM (100,2,512) 0.90, bidirectional (100,3,512) 0.94; narrow
  // inputs, where the projection is a small share, within noise (I = 32..128, H = 512: 0.97-1.02). And a
  // one-row sequence that does not ride (rnn_paths._kernel_rides) projects so. Decided by the call's rows
  // (T x B), never by a thread's share.
  c.project_split = c.l.split && !c.ride && p.x_rows >= kSplitRows;
  if (first && p.x_gates_buf_rows < p.x_rows && !c.ride)
    throw std::invalid_argument(
        "pyseqkern: rnn_forward: 'x_gates_buf' holds " + std::to_string(p.x_gates_buf_rows) +
        " rows, a ring that only a one-row sequence projected inside its steps takes (B = 1, more than " +
        std::to_string(kRideRows) + " steps, a level and dtype whose sizes report a ride ring); this call "
        "needs all of x's " + std::to_string(p.x_rows) + " rows");
  // A call this small whose panels (the input panel too, where the kernel projects) fit one core's
  // cache runs on one thread: waking a second costs more than it saves. RNNCell B=1, H=256 (131K
  // multiply-adds, 512 KB of panels): 5.3 us on one thread, 7.3 on two. Panels that do not fit keep
  // two (GRUCell, 1.5 MB: 27 us on one, 14 on two).
  if (p.x != nullptr) {
    const int64_t in_rows = p.x_gates_buf != nullptr ? p.x_rows : B * p.seq.steps;
    const int64_t call_macs = macs * p.seq.steps + in_rows * c.l.G * c.l.H * p.input;
    if (call_macs < kOneThreadMacs && panel_bytes + in_bytes <= cpu_l2_bytes() / 2 && !p.spread) nt = 1;
  }
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
                        &PSK_CONCAT(isa_, PSK_ISA)::rnn::forward, &PSK_CONCAT(isa_, PSK_ISA)::rnn::backward,
                        &PSK_CONCAT(isa_, PSK_ISA)::rnn::input_panel_numel,
                        &PSK_CONCAT(isa_, PSK_ISA)::rnn::pack_input,
                        &PSK_CONCAT(isa_, PSK_ISA)::rnn::pack_current})
