// Machine probes, compiled once per ISA level (contract: pyseqkern/probe.h).
#include "pyseqkern/probe.h"
#include "pyseqkern/thread_pool.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef PSK_ISA
#error "compile per-ISA kernel sources through CMake's psk_add_cpu_isa(), which defines PSK_ISA"
#endif

#include "amx_tiles.h"

PSK_ISA_NAMESPACE_BEGIN
namespace {

// ---- traits: register width and chain count of this level ---------------------------------------
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kChains = 16;  // 32 zmm registers; 2 FMA pipes x 4-cycle latency needs >= 8 chains
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
constexpr int kChains = 12;  // 16 ymm registers
#else
constexpr int kVecBytes = 16;
constexpr int kChains = 12;  // 16 xmm registers; no FMA: mul + add
#endif
typedef float vfloat __attribute__((vector_size(kVecBytes)));
constexpr int kLanes = kVecBytes / 4;

// ---- kernels -------------------------------------------------------------------------------------
struct PeakCtx {
  const PeakFmaParams* p;
  int team_size;  // threads that actually ran (the runtime may grant fewer than asked)
};

void peak_worker(void* raw, const Team& team) {
  PeakCtx& ctx = *static_cast<PeakCtx*>(raw);
  const PeakFmaParams& p = *ctx.p;
  const int tid = team.tid;
  if (tid == 0) ctx.team_size = team.size;
  vfloat acc[kChains];
  vfloat m, c;
  for (int l = 0; l < kLanes; ++l) {
    m[l] = 0.999999f;
    c[l] = 1e-3f * (1 + l);
  }
#pragma GCC unroll 16
  for (int j = 0; j < kChains; ++j) acc[j] = c * (float)(j + tid + 1);
  for (int64_t it = 0; it < p.iters; ++it) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = acc[j] * m + c;
  }
  float s = 0;
  for (int j = 0; j < kChains; ++j)
    for (int l = 0; l < kLanes; ++l) s += acc[j][l];
  p.sink[tid] = s;
}

double peak_fma(const PeakFmaParams& p) {
  PeakCtx ctx{&p, 1};
  parallel_run(p.num_threads, peak_worker, &ctx);
  return 2.0 * kLanes * kChains * static_cast<double>(p.iters) * ctx.team_size;
}

// bfloat16 arithmetic: the tile unit on amx, vdpbf16ps elsewhere with AVX512_BF16.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr double kBf16FlopsPerRound = 4 * 2.0 * 16 * 16 * 32;
void bf16_worker(void* raw, const Team& team) {
  PeakCtx& ctx = *static_cast<PeakCtx*>(raw);
  if (team.tid == 0) ctx.team_size = team.size;
  alignas(64) uint16_t ab[16 * 32];
  for (int i = 0; i < 16 * 32; ++i) ab[i] = 0x3c00;  // 2^-7: sums stay finite
  alignas(64) float out[16 * 16];
  amx_configure(16, 16);  // every tile 16 rows (amx_tiles.h)
  _tile_loadd(4, ab, 64);
  _tile_loadd(5, ab, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t it = 0; it < ctx.p->iters; ++it) {
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 5);
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, out, 64);
  amx_release();
  ctx.p->sink[team.tid] = out[0];
}
#elif defined(__AVX512BF16__)
constexpr double kBf16FlopsPerRound = 2.0 * 32 * kChains;
void bf16_worker(void* raw, const Team& team) {
  PeakCtx& ctx = *static_cast<PeakCtx*>(raw);
  if (team.tid == 0) ctx.team_size = team.size;
  __m512 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(1e-3f * (j + team.tid + 1));
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3c003c00), b = (__m512bh)_mm512_set1_epi32(0x3c003c00);
  for (int64_t it = 0; it < ctx.p->iters; ++it) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  }
  float s = 0;
  for (int j = 0; j < kChains; ++j) s += _mm512_reduce_add_ps(acc[j]);
  ctx.p->sink[team.tid] = s;
}
#endif

double peak_bf16(const PeakFmaParams& p) {
#if defined(__AVX512BF16__)
  PeakCtx ctx{&p, 1};
  parallel_run(p.num_threads, bf16_worker, &ctx);
  return kBf16FlopsPerRound * static_cast<double>(p.iters) * ctx.team_size;
#else
  return peak_fma(p);
#endif
}

template <typename T>
struct TriadCtx {
  const TriadParams* p;
};

template <typename T>
void triad_worker(void* raw, const Team& team) {
  const TriadParams& p = *static_cast<TriadCtx<T>*>(raw)->p;
  int64_t begin, end;
  split_range(p.n, team.tid, team.size, &begin, &end);
  T* out = static_cast<T*>(p.out);  // may equal a or b (in-place): no __restrict__
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T alpha = static_cast<T>(p.alpha);
  for (int64_t i = begin; i < end; ++i) out[i] = a[i] + alpha * b[i];
}

// ---- dtype-level entry ---------------------------------------------------------------------------
void triad(const TriadParams& p) {
  if (p.n == 0) return;
  // Small arrays are not worth waking workers for.
  const int threads = p.n < (1 << 15) ? 1 : p.num_threads;
  if (p.dtype == DType::Float64) {
    TriadCtx<double> ctx{&p};
    parallel_run(threads, triad_worker<double>, &ctx);
  } else {
    TriadCtx<float> ctx{&p};
    parallel_run(threads, triad_worker<float>, &ctx);
  }
}

}  // namespace
PSK_ISA_NAMESPACE_END

// ---- registration --------------------------------------------------------------------------------
PSK_DEFINE_CPU_KERNELS(ProbeCpuKernels, probe,
                       {&PSK_CONCAT(isa_, PSK_ISA)::peak_fma, &PSK_CONCAT(isa_, PSK_ISA)::peak_bf16,
                        &PSK_CONCAT(isa_, PSK_ISA)::triad,
                        PSK_CONCAT(isa_, PSK_ISA)::kVecBytes * 8})
