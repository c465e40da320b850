// Building blocks of the recurrent CPU kernels, compiled into each per-ISA source (include only from
// sources listed in PSK_CPU_KERNEL_SOURCES, after PSK_ISA is defined). Everything lives in the ISA's
// namespace: see cpu_dispatch.h for why no shared inline code may cross ISA objects.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "amx_tiles.h"
#include "pyseqkern/rnn.h"
#include "pyseqkern/thread_pool.h"

#ifndef PSK_ISA
#error "rnn_common.h belongs to per-ISA kernel sources"
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

// ---- activations ------------------------------------------------------------------------------------
// float lanes: float forms within 1 ulp (as torch's own), so a recurrence and its gradients
// accumulate no more error than torch's give them. Looser forms (1.5-2 ulp, 10 near |x| = 1/16) failed the one-step LSTM gradient rule (dh0 15.7 ulp off where torch is
// 5.7: the backward's 1 - g^2 magnifies g's error); tanh evaluated in double passed but cost 2.5x the
// 1-ulp float form. double lanes use libm.
//
// sigmoid: exp within about 1 ulp, then one correctly rounded division, the construction of ATen's
// own vectorized sigmoid (so the same accuracy class as torch).
inline vfloat vexp_f(vfloat x) {
  // Clamps written so that a NaN fails the test and stays a NaN (torch propagates NaN; so must we).
  // Above ln(FLT_MAX) e^x is +inf, as torch's: clamped to a finite value, sigmoid never reached 0
  // (sigmoid(-inf) was 6e-39, and times an infinite or huge operand a finite, wrong result; stop 16).
  // The clamp below it keeps 2^n finite (n <= 127; between it and ln(FLT_MAX), e^88.37).
  const vfloat x_in = x;
  x = x > 88.37f ? splat(88.37f) : x;
  x = x < -87.3f ? splat(-87.3f) : x;
  const vfloat big = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat n = (x * 1.44269504088896341f + big) - big;
  const vfloat r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vfloat y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const vint32 bits = (__builtin_convertvector(n, vint32) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x_in > 88.72283935546875f ? splat(__builtin_inff()) : y * scale;
}
inline vfloat vsigmoid(vfloat x) { return 1.0f / (1.0f + vexp_f(-x)); }
// tanh in float within 1 ulp (1.003 worst over every positive float, symmetric; 0.26 mean on [0.05,
// 12)), as torch's own: below |x| = 1, x + x^3 P(x^2) with a degree-7 P fitted for relative error (the x^3 P
// term is at most a quarter of the result, so its rounding stays small); above, 1 - 2/(e^{2|x|} + 1)
// with vexp_f and a correctly rounded division, whose error shrinks with 2/(e+1) and is 0.5 ulp in
// saturation, where the backward's 1 - g^2 magnifies it. In double it cost 2.5x as much (half of an
// LSTM epilogue).
inline vfloat vtanh(vfloat x) {
  const vfloat ax = x < 0.0f ? -x : x;
  vfloat big = 1.0f - 2.0f / (vexp_f(ax + ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  const vfloat x2 = x * x;
  vfloat p = splat(1.204130822e-04f);
  p = p * x2 + -8.368722047e-04f;
  p = p * x2 + 3.071601968e-03f;
  p = p * x2 + -8.589142933e-03f;
  p = p * x2 + 2.178190649e-02f;
  p = p * x2 + -5.395237729e-02f;
  p = p * x2 + 1.333319098e-01f;
  p = p * x2 + -3.333332837e-01f;
  const vfloat small = (x * x2) * p + x;
  return ax < 1.0f ? small : big;
}
// ---- bfloat16 storage: activations within about 1e-5 (relative) ----
// bfloat16's own rounding (2^-9) is 30000 times coarser, so the recurrence's error is that of bfloat16
// either way; the accurate forms above (a division each, tanh in double) cost a bfloat16 LSTM step
// more than its recurrent product. 1/d for d >= 1: AVX-512's 14-bit reciprocal and one Newton step
// (23 bits), a division elsewhere.
inline vfloat vrecip_f(vfloat d) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &d, sizeof(x));
  x = _mm512_rcp14_ps(x);
  vfloat r;
  std::memcpy(&r, &x, sizeof(r));
  // 1/inf = 0 (the exponentials overflow to inf in saturation), where the Newton step gives 0 * NaN
  return d == __builtin_inff() ? splat(0.0f) : r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}
// e^x within about 5e-6 (relative): 2^f for |f| <= 1/2 by its degree-5 Taylor polynomial, times 2^n by
// vscalefps. Eleven instructions where vexp_f takes eighteen; the activations were a third of a
// bfloat16 LSTM step.
inline vfloat vexp_bf(vfloat xv) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &xv, sizeof(x));
  // operand order: a NaN x is returned as is. 89 > ln(FLT_MAX): vscalefps overflows to +inf there, as
  // e^x does (a clamp at 88 kept sigmoid from ever reaching 0; see vexp_f), and below it is exact.
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558146428443e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_scalef_ps(p, n);
  vfloat r;
  std::memcpy(&r, &p, sizeof(r));
  return r;
