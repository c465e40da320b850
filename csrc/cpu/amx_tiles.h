// The AMX tile configuration of a per-ISA kernel source (the amx level): one shape family for every
// user, loaded per thread when it changes and released when the thread's kernel work ends. Everything
// lives in the ISA's namespace (cpu_dispatch.h); elsewhere only a no-op amx_release exists.
//
// Palette 1, every tile 64 bytes wide (16 floats, or 32 bfloat16 as 16 pairs). amx_configure(m0, m1):
// with two row groups (m1 > 0) tiles 0-3 are C tiles, 4 and 5 the A tiles of groups 0 and 1 (m0 and m1
// rows, as their C tiles), 6 and 7 B tiles (16 rows of k pairs); with one (m1 = 0, amx_pass1's double
// buffering) tiles 0-1 are C tiles and 2-3 A tiles of m0 rows, 4-7 B tiles; with one and `a3` (the
// split float32 product, amx_split_pass1) tiles 0-1 are C tiles, 2-4 A tiles of m0 rows, 5-7 B tiles.
#pragma once
#include <cstdint>
#include <cstring>

#include "pyseqkern/cpu_dispatch.h"

#if defined(__AMX_TILE__)
#include <immintrin.h>
#endif

#ifndef PSK_ISA
#error "amx_tiles.h belongs to per-ISA kernel sources"
#endif

PSK_ISA_NAMESPACE_BEGIN

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
struct AmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
// The configuration this thread loaded (0: none). Callers release the tiles when their work on the
// thread ends (amx_release), so code run on the thread between our calls (oneDNN's own AMX kernels)
// never leaves a configuration we would take for ours.
inline int& amx_key() {
  static thread_local int key = 0;
  return key;
}
inline void amx_configure(int m0, int m1, bool a3 = false) {
  const int key = 1 + m0 + 64 * m1 + (a3 && !m1 ? 64 * 64 : 0);
  int& cur = amx_key();
  if (cur == key) return;
  alignas(64) AmxConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  if (m1) {
    cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = static_cast<uint8_t>(m0);
    cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = static_cast<uint8_t>(m1);
  } else {
    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = cfg.rows[3] = static_cast<uint8_t>(m0);
    if (a3) cfg.rows[4] = static_cast<uint8_t>(m0);
  }
  _tile_loadconfig(&cfg);
  cur = key;
}
inline void amx_release() {
  int& cur = amx_key();
  if (cur) {
    _tile_release();
    cur = 0;
  }
}
#else
inline void amx_release() {}
#endif

PSK_ISA_NAMESPACE_END
