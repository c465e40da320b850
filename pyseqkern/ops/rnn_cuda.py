"""CUDA impls of the recurrent ops torch.ops.pyseqkern.rnn_pack / rnn_forward / rnn_backward (schemas,
outputs and autograd in ops/rnn.py; kernels and their contract in cuda/rnn_cuda.h).

Differences from the CPU impls, all inside this file: the packed-weight layout and workspace size come
from the CUDA sizes (rnn_sizes(..., cuda=True)); time_offsets and lengths are read by the kernels on the
device (moved there if they arrive on the CPU; batch_sizes stays on the host); every launch goes to
torch's current stream of the tensors' device; float16 storage is accepted besides float32, bfloat16
(float32 math) and float64.

Which kernel path runs (cuda/rnn_cuda.h): "persistent" (weights on chip for the whole sequence, one
cooperative launch) or "step" (one launch per step). PYSEQKERN_CUDA_RNN_PATH=auto|persistent|step,
read at import, forces one (set_path() at run time, for tests); the path each direction last ran is
in pyseqkern.backend_info()["cuda"]["rnn_paths"].
"""
from __future__ import annotations

import os
import warnings

import torch

from .. import _backend
from .._handoff import capsule, stream_of
from . import rnn as _rnn
from . import rnn_seq as _seq
from ._library import LIB
from .rnn_modes import GATES_BY_CODE

_C = _backend._C
PATH_ENV = "PYSEQKERN_CUDA_RNN_PATH"
PATHS = {"auto": 0, "persistent": 1, "step": 2}


def _parse_path(value: str) -> str:
    name = value.strip().lower()
    if name not in PATHS:
        raise ValueError(f"{PATH_ENV}={value!r}: expected one of {sorted(PATHS)}")
    return name


_path = _parse_path(os.environ.get(PATH_ENV, "") or "auto")
_backend.CUDA_RNN_PATHS["requested"] = _path


def set_path(name: str) -> None:
    """Forces the CUDA RNN kernel path ("auto", "persistent" or "step") for later calls."""
    global _path
    _path = _parse_path(name)
    _backend.CUDA_RNN_PATHS["requested"] = _path


def path() -> str:
    return _path


def _ran(direction: str, name: str) -> None:
    _backend.CUDA_RNN_PATHS[direction] = name


_SIZES: dict = {}


def sizes(mode: int, reset_after: bool, hidden: int, proj: int, batch: int, dtype: torch.dtype):
    """(lanes, packed_numel, workspace_numel, reserve_cols, reserve_hprev, ride_ring = 0) of the CUDA
    kernels."""
    key = (mode, reset_after, hidden, proj, batch, dtype == torch.float64)
    got = _SIZES.get(key)
    if got is None:
        got = _SIZES[key] = tuple(_C.rnn_sizes(mode, reset_after, hidden, proj, batch, str(dtype).split(".")[-1],
                                               cuda=True))
    return got


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _none(t):
    return None if t is None else capsule(t)


def _on(t, device):
    """An index tensor where the kernels read it: contiguous int64 on `device`."""
    if t is None:
        return None
    return t.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()


# ---- impls ------------------------------------------------------------------------------------------------
def _pack_cuda(mode, reset_after, hidden, proj, w_hh, w_hr, isa=None):  # (isa: a CPU level; unused)
    numel = sizes(mode, reset_after, hidden, proj, 1, w_hh.dtype)[1]
    out = torch.empty(numel, dtype=_acc_dtype(w_hh.dtype), device=w_hh.device)
    _C.rnn_pack(mode, reset_after, hidden, proj, capsule(w_hh.contiguous()),
                _none(None if w_hr is None else w_hr.contiguous()), capsule(out), stream_of(w_hh))
    return out


SKIP_ENV = "PYSEQKERN_CUDA_RNN_SKIP"  # timing only (cuda/rnn_common.cuh SkipBits, bench/gpu_phases.py)


def _warn_if_skipping():
    """The kernel reads SKIP_ENV at every forward launch; left set (an exported shell variable after a
    bench session), every CUDA forward would be wrong without a word."""
    value = os.environ.get(SKIP_ENV)
    if value and value.strip() not in ("0", ""):
        warnings.warn(f"{SKIP_ENV}={value} is set: the CUDA recurrent forward leaves parts of its kernel out and "
                      "its outputs are wrong (timing only, bench/gpu_phases.py); unset it", RuntimeWarning)


