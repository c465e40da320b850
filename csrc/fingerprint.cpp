// Sampled fingerprints of host memory (contract: fingerprint.h).
#include "fingerprint.h"

#include <cstring>

namespace pyseqkern {

namespace {
uint64_t word_at(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof w);  // (any alignment)
  return w;
}
}  // namespace

// The offsets are worked out here, once: matches() runs on every cache hit (a cell step at B=1 is
// ~15 us), and a division per sample there cost about a microsecond.
Fingerprint::Fingerprint(const std::vector<std::pair<uintptr_t, int64_t>>& spans) {
  for (const auto& span : spans) {
    const auto* base = reinterpret_cast<const unsigned char*>(span.first);
    const int64_t bytes = span.second;
    if (base == nullptr || bytes <= 0) continue;
    if (bytes < 8) {  // (a bfloat16 bias of 1-3 elements)
      for (int64_t i = 0; i < bytes; ++i) bytes_at_.push_back(base + i);
      continue;
    }
    const int64_t last = bytes - 8;  // the last offset a whole word can be read at
    const int64_t words = (last + 7) / 8 + 1;  // (enough to cover every byte, the last one included)
    const int64_t n = words < kSamplesPerSpan ? words : kSamplesPerSpan;
    for (int64_t i = 0; i < n; ++i) words_at_.push_back(base + (n == 1 ? 0 : last * i / (n - 1)));
  }
  for (const unsigned char* p : words_at_) words_.push_back(word_at(p));
  for (const unsigned char* p : bytes_at_) bytes_.push_back(*p);
}

bool Fingerprint::matches() const {
  uint64_t diff = 0;  // (or-ed, not an early exit: the loads stay independent)
  const size_t n = words_.size();
  for (size_t i = 0; i < n; ++i) diff |= word_at(words_at_[i]) ^ words_[i];
  for (size_t i = 0; i < bytes_.size(); ++i) diff |= static_cast<uint64_t>(*bytes_at_[i] ^ bytes_[i]);
  return diff == 0;
}

}  // namespace pyseqkern