#else
  return vexp_f(xv);
#endif
}
inline vfloat vsigmoid_f(vfloat x) { return vrecip_f(1.0f + vexp_bf(-x)); }
// 1 - 2/(e^{2x} + 1) for either sign (no |x| and sign restore: for x < 0 it does not cancel either);
// below |x| = 1/16, where it does, x + x^3 (2x^2/15 - 1/3). Within 1e-5 relative (9.7e-6 worst on a
// 5e-6 grid over [-10, 10]); a third fewer operations than the |x| and sign-restore form.
inline vfloat vtanh_f(vfloat x) {
  const vfloat big = 1.0f - 2.0f * vrecip_f(vexp_bf(x + x) + 1.0f);
  const vfloat x2 = x * x;
  const vfloat small = x + (x * x2) * (x2 * (2.0f / 15) - 1.0f / 3);
  const vfloat ax = x < 0.0f ? -x : x;
  return ax < 0.0625f ? small : big;
}
inline vfloat vrelu(vfloat x) { return x < 0.0f ? splat(0.0f) : x; }  // relu(NaN) = NaN, as torch

inline vdouble vsigmoid(vdouble x) {
  for (int l = 0; l < lanes<double>(); ++l) x[l] = 1.0 / (1.0 + std::exp(-x[l]));
  return x;
}
inline vdouble vtanh(vdouble x) {
  for (int l = 0; l < lanes<double>(); ++l) x[l] = std::tanh(x[l]);
  return x;
}
inline vdouble vrelu(vdouble x) { return x < 0.0 ? splat(0.0) : x; }

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

