// The register tiles (FMA, and vdpbf16ps pairs where the level has them): rows x unit blocks x gates of
// sums held in registers, and the epilogue call that hands a tile's sums on.
// Part of the recurrent kernels' building blocks (rnn_common.h includes them all), compiled into each
// per-ISA source inside the ISA's namespace (cpu_dispatch.h).
#pragma once
#include <cstring>
#include <type_traits>

#include "rnn_vec.h"

#ifndef PSK_ISA
#error "rnn_tiles.h belongs to per-ISA kernel sources"
#endif

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {

// ---- the register-tiled product ---------------------------------------------------------------------
// acc.v[r][b * G + g] = sum_k rows[r][k] * panel[k * kstride + b * bstride + g * L + (0..L-1)] for r < MR,
// b < NB, g < G: MR rows of activations against NB unit blocks of G gates each. Weight vectors are loaded
// once per k for all MR rows. MR * NB * G accumulators: a tile of one gate and one block (a backward
// product, an RNN, a projection) has too few independent sums to hide the FMA latency and ran at a
// quarter of peak, so narrow tiles take several blocks (at B=1, LSTM: 4 blocks x 4 gates).
// The sums live in local variables: written straight into `acc`, which the compiler cannot prove
// apart from the float rows, they would go through memory on every k. Never inlined: inside the large
// step loop the register allocator spilled two of the 16 accumulators and reloaded each weight vector
// once per row (20 loads per k instead of 8); on its own the tile keeps everything in registers.
// Tiles of up to 4 rows keep the 16 accumulators they always had: at 24, GCC compiled the one-row tile
// of 8 blocks x 3 gates into a loop over accumulators in memory (GRU B=1 3.3-4.0x -> 2.3x torch).
#if defined(__AVX512F__)
constexpr int kAcc = 24;        // accumulators per full tile (of 32 zmm: the rest hold weights and a row value)
constexpr int kAccNarrow = 16;  // per tile of 4 rows or fewer
#elif defined(__AVX2__)
constexpr int kAcc = 12;  // of 16 ymm
constexpr int kAccNarrow = 12;
#else
constexpr int kAcc = 8;   // of 16 xmm
constexpr int kAccNarrow = 8;
#endif
inline constexpr int acc_budget(int mr) { return mr > 4 ? kAcc : kAccNarrow; }
constexpr int kMaxNB = 8;
// Rows of a full tile for G gates: each weight vector loaded from L2 feeds that many rows; with 4 rows
// a tile streamed 32 B/cycle of weights at the FMA peak, most of what the L2 delivers (~41 B/cycle
// measured on an Emerald Rapids core). AVX-512: 6 rows x 4 gates, 8 x 3, 6 x 2 gates x 2 blocks, 6 x 4
// blocks of one gate (24 accumulators each; 8 x 2 blocks x 1 gate left a third of them idle and ran
// an RNN slower). AVX2 (12 accumulators): 3 rows x 4 gates, 4 x 3 gates, 3 x 2 gates x 2 blocks, 4 x 3
// blocks of one gate. Until stop 22 every AVX2 tile had 3 rows: 8 rows went as 3 + 3 + 2 and threads
// owning rows split 8 as 6 + 2. With 4-row tiles (and split_rows_by_tiles), on a Zen 3, 5 alternating
// processes, time before / after: RNN (100,8,256) 1.42, (100,32,256) 1.13, (100,9,256) 1.12; GRU B=8
// 1.12, B=32 1.05, (100,16,128) 1.14; LSTM (unchanged tiles) within noise. Baseline: up to kMR.
template <int G> constexpr int rows_per_tile() {
#if defined(__AVX512F__)
  return G == 3 ? 8 : 6;
#elif defined(__AVX2__)
  return G == 3 || G == 1 ? 4 : 3;  // (4 x 1 block x 2 gates would leave a third of them idle)
#else
  return kAcc / G < kMR ? kAcc / G : kMR;
#endif
}
// The next tile's height for `left` rows: full tiles, but never a last tile of 1 or 2 rows behind a
// full one (8 rows go as 4 + 4, not 6 + 2: a narrow tile streams the weights for few rows; with 4-row
// tiles, 5 rows go as 3 + 2, not 4 + 1: RNN (100,5,256) 1.08x the time on a Zen 3). Heights between 4
// and full run as full tiles, the extra rows repeating the last.
template <int G> inline int next_tile_rows(int64_t left) {
  constexpr int M = rows_per_tile<G>();
  if (left <= M) return static_cast<int>(left);
  if (left - M >= 3 || M < 4) return M;
  return M > 4 ? 4 : left - M == 1 ? 3 : M;
}

template <typename A> struct Tile { V<A> v[kMR][kAcc]; };

// Sums over k run in blocks of kSumBlock, each from zero in the registers, added in order to the
// tile's totals: one running sum over a wide input (I = 4096) carried every rounding of 4096 terms and
// made a cell's error 2-3x torch's (whose GEMMs block k too). Blocks of 256 (until stop 30) still left
// K = 256 one run: LSTMs with projections (H = 256, T = 50, B = 1, the backward's sum over 4H = 1024
// gate rows into P units) ran 1.44-1.6x torch.nn's output error at proj_size 1..64, a 2-layer one 2.97x
// on one seed of 16. A sum of K terms in blocks of b carries an error of about sqrt(b/2 + K/(2b))
// x 2^-24 x its norm (simulated: K = 256 4.9 in one run, 2.3 in blocks of 64; K = 1024 9.4 and 2.8),
// least near b = sqrt(K); 64 costs one add per accumulator every 64 FMAs (1-2% of a step at B = 1..4,
// within noise at B = 32) and took those ratios to 0.86-1.04 (1.54 at worst).
constexpr int64_t kSumBlock = 64;
template <int MR, int NB, int G, typename A>
__attribute__((noinline)) void gemm_tile(const A* const* rows, const A* panel, int64_t K, int64_t kstride,
                                         int64_t bstride, Tile<A>& acc) {
  constexpr int L = lanes<A>(), C = NB * G;
  static_assert(MR * C <= kAcc, "tile exceeds the accumulator budget");
  const A* row[MR];
  for (int r = 0; r < MR; ++r) row[r] = rows[r];
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kSumBlock) {
    const int64_t k1 = K - k0 < kSumBlock ? K : k0 + kSumBlock;
    V<A> sum[MR][C];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < C; ++c) sum[r][c] = splat(A(0));
    for (int64_t k = k0; k < k1; ++k) {
      const A* w = panel + k * kstride;
      V<A> wv[C];
      for (int b = 0; b < NB; ++b)
        for (int g = 0; g < G; ++g) wv[b * G + g] = load<A>(w + b * bstride + g * L, L);
      for (int r = 0; r < MR; ++r) {
        const V<A> hb = splat(row[r][k]);
        for (int c = 0; c < C; ++c) sum[r][c] += hb * wv[c];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < C; ++c) acc.v[r][c] = k0 == 0 ? sum[r][c] : acc.v[r][c] + sum[r][c];
  }
}

