"""Python half of the tensor handoff (C++ half and contract: csrc/include/pyseqkern/tensor.h).

Each tensor crosses as a DLPack capsule (about 0.4 us); CUDA work also gets torch's current stream
for the tensor's device, so kernels order correctly with the caller's torch work and never sync."""
from __future__ import annotations

import os

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


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (no affinity call on this OS)
        return max(1, os.cpu_count() or 1)


# The CPUs this process may run on, read at import. Kernel teams never exceed them: the kernels meet at a
# spin barrier every step, and with more threads than CPUs a thread waits out others' time slices (16
# threads on 2 CPUs: LSTM (100,8,256) 6.7 -> 42.8 ms, against torch.nn's 28.8). Bits do not depend on
# the team size.
CPUS = _cpus()


def num_threads() -> int:
    """The kernel team for a call: torch's thread count for this OS thread, at most the CPUs."""
    n = torch.get_num_threads()
    return n if n <= CPUS else CPUS
