"""A layer call's rows, padded or packed (_Seq: how rows of sequence data map to steps and sequences, as
csrc/include/pyseqkern/rnn.h reads them), and a packed batch's forms: its time offsets and lengths listed
on the host once per set of batch sizes (_listed_seq), made with torch ops where they cannot be listed
(_seq_host), and copied to a CUDA device once per device, stream and batch sizes (_device_seq)."""
from __future__ import annotations

import torch

from .. import _backend

_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
try:
    _is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    _unwrapped = torch._C._functorch.get_unwrapped
except AttributeError:
    _is_functorch_wrapped = None


def _plain(t):
    """t without its functorch wrappers (for integer metadata, which no transform differentiates or maps)."""
    while _is_functorch_wrapped is not None and _is_functorch_wrapped(t):
        t = _unwrapped(t)
    return t


# Device copies of packed batches' time offsets and lengths. A copy from host memory is refused inside
# CUDA graph capture, and a captured graph reads the device tensors its kernels were given at every
# replay. So each (device, stream, batch sizes) is copied once, on that stream (later calls there are
# ordered after the copy, and an entry dropped oldest first past _DEVICE_SEQ_MAX goes back to the
# allocator on the stream that used it); a capture takes the copy a call outside it made (the warm-up
# torch.cuda.graphs asks for; torch.cuda.graph synchronizes the device before capturing, so the copy
# is complete whichever stream made it), and keeps it for good.
_DEVICE_SEQ: dict = {}
_DEVICE_SEQ_CAPTURED: dict = {}
_DEVICE_SEQ_MAX = 64


# Packed batches' host-side forms, by their batch sizes: (our copy of batch_sizes, time offsets, lengths,
# their sum), or None where they are malformed (a value below 0, or above the one before) or do not sum
# to the data's `rows` (then not kept: the same sizes may come again with rows they fit; and the lengths,
# a row each, are listed only once the sum bounds them: a hand-made batch_sizes of [10**9] had the listing
# loop for minutes, found by an auditing helper, stop 53). Checked and
# derived with torch ops that took 120 us of a packed layer call (LSTM, B=32, lengths 100..10: 7.3 ms),
# each layer and direction again; a listing and a lookup now. Plain CPU tensors only: compiled graphs,
# fakes and functorch's wrappers take _seq_host (their values can't be listed, or mustn't be).
_LISTED_SEQ: dict = {}
_LISTED_SEQ_MAX = 64