def _forward_cuda(mode, reset_after, hidden, proj, steps, batch, x_gates, b_hn, h0, c0, packed, batch_sizes,
                  time_offsets, lengths, row_stride_t, row_stride_b, reverse, training, x_bias=None, isa=None):
    _warn_if_skipping()
    if x_bias is not None:  # (the CUDA kernels read the bias inside x_gates; the layers pass none here)
        x_gates = x_gates + x_bias
    K = proj if proj > 0 else hidden
    _rnn._require_rows("rnn_forward", x_gates=x_gates)
    n = x_gates.shape[0]
    dtype, dev = x_gates.dtype, x_gates.device
    ws_numel, rcols = sizes(mode, reset_after, hidden, proj, batch, dtype)[2:4]
    acc = _acc_dtype(dtype)
    y = torch.empty(n, K, dtype=dtype, device=dev)
    h_n = torch.empty(batch, K, dtype=dtype, device=dev)
    c_n = torch.empty(batch if mode == 0 else 0, hidden, dtype=dtype, device=dev)
    reserve = torch.empty(n if training else 0, rcols, dtype=acc, device=dev)
    workspace = torch.empty(ws_numel, dtype=acc, device=dev)
    ran = _C.rnn_forward(mode, reset_after, hidden, proj, steps, batch, _none(batch_sizes),
                         _none(_on(time_offsets, dev)), _none(_on(lengths, dev)), row_stride_t, row_stride_b, reverse,
                         capsule(x_gates), _none(b_hn), _none(h0), _none(c0), capsule(y), K, capsule(h_n),
                         capsule(c_n) if mode == 0 else None, capsule(packed), capsule(reserve) if training else None,
                         capsule(workspace), 1, stream_of(x_gates), PATHS[_path])
    _ran("forward", ran)
    return y, h_n, c_n, reserve


def _backward_cuda(mode, reset_after, hidden, proj, steps, batch, dy, dh_n, dc_n, c0, reserve, packed, batch_sizes,
                   time_offsets, lengths, row_stride_t, row_stride_b, reverse, transposed, isa=None):
    """As the CPU impl; the transposed copies (a CPU GEMM aid) are made by torch when asked for."""
    K = proj if proj > 0 else hidden
    G = GATES_BY_CODE[mode]
    _rnn._require_rows("rnn_backward", reserve=reserve)
    n = reserve.shape[0]
    dtype = _rnn._storage_dtype(dy, dh_n, dc_n, c0, reserve)
    dev = reserve.device
    ws_numel = sizes(mode, reset_after, hidden, proj, batch, dtype)[2]

    def e(*shape):
        return torch.empty(*shape, dtype=dtype, device=dev)

    gru_after = mode == 1 and reset_after
    dgx = e(n, G * hidden)
    dgh = e(n if gru_after else 0, G * hidden)
    dproj = e(n if proj > 0 else 0, proj)
    dh0 = e(batch, K)
    dc0 = e(batch if mode == 0 else 0, hidden)
    workspace = torch.empty(ws_numel, dtype=_acc_dtype(dtype), device=dev)
    ran = _C.rnn_backward(mode, reset_after, hidden, proj, steps, batch, _none(batch_sizes),
                          _none(_on(time_offsets, dev)), _none(_on(lengths, dev)), row_stride_t, row_stride_b, reverse,
                          _none(dy), K, _none(dh_n), _none(dc_n), _none(c0), capsule(reserve), capsule(packed),
                          capsule(dgx), capsule(dgh) if gru_after else None, capsule(dproj) if proj > 0 else None,
                          capsule(dh0), capsule(dc0) if mode == 0 else None, capsule(workspace), 1, None, None, None,
                          stream_of(reserve), PATHS[_path])
    _ran("backward", ran)
    if not transposed:
        return dgx, dgh, dproj, dh0, dc0, e(0, n), e(0, n), e(0, n)
    hprev = reserve[:, reserve.shape[1] - K:].to(dtype)
    return (dgx, e(0, G * hidden), dproj, dh0, dc0, dgx.t().contiguous(),
            dgh.t().contiguous() if gru_after else e(0, n), hprev.t().contiguous())


