// Pointwise parts of one recorded cell step (pyseqkern/ops/rnn_cell_deferred.py): the activations after
// torch's gate GEMMs, and their derivatives before the backward's GEMMs.
//
// float32 (float math) or float64. Every buffer is contiguous row-major with `batch` rows:
// gates / act [batch, G*H] (gate order as torch's: lstm i f g o; gru r z n), states [batch, H]. A null
// pointer marked "or null" is zeros (a state not given, a gradient autograd did not materialize), or
// for an output, not wanted. Outputs never alias inputs, except where marked in place.
//
// lstm_forward:  gates in: pre-activations, out (in place): i f g o activated; c_n = f c + i g,
//                tanh_c = tanh(c_n), h_n = o tanh_c. c or null.
// lstm_backward: from act, c (or null), tanh_c, dh_n (or null), dc_n (or null): d_gates [batch, 4H],
//                the gradient of the pre-activations; dc (or null) the gradient of c.
// gru_forward:   gi = x W_ih^T + b_ih, gh = h W_hh^T + b_hh [batch, 3H]; act = r z n with
//                r = sig(gi_r + gh_r), z = sig(gi_z + gh_z), n = tanh(gi_n + r gh_n); h_n = n + z (h - n).
// gru_backward:  from act, gh, h, dh_n (or null): d_gi, d_gh [batch, 3H] (they differ in the n block:
//                d_gh_n = d_gi_n r), and dh (or null) = dh_n z, h's gradient outside the products.
// rnn_forward:   pre in, act out (in place): tanh or relu. rnn_backward: d_pre from act and dy.
// Activations: the recurrent kernels' own (rnn_activations.h: float forms within 1 ulp, as torch's; libm in
// double); relu keeps NaN (as torch.relu) and its gradient is dy where the output is > 0 (torch's
// threshold_backward). Compiled per ISA level (a step at B=8, H=256 holds 10 000 sigmoids and tanhs:
// scalar libm took more than the step's GEMVs).
#pragma once
#include <cstdint>

#include "pyseqkern/cpu_dispatch.h"

namespace pyseqkern {

// `f64`: the buffers hold double, else float.
struct CellCpuKernels {
  void (*lstm_forward)(bool f64, int64_t batch, int64_t hidden, void* gates, const void* c, void* c_n,
                       void* tanh_c, void* h_n);
  void (*lstm_backward)(bool f64, int64_t batch, int64_t hidden, const void* act, const void* c,
                        const void* tanh_c, const void* dh_n, const void* dc_n, void* d_gates, void* dc);
  void (*gru_forward)(bool f64, int64_t batch, int64_t hidden, const void* gi, const void* gh, const void* h,
                      void* act, void* h_n);
  void (*gru_backward)(bool f64, int64_t batch, int64_t hidden, const void* act, const void* gh, const void* h,
                       const void* dh_n, void* d_gi, void* d_gh, void* dh);
  void (*rnn_forward)(bool f64, int64_t batch, int64_t hidden, void* pre, bool relu);
  void (*rnn_backward)(bool f64, int64_t batch, int64_t hidden, const void* act, const void* dy, void* d_pre,
                       bool relu);
};
PSK_DECLARE_CPU_KERNELS(CellCpuKernels, cell)

}  // namespace pyseqkern
