// CPU instruction-set levels and the run-time choice between them.
//
// Every CPU kernel source is compiled once per level (CMake: PSK_CPU_KERNEL_SOURCES) with the level's
// flags and -DPSK_ISA=<name>, which puts its symbols in namespace pyseqkern::cpu::isa_<name>. At import
// the best level that both the build and the running CPU/OS support is chosen; set_active() may
// lower it (PYSEQKERN_CPU_ISA) but never raise it above what the CPU runs.
#pragma once

#include <string>

namespace pyseqkern {

// avx512bf16 is avx512 plus AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later): bfloat16 dot
// products, used by the bfloat16 kernels; other dtypes run as on avx512. On Zen 4/5 vdpbf16ps does twice
// the multiply-adds of an FMA per cycle; on Sapphire/Emerald Rapids half (measured), where:
// amx is avx512bf16 plus AMX-TILE and AMX-BF16 (Sapphire Rapids and later Xeons), with the OS's
// permission for the tile data (Linux >= 5.16, asked once at detection): the bfloat16 kernels' forward
// products run on the tile unit (16 x 16 x 32 bfloat16 multiply-adds per instruction).
enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };
constexpr int kIsaCount = 5;

const char* isa_name(Isa isa);            // "baseline", "avx2", "avx512", "avx512bf16", "amx"
bool isa_parse(const char* name, Isa* out);
bool isa_compiled(Isa isa);               // built into this binary
bool isa_cpu_supports(Isa isa);           // the running CPU and OS can execute it
Isa isa_best();                           // highest level compiled and supported
// The level is per thread: a thread that set none follows the process default (the best level, or
// what the default was set to). Per thread because a level changed by another thread in the middle of a
// call made its buffers sized at one level and its kernels run at another (heap corruption), and its
// caches keyed at one level and packed at another.
Isa isa_active();                         // the level this thread's kernel calls dispatch to now
// Throws std::invalid_argument if not runnable here. all_threads: the process default instead of this
// thread's own level (set at import, from PYSEQKERN_CPU_ISA, before any call runs).
void isa_set_active(Isa isa, bool all_threads = false);
// This thread drops its own level and follows the process default again.
void isa_follow_default();

// One core's L2 in bytes, from the OS (1 MB where it does not say): the cache a kernel thread's share of
// a weight panel must stay in.
long long cpu_l2_bytes();

// The last-level cache the OS reports for one core (L3, shared with the other cores behind it), 0 where
// it says none: how much of a panel streamed every step can come back from cache rather than memory.
long long cpu_l3_bytes();

// Whether a core streams from its L3 at nearly its L2's rate, so that panels past a core's L2, read every
// step, cost little more than panels within it: AMD's (and Hygon's) cores, whose L3 is their CCX's own
// (a Zen 4: one core reads 96-108 GB/s from 128-512 KB, 82-89 from 0.75-4 MB), not Intel's server cores,
// whose L3 is across the mesh (a Granite Rapids-class Xeon with 2 MB of L2: 189 GB/s to 1 MB, 121 at
// 1.5 MB, 75 at 2 MB, 29 from 3 MB on). By vendor, not by a probe: the choices it steers differ in the
// last bits, which must not change from run to run. Other cores (Intel's client cores, ARM) take the slow
// rules unmeasured: where their L3 is fast they forgo what the AMD rules gained there (up to 1.26x, a
// bfloat16 LSTM on a Zen 4; docs/DESIGN.md, "Caches by vendor").
bool cpu_l3_streams_fast();
// Forces it (1 fast, 0 slow) or returns it to the vendor's rule (-1): PYSEQKERN_L3_STREAMS, set by the
// Python layer at import, before any kernel runs (the rules it steers are read then too).
void set_cpu_l3_streams_fast(int fast);

// Whether a core streams from its L2 at about twice its L3's rate, where the L3 is fast too (AMD family
// 1Ah, Zen 5, one core of a 2-vCPU EPYC: 205-270 GB/s from 128-768 KB, 172 at 900 KB, 140 at 1 MB, 119-125
// from 1.5-8 MB; a Zen 4's L2 streamed little faster than its L3, above). There a panel streamed every step
// from the L3 costs twice what it costs from the L2, so the kernels keep a thread's share within the L2
// where a split allows it (rnn_fwd.cpp, the threads' split; ops/rnn_paths.py, projecting each step). By
// vendor and family, as above. Never where cpu_l3_streams_fast() is false.
bool cpu_l2_outpaces_l3();
// Forces it (1 or 0) or returns it to the cpuid rule (-1): for measuring both ways in one process (the
// forward's split reads it each call; the Python layer's rules read it at import). The split it steers
// gives the same bits either way.
void set_cpu_l2_outpaces_l3(int outpaces);

// cpuid's vendor string ("GenuineIntel", "AuthenticAMD", ...), empty off x86. The Python layer picks
// torch's float32 GEMM by it (ops/rnn_gemms.py: MKL's sgemm is fast on Intel's cores and slow on AMD's).
std::string cpu_vendor();

// cpuid's display family (base family, plus the extended family where the base is 0xF: 0x19 for Zen 3
// and Zen 4, 0x1A for Zen 5), 0 off x86. The Python layer's cache rules tell AMD's generations apart by
// it (ops/rnn_paths.py, _L2_OUTPACES_L3): by cpuid, not a probe, for the reason above.
int cpu_family();

}  // namespace pyseqkern
