// Vector registers of the recurrent CPU kernels: lanes per level, element types (bf16), loads and stores
// of whole and partial registers, widening and narrowing, transposes.
// Part of the recurrent kernels' building blocks (rnn_common.h includes them all), compiled into each
// per-ISA source inside the ISA's namespace (cpu_dispatch.h).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "pyseqkern/cpu_dispatch.h"

#ifndef PSK_ISA
#error "rnn_vec.h belongs to per-ISA kernel sources"
#endif

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {

// ---- traits ---------------------------------------------------------------------------------------
// A unit block is one register of L lanes; MR rows share each weight load (register tile MR x G).
// kMR: rows of a tile at most (see rows_per_tile); kRowQuantum: the fewest rows per thread for threads to
// own rows (split_rows_by_tiles splits them), and the LSTM epilogue's row group.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMR = 8;  // 8 x 3 gates (GRU) or 6 x 4 (LSTM) = 24 of 32 zmm accumulators
constexpr int kRowQuantum = 4;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
constexpr int kMR = 4;  // 3 x 4 gates (LSTM), 4 x 3 (GRU), 4 x 3 blocks (RNN) = 12 of 16 ymm
constexpr int kRowQuantum = 3;
#else
constexpr int kVecBytes = 16;
constexpr int kMR = 2;  // 2 x 4 = 8 of 16 xmm (no FMA: mul + add)
constexpr int kRowQuantum = 2;
#endif

typedef float vfloat __attribute__((vector_size(kVecBytes)));
typedef int32_t vint32 __attribute__((vector_size(kVecBytes)));
typedef double vdouble __attribute__((vector_size(kVecBytes)));

template <typename A> struct Vec;
template <> struct Vec<float> { using type = vfloat; };
template <> struct Vec<double> { using type = vdouble; };
template <typename A> using V = typename Vec<A>::type;
// One register loaded from any element-aligned address; `load` takes whole registers through it. Not
// memcpy: at the AVX2 level GCC merged the tile's adjacent per-gate memcpys into one 128-byte copy,
// lowered it as a loop of 16-byte moves into a stack array, and then kept the weights and accumulators
// in memory (LSTM (100,32,256) at 47 GFLOP/s of a 202 peak on a Zen 3).
typedef float vfloat_u __attribute__((vector_size(kVecBytes), aligned(4), may_alias));
typedef double vdouble_u __attribute__((vector_size(kVecBytes), aligned(8), may_alias));
template <typename A> struct VecU;
template <> struct VecU<float> { using type = vfloat_u; };
template <> struct VecU<double> { using type = vdouble_u; };
template <typename A> inline V<A> loadu(const A* p) { return *reinterpret_cast<const typename VecU<A>::type*>(p); }
template <typename A> constexpr int lanes() { return kVecBytes / static_cast<int>(sizeof(A)); }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// bfloat16 storage: the upper half of a float32; round to nearest even on the way down.
struct bf16 {
  uint16_t bits;
};
inline float to_acc(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
template <typename T> inline T from_acc(float v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline bf16 from_acc<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // keep NaN a NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
template <typename T> inline T from_acc(double v);
template <> inline double from_acc<double>(double v) { return v; }

// A scalar in every lane. Written as x - 0, which GCC and Clang fold into one broadcast (x - 0 == x
// exactly, -0 included); a lane-by-lane loop compiled into one masked broadcast per lane.
template <typename A> inline V<A> splat(A x) { return x - V<A>{}; }

// bfloat16 lanes of a register, as a whole register: widening is a shift; narrowing rounds to nearest
// even and keeps NaN a NaN, lane by lane the same as from_acc<bf16>. Converting lane by lane in the
// gate epilogue cost a bfloat16 LSTM step more than its recurrent product.
typedef uint16_t vbf16 __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t vuint32 __attribute__((vector_size(kVecBytes)));
inline vfloat widen(vbf16 b) {
  const vuint32 u = __builtin_convertvector(b, vuint32) << 16;
  vfloat f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline vbf16 narrow(vfloat f) {
#if defined(__AVX512BF16__)
  // One vcvtneps2bf16 for the ~8 operations below: the same bits for every float (checked over all
  // 2^32) but denormal inputs, which it flushes to a zero of their sign (bfloat16's denormals, below
  // 1.2e-38; the dot products treat them as zero anyway).
  __m512 x;
  std::memcpy(&x, &f, sizeof(x));
  const __m256bh r = _mm512_cvtneps_pbh(x);
  vbf16 out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
#else
  vuint32 u;
  std::memcpy(&u, &f, sizeof(u));
  const vuint32 rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  const vuint32 quiet = (u >> 16) | 0x40u;
  return __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded, vbf16);
#endif
}

// Loads `valid` (<= L) elements, zero beyond; stores only `valid`. A partial register (the last unit
// block where H is not a multiple of L) goes by one masked load or store, which touches only the valid
// elements as the lane loop does (masked-off lanes neither fault nor write). Lane by lane, each cost
// tens of cycles: at H = 37 (blocks 16 + 16 + 5) the forward and backward epilogues, a dozen partial
// accesses per row and step, took more of an LSTM training step than the recurrent products.
inline unsigned lane_mask(int valid) { return (1u << valid) - 1u; }
#if defined(__AVX2__) && !defined(__AVX512F__)
// Lanes below n set, as the top bit of each 32-bit (vmaskmovps) or 64-bit (vmaskmovpd) lane, which
// touch nothing past them.
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i lanes_below_pd(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif
template <typename A, typename T> inline V<A> load(const T* p, int valid) {
  V<A> v;
  if constexpr (std::is_same<T, A>::value) {
    if (valid == lanes<A>()) return loadu(p);  // (not memcpy: see loadu)
#if defined(__AVX512F__)
    if constexpr (std::is_same<A, float>::value) {
      const __m512 x = _mm512_maskz_loadu_ps(__mmask16(lane_mask(valid)), p);
      std::memcpy(&v, &x, sizeof(v));
    } else {
      const __m512d x = _mm512_maskz_loadu_pd(__mmask8(lane_mask(valid)), p);
      std::memcpy(&v, &x, sizeof(v));
    }
    return v;
#elif defined(__AVX2__)
    if constexpr (std::is_same<A, float>::value) {
      const __m256 x = _mm256_maskload_ps(p, lanes_below(valid));
      std::memcpy(&v, &x, sizeof(v));
    } else {
      const __m256d x = _mm256_maskload_pd(p, lanes_below_pd(valid));
      std::memcpy(&v, &x, sizeof(v));
    }
    return v;
#endif
  }
  if constexpr (std::is_same<T, bf16>::value && std::is_same<A, float>::value) {
    vbf16 b;
    if (valid == lanes<A>()) {
      std::memcpy(&b, p, sizeof(b));
      return widen(b);
    }
#if defined(__AVX512F__)
    const __m256i x = _mm256_maskz_loadu_epi16(__mmask16(lane_mask(valid)), p);
    std::memcpy(&b, &x, sizeof(b));
    return widen(b);
#endif
  }
  for (int l = 0; l < lanes<A>(); ++l) v[l] = l < valid ? static_cast<A>(to_acc(p[l])) : A(0);
  return v;
}
template <typename A, typename T> inline void store(T* p, V<A> v, int valid) {
  if constexpr (std::is_same<T, A>::value) {
    if (valid == lanes<A>()) {
      std::memcpy(p, &v, sizeof(v));
      return;
    }
#if defined(__AVX512F__)
    if constexpr (std::is_same<A, float>::value) {
      __m512 x;
      std::memcpy(&x, &v, sizeof(x));
      _mm512_mask_storeu_ps(p, __mmask16(lane_mask(valid)), x);
    } else {
      __m512d x;
      std::memcpy(&x, &v, sizeof(x));
      _mm512_mask_storeu_pd(p, __mmask8(lane_mask(valid)), x);
    }
    return;
#elif defined(__AVX2__)
    if constexpr (std::is_same<A, float>::value) {
      __m256 x;
      std::memcpy(&x, &v, sizeof(x));
      _mm256_maskstore_ps(p, lanes_below(valid), x);
    } else {
      __m256d x;
      std::memcpy(&x, &v, sizeof(x));
      _mm256_maskstore_pd(p, lanes_below_pd(valid), x);
    }
    return;
#endif
  }
  if constexpr (std::is_same<T, bf16>::value && std::is_same<A, float>::value) {
    const vbf16 b = narrow(v);
    if (valid == lanes<A>()) {
      std::memcpy(p, &b, sizeof(b));
      return;
    }
#if defined(__AVX512F__)
    __m256i x;
    std::memcpy(&x, &b, sizeof(x));
    _mm256_mask_storeu_epi16(p, __mmask16(lane_mask(valid)), x);
    return;
#endif
  }
  for (int l = 0; l < valid; ++l) p[l] = from_acc<T>(v[l]);
}

// A store that bypasses the caches where it can (`stream`, and a full, aligned register on AVX-512): for
// data read back only after the call, such as the training reserve (20 MB per LSTM layer call at
// T=100, B=32, H=256). A plain store first reads each line it writes. Weakly ordered: the writer ends
// with stream_fence(). Only for outputs of at least kStreamBytes: smaller ones would still be in a
// cache when read.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
template <typename A> inline void store_stream(A* p, V<A> v, int valid, bool stream) {
#if defined(__AVX512F__)
  if (stream && valid == lanes<A>() && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    if constexpr (std::is_same<A, float>::value) {
      __m512 x;
      std::memcpy(&x, &v, sizeof(x));
      _mm512_stream_ps(p, x);
      return;
    } else {
      __m512d x;
      std::memcpy(&x, &v, sizeof(x));
      _mm512_stream_pd(p, x);
      return;
    }
  }
#endif
  store<A>(p, v, valid);
}
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

#if defined(__AVX512F__)
// (Transposed copies in the backward, weight packing.)
// r[i][j] -> r[j][i] for a 16 x 16 block of floats: pairs, then 4 x 4 blocks within 128-bit lanes, then
// the lanes themselves.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// The AVX2 level's transposes (the same copies as transpose16's): r[i][j] -> r[j][i] for an 8 x 8 block
// of floats. Until stop 21 that level copied element by element: the backward's transposed outputs
// were half of a GRU training step's own kernel work on a Zen 3.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // rows 2i, 2i+1: columns 0 1 | 4 5
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);  // columns 2 3 | 6 7
  }
  for (int i = 0; i < 2; ++i) {  // rows 4i..4i+3 of columns c | c + 4, for c = 0..3
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}
#endif

}  // namespace rnn
PSK_ISA_NAMESPACE_END
