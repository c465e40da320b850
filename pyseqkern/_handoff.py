"""Python half of the tensor handoff (C++ half and contract: csrc/include/pyseqkern/tensor.h).

Each tensor crosses as a DLPack capsule (about 0.4 us); CUDA work also gets torch's current stream
for the tensor's device, so kernels order correctly with the caller's torch work and never sync."""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack as capsule  # noqa: F401  (re-exported for ops)


# torch's raw lookup returns the handle without building a Stream object (several microseconds less per
# call); the public API stands in where a torch build lacks it.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(t: torch.Tensor) -> int:
    """The cudaStream_t (as an int) that torch would use for `t` now; 0 for CPU tensors."""
    if t.is_cuda:
        if _raw_stream is not None:
            return _raw_stream(t.get_device())
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def num_threads() -> int:
    return torch.get_num_threads()