# ---- the op route's packed metadata ------------------------------------------------------------------------
def _trusted_seq(op, batch_sizes, time_offsets, lengths, device):
    """The device time offsets and lengths the kernels of a packed op call read: the copies _device_seq made
    from batch_sizes. The kernels index rows with them unchecked (a review, stop 33: a raw call's own device
    lengths that batch_sizes does not imply would have had y, reserve and h_n written out of bounds), so a
    caller's own are only compared with them: on the host where they are CPU tensors (a ValueError, as the
    CPU entries raise), else by an asynchronous device-side assert, as torch checks indices on CUDA (no
    sync, allowed in a capture; like torch's, it ends the CUDA context, and the kernels read the copies
    either way). The layers' own copies are those objects: a cache lookup, no comparison. Compiled graphs
    pass fresh device tensors: a comparison of a few small kernels per call. Without all three tensors the
    binding says what is missing."""
    if batch_sizes is None or time_offsets is None or lengths is None:
        return time_offsets, lengths
    bs = batch_sizes
    if bs.dim() != 1 or bs.dtype != torch.int64 or bs.device.type != "cpu" or bs.numel() == 0:
        raise ValueError(f"pyseqkern::{op}: 'batch_sizes' must be a non-empty 1-D int64 CPU tensor, got "
                         f"{bs.dtype} {tuple(bs.shape)} on {bs.device}")
    bs = bs.contiguous()
    sizes = tuple(bs.tolist())
    if sizes[-1] < 0 or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"pyseqkern::{op}: 'batch_sizes' must be non-increasing and >= 0")
    want = _seq._device_seq(bs, None, None, device, sizes)
    if time_offsets is want[0] and lengths is want[1]:
        return want
    host = _seq._seq_host(bs)
    for name, given, expect, dev in (("time_offsets", time_offsets, host[0], want[0]),
                                     ("lengths", lengths, host[1], want[1])):
        if given is dev:
            continue
        msg = (f"pyseqkern::{op}: '{name}' must be what 'batch_sizes' implies (time_offsets: its exclusive "
               "cumsum; lengths: each row's steps)")
        if given.shape != expect.shape or given.dtype != torch.int64:
            raise ValueError(f"{msg}: an int64 tensor of shape {tuple(expect.shape)}, got {given.dtype} "
                             f"{tuple(given.shape)}")
        if given.device.type == "cpu":
            if not torch.equal(given, expect):
                raise ValueError(msg)
        else:
            torch._assert_async((given.to(device) == dev).all(), msg)
    return want


def _forward_op(mode, reset_after, hidden, proj, steps, batch, x_gates, b_hn, h0, c0, packed, batch_sizes,
                time_offsets, lengths, row_stride_t, row_stride_b, reverse, training, x_bias=None, isa=None):
    """The op's CUDA impl: the layers' direct route calls _forward_cuda with their own copies."""
    time_offsets, lengths = _trusted_seq("rnn_forward", batch_sizes, time_offsets, lengths, x_gates.device)
    return _forward_cuda(mode, reset_after, hidden, proj, steps, batch, x_gates, b_hn, h0, c0, packed, batch_sizes,
                         time_offsets, lengths, row_stride_t, row_stride_b, reverse, training, x_bias)


def _backward_op(mode, reset_after, hidden, proj, steps, batch, dy, dh_n, dc_n, c0, reserve, packed, batch_sizes,
                 time_offsets, lengths, row_stride_t, row_stride_b, reverse, transposed, isa=None):
    time_offsets, lengths = _trusted_seq("rnn_backward", batch_sizes, time_offsets, lengths, reserve.device)
    return _backward_cuda(mode, reset_after, hidden, proj, steps, batch, dy, dh_n, dc_n, c0, reserve, packed,
                          batch_sizes, time_offsets, lengths, row_stride_t, row_stride_b, reverse, transposed)


LIB.impl("rnn_pack", _pack_cuda, "CUDA")
LIB.impl("rnn_forward", _forward_op, "CUDA")
LIB.impl("rnn_backward", _backward_op, "CUDA")
