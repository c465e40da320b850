// One recurrent step read straight from the weights as torch holds them (CPU): both products, the gates
// and the state update in one call, with no packed copy of anything.
//
// Why: a step reads each weight once, so packing buys it nothing, and a packing kept across calls must
// be proven current first. A compiled graph holds no cache and promises to see every write to the
// weights between two calls, `.data` writes included, so each of its decoding steps (T = 1) either
// packed W_hh afresh or checked a cached pack bit for bit: both read the weights once more than the
// step itself (pyseqkern/ops/rnn_direct.py; DESIGN.md "Ops").
//
// Shapes (symbols as rnn.h; no projection): x [B, I] rows ld_x apart; h0 [B, H] and c0 [B, H]
// contiguous, or null for zeros; w_ih [G*H, I] and w_hh [G*H, H] row-major with leading dimensions;
// b_ih, b_hh [G*H] contiguous or null for zeros; h_n, c_n [B, H] contiguous (c_n LSTM only). Storage
// dtype float32, float64 or bfloat16 (math in A: float for float32 and bfloat16, double for float64),
// the same for every tensor. workspace: 3*B*H of A for GRU reset_before (its second product needs every
// unit's r), else null. Outputs alias no input.
//
// Gates (torch's order): LSTM pre = (W_ih x + b_ih) + (W_hh h + b_hh); GRU r, z likewise, and
// n = tanh((W_in x + b_in) + r * (W_hn h + b_hn)) (reset_after) or tanh((W_in x + b_in) + (W_hn (r * h)
// + b_hn)) (reset_before), h_n = n + z (h - n); RNN h_n = act(pre). Activations are the recurrent
// kernels' (rnn_activations.h) for the storage dtype. Each dot product sums over k in lanes of a register,
// then across the lanes in a fixed tree: the bits do not depend on the thread count, but they are not
// the packed kernels' bits (those sum each unit over k in order).
#pragma once
#include <cstdint>

#include "pyseqkern/cpu_dispatch.h"
#include "pyseqkern/rnn.h"

namespace pyseqkern {

struct RnnDirectParams {
  RnnShape shape;  // proj must be 0
  DType dtype;
  int64_t batch, input;  // B, I
  const void* x; int64_t ld_x;
  const void* h0;
  const void* c0;
  const void* w_ih; int64_t ld_w_ih;
  const void* w_hh; int64_t ld_w_hh;
  const void* b_ih;
  const void* b_hh;
  void* h_n;
  void* c_n;
  void* workspace;
  int num_threads;
};

struct RnnDirectCpuKernels {
  void (*step)(const RnnDirectParams& p);
};
PSK_DECLARE_CPU_KERNELS(RnnDirectCpuKernels, rnn_direct)

}  // namespace pyseqkern
