// Recurrent kernels (LSTM, GRU, RNN): the contract between pyseqkern/ops/rnn.py and the CPU/CUDA code.
//
// One call runs one layer in one direction over a whole sequence (a cell step is a sequence of one
// step). Torch does the input projection before the call (x_gates = x W_ih^T + b_ih, plus b_hh where
// it adds outside the gate nonlinearity) and the weight gradients after backward; the kernels do the
// time loop: the recurrent product, the gates and the state update, fused. (On the CPU the forward
// may project the input itself instead: RnnFwdParams::x.)
//
// Symbols: T steps, B batch rows (rows at step 0), H hidden units, P projection size (LSTM proj_size,
// 0 if none), K = P ? P : H the recurrent state size, G gates (LSTM 4: i,f,g,o; GRU 3: r,z,n; RNN 1),
// N rows of sequence data. A = accumulation type: float for float32 and bfloat16 storage, double for
// float64. Storage dtype (dtype below) applies to x_gates, y, h0, c0, h_n, c_n, dy, dh_n, dc_n,
// d_gates_*, d_proj, dh0, dc0; packed weights, reserve and workspace are always A.
//
// Rows. Sequence data (x_gates, y, reserve, dy, d_gates_*, d_proj) are matrices of N rows; the row of
// time t of sequence b is
//   packed (time_offsets != null): time_offsets[t] + b   (PackedSequence order, N = sum batch_sizes)
//   padded:                        t * row_stride_t + b * row_stride_b
// At step s (0..T-1) the active rows are b < batch_sizes[s] (all B when batch_sizes is null), which is
// why sequences must be sorted longest first; a row costs nothing after its length. Forward direction:
// t = s. Reverse: t = lengths[b] - 1 - s (each sequence from its own last step back to 0).
// h_n/c_n[b] (and dh0/dc0[b]) are written at row b's last step.
#pragma once
#include <cstdint>

#include "pyseqkern/cpu_dispatch.h"
#include "pyseqkern/tensor.h"

