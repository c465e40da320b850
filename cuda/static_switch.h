// Run-time values to template arguments for the recurrent CUDA kernels: the one place that mapping is
// written (flash-attention's static_switch.h idea). Each macro runs its body with a constexpr alias.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "pyseqkern/tensor.h"

// DTYPE_SWITCH(dtype, T, ...): T = float, __half, __nv_bfloat16 or double.
#define PSK_RNN_DTYPE_SWITCH(DTYPE, T, ...)                                                          \
  [&] {                                                                                             \
    switch (DTYPE) {                                                                                \
      case ::pyseqkern::DType::Float32: { using T = float; return __VA_ARGS__(); }                  \
      case ::pyseqkern::DType::Float16: { using T = __half; return __VA_ARGS__(); }                 \
      case ::pyseqkern::DType::BFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }         \
      case ::pyseqkern::DType::Float64: { using T = double; return __VA_ARGS__(); }                 \
      default: throw std::invalid_argument("pyseqkern: rnn (CUDA): dtype must be float32, float16, " \
                                           "bfloat16 or float64");                                  \
    }                                                                                               \
  }()

// VARIANT_SWITCH(shape, V, ...): V = Variant::Lstm, GruAfter, GruBefore or Rnn (tanh and relu share it).
#define PSK_RNN_VARIANT_SWITCH(SHAPE, V, ...)                                                        \
  [&] {                                                                                             \
    using ::pyseqkern::rnn_cuda::Variant;                                                           \
    switch ((SHAPE).mode) {                                                                         \
      case ::pyseqkern::RnnMode::Lstm: { constexpr Variant V = Variant::Lstm; return __VA_ARGS__(); } \
      case ::pyseqkern::RnnMode::Gru:                                                               \
        if ((SHAPE).reset_after) { constexpr Variant V = Variant::GruAfter; return __VA_ARGS__(); } \
        else { constexpr Variant V = Variant::GruBefore; return __VA_ARGS__(); }                    \
      default: { constexpr Variant V = Variant::Rnn; return __VA_ARGS__(); }                        \
    }                                                                                               \
  }()
