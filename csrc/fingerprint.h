// Fingerprints of the host memory a cache entry was made from (pyseqkern/ops/rnn.py: _hit, _cell_plan).
//
// Contract: a Fingerprint is built from spans (address, bytes) of live CPU memory that the caller keeps
// alive and unmoved for as long as it calls matches() (the Python entry pins each tensor and checks its
// address first). It copies a fixed sample of each span, kSamplesPerSpan 8-byte words spread evenly from
// the first byte to the last (every byte of spans under 8 bytes), and matches() compares the span's
// current words with that copy. Cost: at most kSamplesPerSpan loads per span, whatever its size.
//
// Why: the caches key on torch's version counter, which writes through `.data` do not bump
// (`target.p.data.copy_(tau * p.data + (1 - tau) * target.p.data)`, the soft target update of many RL
// codebases), so inference went on with the weights packed before such a write. A write that changes a
// whole tensor, or any slice covering 1/kSamplesPerSpan of it, changes a sampled word. Writes of a few
// elements are seen only where they touch one; a full comparison (rnn_pack_current) costs one pass over
// the weights, 27 us for an LSTM's W_hh at H=256: more than a whole cell step.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace pyseqkern {

class Fingerprint {
 public:
  static constexpr int64_t kSamplesPerSpan = 64;

  // spans: (address, bytes) pairs; spans of 0 bytes are ignored.
  explicit Fingerprint(const std::vector<std::pair<uintptr_t, int64_t>>& spans);

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
