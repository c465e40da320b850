// Sampled fingerprints of host memory (contract: fingerprint.h).
#include "fingerprint.h"

#include <cstring>
#include <stdexcept>
#include <string>

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
Fingerprint::Fingerprint(const std::vector<Span>& spans) {
  for (const auto& span : spans) {
    const auto* base = reinterpret_cast<const unsigned char*>(std::get<0>(span));
    const int64_t rows = std::get<1>(span), stride = std::get<2>(span), row_bytes = std::get<3>(span);
    if (base == nullptr || rows <= 0 || row_bytes <= 0) continue;
    if (rows > 1 && row_bytes < 8)
      throw std::invalid_argument("pyseqkern: Fingerprint: a span of " + std::to_string(rows) +
                                  " rows needs rows of 8 bytes or more, got " + std::to_string(row_bytes));
    if (rows == 1 && row_bytes < 8) {  // (a bfloat16 bias of 1-3 elements)
      for (int64_t i = 0; i < row_bytes; ++i) bytes_at_.push_back(base + i);
      continue;
    }
    const int64_t last = row_bytes - 8;           // the last offset in a row a whole word can be read at
    const int64_t per_row = (last + 7) / 8 + 1;   // words that cover a row, its last byte included
    if (rows * per_row <= kSamplesPerSpan) {      // every word
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < per_row; ++j)
          words_at_.push_back(base + r * stride + (per_row == 1 ? 0 : last * j / (per_row - 1)));
      continue;
    }
    const int64_t n = kSamplesPerSpan;  // spread evenly over a flat span, on the diagonal of a matrix
    for (int64_t i = 0; i < n; ++i)
      words_at_.push_back(base + (rows - 1) * i / (n - 1) * stride + last * i / (n - 1));
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