// ---- the bfloat16 dot-product tile (levels with AVX512_BF16) ----------------------------------------
// The same tile over pairs of k: each 32-bit lane of a weight vector holds the bfloat16 weights of k =
// 2j (low half) and 2j + 1 (high half) for one unit, each row gives the bfloat16 pair (h[2j], h[2j+1]),
// and one vdpbf16ps adds both products to the float32 sums: twice the multiply-adds of an FMA per
// instruction. Products of bfloat16 values are exact in float32; the pair's sum is rounded once
// (round to nearest even, denormals flushed), then added. bfloat16 storage only: its rows (h_{t-1}) are
// rounded to bfloat16 before the product, as torch's oneDNN bfloat16 LSTM keeps them.
struct bf16x2 {
  uint32_t bits;
};
template <typename P> struct AccOf { using type = P; };
template <> struct AccOf<bf16x2> { using type = float; };
#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
// Row values k = 2j and 2j + 1 as one pair broadcast to every lane.
inline __m512bh pair_at(const bf16* row, int64_t j) {
  uint32_t pair;
  std::memcpy(&pair, row + 2 * j, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
}
// A block's sums into a tile's totals (vfloat and __m512 are the same bits by memcpy): the first block's
// stored, later ones added.
inline void add_block(vfloat& total, __m512 part, bool first) {
  if (!first) {
    __m512 t;
    std::memcpy(&t, &total, sizeof(vfloat));
    part = _mm512_add_ps(t, part);
  }
  std::memcpy(&total, &part, sizeof(vfloat));
}
template <int MR, int NB, int G>
__attribute__((noinline)) void gemm_tile(const bf16* const* rows, const bf16x2* panel, int64_t K2, int64_t kstride,
                                         int64_t bstride, Tile<float>& acc) {
  constexpr int C = NB * G;
  static_assert(MR * C <= kAcc, "tile exceeds the accumulator budget");
  // k in blocks as gemm_tile's (kSumBlock values: half as many pairs).
  for (int64_t k0 = 0; k0 < K2 || k0 == 0; k0 += kSumBlock / 2) {
    const int64_t k1 = K2 - k0 < kSumBlock / 2 ? K2 : k0 + kSumBlock / 2;
    __m512 sum[MR][C];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < C; ++c) sum[r][c] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const bf16x2* w = panel + k * kstride;
      __m512bh wv[C];
      for (int b = 0; b < NB; ++b)
        for (int g = 0; g < G; ++g) wv[b * G + g] = (__m512bh)_mm512_loadu_si512(w + b * bstride + g * 16);
      for (int r = 0; r < MR; ++r) {
        const __m512bh hb = pair_at(rows[r], k);
        for (int c = 0; c < C; ++c) sum[r][c] = _mm512_dpbf16_ps(sum[r][c], hb, wv[c]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < C; ++c) add_block(acc.v[r][c], sum[r][c], k0 == 0);
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

// Blocks one tile of `mr` rows takes: the widest power of two within the budget and `left`.
template <int G> inline int tile_blocks(int mr, int64_t left) {
  int nb = acc_budget(mr) / (mr * G);
  nb = nb >= kMaxNB ? kMaxNB : nb >= 4 ? 4 : nb == 3 ? 3 : nb >= 2 ? 2 : 1;
  while (nb > left) nb = nb == 3 ? 2 : nb >> 1;
  return nb;
}

// Runtime (rows, blocks), as tile_blocks chose them, to the template. R: row element, P: panel element
// (A, or bf16 rows against bf16x2 pairs), A: the sums.
template <int G, int MR, typename R, typename P, typename A>
inline void gemm_nb(int nb, const R* const* rows, const P* panel, int64_t K, int64_t ks, int64_t bs, Tile<A>& acc) {
  constexpr int cap = acc_budget(MR) / (MR * G);
  if constexpr (cap >= 8) if (nb == 8) return gemm_tile<MR, 8, G>(rows, panel, K, ks, bs, acc);
  if constexpr (cap >= 4) if (nb == 4) return gemm_tile<MR, 4, G>(rows, panel, K, ks, bs, acc);
  if constexpr (cap == 3) if (nb == 3) return gemm_tile<MR, 3, G>(rows, panel, K, ks, bs, acc);
  if constexpr (cap >= 2) if (nb == 2) return gemm_tile<MR, 2, G>(rows, panel, K, ks, bs, acc);
  gemm_tile<MR, 1, G>(rows, panel, K, ks, bs, acc);
}
template <int G, typename R, typename P, typename A>
inline void gemm_block(int mr, int nb, const R* const* rows, const P* panel, int64_t K, int64_t kstride,
                       int64_t bstride, Tile<A>& acc) {
  // Tiles of more than 4 rows come at the full height (the caller repeats its last row to fill one).
  constexpr int MRT = rows_per_tile<G>();
  if constexpr (MRT > 4) if (mr > 4) return gemm_nb<G, MRT>(nb, rows, panel, K, kstride, bstride, acc);
  if constexpr (MRT >= 4) if (mr == 4) return gemm_nb<G, MRT >= 4 ? 4 : 1>(nb, rows, panel, K, kstride, bstride, acc);
  if constexpr (MRT >= 3) if (mr == 3) return gemm_nb<G, MRT >= 3 ? 3 : 1>(nb, rows, panel, K, kstride, bstride, acc);
  if (mr == 2) return gemm_nb<G, 2>(nb, rows, panel, K, kstride, bstride, acc);
  gemm_nb<G, 1>(nb, rows, panel, K, kstride, bstride, acc);
}

// Tiles hand their sums to an epilogue row by row, or a whole tile of rows at once (tiled_product).
struct RowTile {};

// The epilogue of rows [r0, r0 + mr) of block blk: row r's G sums at sum[r * kAcc + col + g].
template <typename A, typename Epi>
inline void call_epilogue(Epi& epi, int64_t r0, int mr, int64_t blk, const V<A>* sum, int col) {
  if constexpr (std::is_invocable<Epi, RowTile, int64_t, int, int64_t, const V<A>*, int>::value)
    epi(RowTile{}, r0, mr, blk, sum, col);
  else
    for (int r = 0; r < mr; ++r) epi(r0 + r, blk, sum + r * kAcc, col);
}

}  // namespace rnn
PSK_ISA_NAMESPACE_END