// ---- the bfloat16 product on AMX tiles (the amx level) ------------------------------------------------
// The pair sections are exactly the tile unit's B layout: a tile of 16 rows of k pairs x 16 units is 16
// rows of 64 bytes, kstride apart. Each product stages its rows (up to 32 at a time) into an aligned
// buffer zero padded to whole tiles of k (tile loads of unaligned rows ran at a fifth of the rate, and
// the rows' sources differ: h, m, r*h, x rows at any stride), then runs passes of tile products: two
// row groups of 16 x two columns (the usual 2 x 2 blocking: 2 A + 2 B + 4 C tiles), or one row group x
// four columns. The C tiles go to a scratch whose rows are kAcc vectors apart, so the epilogues read
// their sums as from a gemm_tile Tile (row pointers, rows kAcc apart). TDPBF16PS sums each pair
// exactly and rounds once into the float32 sum (round to nearest even, denormals flushed), like vdpbf16ps. Measured on a
// Sapphire/Emerald Rapids core: ~2.2 TFLOP/s of tile products (16 rows), against 87 GFLOP/s for
// vdpbf16ps and 177 for float32 FMA.
// The pair sections hold whole tiles of k at this level: ceil(K/2) pairs rounded up to kPairRound,
// zero past K, so no tile load reads past a block.
// The three pieces of a float (amx_split_pass2: split_row's, value by value, and pack_split's).
inline void split3(float v, bf16* h, bf16* m, bf16* lo) {
  *h = from_acc<bf16>(v);
  float r = v - to_acc(*h);
  r = r == r ? r : 0.f;
  *m = from_acc<bf16>(r);
  *lo = from_acc<bf16>(r - to_acc(*m));
}
// split3 over n values into three arrays, a register at a time (vcvtneps2bf16 flushes denormal values
// to zero where from_acc keeps them: the tile unit reads denormal bfloat16 as zero either way).
inline void split_values(const float* src, int64_t n, bf16* h, bf16* m, bf16* lo) {
  constexpr int W = lanes<float>();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vfloat v;
    std::memcpy(&v, src + i, sizeof v);
    const vbf16 vh = narrow(v);
    vfloat r = v - widen(vh);
    r = r == r ? r : vfloat{};
    const vbf16 vm = narrow(r);
    const vbf16 vl = narrow(r - widen(vm));
    std::memcpy(h + i, &vh, sizeof vh);
    std::memcpy(m + i, &vm, sizeof vm);
    std::memcpy(lo + i, &vl, sizeof vl);
  }
  for (; i < n; ++i) split3(src[i], h + i, m + i, lo + i);
}
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool kAmx = true;
constexpr int64_t kPairRound = 16;
#else
constexpr bool kAmx = false;
constexpr int64_t kPairRound = 1;
#endif
inline int64_t pairs_stored(int64_t k) { return (((k + 1) / 2 + kPairRound - 1) / kPairRound) * kPairRound; }

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The staged rows of amx_product: 32 rows of whole tiles of k, this thread's scratch (thread_scratch:
// kept and grown as needed; an LSTM's backward at H = 512 contracts over 2048 gate rows, 128 KB, more
// than a worker's stack should hold). Until stop 42 rows past 1024 values took the vdpbf16ps tile
// instead, at a third of the tile unit's rate: half of a bfloat16 LSTM training call at (200, 64, 512).
// Null where the scratch is refused: the caller then finishes on the vdpbf16ps / FMA tiles (other bits)
// only so that its threads meet their barriers, and parallel_run throws, so those bits never reach
// anyone (until stop 47 they were returned).
inline bf16* amx_stage(int64_t values) { return static_cast<bf16*>(thread_scratch(values * 2)); }
constexpr int64_t kScratchRow = kAcc * 64;  // bytes between rows of the scratch: kAcc vectors, as in a Tile

// Two row groups: tiles 0-3 C, 4-5 A (row groups 0 and 1), 6-7 B. One row group: 0-1 C, 2-3 A, 4-7 B
// (amx_tiles.h).

// The C tiles of two row groups x NC columns: 0, 1 (group 0) and 2, 3 (group 1), zeroed, or stored at
// out + c * 64 (group 1 16 scratch rows on).
template <int NC> inline void amx_zero2() {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NC > 1) {
    _tile_zero(1);
    _tile_zero(3);
  }
}
template <int NC> inline void amx_store2(char* out) {
  _tile_stored(0, out, kScratchRow);
  _tile_stored(2, out + 16 * kScratchRow, kScratchRow);
  if constexpr (NC > 1) {
    _tile_stored(1, out + 64, kScratchRow);
    _tile_stored(3, out + 16 * kScratchRow + 64, kScratchRow);
  }
}

