// Fingerprints of the host memory a cache entry was made from (pyseqkern/ops/rnn.py: _hit, _cell_plan).
//
// Contract: a Fingerprint is built from spans of live CPU memory that the caller keeps alive and unmoved
// for as long as it calls matches() (the Python entry pins each tensor and checks its address first). A
// span is `rows` rows of `row_bytes` bytes, `row_stride` bytes apart (a matrix whose rows are contiguous;
// a flat span is one row). Rows > 1 need row_bytes >= 8 (std::invalid_argument otherwise). It copies a
// fixed sample of each span, at most kSamplesPerSpan 8-byte words, and matches() compares the span's
// current words with that copy. Cost: at most kSamplesPerSpan loads per span, whatever its size.
//
// The sample: every byte of a span under 8 bytes; every word of a span that has kSamplesPerSpan words or
// fewer; else, in a flat span, words spread evenly from its first byte to its last, and in a matrix a
// diagonal: sample i in row i (R - 1) / (n - 1) at byte i (row_bytes - 8) / (n - 1) of it. A flat span's
// sample sees a write to any contiguous 1/kSamplesPerSpan of it; a matrix's a write to a run of about
// 1/kSamplesPerSpan of its rows or more, or to a band of about 1/kSamplesPerSpan of its columns or more,
// and so to any whole column where its rows are 512 bytes or less (128 float32 values, 64 float64).
// Evenly spread over a matrix's bytes instead, the words fell in a few columns: a `.data` write of one
// column of an LSTM's float64 W_ih (48 x 192: 1/48 of it, an input feature pruned) went unseen in 5 of 96
// columns, and inference served the weights packed before it (found by an auditing helper, stop 52).
//
// Why sample: the caches key on torch's version counter, which writes through `.data` do not bump
// (`target.p.data.copy_(tau * p.data + (1 - tau) * target.p.data)`, the soft target update of many RL
// codebases), so inference went on with the weights packed before such a write. Writes of a few
// elements are seen only where they touch a sampled word; a full comparison (rnn_pack_current) costs one
// pass over the weights, 27 us for an LSTM's W_hh at H=256: more than a whole cell step.
#pragma once
#include <cstdint>
#include <tuple>
#include <vector>

namespace pyseqkern {

class Fingerprint {
 public:
  static constexpr int64_t kSamplesPerSpan = 64;

  // (address, rows, row_stride, row_bytes) per span; spans of no bytes (or a null address) are ignored.
  using Span = std::tuple<uintptr_t, int64_t, int64_t, int64_t>;
  explicit Fingerprint(const std::vector<Span>& spans);

  // Whether every sampled word still holds the value it held at construction.
  bool matches() const;

  // The number of words sampled over all spans (for tests).
  int64_t samples() const { return static_cast<int64_t>(words_.size() + bytes_.size()); }

 private:
  // Each sample: where it is read, 8 bytes (or 1 for spans under 8 bytes), and what it held.
  std::vector<const unsigned char*> words_at_, bytes_at_;
  std::vector<uint64_t> words_;
  std::vector<unsigned char> bytes_;
};

}  // namespace pyseqkern
