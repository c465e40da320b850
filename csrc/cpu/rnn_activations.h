// The gates' activations (sigmoid, tanh, relu) on registers of each storage dtype.
// Part of the recurrent kernels' building blocks (rnn_common.h includes them all), compiled into each
// per-ISA source inside the ISA's namespace (cpu_dispatch.h).
#pragma once
#include <cmath>
#include <cstring>

#include "rnn_vec.h"

#ifndef PSK_ISA
#error "rnn_activations.h belongs to per-ISA kernel sources"
#endif

PSK_ISA_NAMESPACE_BEGIN
namespace rnn {

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

}  // namespace rnn
PSK_ISA_NAMESPACE_END