// Two row groups (A tiles 4, 5 at a and a + 16 rows) x NC (1 or 2) columns (B tiles 6, 7 from b[c] +
// kc * bk) over KC tiles of k; C tiles 0, 1 (group 0) and 2, 3 (group 1) stored at out + c * 64.
template <int NC>
__attribute__((noinline)) void amx_pass2(const char* a, int64_t as, const char* const* b, int64_t bs, int64_t bk,
                                         int64_t KC, char* out) {
  const char* a1 = a + 16 * as;
  amx_zero2<NC>();
  for (int64_t kc = 0; kc < KC; ++kc) {
    _tile_loadd(4, a + kc * 64, as);
    _tile_loadd(6, b[0] + kc * bk, bs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, a1 + kc * 64, as);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NC > 1) {
      _tile_loadd(7, b[1] + kc * bk, bs);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  amx_store2<NC>(out);
}
// One row group x NC (1 or 2) columns, double buffered: even tiles of k in A tile 2 and B tiles 4, 5,
// odd ones in A tile 3 and B tiles 6, 7; C tiles 0, 1. The tile registers are not renamed, so a load
// into a tile waits for the product that reads it: with four columns through three B tiles (5, 6, 7,
// then 5 again) each product waited on a B tile load from L2 (a bfloat16 LSTM at B=8 spent 12.5 us a
// step in these passes, ~180 cycles a product against 16). Now the loads of one half of a pair of k
// tiles run under the other half's products. Each C tile still sums k in order: the same bits.
template <int NC>
__attribute__((noinline)) void amx_pass1(const char* a, int64_t as, const char* const* b, int64_t bs, int64_t bk,
                                         int64_t KC, char* out) {
  _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  int64_t kc = 0;
  for (; kc + 1 < KC; kc += 2) {
    _tile_loadd(2, a + kc * 64, as);
    _tile_loadd(4, b[0] + kc * bk, bs);
    if constexpr (NC > 1) _tile_loadd(5, b[1] + kc * bk, bs);
    _tile_loadd(3, a + (kc + 1) * 64, as);
    _tile_loadd(6, b[0] + (kc + 1) * bk, bs);
    if constexpr (NC > 1) _tile_loadd(7, b[1] + (kc + 1) * bk, bs);
    _tile_dpbf16ps(0, 2, 4);
    if constexpr (NC > 1) _tile_dpbf16ps(1, 2, 5);
    _tile_dpbf16ps(0, 3, 6);
    if constexpr (NC > 1) _tile_dpbf16ps(1, 3, 7);
  }
  if (kc < KC) {
    _tile_loadd(2, a + kc * 64, as);
    _tile_loadd(4, b[0] + kc * bk, bs);
    _tile_dpbf16ps(0, 2, 4);
    if constexpr (NC > 1) {
      _tile_loadd(5, b[1] + kc * bk, bs);
      _tile_dpbf16ps(1, 2, 5);
    }
  }
  _tile_stored(0, out, kScratchRow);
  if constexpr (NC > 1) _tile_stored(1, out + 64, kScratchRow);
}

// ---- float32 on the tile unit: three bfloat16 pieces a value (the amx level) --------------------------
// A float32 value v splits exactly into hi = bf16(v), mid = bf16(v - hi), lo = bf16(v - hi - mid) (8
// significant bits each, signs free: 24 bits, a float's; denormal pieces aside, which the tile unit
// reads as zero). A product of two floats is then the nine products of pieces; the six kept here (hi
// with every piece, mid with hi and mid, lo with hi) leave out terms below 2^-24 of it, and each is
// exact in float32. TDPBF16PS adds a row's products of a tile of k to the float32 sum, rounded once
// (measured: against float64, a 32 x 512 x 512 product's largest error 2.6e-7 this way, 8.4e-7 for one
// float32 FMA chain over k). Six tile products per float32 one, at 16 cycles each whether a tile holds
// 16 rows or 8: on the Granite Rapids-class Xeon one core ran a 32 x 512 x 512 float32 product this way
// at 270-350 GFLOP/s (one row group of 16: 250; of 8: 122), where the FMA tile runs ~183 from L2. So
// only calls of kSplitRows rows take it, at steps of kSplitStepRows<G> active rows (uses_split, below),
// and any projection of kSplitRows rows before the steps (rnn_fwd.cpp, project_split).
// The staged rows hold the three pieces of each row (piece p of row r at stage + (p * 32 + r) * Ks), the
// panel the weights' hi, mid and lo pair sections `piece` elements apart.
// Two row groups: C tiles 0-3, A tiles 4, 5 (a piece of each group's rows), B tiles 6, 7 (a piece of
// NC columns); the smallest products first, the largest (hi x hi) last.
template <int NC>
__attribute__((noinline)) void amx_split_pass2(const char* a, int64_t as, int64_t ap, const char* const* b,
                                               int64_t bp, int64_t bs, int64_t bk, int64_t KC, char* out) {
  const int64_t g1 = 16 * as;
  amx_zero2<NC>();
  auto loadb = [&](int piece, int64_t kc) __attribute__((always_inline)) {
    _tile_loadd(6, b[0] + piece * bp + kc * bk, bs);
    if constexpr (NC > 1) _tile_loadd(7, b[1] + piece * bp + kc * bk, bs);
  };
  auto loada = [&](int piece, int64_t kc) __attribute__((always_inline)) {
    _tile_loadd(4, a + piece * ap + kc * 64, as);
    _tile_loadd(5, a + piece * ap + g1 + kc * 64, as);
  };
  auto dp = [&]() __attribute__((always_inline)) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NC > 1) {
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  };
  for (int64_t kc = 0; kc < KC; ++kc) {
    loadb(0, kc);
    loada(2, kc);
    dp();  // lo x hi
    loada(1, kc);
    dp();  // mid x hi
    loadb(1, kc);
    dp();  // mid x mid
    loada(0, kc);
    dp();  // hi x mid
    loadb(2, kc);
    dp();  // hi x lo
    loadb(0, kc);
    dp();  // hi x hi
  }
  amx_store2<NC>(out);
}
// One row group (up to 16 rows): C tiles 0, 1, A tiles 2-4 (the group's hi, mid, lo), B tiles 5-7.
template <int NC>
__attribute__((noinline)) void amx_split_pass1(const char* a, int64_t as, int64_t ap, const char* const* b,
                                               int64_t bp, int64_t bs, int64_t bk, int64_t KC, char* out) {
  _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  for (int64_t kc = 0; kc < KC; ++kc) {
    _tile_loadd(2, a + kc * 64, as);
    _tile_loadd(3, a + ap + kc * 64, as);
    _tile_loadd(4, a + 2 * ap + kc * 64, as);
    _tile_loadd(5, b[0] + kc * bk, bs);  // hi
    if constexpr (NC > 1) _tile_loadd(6, b[1] + kc * bk, bs);
    _tile_loadd(7, b[0] + bp + kc * bk, bs);  // mid
    _tile_dpbf16ps(0, 4, 5);  // lo x hi
    if constexpr (NC > 1) _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(0, 3, 5);  // mid x hi
    if constexpr (NC > 1) _tile_dpbf16ps(1, 3, 6);
    _tile_dpbf16ps(0, 3, 7);  // mid x mid
    _tile_dpbf16ps(0, 2, 7);  // hi x mid
    if constexpr (NC > 1) {
      _tile_loadd(7, b[1] + bp + kc * bk, bs);
      _tile_dpbf16ps(1, 3, 7);
      _tile_dpbf16ps(1, 2, 7);
    }
    _tile_loadd(7, b[0] + 2 * bp + kc * bk, bs);  // lo
    _tile_dpbf16ps(0, 2, 7);  // hi x lo
    if constexpr (NC > 1) {
      _tile_loadd(7, b[1] + 2 * bp + kc * bk, bs);
      _tile_dpbf16ps(1, 2, 7);
    }
    _tile_dpbf16ps(0, 2, 5);  // hi x hi
    if constexpr (NC > 1) _tile_dpbf16ps(1, 2, 6);
  }
  _tile_stored(0, out, kScratchRow);
  if constexpr (NC > 1) _tile_stored(1, out + 64, kScratchRow);
}
// A float row's three pieces, n values, zero padded to Ks (whole tiles of k), into dst[p * ap2 + ...].
inline void split_row(const float* src, int64_t n, int64_t Ks, bf16* dst, int64_t ap2) {
  split_values(src, n, dst, dst + ap2, dst + 2 * ap2);
  for (int p = 0; p < 3; ++p) std::memset(dst + p * ap2 + n, 0, (Ks - n) * sizeof(bf16));
}
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

