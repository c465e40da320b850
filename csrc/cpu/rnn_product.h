// tiled_product: the loop every recurrent product shares, on the register tiles or the tile unit.
// Part of the recurrent kernels' building blocks (rnn_common.h includes them all), compiled into each
// per-ISA source inside the ISA's namespace (cpu_dispatch.h).
#pragma once
#include <type_traits>

#include "pyseqkern/isa.h"
#include "rnn_amx.h"
#include "rnn_tiles.h"

#ifndef PSK_ISA
#error "rnn_product.h belongs to per-ISA kernel sources"
#endif

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {

// The tiled loop every product here shares: for row tiles r0 (of up to rows_per_tile<G>() rows b from
// `row_ptr`, b in [row0, row0 + nrows)) and unit blocks [blk0, blk1) in groups, the tile's sums, then
// `epi(b, blk, sum, col)` for each row and block, with the block's G sums at sum[col + g]. P is the
// panel's element: A, or bf16x2 (then rows are bf16, K and the strides count pairs of k, and the sums
// are float). An epilogue that takes a RowTile first is called once per block with the tile's rows,
// `epi(RowTile{}, r0, mr, blk, sum, col)`, row r's sums at sum[r * kAcc + col + g]: it can interleave
// the rows' activations (see the LSTM forward). mr <= rows_per_tile<G>(), except on the amx level (up
// to 32).
template <int G, typename P, typename RowPtr, typename Epi>
inline void tiled_product(int64_t nrows, int64_t blk0, int64_t blk1, const P* panel, int64_t K, int64_t kstride,
                          int64_t bstride, RowPtr row_ptr, Epi epi, int64_t row0 = 0) {
  using R = typename std::remove_cv<typename std::remove_pointer<decltype(row_ptr(0))>::type>::type;
  using A = typename AccOf<P>::type;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same<P, bf16x2>::value) {
    if (bf16* stage = amx_stage(32 * ceil_div(K, 16) * 32))
      return amx_product<G>(nrows, blk0, blk1, panel, K, kstride, bstride, row_ptr, epi, row0, stage);
  }
#endif
  // Rows outer, so each row tile streams every block of the panel: from the cache where the panel
  // fits it (recurrent panels of sequences, by construction). Where this thread's blocks do not fit
  // half its L2 (an LSTM cell at H=512 reads 4 MB of W_hh once, 32 rows at a time), they go in chunks
  // that do, every row tile over one chunk before the next: else each row tile fetched the whole
  // panel again from L3 or memory. Each sum runs over k the same way either way (same bits).
  constexpr int MRT = rows_per_tile<G>();
  const int64_t row_end = row0 + nrows, blk_bytes = K * G * kVecBytes, budget = cpu_l2_bytes() / 2;
  int64_t chunk = blk1 - blk0;
  if (nrows > MRT && chunk * blk_bytes > budget) {
    chunk = budget / blk_bytes;
    chunk = chunk >= kMaxNB ? chunk / kMaxNB * kMaxNB : chunk < 1 ? 1 : chunk;
  }
  for (int64_t c0 = blk0; c0 < blk1; c0 += chunk) {
    const int64_t c1 = blk1 - c0 < chunk ? blk1 : c0 + chunk;
    for (int64_t r0 = row0, mr = 0; r0 < row_end; r0 += mr) {
      mr = next_tile_rows<G>(row_end - r0);
      const int mrt = mr > 4 ? MRT : static_cast<int>(mr);  // rows computed: 5..MRT-1 run as a full tile
      const R* rows[kMR];
      for (int r = 0; r < mrt; ++r) rows[r] = row_ptr(r0 + (r < mr ? r : mr - 1));
      for (int64_t blk = c0; blk < c1;) {
        const int nb = tile_blocks<G>(mrt, c1 - blk);
        Tile<A> acc;
        gemm_block<G>(mrt, nb, rows, panel + blk * bstride, K, kstride, bstride, acc);
        for (int bi = 0; bi < nb; ++bi, ++blk) call_epilogue<A>(epi, r0, mr, blk, acc.v[0], bi * G);
      }
    }
  }
}

}  // namespace rnn
PSK_ISA_NAMESPACE_END
