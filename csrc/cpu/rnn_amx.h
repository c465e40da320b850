// The tile unit (AMX): bfloat16 products on tiles, float32 ones as three bfloat16 pieces a value, the
// staged rows and the passes over them (amx_product).
// Part of the recurrent kernels' building blocks (rnn_common.h includes them all), compiled into each
// per-ISA source inside the ISA's namespace (cpu_dispatch.h).
#pragma once
#include <cstring>

#include "amx_tiles.h"
#include "pyseqkern/thread_pool.h"
#include "rnn_tiles.h"

#ifndef PSK_ISA
#error "rnn_amx.h belongs to per-ISA kernel sources"
#endif

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {

// ---- the bfloat16 product on AMX tiles (the amx level) ------------------------------------------------
// The pair sections are exactly the tile unit's B layout: a tile of 16 rows of k pairs x 16 units is 16
// rows of 64 bytes, kstride apart. Each product stages its rows (up to 32 at a time) into an aligned
// buffer zero padded to whole tiles of k (tile loads of unaligned rows ran at a fifth of the rate, and
// the rows' sources differ: h, m, r*h, x rows at any stride), then runs passes of tile products: two
// row groups of 16 x two columns (the usual 2 x 2 blocking: 2 A + 2 B + 4 C tiles), or one row group x
// four columns. The C tiles go to a scratch whose rows are kAcc vectors apart, so the epilogues read
// their sums as from a gemm_tile Tile (row pointers, rows kAcc apart). TDPBF16PS sums each pair
// exactly and rounds once into the float32 sum (round to nearest even, denormals flushed), like vdpbf16ps. Measured on a
// Sapphire/Emerald Rapids core: ~2.2 TFLOP/s of tile products (16 rows), against 87 GFLOP/s for
// vdpbf16ps and 177 for float32 FMA.
// The pair sections hold whole tiles of k at this level: ceil(K/2) pairs rounded up to kPairRound,
// zero past K, so no tile load reads past a block.
// The three pieces of a float (amx_split_pass2: split_row's, value by value, and pack_split's).
inline void split3(float v, bf16* h, bf16* m, bf16* lo) {
  *h = from_acc<bf16>(v);
  float r = v - to_acc(*h);
  r = r == r ? r : 0.f;
  *m = from_acc<bf16>(r);
  *lo = from_acc<bf16>(r - to_acc(*m));
}
// split3 over n values into three arrays, a register at a time (vcvtneps2bf16 flushes denormal values
// to zero where from_acc keeps them: the tile unit reads denormal bfloat16 as zero either way).
inline void split_values(const float* src, int64_t n, bf16* h, bf16* m, bf16* lo) {
  constexpr int W = lanes<float>();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vfloat v;
    std::memcpy(&v, src + i, sizeof v);
    const vbf16 vh = narrow(v);
    vfloat r = v - widen(vh);
    r = r == r ? r : vfloat{};
    const vbf16 vm = narrow(r);
    const vbf16 vl = narrow(r - widen(vm));
    std::memcpy(h + i, &vh, sizeof vh);
    std::memcpy(m + i, &vm, sizeof vm);
    std::memcpy(lo + i, &vl, sizeof vl);
  }
  for (; i < n; ++i) split3(src[i], h + i, m + i, lo + i);
}
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool kAmx = true;
constexpr int64_t kPairRound = 16;
#else
constexpr bool kAmx = false;
constexpr int64_t kPairRound = 1;
#endif
inline int64_t pairs_stored(int64_t k) { return (((k + 1) / 2 + kPairRound - 1) / kPairRound) * kPairRound; }

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The staged rows of amx_product: 32 rows of whole tiles of k, this thread's scratch (thread_scratch:
// kept and grown as needed; an LSTM's backward at H = 512 contracts over 2048 gate rows, 128 KB, more
// than a worker's stack should hold). Until stop 42 rows past 1024 values took the vdpbf16ps tile
// instead, at a third of the tile unit's rate: half of a bfloat16 LSTM training call at (200, 64, 512).
// Null where the scratch is refused: the caller then finishes on the vdpbf16ps / FMA tiles (other bits)
// only so that its threads meet their barriers, and parallel_run throws, so those bits never reach
// anyone (until stop 47 they were returned).
inline bf16* amx_stage(int64_t values) { return static_cast<bf16*>(thread_scratch(values * 2)); }
constexpr int64_t kScratchRow = kAcc * 64;  // bytes between rows of the scratch: kAcc vectors, as in a Tile

