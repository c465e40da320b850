# Compiles the CPU kernel sources once per ISA level (baseline x86-64, AVX2+FMA, AVX-512, AVX-512 with
# BF16 dot products, and that plus AMX tiles where the compiler has them) into object libraries;
# pyseqkern::isa_active() picks one at run time. Never -march=native: the wheel must run on any x86-64
# CPU. Non-x86 machines build the portable baseline only.
#
# Sets in the caller's scope: PSK_X86_ISAS (1 or 0), PSK_HAVE_AMX (1 or 0: the amx level is built) and
# PSK_CPU_ISA_OBJECTS (generator expressions).
include(CheckCXXCompilerFlag)
function(psk_add_cpu_isa isa sources)
  add_library(psk_cpu_${isa} OBJECT ${sources})
  target_include_directories(psk_cpu_${isa} PRIVATE ${PROJECT_SOURCE_DIR}/csrc/include)
  target_compile_definitions(psk_cpu_${isa} PRIVATE PSK_ISA=${isa} PSK_X86_ISAS=${PSK_X86_ISAS}
    PSK_HAVE_AMX=${PSK_HAVE_AMX})
  set_target_properties(psk_cpu_${isa} PROPERTIES POSITION_INDEPENDENT_CODE ON CXX_VISIBILITY_PRESET hidden)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    # Fused multiply-add where the level has it; the same source gives the same bits on a given level.
    target_compile_options(psk_cpu_${isa} PRIVATE -O3 -ffp-contract=fast ${ARGN})
  endif()
  set(PSK_CPU_ISA_OBJECTS ${PSK_CPU_ISA_OBJECTS} $<TARGET_OBJECTS:psk_cpu_${isa}> PARENT_SCOPE)
endfunction()

macro(psk_add_cpu_isas sources)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    set(PSK_X86_ISAS 1)
    # AMX intrinsics: GCC >= 11, Clang >= 12.
    check_cxx_compiler_flag("-mamx-tile -mamx-bf16" PSK_CXX_HAS_AMX)
    set(PSK_HAVE_AMX 0)
    if(PSK_CXX_HAS_AMX)
      set(PSK_HAVE_AMX 1)
    endif()
  else()
    set(PSK_X86_ISAS 0)
    set(PSK_HAVE_AMX 0)
  endif()
  set(PSK_CPU_ISA_OBJECTS "")
  psk_add_cpu_isa(baseline "${sources}")
  if(PSK_X86_ISAS)
    psk_add_cpu_isa(avx2 "${sources}" -mavx2 -mfma -mf16c)
    set(avx512_flags -mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma -mf16c -mprefer-vector-width=512)
    psk_add_cpu_isa(avx512 "${sources}" ${avx512_flags})
    psk_add_cpu_isa(avx512bf16 "${sources}" ${avx512_flags} -mavx512bf16)
    if(PSK_HAVE_AMX)
      psk_add_cpu_isa(amx "${sources}" ${avx512_flags} -mavx512bf16 -mamx-tile -mamx-bf16)
    endif()
  endif()
endmacro()