namespace pyseqkern {

enum class RnnMode : int32_t { Lstm = 0, Gru = 1, RnnTanh = 2, RnnRelu = 3 };

inline int rnn_gate_count(RnnMode m) { return m == RnnMode::Lstm ? 4 : (m == RnnMode::Gru ? 3 : 1); }

struct RnnShape {
  RnnMode mode;
  bool reset_after;  // GRU: true = torch/cuDNN (r * (W_hn h + b_hn)); false = ONNX/Keras (W_hn (r * h))
  int64_t hidden;    // H
  int64_t proj;      // P (LSTM only), 0 = none
  int64_t state() const { return proj > 0 ? proj : hidden; }  // K
};

struct RnnSeq {
  int64_t steps;               // T
  int64_t batch;               // B
  const int64_t* batch_sizes;  // [T] non-increasing, host memory; null: all B rows run all T steps
  const int64_t* time_offsets; // [T] packed layout (see above), same memory space as the kernel; or null
  const int64_t* lengths;      // [B] steps of each row, kernel memory space; null: all T
  int64_t row_stride_t, row_stride_b;  // padded layout only
  bool reverse;
};

// Sizes a caller allocates (elements of A), for the storage dtype and the lane width L of the active
// kernels (levels with bfloat16 dot products pack extra bfloat16 copies for that dtype; the amx level
// packs float32 weights once more as three bfloat16 pieces each, for calls of 32 rows and more: the
// tile unit multiplies them, summed to float32 accuracy). Reserve rows
// hold, per row of sequence data, in this order:
//   LSTM: i, f, g, o activations [4H]; c_t [H]; m = o * tanh(c_t) [H] (proj only); h_prev [K]
//   GRU:  r, z, n [3H]; reset_after: W_hn h_prev + b_hn [H], else r * h_prev [H]; h_prev [H]
//   RNN:  h_prev [H]
struct RnnSizes {
  int64_t lanes;           // L: unit block width of the packed weights
  int64_t packed_numel;    // rnn pack output (the binding adds a stamp to CPU packs: csrc/pack_stamp.h)
  int64_t workspace_numel; // per call
  int64_t reserve_cols;    // reserve row width
  int64_t reserve_hprev;   // column where h_prev starts in a reserve row
  int64_t ride_ring;       // CPU, B = 1: kRnnRideRing where a forward projecting first may ride at this
                           // level and dtype (RnnFwdParams::ride; x_gates_buf may then be that ring), else 0
  int64_t split_rows;      // CPU: calls of this many rows (batch) or more read the pack's piece sections
                           // (float32 on the amx level); 0: the layout has none
};

// Packing: w_hh [G*H, K] and w_hr [P, H] (row-major with leading dimensions, storage dtype) into the
// layouts the forward and backward kernels read. Done once per weight version (the Python layer caches
// it); out [packed_numel] of A, must not alias the weights.
struct RnnPackParams {
  RnnShape shape;
  DType dtype;
  const void* w_hh; int64_t ld_w_hh;
  const void* w_hr; int64_t ld_w_hr;  // null unless proj
  void* out;
  int num_threads;                    // CPU: threads the pack may take (0 or 1: the caller's alone)
  bool skip_pieces;                   // CPU: leave the piece sections (RnnSizes::split_rows) unwritten, for
                                      // calls below split_rows only (a training call packs for itself); the
                                      // binding's stamp says so and the entries refuse it to wider calls
};

// The input panel (CPU only): w_ih [G*H, I] packed like w_hh's forward section, for forwards that
// project the input themselves (RnnFwdParams::x). out [input_panel_numel] of A.
struct RnnPackInputParams {
  RnnShape shape;
  DType dtype;
  int64_t input;                      // I
  const void* w_ih; int64_t ld_w_ih;
  void* out;
};

// Rows of x_gates_buf that a forward projecting a one-row sequence inside its steps keeps (two groups
// of the 8 rows a step's tiles project ahead).
constexpr int64_t kRnnRideRing = 16;

struct RnnFwdParams {
  RnnShape shape;
  DType dtype;
  RnnSeq seq;
  const void* x_gates; int64_t ld_gates;  // [N, G*H]
  const void* b_hn;                       // [H] GRU reset_after (stays inside r * (...)); null = 0
  const void* h0;                         // [B, K] contiguous
  const void* c0;                         // [B, H] contiguous (LSTM)
  void* y; int64_t ld_y;                  // [N, K] (a column slice of a wider output is fine); for T == 1
                                          // padded it may alias h_n (both get the same values)
  void* h_n;                              // [B, K] contiguous
  void* c_n;                              // [B, H] contiguous (LSTM)
  const void* packed;                     // rnn pack output
  void* reserve;                          // [N, reserve_cols] for training, or null (inference)
  void* workspace;                        // [workspace_numel], plus B*G*ceil(H/L)*L when x is given
                                          // without x_gates_buf
  int num_threads;                        // CPU
  // CPU only, optional: the input itself, x [N, I] (rows as x_gates', storage dtype), and the input
  // panel. Then each thread projects its own gate columns of the step's rows (x W_ih^T + the x_gates
  // row) before the recurrent product, and x_gates is one row [G*H] of folded biases read for every
  // (t, b) (ld_gates unused), or null for none. For small batches (cells) where a separate GEMM
  // would stream W_ih once more through another loop. bfloat16 needs a level with bf16 dot products.
  const void* x; int64_t ld_x; int64_t input;
  const void* packed_in;
  // With x, optional: x_gates_buf [x_rows, G*H] (storage dtype, leading dimension ld_gates). Then the
  // kernel first projects all x_rows rows into it (x W_ih^T + the bias row, rounded to the storage
  // dtype as torch's GEMM rounds), each thread its own gate columns from the panel in its cache, and
  // runs the steps reading it as x_gates; the workspace needs no room for x_gates then. For sequences
  // whose per-thread input panel fits the cache: torch's GEMM evicts the recurrent panel and reaches
  // a lower share of peak on these shapes. With `ride` the kernel projects a one-row sequence inside
  // its steps instead (the caller's choice, pyseqkern/ops/rnn_paths.py _kernel_rides; possible where
  // RnnSizes::ride_ring is nonzero for B = 1, in a sequence of more than 8 steps each with its row, else
  // std::invalid_argument): it then keeps the rows as a ring of kRnnRideRing (rows of step s at
  // s % kRnnRideRing, whatever the direction), and x_gates_buf_rows may be that many; x_rows
  // otherwise (a forward that does not ride refuses a shorter buffer). Projecting before the steps, x's
  // rows go on the tile unit where there are kSplitRows of them or more (float32 on the amx level).
  void* x_gates_buf; int64_t x_rows; int64_t x_gates_buf_rows;
  bool ride;
  // CPU only, optional, without x: a row [G*H] (storage dtype) added to every x_gates row as the steps
  // read it, for x_gates that torch's GEMM made without its bias (addmm first copies the bias into
  // every row of its output, then reads it back: a tenth of the GEMM's time). For float32 and float64,
  // x_gates + x_bias is rounded once. (addmm, which accumulates onto the bias, can differ in the last
  // bit where MKL splits k: measured at K=512, not at 256.)
  const void* x_bias;
  // CPU: never the one-thread shortcut for small calls whose panels fit one core's cache. Set by a
  // caller that runs several layers' steps in a row (a decoding step through a stack): their panels
  // together overflow that core's L2, and two threads keep half of every layer's in each core's.
  bool spread;
  // CPU only, optional: y's rows of a padded sequence at t * y_row_stride_t + b * y_row_stride_b where
  // y_row_stride_t is nonzero; 0: x's rows (seq.row_stride_t, row_stride_b). For a batch_first input
  // read in place (batch-major rows) whose output torch.nn lays out time-major (a transposed view).
  int64_t y_row_stride_t, y_row_stride_b;
};

struct RnnBwdParams {
  RnnShape shape;
  DType dtype;
  RnnSeq seq;
  const void* dy; int64_t ld_dy;          // [N, K] or null (no gradient reaches y)
  const void* dh_n;                       // [B, K] or null
  const void* dc_n;                       // [B, H] or null (LSTM)
  const void* c0;                         // [B, H] the forward's initial cell state (LSTM), or null = 0
  const void* reserve;                    // the forward's reserve [N, reserve_cols]
  const void* packed;
  void* d_gates_x; int64_t ld_dgx;        // [N, G*H] gradient wrt x_gates
  void* d_gates_h; int64_t ld_dgh;        // [N, G*H] gradient wrt the recurrent pre-activations
                                          // (W_hh h_prev + b_hh, GRU reset_before: n rows wrt
                                          // W_hn (r*h)); null for LSTM and RNN, where it equals d_gates_x,
                                          // and for GRU reset_after when d_gates_ht is given
  void* d_proj;                           // [N, P] gradient wrt h_t (proj only: dW_hr = d_proj^T m)
  // Optional transposed copies for the weight-gradient GEMMs (dW = dG^T x contracts over rows, and
  // torch's fast CPU GEMM takes only operands contiguous along the contracted dimension): written by
  // the owner of each unit or state block as the step's values are made, far cheaper than a torch
  // transpose afterwards. Each is null or [cols, N] with leading dimension ld_t (>= N).
  void* d_gates_xt;                       // [G*H, N] d_gates_x^T
  void* d_gates_ht;                       // [G*H, N] d_gates_h^T (GRU reset_after; then d_gates_h may be null)
  void* h_prev_t;                         // [K, N] the reserve's h_prev^T, storage dtype
  int64_t ld_t;
  void* dh0;                              // [B, K]
  void* dc0;                              // [B, H] (LSTM)
  void* workspace;                        // [workspace_numel]
  int num_threads;
};

struct RnnCpuKernels {
  RnnSizes (*sizes)(const RnnShape& shape, int64_t batch, DType dtype);
  void (*pack)(const RnnPackParams& p);
  void (*forward)(const RnnFwdParams& p);
  void (*backward)(const RnnBwdParams& p);
  int64_t (*input_panel_numel)(const RnnShape& shape, int64_t input, DType dtype);  // 0: not supported
  void (*pack_input)(const RnnPackInputParams& p);
  // True where p.out (read only) is the pack of p.w_hh / p.w_hr as their bits are now: a packing kept
  // across calls that record gradients is checked so, since writes through `.data` leave no trace.
  bool (*pack_current)(const RnnPackParams& p);
};
PSK_DECLARE_CPU_KERNELS(RnnCpuKernels, rnn)

}  // namespace pyseqkern