// Two row groups: tiles 0-3 C, 4-5 A (row groups 0 and 1), 6-7 B. One row group: 0-1 C, 2-3 A, 4-7 B
// (amx_tiles.h).

// The C tiles of two row groups x NC columns: 0, 1 (group 0) and 2, 3 (group 1), zeroed, or stored at
// out + c * 64 (group 1 16 scratch rows on).
template <int NC> inline void amx_zero2() {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NC > 1) {
    _tile_zero(1);
    _tile_zero(3);
  }
}
template <int NC> inline void amx_store2(char* out) {
  _tile_stored(0, out, kScratchRow);
  _tile_stored(2, out + 16 * kScratchRow, kScratchRow);
  if constexpr (NC > 1) {
    _tile_stored(1, out + 64, kScratchRow);
    _tile_stored(3, out + 16 * kScratchRow + 64, kScratchRow);
  }
}

// Two row groups (A tiles 4, 5 at a and a + 16 rows) x NC (1 or 2) columns (B tiles 6, 7 from b[c] +
// kc * bk) over KC tiles of k; C tiles 0, 1 (group 0) and 2, 3 (group 1) stored at out + c * 64.
template <int NC>
__attribute__((noinline)) void amx_pass2(const char* a, int64_t as, const char* const* b, int64_t bs, int64_t bk,
                                         int64_t KC, char* out) {
  const char* a1 = a + 16 * as;
  amx_zero2<NC>();
  for (int64_t kc = 0; kc < KC; ++kc) {
    _tile_loadd(4, a + kc * 64, as);
    _tile_loadd(6, b[0] + kc * bk, bs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, a1 + kc * 64, as);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NC > 1) {
      _tile_loadd(7, b[1] + kc * bk, bs);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  amx_store2<NC>(out);
}
// One row group x NC (1 or 2) columns, double buffered: even tiles of k in A tile 2 and B tiles 4, 5,
// odd ones in A tile 3 and B tiles 6, 7; C tiles 0, 1. The tile registers are not renamed, so a load
// into a tile waits for the product that reads it: with four columns through three B tiles (5, 6, 7,
// then 5 again) each product waited on a B tile load from L2 (a bfloat16 LSTM at B=8 spent 12.5 us a
// step in these passes, ~180 cycles a product against 16). Now the loads of one half of a pair of k
// tiles run under the other half's products. Each C tile still sums k in order: the same bits.
template <int NC>
__attribute__((noinline)) void amx_pass1(const char* a, int64_t as, const char* const* b, int64_t bs, int64_t bk,
                                         int64_t KC, char* out) {
  _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  int64_t kc = 0;
  for (; kc + 1 < KC; kc += 2) {
    _tile_loadd(2, a + kc * 64, as);
    _tile_loadd(4, b[0] + kc * bk, bs);
    if constexpr (NC > 1) _tile_loadd(5, b[1] + kc * bk, bs);
    _tile_loadd(3, a + (kc + 1) * 64, as);
    _tile_loadd(6, b[0] + (kc + 1) * bk, bs);
    if constexpr (NC > 1) _tile_loadd(7, b[1] + (kc + 1) * bk, bs);
    _tile_dpbf16ps(0, 2, 4);
    if constexpr (NC > 1) _tile_dpbf16ps(1, 2, 5);
    _tile_dpbf16ps(0, 3, 6);
    if constexpr (NC > 1) _tile_dpbf16ps(1, 3, 7);
  }
  if (kc < KC) {
    _tile_loadd(2, a + kc * 64, as);
    _tile_loadd(4, b[0] + kc * bk, bs);
    _tile_dpbf16ps(0, 2, 4);
    if constexpr (NC > 1) {
      _tile_loadd(5, b[1] + kc * bk, bs);
      _tile_dpbf16ps(1, 2, 5);
    }
  }
  _tile_stored(0, out, kScratchRow);
  if constexpr (NC > 1) _tile_stored(1, out + 64, kScratchRow);
}

// ---- float32 on the tile unit: three bfloat16 pieces a value (the amx level) --------------------------
// A float32 value v splits exactly into hi = bf16(v), mid = bf16(v - hi), lo = bf16(v - hi - mid) (8
// significant bits each, signs free: 24 bits, a float's; denormal pieces aside, which the tile unit
// reads as zero). A product of two floats is then the nine products of pieces; the six kept here (hi
// with every piece, mid with hi and mid, lo with hi) leave out terms below 2^-24 of it, and each is
// exact in float32. TDPBF16PS adds a row's products of a tile of k to the float32 sum, rounded once
// (measured: against float64, a 32 x 512 x 512 product's largest error 2.6e-7 this way, 8.4e-7 for one
// float32 FMA chain over k). Six tile products per float32 one, at 16 cycles each whether a tile holds
// 16 rows or 8: on the Granite Rapids-class Xeon one core ran a 32 x 512 x 512 float32 product this way
// at 270-350 GFLOP/s (one row group of 16: 250; of 8: 122), where the FMA tile runs ~183 from L2. So
// only calls of kSplitRows rows take it, at steps of kSplitStepRows<G> active rows (uses_split, below),
// and any projection of kSplitRows rows before the steps (rnn_fwd.cpp, project_split).
// The staged rows hold the three pieces of each row (piece p of row r at stage + (p * 32 + r) * Ks), the
// panel the weights' hi, mid and lo pair sections `piece` elements apart.
// Two row groups: C tiles 0-3, A tiles 4, 5 (a piece of each group's rows), B tiles 6, 7 (a piece of
// NC columns); the smallest products first, the largest (hi x hi) last.
template <int NC>
__attribute__((noinline)) void amx_split_pass2(const char* a, int64_t as, int64_t ap, const char* const* b,
                                               int64_t bp, int64_t bs, int64_t bk, int64_t KC, char* out) {
  const int64_t g1 = 16 * as;
  amx_zero2<NC>();
  auto loadb = [&](int piece, int64_t kc) __attribute__((always_inline)) {
    _tile_loadd(6, b[0] + piece * bp + kc * bk, bs);
    if constexpr (NC > 1) _tile_loadd(7, b[1] + piece * bp + kc * bk, bs);
  };
  auto loada = [&](int piece, int64_t kc) __attribute__((always_inline)) {
    _tile_loadd(4, a + piece * ap + kc * 64, as);
    _tile_loadd(5, a + piece * ap + g1 + kc * 64, as);
  };
  auto dp = [&]() __attribute__((always_inline)) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NC > 1) {
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  };
  for (int64_t kc = 0; kc < KC; ++kc) {
    loadb(0, kc);
    loada(2, kc);
    dp();  // lo x hi
    loada(1, kc);
    dp();  // mid x hi
    loadb(1, kc);
    dp();  // mid x mid
    loada(0, kc);
    dp();  // hi x mid
    loadb(2, kc);
    dp();  // hi x lo
    loadb(0, kc);
    dp();  // hi x hi
  }
  amx_store2<NC>(out);
}
// One row group (up to 16 rows): C tiles 0, 1, A tiles 2-4 (the group's hi, mid, lo), B tiles 5-7.
template <int NC>
__attribute__((noinline)) void amx_split_pass1(const char* a, int64_t as, int64_t ap, const char* const* b,
                                               int64_t bp, int64_t bs, int64_t bk, int64_t KC, char* out) {
  _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  for (int64_t kc = 0; kc < KC; ++kc) {
    _tile_loadd(2, a + kc * 64, as);
    _tile_loadd(3, a + ap + kc * 64, as);
    _tile_loadd(4, a + 2 * ap + kc * 64, as);
    _tile_loadd(5, b[0] + kc * bk, bs);  // hi
    if constexpr (NC > 1) _tile_loadd(6, b[1] + kc * bk, bs);
    _tile_loadd(7, b[0] + bp + kc * bk, bs);  // mid
    _tile_dpbf16ps(0, 4, 5);  // lo x hi
    if constexpr (NC > 1) _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(0, 3, 5);  // mid x hi
    if constexpr (NC > 1) _tile_dpbf16ps(1, 3, 6);
    _tile_dpbf16ps(0, 3, 7);  // mid x mid
    _tile_dpbf16ps(0, 2, 7);  // hi x mid
    if constexpr (NC > 1) {
      _tile_loadd(7, b[1] + bp + kc * bk, bs);
      _tile_dpbf16ps(1, 3, 7);
      _tile_dpbf16ps(1, 2, 7);
    }
    _tile_loadd(7, b[0] + 2 * bp + kc * bk, bs);  // lo
    _tile_dpbf16ps(0, 2, 7);  // hi x lo
    if constexpr (NC > 1) {
      _tile_loadd(7, b[1] + 2 * bp + kc * bk, bs);
      _tile_dpbf16ps(1, 2, 7);
    }
    _tile_dpbf16ps(0, 2, 5);  // hi x hi
    if constexpr (NC > 1) _tile_dpbf16ps(1, 2, 6);
  }
  _tile_stored(0, out, kScratchRow);
  if constexpr (NC > 1) _tile_stored(1, out + 64, kScratchRow);
}
// A float row's three pieces, n values, zero padded to Ks (whole tiles of k), into dst[p * ap2 + ...].
inline void split_row(const float* src, int64_t n, int64_t Ks, bf16* dst, int64_t ap2) {
  split_values(src, n, dst, dst + ap2, dst + 2 * ap2);
  for (int p = 0; p < 3; ++p) std::memset(dst + p * ap2 + n, 0, (Ks - n) * sizeof(bf16));
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The sums of a scratch (row r's at r * kAcc) over m rows and nc columns that hold a NaN, replaced by
// resum(r, c). One compare a vector: ~2% of a window's tile products, which it overlaps.
template <typename Resum>
inline void resum_nan(vfloat* sc, int m, int nc, Resum resum) {
  for (int r = 0; r < m; ++r) {
    __mmask16 any = 0;
    for (int c = 0; c < nc; ++c) {
      __m512 v;
      std::memcpy(&v, sc + r * kAcc + c, sizeof v);
      any |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (!any) continue;
    for (int c = 0; c < nc; ++c) {
      __m512 v;
      std::memcpy(&v, sc + r * kAcc + c, sizeof v);
      if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) sc[r * kAcc + c] = resum(r, c);
    }
  }
}

// tiled_product for bf16 rows against pair panels on the tile unit (see amx_pass2): windows of the
// blocks whose G columns fit a Tile (kAcc), each computed for up to 32 rows, then its epilogues.
// `stage`: amx_stage's buffer of 32 staged rows (whole tiles of k). With S, float rows of K2 pairs
// (2 * K2 values, the last pair's second zero where K is odd: `kvals`) against the three piece sections
// `piece` pair elements apart (split_row, amx_split_pass2); the stage then holds 3 x 32 rows. Where a
// row or a weight is infinite, pieces of the other factor multiply it (inf x hi + inf x mid, of either
// sign: NaN where the float product is +-inf), so a sum that comes out NaN is summed again from the
// float panel `fpanel` (laid out as fmain, `fkstride` and `fbstride` as tiled_product takes them), as
// tiled_product would: one (row, column) at a time, whatever the rows beside it.
template <int G, bool S = false, typename RowPtr, typename Epi>
void amx_product(int64_t nrows, int64_t blk0, int64_t blk1, const bf16x2* panel, int64_t K2, int64_t kstride,
                 int64_t bstride, RowPtr row_ptr, Epi& epi, int64_t row0, bf16* stage, int64_t piece = 0,
                 int64_t kvals = 0, const float* fpanel = nullptr, int64_t fkstride = 0, int64_t fbstride = 0) {
  const int64_t KC = ceil_div(K2, 16), Ks = KC * 32;  // staged row: whole tiles of k (bfloat16 values)
  // Two scratches: the next window's tile products are issued before the last window's epilogue runs,
  // so the out-of-order core runs that epilogue's vector work while the tile unit computes.
  alignas(64) vfloat sc[2][32 * kAcc];  // in each, row r's sums at r * kAcc
  const int64_t as = Ks * 2, bs = kstride * 4, bk = 16 * bs, ap = 32 * Ks * 2, bp = piece * 4;
  constexpr int NBW = kAcc / G;  // blocks per window
  const int64_t row_end = row0 + nrows;
  for (int64_t r0 = row0; r0 < row_end; r0 += 32) {
    const int m = static_cast<int>(row_end - r0 < 32 ? row_end - r0 : 32);
    const int m0 = m < 16 ? m : 16, m1 = m - m0;
    for (int r = 0; r < m; ++r) {
      bf16* dst = stage + r * Ks;
      if constexpr (S) {
        split_row(row_ptr(r0 + r), kvals, Ks, dst, 32 * Ks);
      } else {
        std::memcpy(dst, row_ptr(r0 + r), 2 * K2 * sizeof(bf16));
        std::memset(dst + 2 * K2, 0, (Ks - 2 * K2) * sizeof(bf16));
      }
    }
    amx_configure(m0, m1, S);
    const char* a = reinterpret_cast<const char*>(stage);
    int64_t prev_blk = 0;
    int prev_nb = 0;
    auto epilogues = [&](int w) {  // of the window before w
      if constexpr (S) resum_nan(sc[(w + 1) & 1], m, prev_nb * G, [&](int r, int c) {
        const float* row[1] = {row_ptr(r0 + r)};  // the FMA tile's one-row, one-column sum: its bits
        Tile<float> acc;
        gemm_tile<1, 1, 1>(row, fpanel + (prev_blk + c / G) * fbstride + (c % G) * 16, kvals, fkstride, fbstride,
                           acc);
        return acc.v[0][0];
      });
      for (int bi = 0; bi < prev_nb; ++bi) call_epilogue<float>(epi, r0, m, prev_blk + bi, sc[(w + 1) & 1], bi * G);
    };
    int w = 0;
    for (int64_t blk = blk0; blk < blk1; blk += prev_nb, ++w) {
      const int nb = static_cast<int>(blk1 - blk < NBW ? blk1 - blk : NBW), nc = nb * G;
      const char* col[kAcc];  // column c of the window: block blk + c / G, gate c % G
      for (int c = 0; c < nc; ++c)
        col[c] = reinterpret_cast<const char*>(panel + (blk + c / G) * bstride + (c % G) * 16);
      char* scb = reinterpret_cast<char*>(sc[w & 1]);
      for (int c = 0; c < nc;) {
        char* out = scb + c * 64;
        const int left = nc - c;
        if constexpr (S) {
          if (m1) {
            if (left >= 2) amx_split_pass2<2>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 2;
            else amx_split_pass2<1>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 1;
          } else {
            if (left >= 2) amx_split_pass1<2>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 2;
            else amx_split_pass1<1>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 1;
          }
        } else if (m1) {
          if (left >= 2) amx_pass2<2>(a, as, col + c, bs, bk, KC, out), c += 2;
          else amx_pass2<1>(a, as, col + c, bs, bk, KC, out), c += 1;
        } else {
          if (left >= 2) amx_pass1<2>(a, as, col + c, bs, bk, KC, out), c += 2;
          else amx_pass1<1>(a, as, col + c, bs, bk, KC, out), c += 1;
        }
      }
      epilogues(w);
      prev_blk = blk;
      prev_nb = nb;
    }
    epilogues(w);
  }
}

// The float32 product on the tile unit (see amx_split_pass2): rows of K floats from `row_ptr` against
// the hi section `panel` of pairs (laid out as fmain2; mid and lo `piece` elements on), and the same
// weights as floats in `fpanel` (laid out as fmain: `fkstride`, `fbstride`) for the sums the pieces
// make NaN (amx_product). False (nothing computed) where the stage could not be allocated: the caller
// takes tiled_product.
template <int G, typename RowPtr, typename Epi>
inline bool split_product(int64_t nrows, int64_t blk0, int64_t blk1, const bf16x2* panel, int64_t piece, int64_t K,
                          int64_t kstride, int64_t bstride, const float* fpanel, int64_t fkstride, int64_t fbstride,
                          RowPtr row_ptr, Epi epi, int64_t row0) {
  const int64_t K2 = ceil_div(K, 2);
  bf16* stage = amx_stage(3 * 32 * ceil_div(K2, 16) * 32);
  if (!stage) return false;
  amx_product<G, true>(nrows, blk0, blk1, panel, K2, kstride, bstride, row_ptr, epi, row0, stage, piece, K, fpanel,
                       fkstride, fbstride);
  return true;
}
#endif

}  // namespace rnn
PSK_ISA_NAMESPACE_END
