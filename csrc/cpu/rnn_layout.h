// Packed-weight and workspace layouts, sequence rows, and how threads split rows and unit blocks.
// Part of the recurrent kernels' building blocks (rnn_common.h includes them all), compiled into each
// per-ISA source inside the ISA's namespace (cpu_dispatch.h).
#pragma once
#include <array>

#include "pyseqkern/rnn.h"
#include "pyseqkern/thread_pool.h"
#include "rnn_amx.h"
#include "rnn_tiles.h"

#ifndef PSK_ISA
#error "rnn_layout.h belongs to per-ISA kernel sources"
#endif

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {

// ---- packed-weight and workspace layout -------------------------------------------------------------
// Packed sections (elements of A), unit blocks of L lanes, zero padded past the last unit:
//   fmain [ceil(H/L)][K][G][L]   w_hh, forward: block u holds units u*L.. of every gate, k-major
//   fproj [ceil(P/L)][H][L]      w_hr, forward (proj)
//   bmain [ceil(K/L)][G*H][L]    w_hh transposed: block over state units, j over the G*H gate rows
//   bproj [ceil(H/L)][P][L]      w_hr transposed (proj)
// bfloat16 storage on levels with bfloat16 dot products (kBf16Dot) adds the forward sections and the
// backward's main one again as bf16x2 pairs of k (one pair per A element), the second of a pair zero
// past the last k:
//   fmain2 [ceil(H/L)][K2][G][L]   fproj2 [ceil(P/L)][H2][L]   bmain2 [ceil(K/L)][GH2][L]
// with K2 = pairs_stored(K) = ceil(K/2) (on the amx level rounded up to whole tiles of 16 pairs), H2
// and GH2 likewise of H and G*H.
// float32 storage on the amx level (`split`) adds instead the forward's and the backward's main sections
// as the three pieces of their weights (split3's hi, mid, lo), each laid out as fmain2 and bmain2,
// `split_piece` and `bsplit_piece` elements apart:
//   fmain2 [3][ceil(H/L)][K2][G][L]   bsplit [3][ceil(K/L)][GH2][L]
struct Layout {
  int64_t L, U, UK, UP, H, K, P, G;
  int64_t fmain, fproj, bmain, bproj, fmain2, fproj2, bmain2, packed_numel, split_piece, bsplit, bsplit_piece;
  bool dot;    // the pair sections exist, and the products of bfloat16 storage use them
  bool split;  // the piece sections exist (float32 on the amx level)
};
// float32 on the amx level packs its main sections as three bfloat16 pieces too (Layout::split), which
// calls of kSplitRows rows or more multiply on the tile unit (split_product) at every step with
// kSplitStepRows<G> active rows or more, G the gates of the product's column blocks; a packed batch's
// last steps, with fewer rows, take the FMA tiles. A tile product costs the same for 1 row as for 16, so
// the tile unit pays from where the FMA tiles need a third row tile of 6 (LSTM, RNN, the backward's
// product: 13 rows) or a second of 8 (GRU: 9 rows); time a step, packed B=32 with n rows of 100 steps,
// in DESIGN ("float32 on the tile unit"). All of a step's rows go one way: its rows past whole groups
// of 16 on the FMA tiles cost more than a group (both panels then stream through the cache). Decided
// by the call's batch and the step's active rows, never by a thread's share: a row's bits do not
// depend on the thread count (they do on its step's active rows, as a GEMM's on its size).
inline bool uses_split(DType dtype) { return kAmx && dtype == DType::Float32; }
constexpr int64_t kSplitRows = 32;
template <int G> constexpr int64_t kSplitStepRows = G == 3 ? 9 : 13;
inline Layout layout_of(const RnnShape& s, int64_t L, bool dot = false, bool split = false) {
  Layout l;
  l.L = L;
  l.H = s.hidden;
  l.K = s.state();
  l.P = s.proj;
  l.G = rnn_gate_count(s.mode);
  l.U = ceil_div(l.H, L);
  l.UK = ceil_div(l.K, L);
  l.UP = ceil_div(l.P, L);
  l.fmain = 0;
  l.fproj = l.fmain + l.U * l.K * l.G * L;
  l.bmain = l.fproj + l.UP * l.H * L;
  l.bproj = l.bmain + l.UK * l.G * l.H * L;
  l.fmain2 = l.bproj + l.U * l.P * L;
  l.fproj2 = l.fmain2 + l.U * pairs_stored(l.K) * l.G * L;
  l.bmain2 = l.fproj2 + l.UP * pairs_stored(l.H) * L;
  l.dot = dot;
  l.split = split && !dot;
  l.split_piece = l.U * pairs_stored(l.K) * l.G * L;
  l.bsplit = l.fmain2 + 3 * l.split_piece;
  l.bsplit_piece = l.UK * pairs_stored(l.G * l.H) * L;
  l.packed_numel = dot ? l.bmain2 + l.UK * pairs_stored(l.G * l.H) * L : l.split ? l.bsplit + 3 * l.bsplit_piece : l.fmain2;
  return l;
}

// Reserve row layout (rnn.h): its width and the column where h_prev starts.
inline void reserve_layout(const Layout& l, RnnMode mode, int64_t* cols, int64_t* hprev) {
  switch (mode) {
    case RnnMode::Lstm: *hprev = 5 * l.H + (l.P > 0 ? l.H : 0); *cols = *hprev + l.K; break;
    case RnnMode::Gru: *hprev = 4 * l.H; *cols = 5 * l.H; break;
    default: *hprev = l.H; *cols = 2 * l.H; break;
  }
}

// Threads worth waking: each must own at least one unit block, a step must carry enough work
// (multiply-adds) to pay for a barrier, and the whole call enough to pay for the wake-up. On torch's
// OpenMP team, whose threads spin a while between regions, that is a few microseconds: an LSTM cell
// step at B=1, H=256 (262K multiply-adds, 1 MB of weights) took 19 us on one thread, 13.5 on two.
inline int choose_threads(int requested, int64_t blocks, int64_t macs_per_step, int64_t steps) {
  int64_t n = requested < 1 ? 1 : requested;
  if (n > blocks) n = blocks;
  const int64_t by_work = macs_per_step / 16384;
  if (n > by_work) n = by_work < 1 ? 1 : by_work;
  if (macs_per_step * steps < (int64_t(1) << 16)) n = 1;
  return static_cast<int>(n);
}

// Row of sequence data for (step s, sequence b).
inline int64_t seq_len(const RnnSeq& q, int64_t b) { return q.lengths ? q.lengths[b] : q.steps; }
inline int64_t seq_row(const RnnSeq& q, int64_t s, int64_t b) {
  const int64_t t = q.reverse ? seq_len(q, b) - 1 - s : s;
  return q.time_offsets ? q.time_offsets[t] + b : t * q.row_stride_t + b * q.row_stride_b;
}
inline int64_t seq_active(const RnnSeq& q, int64_t s) { return q.batch_sizes ? q.batch_sizes[s] : q.batch; }

// Thread tid's rows [r0, r1) of a packed batch (rows sorted longest first), so that the busiest
// thread's cost is least: a range of rows costs its valid steps plus kStepRows for each step it is active
// at all (the panels it streams every step, whatever its rows), kStepRows * len(first) + the sum of len.
// The least largest cost by bisection, then each range as long as it allows (every thread computes the
// same partition: it depends only on the lengths). Until stop 20 the split was by valid steps alone, in
// quanta of kRowQuantum rows, whose coarse boundaries left the thread of the long rows 15% over its
// share at B=32 (lengths 100..10) and more at B=8-16. In-process, 25 rotations, ratio to torch.nn,
// quanta -> rows (kStepRows 1 / 2 / 3): RNN H=256 packed B=32 1.85 -> 1.81 / 2.08 / 2.08x, B=16 1.72 ->
// 2.18 / 2.23 / 2.27x, B=8 2.29 -> 2.97 / 3.09 / 3.18x, RNN H=128 B=64 2.41 -> 2.69 / 2.88 / 2.80x,
// LSTM H=128 B=32 2.53 -> 2.44 / 2.47 / 2.45x and B=64 2.05 -> 2.07 / 2.08x (within noise).
inline constexpr int64_t kStepRows = 2;
inline void split_rows_by_cost(const RnnSeq& q, int tid, int nt, int64_t* r0, int64_t* r1) {
  const int64_t B = q.batch;
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += seq_len(q, b);
  // Ranges of rows from row 0, each of cost <= cap: the start of range k (B where there is none).
  auto start_of = [&](int64_t cap, int k) {
    int64_t b = 0;
    for (int r = 0; r < k && b < B; ++r) {
      int64_t cost = kStepRows * seq_len(q, b);
      while (b < B && cost + seq_len(q, b) <= cap) cost += seq_len(q, b++);
    }
    return b;
  };
  int64_t lo = (kStepRows + 1) * (B ? seq_len(q, 0) : 0), hi = kStepRows * (B ? seq_len(q, 0) : 0) + total;
  while (lo < hi) {  // the least cap whose nt ranges cover every row
    const int64_t mid = lo + (hi - lo) / 2;
    if (start_of(mid, nt) >= B) hi = mid;
    else lo = mid + 1;
  }
  *r0 = start_of(lo, tid);
  *r1 = start_of(lo, tid + 1);
}

// Thread tid's rows [r0, r1) of a padded batch, in the same way by the cost of its row tiles for G gates
// (tiled_product's: each tile's rows plus one for streaming the panels). Until stop 22 the split was by
// quanta of kRowQuantum rows: with 4-row tiles on AVX2, 8 rows went 6 + 2, 32 rows 18 + 14. Beyond
// kExactSplitRows rows, whole tiles split evenly (a tile's difference is then small, and the bisections
// would cost microseconds per call).
template <int G> int64_t tiles_cost(int64_t n) {
  constexpr int MRT = rows_per_tile<G>();
  int64_t cost = 0;
  for (int64_t left = n, mr; left > 0; left -= mr) {
    mr = next_tile_rows<G>(left);
    cost += (mr > 4 ? MRT : mr) + 1;  // (5 to MRT - 1 rows run as a full tile)
  }
  return cost;
}
inline constexpr int64_t kExactSplitRows = 64;
template <int G> void split_rows_by_tiles(int64_t B, int tid, int nt, int64_t* r0, int64_t* r1) {
  if (B > kExactSplitRows) {
    constexpr int M = rows_per_tile<G>();
    int64_t t0, t1;
    split_range(ceil_div(B, M), tid, nt, &t0, &t1);
    *r0 = t0 * M < B ? t0 * M : B;
    *r1 = t1 * M < B ? t1 * M : B;
    return;
  }
  // The cost is not monotonic in the rows: at AVX-512 a GRU's 9 and 10 rows run as 4 + a full tile of
  // 8 (cost 14), 11 rows as 8 + 3 (13). So the most rows within a cap come from a scan down the table,
  // not a bisection: bisecting, 11 rows under cap 13 gave 8, no cap below the search's top (13) covered
  // them, and one thread (a small call: forward_variant keeps split_rows but runs one) computed rows 0-7
  // only, leaving rows 8-10 of every step unwritten (B = 11, 19, 27, ...: a fuzzer, stop 46). With the
  // scan the top cap, tiles_cost(B), always covers every row, so the least covering cap exists.
  static const std::array<int64_t, kExactSplitRows + 1> cost = [] {
    std::array<int64_t, kExactSplitRows + 1> t{};
    for (int64_t n = 0; n <= kExactSplitRows; ++n) t[n] = tiles_cost<G>(n);
    return t;
  }();
  auto rows_within = [&](int64_t cap, int64_t most) {  // the most rows, up to `most`, costing <= cap
    while (most > 0 && cost[most] > cap) --most;
    return most;
  };
  auto start_of = [&](int64_t cap, int k) {
    int64_t b = 0;
    for (int r = 0; r < k && b < B; ++r) b += rows_within(cap, B - b);
    return b;
  };
  int64_t lo = 0, hi = cost[B];
  while (lo < hi) {  // the least cap whose nt ranges cover every row
    const int64_t mid = lo + (hi - lo) / 2;
    if (start_of(mid, nt) >= B) hi = mid;
    else lo = mid + 1;
  }
  *r0 = start_of(lo, tid);
  *r1 = start_of(lo, tid + 1);
}

}  // namespace rnn
PSK_ISA_NAMESPACE_END
