// Run-time selection of a CPU kernel family's per-ISA table, in the manner of PyTorch's DispatchStub.
//
// A family header declares a struct of function pointers and PSK_DECLARE_CPU_KERNELS(Struct, family);
// each per-ISA compilation of the family's source ends with PSK_DEFINE_CPU_KERNELS(Struct, family,
// {...}); callers use family_cpu_kernels(), which reads isa_active() on every call (a load and a
// switch: cheap next to any kernel, and it lets tests change the level at run time).
//
// Rule for sources compiled per ISA: keep every helper inside the ISA namespace (or out of line in a
// baseline-compiled file) and instantiate no std:: templates there. An inline function or template
// emitted in several ISA objects is merged by the linker into one copy, possibly the AVX-512 one,
// which would then crash a CPU without AVX-512 when the baseline kernel calls it.
#pragma once
#include "pyseqkern/isa.h"

#define PSK_CONCAT_IMPL(a, b) a##b
#define PSK_CONCAT(a, b) PSK_CONCAT_IMPL(a, b)

#if defined(PSK_X86_ISAS) && PSK_X86_ISAS
// The amx level exists where the compiler has AMX intrinsics (PSK_HAVE_AMX, set by CMake for every
// target alike); isa_compiled() says so at run time.
#if defined(PSK_HAVE_AMX) && PSK_HAVE_AMX
#define PSK_AMX_KERNELS(Struct, family) const Struct* family##_kernels_amx();
#define PSK_AMX_CASE(family) case Isa::Amx: return *cpu::family##_kernels_amx();
#else
#define PSK_AMX_KERNELS(Struct, family)
#define PSK_AMX_CASE(family)
#endif
#define PSK_DECLARE_CPU_KERNELS(Struct, family)                                             \
  namespace cpu {                                                                           \
  const Struct* family##_kernels_baseline();                                                \
  const Struct* family##_kernels_avx2();                                                    \
  const Struct* family##_kernels_avx512();                                                  \
  const Struct* family##_kernels_avx512bf16();                                              \
  PSK_AMX_KERNELS(Struct, family)                                                           \
  }                                                                                         \
  inline const Struct& family##_cpu_kernels() {                                             \
    switch (isa_active()) {                                                                 \
      PSK_AMX_CASE(family)                                                                  \
      case Isa::Avx512Bf16: return *cpu::family##_kernels_avx512bf16();                     \
      case Isa::Avx512: return *cpu::family##_kernels_avx512();                             \
      case Isa::Avx2: return *cpu::family##_kernels_avx2();                                 \
      default: return *cpu::family##_kernels_baseline();                                    \
    }                                                                                       \
  }
#else
#define PSK_DECLARE_CPU_KERNELS(Struct, family)                                             \
  namespace cpu {                                                                           \
  const Struct* family##_kernels_baseline();                                                \
  }                                                                                         \
  inline const Struct& family##_cpu_kernels() { return *cpu::family##_kernels_baseline(); }
#endif

// Used once at the bottom of a per-ISA kernel source, outside any namespace.
#define PSK_DEFINE_CPU_KERNELS(Struct, family, ...)                                         \
  namespace pyseqkern::cpu {                                                                \
  const Struct* PSK_CONCAT(family##_kernels_, PSK_ISA)() {                                  \
    static const Struct table = __VA_ARGS__;                                                \
    return &table;                                                                          \
  }                                                                                         \
  }

// Opens the namespace private to this ISA compilation of a kernel source.
#define PSK_ISA_NAMESPACE_BEGIN namespace pyseqkern::cpu::PSK_CONCAT(isa_, PSK_ISA) {
#define PSK_ISA_NAMESPACE_END }