// The tiled loop every product here shares: for row tiles r0 (of up to rows_per_tile<G>() rows b from
// `row_ptr`, b in [row0, row0 + nrows)) and unit blocks [blk0, blk1) in groups, the tile's sums, then
// `epi(b, blk, sum, col)` for each row and block, with the block's G sums at sum[col + g]. P is the
// panel's element: A, or bf16x2 (then rows are bf16, K and the strides count pairs of k, and the sums
// are float). An epilogue that takes a RowTile first is called once per block with the tile's rows,
// `epi(RowTile{}, r0, mr, blk, sum, col)`, row r's sums at sum[r * kAcc + col + g]: it can interleave
// the rows' activations (see the LSTM forward). mr <= rows_per_tile<G>(), except on the amx level (up
// to 32).
struct RowTile {};
template <typename A, typename Epi>
inline void call_epilogue(Epi& epi, int64_t r0, int mr, int64_t blk, const V<A>* sum, int col);

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The sums of a scratch (row r's at r * kAcc) over m rows and nc columns that hold a NaN, replaced by
// resum(r, c). One compare a vector: ~2% of a window's tile products, which it overlaps.
template <typename Resum>
inline void resum_nan(vfloat* sc, int m, int nc, Resum resum) {
  for (int r = 0; r < m; ++r) {
    __mmask16 any = 0;
    for (int c = 0; c < nc; ++c) {
      __m512 v;
      std::memcpy(&v, sc + r * kAcc + c, sizeof v);
      any |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (!any) continue;
    for (int c = 0; c < nc; ++c) {
      __m512 v;
      std::memcpy(&v, sc + r * kAcc + c, sizeof v);
      if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) sc[r * kAcc + c] = resum(r, c);
    }
  }
}

// tiled_product for bf16 rows against pair panels on the tile unit (see amx_pass2): windows of the
// blocks whose G columns fit a Tile (kAcc), each computed for up to 32 rows, then its epilogues.
// `stage`: amx_stage's buffer of 32 staged rows (whole tiles of k). With S, float rows of K2 pairs
// (2 * K2 values, the last pair's second zero where K is odd: `kvals`) against the three piece sections
// `piece` pair elements apart (split_row, amx_split_pass2); the stage then holds 3 x 32 rows. Where a
// row or a weight is infinite, pieces of the other factor multiply it (inf x hi + inf x mid, of either
// sign: NaN where the float product is +-inf), so a sum that comes out NaN is summed again from the
// float panel `fpanel` (laid out as fmain, `fkstride` and `fbstride` as tiled_product takes them), as
// tiled_product would: one (row, column) at a time, whatever the rows beside it.
template <int G, bool S = false, typename RowPtr, typename Epi>
void amx_product(int64_t nrows, int64_t blk0, int64_t blk1, const bf16x2* panel, int64_t K2, int64_t kstride,
                 int64_t bstride, RowPtr row_ptr, Epi& epi, int64_t row0, bf16* stage, int64_t piece = 0,
                 int64_t kvals = 0, const float* fpanel = nullptr, int64_t fkstride = 0, int64_t fbstride = 0) {
  const int64_t KC = ceil_div(K2, 16), Ks = KC * 32;  // staged row: whole tiles of k (bfloat16 values)
  // Two scratches: the next window's tile products are issued before the last window's epilogue runs,
  // so the out-of-order core runs that epilogue's vector work while the tile unit computes.
  alignas(64) vfloat sc[2][32 * kAcc];  // in each, row r's sums at r * kAcc
  const int64_t as = Ks * 2, bs = kstride * 4, bk = 16 * bs, ap = 32 * Ks * 2, bp = piece * 4;
  constexpr int NBW = kAcc / G;  // blocks per window
  const int64_t row_end = row0 + nrows;
  for (int64_t r0 = row0; r0 < row_end; r0 += 32) {
    const int m = static_cast<int>(row_end - r0 < 32 ? row_end - r0 : 32);
    const int m0 = m < 16 ? m : 16, m1 = m - m0;
    for (int r = 0; r < m; ++r) {
      bf16* dst = stage + r * Ks;
      if constexpr (S) {
        split_row(row_ptr(r0 + r), kvals, Ks, dst, 32 * Ks);
      } else {
        std::memcpy(dst, row_ptr(r0 + r), 2 * K2 * sizeof(bf16));
        std::memset(dst + 2 * K2, 0, (Ks - 2 * K2) * sizeof(bf16));
      }
    }
    amx_configure(m0, m1, S);
    const char* a = reinterpret_cast<const char*>(stage);
    int64_t prev_blk = 0;
    int prev_nb = 0;
    auto epilogues = [&](int w) {  // of the window before w
      if constexpr (S) resum_nan(sc[(w + 1) & 1], m, prev_nb * G, [&](int r, int c) {
        const float* row[1] = {row_ptr(r0 + r)};  // the FMA tile's one-row, one-column sum: its bits
        Tile<float> acc;
        gemm_tile<1, 1, 1>(row, fpanel + (prev_blk + c / G) * fbstride + (c % G) * 16, kvals, fkstride, fbstride,
                           acc);
        return acc.v[0][0];
      });
      for (int bi = 0; bi < prev_nb; ++bi) call_epilogue<float>(epi, r0, m, prev_blk + bi, sc[(w + 1) & 1], bi * G);
    };
    int w = 0;
    for (int64_t blk = blk0; blk < blk1; blk += prev_nb, ++w) {
      const int nb = static_cast<int>(blk1 - blk < NBW ? blk1 - blk : NBW), nc = nb * G;
      const char* col[kAcc];  // column c of the window: block blk + c / G, gate c % G
      for (int c = 0; c < nc; ++c)
        col[c] = reinterpret_cast<const char*>(panel + (blk + c / G) * bstride + (c % G) * 16);
      char* scb = reinterpret_cast<char*>(sc[w & 1]);
      for (int c = 0; c < nc;) {
        char* out = scb + c * 64;
        const int left = nc - c;
        if constexpr (S) {
          if (m1) {
            if (left >= 2) amx_split_pass2<2>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 2;
            else amx_split_pass2<1>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 1;
          } else {
            if (left >= 2) amx_split_pass1<2>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 2;
            else amx_split_pass1<1>(a, as, ap, col + c, bp, bs, bk, KC, out), c += 1;
          }
        } else if (m1) {
          if (left >= 2) amx_pass2<2>(a, as, col + c, bs, bk, KC, out), c += 2;
          else amx_pass2<1>(a, as, col + c, bs, bk, KC, out), c += 1;
        } else {
          if (left >= 2) amx_pass1<2>(a, as, col + c, bs, bk, KC, out), c += 2;
          else amx_pass1<1>(a, as, col + c, bs, bk, KC, out), c += 1;
        }
      }
      epilogues(w);
      prev_blk = blk;
      prev_nb = nb;
    }
    epilogues(w);
  }
}

// The float32 product on the tile unit (see amx_split_pass2): rows of K floats from `row_ptr` against
// the hi section `panel` of pairs (laid out as fmain2; mid and lo `piece` elements on), and the same
// weights as floats in `fpanel` (laid out as fmain: `fkstride`, `fbstride`) for the sums the pieces
// make NaN (amx_product). False (nothing computed) where the stage could not be allocated: the caller
// takes tiled_product.
template <int G, typename RowPtr, typename Epi>
inline bool split_product(int64_t nrows, int64_t blk0, int64_t blk1, const bf16x2* panel, int64_t piece, int64_t K,
                          int64_t kstride, int64_t bstride, const float* fpanel, int64_t fkstride, int64_t fbstride,
                          RowPtr row_ptr, Epi epi, int64_t row0) {
  const int64_t K2 = ceil_div(K, 2);
  bf16* stage = amx_stage(3 * 32 * ceil_div(K2, 16) * 32);
  if (!stage) return false;
  amx_product<G, true>(nrows, blk0, blk1, panel, K2, kstride, bstride, row_ptr, epi, row0, stage, piece, K, fpanel,
                       fkstride, fbstride);
  return true;
}
#endif

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

// The epilogue of rows [r0, r0 + mr) of block blk: row r's G sums at sum[r * kAcc + col + g].
template <typename A, typename Epi>
inline void call_epilogue(Epi& epi, int64_t r0, int mr, int64_t blk, const V<A>* sum, int col) {
  if constexpr (std::is_invocable<Epi, RowTile, int64_t, int, int64_t, const V<A>*, int>::value)
    epi(RowTile{}, r0, mr, blk, sum, col);
  else
    for (int r = 0; r < mr; ++r) epi(r0 + r, blk, sum + r * kAcc, col);
}

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
