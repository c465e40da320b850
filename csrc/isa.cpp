// Which CPU kernel level runs: detection (cpuid + the OS's saved register state) and the active choice.
#include "pyseqkern/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>

#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

namespace pyseqkern {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// AVX needs the OS to save YMM state (XCR0 bits 1,2); AVX-512 also opmask and ZMM (bits 5,6,7).
bool detect(Isa isa) {
  if (isa == Isa::Baseline) return true;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!(osxsave && avx && fma && f16c)) return false;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx2 = b & (1u << 5);
  if (isa == Isa::Avx2) return avx2;
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool avx512 = avx2 && f && dq && bw && vl && (xcr0 & 0xE6) == 0xE6;
  if (isa == Isa::Avx512) return avx512;
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  // AVX512_BF16: leaf 7 sub-leaf 1, EAX bit 5.
  if (!avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool bf16 = a & (1u << 5);
  if (isa == Isa::Avx512Bf16) return bf16;
  // AMX: the tile config and data states enabled by the OS (XCR0 bits 17, 18), and on Linux the
  // process's permission to use the tile data (ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18),
  // without which the first tile instruction faults. Asked once; process-wide.
  if (!(bf16 && amx_bf16 && amx_tile && (xcr0 & 0x60000) == 0x60000)) return false;
#if defined(__linux__)
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
  return false;
#endif
}
#else
bool detect(Isa isa) { return isa == Isa::Baseline; }
#endif

Isa compute_best() {
  for (int i = kIsaCount - 1; i > 0; --i) {
    Isa isa = static_cast<Isa>(i);
    if (isa_compiled(isa) && isa_cpu_supports(isa)) return isa;
  }
  return Isa::Baseline;
}

std::atomic<int> g_active{-1};   // the process default (-1: the best level)
thread_local int t_active = -1;  // this thread's own level (-1: the default)

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Baseline: return "baseline";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Amx: return "amx";
  }
  return "?";
}

bool isa_parse(const char* name, Isa* out) {
  for (int i = 0; i < kIsaCount; ++i) {
    if (std::strcmp(name, isa_name(static_cast<Isa>(i))) == 0) {
      *out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

bool isa_compiled(Isa isa) {
#if defined(PSK_X86_ISAS) && PSK_X86_ISAS
#if defined(PSK_HAVE_AMX) && PSK_HAVE_AMX
  (void)isa;
  return true;
#else
  return isa != Isa::Amx;
#endif
#else
  return isa == Isa::Baseline;
#endif
}

bool isa_cpu_supports(Isa isa) {
  static const bool cache[kIsaCount] = {detect(Isa::Baseline), detect(Isa::Avx2), detect(Isa::Avx512),
                                               detect(Isa::Avx512Bf16), detect(Isa::Amx)};
  return cache[static_cast<int>(isa)];
}

Isa isa_best() {
  static const Isa best = compute_best();
  return best;
}

Isa isa_active() {
  int v = t_active;
  if (v < 0) v = g_active.load(std::memory_order_relaxed);
  return v < 0 ? isa_best() : static_cast<Isa>(v);
}

void isa_set_active(Isa isa, bool all_threads) {
  if (!isa_compiled(isa))
    throw std::invalid_argument(std::string("CPU ISA level '") + isa_name(isa) + "' is not compiled into this build");
  if (static_cast<int>(isa) > static_cast<int>(isa_best()))
    throw std::invalid_argument(std::string("CPU ISA level '") + isa_name(isa) +
                                "' is above what this CPU supports ('" + isa_name(isa_best()) + "')");
  if (all_threads)
    g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
  else
    t_active = static_cast<int>(isa);
}

void isa_follow_default() { t_active = -1; }

long long cpu_l2_bytes() {
  static const long long bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return static_cast<long long>(v);
#endif
    return 1LL << 20;
  }();
  return bytes;
}

long long cpu_l3_bytes() {
  // From sysfs, not sysconf: glibc's _SC_LEVEL3_CACHE_SIZE said 320 MB on a 2-vCPU Zen 4 VM whose
  // cache/index3 (and lscpu) say 32 MB.
  static const long long bytes = [] {
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level(dir + "level"), size(dir + "size");
      int lv = 0;
      std::string sz;
      if (!(level >> lv) || lv != 3 || !(size >> sz) || sz.empty()) continue;
      const char unit = sz.back();
      const long long n = std::atoll(sz.c_str());
      return unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : unit == 'G' ? n << 30 : n;
    }
    return 0LL;
  }();
  return bytes;
}

namespace {
std::atomic<int> g_l3_streams_forced{-1};  // set_cpu_l3_streams_fast: -1 by vendor, else 0 or 1
}  // namespace

bool cpu_l3_streams_fast() {
  const int forced = g_l3_streams_forced.load(std::memory_order_relaxed);
  if (forced >= 0) return forced != 0;
  static const bool fast = [] {
    const std::string v = cpu_vendor();
    return v == "AuthenticAMD" || v == "HygonGenuine";
  }();
  return fast;
}

void set_cpu_l3_streams_fast(int fast) { g_l3_streams_forced.store(fast < 0 ? -1 : fast != 0); }

namespace {
std::atomic<int> g_l2_outpaces_forced{-1};  // set_cpu_l2_outpaces_l3: -1 by cpuid, else 0 or 1
}  // namespace

bool cpu_l2_outpaces_l3() {
  if (!cpu_l3_streams_fast()) return false;
  const int forced = g_l2_outpaces_forced.load(std::memory_order_relaxed);
  if (forced >= 0) return forced != 0;
  static const bool outpaces = cpu_vendor() == "AuthenticAMD" && cpu_family() >= 0x1A;
  return outpaces;
}

void set_cpu_l2_outpaces_l3(int outpaces) { g_l2_outpaces_forced.store(outpaces < 0 ? -1 : outpaces != 0); }

std::string cpu_vendor() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    char id[13];
    std::memcpy(id, &b, 4);  // the vendor string is EBX, EDX, ECX
    std::memcpy(id + 4, &d, 4);
    std::memcpy(id + 8, &c, 4);
    id[12] = 0;
    return id;
  }
#endif
  return "";
}

int cpu_family() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    const int base = static_cast<int>((a >> 8) & 0xF);
    return base == 0xF ? base + static_cast<int>((a >> 20) & 0xFF) : base;
  }
#endif
  return 0;
}

}  // namespace pyseqkern