def _listed_seq(bs, rows):
    sizes = tuple(bs.tolist())
    hit = _LISTED_SEQ.pop(sizes, _LISTED_SEQ)
    if hit is _LISTED_SEQ:
        hit = None
        if sizes[-1] >= 0 and all(a >= b for a, b in zip(sizes, sizes[1:])):
            offsets, total = [], 0
            for n in sizes:
                offsets.append(total)
                total += n
            if total != rows:
                return None
            lengths, t = [], len(sizes)
            for b in range(sizes[0]):  # (rows active at step t are its first sizes[t]: a prefix)
                while sizes[t - 1] <= b:
                    t -= 1
                lengths.append(t)
            hit = (torch.tensor(sizes, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
                   torch.tensor(lengths, dtype=torch.int64), total)
    _LISTED_SEQ[sizes] = hit  # (re)inserted last: the dict's order is the age
    while len(_LISTED_SEQ) > _LISTED_SEQ_MAX:
        del _LISTED_SEQ[next(iter(_LISTED_SEQ))]
    return hit if hit is None or hit[3] == rows else None


def _listable(bs):
    """Whether batch_sizes' values can be read here (_listed_seq): a plain, non-empty 1-D int64 CPU tensor,
    outside compilation and grad transforms."""
    return (type(bs) is torch.Tensor and bs.dtype == torch.int64 and bs.device.type == "cpu" and bs.dim() == 1
            and bs.numel() > 0 and not torch.compiler.is_compiling()
            and not (_functorch_active is not None and _functorch_active()))


def _seq_host(bs, batch=None):
    """(time_offsets, lengths) of a batch_sizes (1-D int64 CPU, non-increasing from `batch`, its first value:
    given where the caller has it, since reading it breaks a compiled graph): the exclusive cumsum, and
    each row's steps (the binding checks both against batch_sizes on the CPU)."""
    if batch is None:
        batch = int(bs[0]) if bs.numel() else 0
    return torch.cumsum(bs, 0) - bs, (bs.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)


def _device_seq(bs, time_offsets, lengths, device, sizes=None):
    """bs, time_offsets, lengths: plain CPU tensors (_Seq unwraps functorch's wrappers first: a wrapper
    has no storage for tolist(), and the kernels cannot read one); time_offsets and lengths may be None,
    made from bs (_seq_host) where no copy is cached. Fake ones (opcheck's
    aot_dispatch_dynamic, make_fx's symbolic tracing) are only moved: their tolist() gives SymInts,
    which no dict key takes ("unhashable type: non-nested SymInt", the first GPU run, stop 31). (Real
    tensors under a dispatch mode keep the cache: a capture under FlopCounterMode needs its copy.)
    sizes: bs as a tuple, where the caller has listed it already."""
    if torch.compiler.is_compiling() or type(bs) is not torch.Tensor:
        return time_offsets.to(device, non_blocking=True), lengths.to(device, non_blocking=True)
    sizes = tuple(bs.tolist()) if sizes is None else sizes
    if torch.cuda.is_current_stream_capturing():
        key = (device, sizes)
        hit = _DEVICE_SEQ_CAPTURED.get(key)
        if hit is None:
            made = next((k for k in _DEVICE_SEQ if k[0] == device and k[2] == sizes), None)
            if made is None:
                raise RuntimeError(
                    "pyseqkern: a packed batch with these batch sizes is first seen inside CUDA graph capture, "
                    "where its lengths cannot be copied to the device; run the model once with the same "
                    "batch sizes before capturing (the warm-up torch.cuda.graphs asks for)")
            hit = _DEVICE_SEQ_CAPTURED[key] = _DEVICE_SEQ.pop(made)
        return hit
    key = (device, torch.cuda.current_stream(device).cuda_stream, sizes)
    hit = _DEVICE_SEQ.pop(key, None)
    if hit is None:  # (under a grad transform the copies come wrapped, however plain their sources)
        if time_offsets is None:
            time_offsets, lengths = _seq_host(bs)
        hit = (_plain(time_offsets.to(device, non_blocking=True)), _plain(lengths.to(device, non_blocking=True)))
    _DEVICE_SEQ[key] = hit  # (re)inserted last: the dict's order is the age
    while len(_DEVICE_SEQ) > _DEVICE_SEQ_MAX:
        del _DEVICE_SEQ[next(iter(_DEVICE_SEQ))]
    return hit


class _Seq:
    """How rows of sequence data map to (step, sequence): see csrc/include/pyseqkern/rnn.h."""

    __slots__ = ("steps", "batch", "batch_sizes", "time_offsets", "lengths", "row_stride_t", "row_stride_b",
                 "reverse", "isa")

    def __init__(self, x, batch_sizes, reverse, batch=None):
        """batch: batch_sizes[0] where the caller has it (a read of it breaks a compiled graph). isa: the
        CPU level of the forward (made in its thread), at which its backward runs (_kernel_grads)."""
        self.reverse = bool(reverse)
        self.isa = _backend.active_isa() if x.device.type == "cpu" else None
        if batch_sizes is None:
            self.steps, self.batch = x.shape[0], x.shape[1]
            self.batch_sizes = self.time_offsets = self.lengths = None
            self.row_stride_t, self.row_stride_b = x.shape[1], 1
        else:
            # A copy: the backward reads them again, and the caller's tensor may be written in between
            # (torch.nn's backward does not read them).
            hit = _listed_seq(batch_sizes, x.shape[0]) if _listable(batch_sizes) else None
            if hit is not None:  # (its tensors are ours alone, made from the values, and never written)
                bs, self.time_offsets, self.lengths, _ = hit
            else:
                bs = batch_sizes.to(dtype=torch.int64, device="cpu", memory_format=torch.contiguous_format,
                                    copy=True)
            self.steps = bs.shape[0]
            self.batch = (batch if batch is not None else hit[2].shape[0] if hit is not None
                          else int(bs[0]) if bs.numel() else 0)
            self.batch_sizes = bs
            if hit is None:
                self.time_offsets, self.lengths = _seq_host(bs, self.batch)
            self.row_stride_t = self.row_stride_b = 0
            if _functorch_active is not None and _functorch_active():
                # Under a grad transform every op's result (these too) is a functorch wrapper, which the
                # kernels cannot read; _Seq is opaque to the transforms, so nothing unwraps them later.
                self.batch_sizes, self.time_offsets, self.lengths = (
                    _plain(t) for t in (self.batch_sizes, self.time_offsets, self.lengths))
            if x.device.type == "cuda":  # read by the CUDA kernels on the device
                self.time_offsets, self.lengths = _device_seq(self.batch_sizes, self.time_offsets, self.lengths,
                                                              x.device)

    def args(self):
        return (self.batch_sizes, self.time_offsets, self.lengths, self.row_stride_t, self.row_stride_b, self.reverse)


def clear() -> None:
    """Drops the device copies no captured CUDA graph reads and the host forms (ops.rnn.empty_cache)."""
    _DEVICE_SEQ.clear()
    _LISTED_SEQ.clear()
