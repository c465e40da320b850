// Stamps on CPU packs (rnn_pack's packed weights, rnn_pack_input's input panel).
//
// Contract: a CPU pack of `layout_numel` elements of A (rnn.h: the kernel table's packed_numel, or
// input_panel_numel) is followed by a stamp of kStampBytes, so the binding reports layout_numel +
// stamp_elems(A) as the size to allocate. The packing entry writes the stamp after packing; every entry
// that reads a pack (rnn_forward, rnn_backward, RnnCellStep, rnn_pack_current) compares it with the one
// its own call would write, before any kernel runs. The stamp names the layout, not the ISA level:
// magic, kind (weights or input panel), gates G, storage dtype, lanes L, hidden, P (or I for a panel) and
// the layout's element count (which tells the bfloat16 pair sections apart). So a pack made at avx512
// still serves avx512bf16 for float32, and a GRU's either variant, where the layouts are the same.
//
// A training call packs its weights for itself (the optimizer changes them between calls), and below
// RnnSizes::split_rows rows no kernel reads the piece sections of the amx level's float32 layout, which are
// three quarters of that pack's time (LSTM W_hh at H=256: 0.25 ms with them, 0.065 without): such a pack
// leaves them unwritten and says so in its stamp (kNoPieces); the entries take it only for calls below
// split_rows (accepts_narrow) and refuse it to wider ones, naming why.
//
// Why: a pack is a plain tensor. Made at one level and read at another (set_cpu_isa between the two
// calls), or made for another layer, it is in bounds but laid out otherwise: the raw ops returned wrong
// numbers without a word (a fuzzer, stop 32). The modules key their caches on the level and never hit
// this; the raw ops and exported graphs that keep a pack as a constant can. CUDA packs carry no stamp
// (one layout per build): the CPU entries refuse CUDA tensors outright, and a CUDA pack copied to the host
// for the missing magic.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "pyseqkern/rnn.h"
#include "pyseqkern/tensor.h"

namespace pyseqkern {

constexpr int64_t kStampBytes = 32;
constexpr uint64_t kStampMagic = 0x50534b50u;  // "PSKP"

enum class PackKind : uint32_t { Weights = 0, InputPanel = 1 };
constexpr uint64_t kNoPieces = uint64_t(1) << 31;  // (meta bit: the piece sections were left unwritten)

struct PackStamp {
  uint64_t word[4];
};

inline int64_t stamp_elems(DType storage) { return kStampBytes / (storage == DType::Float64 ? 8 : 4); }

// `extent`: P for weights, I for an input panel.
inline PackStamp pack_stamp(PackKind kind, const RnnShape& s, DType storage, int64_t lanes, int64_t extent,
                            int64_t layout_numel, bool no_pieces = false) {
  const uint64_t meta = static_cast<uint64_t>(rnn_gate_count(s.mode)) |
                        static_cast<uint64_t>(storage) << 8 | static_cast<uint64_t>(lanes) << 16 |
                        static_cast<uint64_t>(kind) << 28 | (no_pieces ? kNoPieces : 0);
  return PackStamp{{kStampMagic << 32 | meta, static_cast<uint64_t>(s.hidden), static_cast<uint64_t>(extent),
                    static_cast<uint64_t>(layout_numel)}};
}

// `pack`: the pack's first element; the stamp sits at byte layout_numel * sizeof(A) (memcpy: a float
// pack's stamp need not be 8-byte aligned).
inline void write_stamp(void* pack, DType storage, int64_t layout_numel, const PackStamp& st) {
  const int64_t elem = storage == DType::Float64 ? 8 : 4;
  std::memcpy(static_cast<char*>(pack) + layout_numel * elem, &st, sizeof st);
}

// Empty where the pack at `pack` (`numel` elements of A, at least layout_numel + stamp_elems) carries `want`;
// else why not, for an error message. A pack made for a larger layout has its stamp at its own end, which
// is read then to say whose it is.
inline std::string stamp_mismatch(const void* pack, int64_t numel, DType storage, int64_t layout_numel,
                                  const PackStamp& want) {
  const int64_t elem = storage == DType::Float64 ? 8 : 4;
  PackStamp got;
  std::memcpy(&got, static_cast<const char*>(pack) + layout_numel * elem, sizeof got);
  if (std::memcmp(&got, &want, sizeof got) == 0) return std::string();
  if (got.word[0] >> 32 != kStampMagic)
    std::memcpy(&got, static_cast<const char*>(pack) + numel * elem - kStampBytes, sizeof got);
  if (got.word[0] >> 32 != kStampMagic)
    return "it is not a CPU pack (no pack stamp where this layer's layout ends, nor at its own end: made by "
           "hand, or on CUDA)";
  const uint64_t gm = got.word[0], wm = want.word[0];
  const auto field = [](uint64_t meta, int shift, uint64_t mask) { return (meta >> shift) & mask; };
  if (field(gm, 28, 0x7) != field(wm, 28, 0x7))
    return field(gm, 28, 0x7) == 0 ? "it holds packed recurrent weights (rnn_pack), not an input panel"
                                   : "it holds an input panel (rnn_pack_input), not packed recurrent weights";
  if ((gm ^ wm) == kNoPieces && std::memcmp(&got.word[1], &want.word[1], 3 * sizeof got.word[0]) == 0)
    return "it was packed without the piece sections (rnn_pack's pieces=False), which a call of this many rows "
           "reads: pack it with them";
  const char* extent = field(wm, 28, 0x7) == 0 ? ", proj " : ", input ";
  const auto layer = [&](uint64_t meta, const PackStamp& st) {
    return std::to_string(field(meta, 0, 0xF)) + " gates, dtype " +
           dtype_name(static_cast<DType>(field(meta, 8, 0xFF))) + ", hidden " + std::to_string(st.word[1]) + extent +
           std::to_string(st.word[2]);
  };
  if (field(gm, 0, 0xFFFF) != field(wm, 0, 0xFFFF) || got.word[1] != want.word[1] || got.word[2] != want.word[2])
    return "it was packed for another layer (" + layer(gm, got) + "; this call: " + layer(wm, want) + ")";
  return "it was packed at another CPU level (lanes " + std::to_string(field(gm, 16, 0xFFF)) + ", " +
         std::to_string(got.word[3]) + " elements; the active level packs " + std::to_string(field(wm, 16, 0xFFF)) +
         " lanes, " + std::to_string(want.word[3]) + " elements): pack it again after pyseqkern.set_cpu_isa";
}

}  // namespace pyseqkern
