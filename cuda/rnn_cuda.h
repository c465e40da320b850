// Recurrent CUDA kernels (LSTM, GRU, RNN): the CUDA half of the contract in pyseqkern/rnn.h.
//
// Same params structs, same semantics, same reserve layout as the CPU kernels (so the Python backward
// GEMMs work unchanged); only the packed-weight layout and the workspace size are this backend's own,
// which is why sizes come from rnn_sizes_cuda and never from the CPU table. Plain C++: bindings.cpp
// includes this without cuda_runtime.h. Compiled only with PSK_WITH_CUDA.
//
// Memory spaces. Every pointer in the params is device memory of the current device, except
// seq.batch_sizes, which stays in host memory (the per-step path reads it to size each launch).
// seq.time_offsets [T] and seq.lengths [B] (int64) must be device memory: the persistent kernel reads
// them on the GPU. x_gates, y, h0, ... have the storage dtype: float32, float16, bfloat16 (float32
// math) or float64 (double math); packed, reserve and workspace are A (float, or double for float64).
//
// Packed layout (A, rnn_sizes_cuda(...).packed_numel elements), plain row-major copies:
//   fmain [G*H][K]  w_hh          fproj [P][H]  w_hr
//   bmain [K][G*H]  w_hh^T        bproj [H][P]  w_hr^T
// Workspace (A, workspace_numel): owned by the caller, contents undefined between calls.
//
// Streams and hygiene: every entry enqueues on `stream` (torch's current stream for the tensors'
// device, which the caller made current), never synchronizes, never allocates, and checks each launch
// (a std::runtime_error names the kernel). Results are deterministic: every sum has a fixed order.
//
// Paths. The persistent path keeps each block's slice of the recurrent weights in shared memory for
// the whole sequence and synchronizes the grid at each step's phase boundaries (cooperative launch,
// one kernel per call). The per-step path launches one kernel per step and phase and reads weights
// from global memory (L2); it takes over when the slices do not fit on chip or the grid cannot be
// co-resident. Both give results within rounding of each other (the reduction split may differ).
#pragma once
#include <cstdint>

#include "pyseqkern/rnn.h"

namespace pyseqkern {

enum class RnnCudaPath : int32_t { Auto = 0, Persistent = 1, Step = 2 };

inline const char* rnn_cuda_path_name(RnnCudaPath p) {
  return p == RnnCudaPath::Persistent ? "persistent" : (p == RnnCudaPath::Step ? "step" : "auto");
}

// lanes is 1 (no unit blocks); reserve_cols / reserve_hprev equal the CPU's (rnn.h).
RnnSizes rnn_sizes_cuda(const RnnShape& shape, int64_t batch, bool is_double);

void rnn_pack_cuda(const RnnPackParams& p, void* stream);

// `request` Auto picks persistent when it fits; Persistent throws std::invalid_argument when it does
// not fit on this device. Returns the path that ran (Persistent or Step). num_threads is ignored.
RnnCudaPath rnn_forward_cuda(const RnnFwdParams& p, RnnCudaPath request, void* stream);
RnnCudaPath rnn_backward_cuda(const RnnBwdParams& p, RnnCudaPath request, void* stream);

}  // namespace pyseqkern
