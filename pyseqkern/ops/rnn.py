"""Recurrent ops: one call per layer and direction (rnn_layer) or per cell step (rnn_cell).

rnn_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after=True)
  One layer, one direction.
  mode        "lstm", "gru", "rnn_tanh" or "rnn_relu"; G = 4, 3, 1, 1 gates
  x           [T, B, I] time-major (batch_sizes None), or packed [N, I] with batch_sizes
  batch_sizes None, or int64 CPU tensor [T], non-increasing, as PackedSequence.batch_sizes (rows of x in
              PackedSequence order: time step t holds batch_sizes[t] rows, the longest sequences first)
  h0          [B, Hout] (Hout = proj_size if w_hr is given, else H); c0 [B, H] for lstm, else None
  w_ih [G*H, I], w_hh [G*H, Hout], b_ih and b_hh [G*H] or None, w_hr [Hout, H] (lstm only) or None
  reverse     each sequence runs from its own last valid step back to its first
  reset_after gru only: True is torch/cuDNN (n = tanh(W_in x + b_in + r*(W_hn h + b_hn))), False is
              Keras reset_after=False / ONNX default (n = tanh(W_in x + b_in + W_hn (r*h) + b_hn))
  returns     y (same layout as x, feature size Hout), h_n [B, Hout], c_n [B, H] or None; for packed input
              h_n[b] and c_n[b] are the states after row b's last valid step

rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, reset_after=True)
  x [B, I], h [B, H], c [B, H] (lstm) or None; returns (h', c') with c' None except for lstm.

How the work splits: torch computes x W_ih^T + biases for all steps in one GEMM; the kernel
(torch.ops.pyseqkern.rnn_forward) runs the whole time loop; backward (rnn_backward) runs the loop in
reverse and returns gate gradients, from which torch GEMMs form every weight gradient. Recurrent weights
are packed once per weight version (_packed, by param_cache.py's rules); the modules' thin inference
routes are in rnn_thin.py, a call's rows and a packed batch's lengths in rnn_seq.py, the op's autograd
and torch.func rules in rnn_autograd.py, autocast in rnn_autocast.py, which torch GEMM serves each
product in rnn_gemms.py, which way a CPU inference sequence goes in rnn_paths.py, the buffers kept
between calls in rnn_scratch.py.
Dtypes: float32, float64, bfloat16 (float32 math); float16 on CUDA, and on the CPU through float32 casts.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad as _fwad

from .. import _backend
from .._handoff import capsule, num_threads
from ..reference import rnn as _reference
from . import rnn_autocast as _autocast
from . import rnn_gemms as _gemms
from . import rnn_paths as _paths
from . import rnn_seq as _seq
from .rnn_modes import GATES, GATES_BY_CODE, MODES
from .rnn_seq import _functorch_active, _plain, _Seq
from .rnn_scratch import (_fwd_scratch, _proj_scratch, _reserves, normal,
                          release as _release_scratch)
from ._library import LIB
from . import param_cache
from .param_cache import MISS, NO_VERSION, anchored, cached, hit, put, sharded
from . import rnn_direct  # noqa: F401  (defines rnn_step_direct, which rnn_layer calls in compiled graphs)

_C = _backend._C
DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# `isa` (CPU; None: the calling thread's level): the level a compiled graph was traced at, which its calls
# run at whichever thread runs them (_backend.at_isa): the sizes of a pack and a reserve depend on the level, and the
# graph holds the ones its fake impls gave then.
LIB.define("rnn_pack(int mode, bool reset_after, int hidden, int proj, Tensor w_hh, Tensor? w_hr, str? isa=None) "
           "-> Tensor")
LIB.define(
    "rnn_forward(int mode, bool reset_after, int hidden, int proj, SymInt steps, SymInt batch, Tensor x_gates, "
    "Tensor? b_hn, Tensor? h0, Tensor? c0, Tensor packed, Tensor? batch_sizes, Tensor? time_offsets, "
    "Tensor? lengths, SymInt row_stride_t, SymInt row_stride_b, bool reverse, bool training, Tensor? x_bias=None, "
    "str? isa=None) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "rnn_backward(int mode, bool reset_after, int hidden, int proj, SymInt steps, SymInt batch, Tensor? dy, "
    "Tensor? dh_n, Tensor? dc_n, Tensor? c0, Tensor reserve, Tensor packed, Tensor? batch_sizes, "
    "Tensor? time_offsets, Tensor? lengths, SymInt row_stride_t, SymInt row_stride_b, bool reverse, bool transposed, "
    "str? isa=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_SIZES: dict = {}
_SIZES_MAX = 4096  # (a server seeing every batch size would otherwise grow it for good; cleared past this)


def _sizes(mode: int, reset_after: bool, hidden: int, proj: int, batch: int, dtype: torch.dtype, isa=None,
           op="rnn_sizes"):
    """(lanes, packed_numel, workspace_numel, reserve_cols, reserve_hprev, ride_ring, split_rows) for the
    active ISA level, or level `isa` (rnn.h RnnSizes; `op`: whose `isa` it is, for its error)."""
    key = (mode, reset_after, hidden, proj, batch, dtype, _backend.active_isa() if isa is None else isa)
    got = _SIZES.get(key)
    if got is None:
        if len(_SIZES) >= _SIZES_MAX:
            _SIZES.clear()
        with _backend.at_isa(op, isa):
            got = _SIZES[key] = _C.rnn_sizes(mode, reset_after, hidden, proj, batch, str(dtype).split(".")[-1])
    return got


def _none(t):
    return None if t is None else capsule(t)


# ---- rnn_pack -------------------------------------------------------------------------------------------
def _pack_impl(mode, reset_after, hidden, proj, w_hh, w_hr, isa=None):
    with _backend.at_isa("rnn_pack", isa):
        return _pack_here(mode, reset_after, hidden, proj, w_hh, w_hr)


def _pack_here(mode, reset_after, hidden, proj, w_hh, w_hr):
    """The op's CPU kernel. Handed a Parameter itself (a graph compiled by Inductor passes the module's
    parameters as they are; eager calls pass detached aliases), it serves the pack cached for that
    Parameter once the kernel has checked it against the weights bit for bit, as eager training reuses
    one (_packed's `reuse`): each compiled call packed afresh, 70% of a compiled GRU step at B=1."""
    if type(w_hh) is torch.nn.Parameter and (w_hr is None or type(w_hr) is torch.nn.Parameter):
        return _packed(mode, reset_after, hidden, proj, w_hh, w_hr, True, reuse=True)
    _require_float("rnn_pack", w_hh=w_hh)
    return _pack_into_new(mode, reset_after, hidden, proj, w_hh, w_hr)


def _pack_into_new(mode, reset_after, hidden, proj, w_hh, w_hr, pieces=True):
    """A fresh CPU pack of w_hh (and w_hr) at the active level; `pieces`: rnn_pack's (_pack_narrow)."""
    numel = _sizes(mode, reset_after, hidden, proj, 1, w_hh.dtype)[1]
    out = torch.empty(numel, dtype=_acc_dtype(w_hh.dtype), device=w_hh.device)
    _C.rnn_pack(mode, reset_after, hidden, proj, capsule(w_hh.contiguous()),
                _none(None if w_hr is None else w_hr.contiguous()), capsule(out), num_threads=num_threads(),
                pieces=pieces)
    return out


LIB.impl("rnn_pack", _pack_impl, "CPU")


@torch.library.register_fake("pyseqkern::rnn_pack")
def _pack_fake(mode, reset_after, hidden, proj, w_hh, w_hr, isa=None):
    if w_hh.device.type == "cuda":  # CUDA packs its own layout
        numel = rnn_cuda.sizes(mode, reset_after, hidden, proj, 1, w_hh.dtype)[1]
    else:
        numel = _sizes(mode, reset_after, hidden, proj, 1, w_hh.dtype, isa, "rnn_pack")[1]
    return w_hh.new_empty(numel, dtype=_acc_dtype(w_hh.dtype))


# Packed weights, cached per recurrent weight: reused while the parameter is unchanged (same storage,
# same version counter, dtype, device, and ISA level, which sets the lane width of the layout).
# Writes through `.data` (p.data.copy_(...), gradcheck's perturbations) do not bump the version
# counter, so an entry serves calls that record no gradient for the weight (inference) on its key and
# a sample of the weights' memory (param_cache.fingerprint: whole-tensor writes are seen, a few elements written
# through `.data` only where they touch the sample). When autograd records one (training), the
# optimizer changes the weights every step anyway: packing again costs one pass over the weights,
# small next to a sequence's forward and backward. Not next to one step: a cell stepped in a training
# loop (or a layer fed one token a call) packed on every step, 80-130 us of a 300-700 us step at H=256
# (and more in fresh memory). Such calls (`reuse`) take the entry where its key matches and the kernel
# finds the weights still equal to the pack, bit for bit (`_C.rnn_pack_current`: one read of both, no
# copy kept), so no write of any kind is missed.
_PACK_CACHE: dict = anchored({})


def _packed(mode: int, reset_after: bool, hidden: int, proj: int, w_hh: torch.Tensor, w_hr, recording: bool,
            reuse: bool = False, narrow_batch=None):
    """`recording`: autograd records a gradient for w_hh or w_hr in this call. `reuse`: such a call (plain
    eager, CPU) may take the cached pack once the kernel has checked it against the weights' bits.
    `narrow_batch`: a plain eager CPU call's batch, where its pack is its own (recording, not `reuse`): below
    the level's split_rows no kernel of the call (forward or backward) reads the piece sections, and its
    pack leaves them out (_pack_narrow)."""
    def pack():
        return torch.ops.pyseqkern.rnn_pack(mode, reset_after, hidden, proj, w_hh.detach(),
                                            None if w_hr is None else w_hr.detach(), _backend.compiled_isa())

    def key():  # strides too: `p.data = p.data.t()` keeps the address and the version
        return (mode, reset_after, hidden, proj, w_hh.data_ptr(), w_hh._version, w_hh.stride(), w_hh.dtype,
                w_hh.device, None if w_hr is None else (w_hr.data_ptr(), w_hr._version, w_hr.stride()),
                _backend.active_isa())

    if torch.compiler.is_compiling() or (recording and not reuse):
        if narrow_batch is not None and not torch.compiler.is_compiling():
            narrow = _pack_narrow(mode, reset_after, hidden, proj, w_hh, w_hr, narrow_batch)
            if narrow is not None:
                return narrow
        return pack()
    if not recording:
        return cached(_PACK_CACHE, w_hh, key, pack, w_hh, w_hr)  # (its pack made normal: cached)
    if sharded():
        return pack()
    try:
        k = key()
    except NO_VERSION:
        return pack()
    got = hit(_PACK_CACHE.get(id(w_hh)), k)
    if got is not MISS and _C.rnn_pack_current(mode, reset_after, hidden, proj, capsule(w_hh.detach()),
                                               _none(None if w_hr is None else w_hr.detach()), capsule(got)):
        return got
    return put(_PACK_CACHE, w_hh, k, lambda: normal(pack), w_hh, w_hr)


def _pack_narrow(mode, reset_after, hidden, proj, w_hh, w_hr, batch):
    """A CPU pack without the piece sections (pack_stamp.h) for calls of `batch` rows, or None where the
    level's layout has none or a call of that batch reads them (RnnSizes::split_rows). The pieces are three
    quarters of a float32 pack's time on the amx level (LSTM W_hh at H=256: 0.25 -> 0.065 ms alone,
    0.61 ms of a (100, 8, 256) training forward's 4.4 in-call); training calls pack on every call."""
    split_rows = _sizes(mode, reset_after, hidden, proj, batch, w_hh.dtype)[6]
    if not split_rows or batch >= split_rows:
        return None
    return _pack_into_new(mode, reset_after, hidden, proj, w_hh.detach(), None if w_hr is None else w_hr.detach(),
                          pieces=False)


def _pack_for_rows(mode, reset_after, hidden, proj, packed, w_hh, w_hr, batch, rows, dtype):
    """A forward's pack `packed`, made for its calls of `batch` rows, for a backward of `rows` rows (vmap's
    folded batch): itself, or where it may be a pack without pieces (_pack_narrow: `batch` below the level's
    split_rows) and a call of `rows` reads them, a whole pack of w_hh and w_hr; None where that pack would be
    needed and w_hh is not at hand (the caller then runs `batch` rows a call)."""
    if packed.device.type != "cpu":
        return packed
    split_rows = _sizes(mode, reset_after, hidden, proj, batch, dtype)[6]
    if not split_rows or batch >= split_rows or rows < split_rows:
        return packed
    if w_hh is None or (proj > 0 and w_hr is None):
        return None
    return _pack_into_new(mode, reset_after, hidden, proj, w_hh.detach(), None if w_hr is None else w_hr.detach())


# ---- rnn_forward / rnn_backward --------------------------------------------------------------------------
def _forward_impl(mode, reset_after, hidden, proj, steps, batch, x_gates, b_hn, h0, c0, packed, batch_sizes,
                  time_offsets, lengths, row_stride_t, row_stride_b, reverse, training, x_bias=None, isa=None):
    _require_float("rnn_forward", x_gates=x_gates)
    _require_rows("rnn_forward", x_gates=x_gates)
    with _backend.at_isa("rnn_forward", isa):
        return _run_forward(mode, reset_after, hidden, proj, steps, batch, x_gates, b_hn, h0, c0, packed,
                            (batch_sizes, time_offsets, lengths, row_stride_t, row_stride_b, reverse), training,
                            x_gates.shape[0], x_bias=x_bias)


def _own_x_gates_numel(sizes, mode, batch, hidden):
    """Workspace a forward needs beyond sizes' when it projects each step's rows itself (x without
    x_gates_buf, rnn.h): the step's x_gates, B*G*Hp. `sizes` is _sizes(...)'s tuple, `mode` the code."""
    lanes = sizes[0]
    return batch * GATES_BY_CODE[mode] * -(-hidden // lanes) * lanes


def _projecting_buffers(sizes, mode, batch, hidden, dtype, n, each_step, ring):
    """(workspace, x_gates buffer or None) of a forward that projects its n rows itself, from this thread's
    forward scratch (_fwd_scratch): each step's rows inside the step (the workspace grows by its own
    x_gates), or every row before the steps into a buffer (a ring of rnn_paths._RIDE_RING rows where it rides)."""
    scratch = _fwd_scratch()
    if each_step:
        return scratch.take((sizes[2] + _own_x_gates_numel(sizes, mode, batch, hidden),), _acc_dtype(dtype)), None
    return (scratch.take((sizes[2],), _acc_dtype(dtype)),
            scratch.take((min(n, _paths._RIDE_RING) if ring else n, GATES_BY_CODE[mode] * hidden), dtype))


def _run_forward(mode, reset_after, hidden, proj, steps, batch, x_gates, b_hn, h0, c0, packed, seq_args, training,
                 n, x=None, panel=None, each_step=False, x_bias=None, out=None, ring=False):
    """Allocates the outputs (or writes `out`: y, h_n, c_n) and runs the forward kernel over n rows of
    sequence data. With x and its input panel, x_gates is the bias row (or None) and the kernel projects
    the input itself (CPU, the eager inference path): every row before the steps into an x_gates
    buffer, or with `each_step` each step's rows inside the step (rnn.h: no buffer, the workspace grows
    by B*G*Hp; with `ring`, where the kernel rides, a ring of rnn_paths._RIDE_RING rows). Its buffer and workspace
    live only inside the call and come from this thread's forward scratch (_fwd_scratch)."""
    K = proj if proj > 0 else hidden
    dtype, dev = (x if x is not None else x_gates).dtype, (x if x is not None else x_gates).device
    sizes = _sizes(mode, reset_after, hidden, proj, batch, dtype)
    ws_numel, rcols = sizes[2], sizes[3]
    if out is None:
        y = torch.empty(n, K, dtype=dtype, device=dev)
        h_n = torch.empty(batch, K, dtype=dtype, device=dev)
        c_n = torch.empty(batch if mode == 0 else 0, hidden, dtype=dtype, device=dev)
    else:
        y, h_n, c_n = out
    reserve = _reserves().take((n, rcols), _acc_dtype(dtype)) if training and dev.type == "cpu" else \
        torch.empty(n if training else 0, rcols, dtype=_acc_dtype(dtype), device=dev)
    if x is None:
        workspace, x_buf = torch.empty(ws_numel, dtype=_acc_dtype(dtype), device=dev), None
    else:
        workspace, x_buf = _projecting_buffers(sizes, mode, batch, hidden, dtype, n, each_step, ring)
    batch_sizes, time_offsets, lengths, row_stride_t, row_stride_b, reverse = seq_args
    _C.rnn_forward(mode, reset_after, hidden, proj, steps, batch, _none(batch_sizes), _none(time_offsets),
                   _none(lengths), row_stride_t, row_stride_b, reverse, _none(x_gates), _none(b_hn), _none(h0),
                   _none(c0), capsule(y), K, capsule(h_n), capsule(c_n) if mode == 0 else None, capsule(packed),
                   capsule(reserve) if training else None, capsule(workspace), num_threads(), x=_none(x),
                   packed_in=_none(panel), x_gates_buf=_none(x_buf), x_bias=_none(x_bias), ride=ring)
    return y, h_n, c_n, reserve


LIB.impl("rnn_forward", _forward_impl, "CPU")


@torch.library.register_fake("pyseqkern::rnn_forward")
def _forward_fake(mode, reset_after, hidden, proj, steps, batch, x_gates, b_hn, h0, c0, packed, batch_sizes,
                  time_offsets, lengths, row_stride_t, row_stride_b, reverse, training, x_bias=None, isa=None):
    K = proj if proj > 0 else hidden
    _require_rows("rnn_forward", x_gates=x_gates)
    n = x_gates.shape[0]
    # (as _pack_fake: the backend's own table; the width does not depend on the batch)
    rcols = (rnn_cuda.sizes(mode, reset_after, hidden, proj, 1, x_gates.dtype) if x_gates.device.type == "cuda"
             else _sizes(mode, reset_after, hidden, proj, 1, x_gates.dtype, isa, "rnn_forward"))[3]
    acc = _acc_dtype(x_gates.dtype)
    return (x_gates.new_empty(n, K), x_gates.new_empty(batch, K),
            x_gates.new_empty(batch if mode == 0 else 0, hidden),
            x_gates.new_empty(n if training else 0, rcols, dtype=acc))


def _backward_impl(mode, reset_after, hidden, proj, steps, batch, dy, dh_n, dc_n, c0, reserve, packed, batch_sizes,
                   time_offsets, lengths, row_stride_t, row_stride_b, reverse, transposed, isa=None, scratch=None,
                   h_prev_t=None):
    with _backend.at_isa("rnn_backward", isa):
        return _backward_here(mode, reset_after, hidden, proj, steps, batch, dy, dh_n, dc_n, c0, reserve, packed,
                              batch_sizes, time_offsets, lengths, row_stride_t, row_stride_b, reverse, transposed,
                              scratch, h_prev_t)


def _backward_here(mode, reset_after, hidden, proj, steps, batch, dy, dh_n, dc_n, c0, reserve, packed, batch_sizes,
                   time_offsets, lengths, row_stride_t, row_stride_b, reverse, transposed, scratch, h_prev_t):
    """`transposed`: also return d_gates_x^T, d_gates_h^T (GRU reset_after, then in place of d_gates_h)
    and h_prev^T, [cols, N] each, for the weight-gradient GEMMs (rnn.h); empty tensors otherwise.
    `scratch` (the autograd backward's direct call only): a _Scratch whose buffers hold everything but
    dh0 and dc0, which the caller consumes before its next call; `h_prev_t`, where h_prev^T goes
    (rows of a wider buffer, row stride n)."""
    K = proj if proj > 0 else hidden
    G = GATES_BY_CODE[mode]
    _require_rows("rnn_backward", reserve=reserve)
    n = reserve.shape[0]
    _require_float("rnn_backward", dy=dy, dh_n=dh_n, dc_n=dc_n, c0=c0)
    dtype = _storage_dtype(dy, dh_n, dc_n, c0, reserve)
    dev = reserve.device
    ws_numel = _sizes(mode, reset_after, hidden, proj, batch, dtype)[2]
    e = lambda *shape: torch.empty(*shape, dtype=dtype, device=dev)
    s = e if scratch is None else (lambda *shape: scratch.take(shape, dtype))
    gru_after = mode == 1 and reset_after
    dgx = s(n, G * hidden)
    dgh = s(n if gru_after and not transposed else 0, G * hidden)
    dproj = s(n if proj > 0 else 0, proj)
    dh0 = e(batch, K)
    dc0 = e(batch if mode == 0 else 0, hidden)
    dgxt = s(G * hidden if transposed else 0, n)
    dght = s(G * hidden if transposed and gru_after else 0, n)
    hpt = h_prev_t if h_prev_t is not None else s(K if transposed else 0, n)
    workspace = torch.empty(ws_numel, dtype=_acc_dtype(dtype), device=dev) if scratch is None else \
        scratch.take((ws_numel,), _acc_dtype(dtype))
    opt = lambda t: capsule(t) if t.numel() else None
    _C.rnn_backward(mode, reset_after, hidden, proj, steps, batch, _none(batch_sizes), _none(time_offsets),
                    _none(lengths), row_stride_t, row_stride_b, reverse, _none(dy), K, _none(dh_n), _none(dc_n),
                    _none(c0), capsule(reserve), capsule(packed), capsule(dgx), opt(dgh), opt(dproj), capsule(dh0),
                    opt(dc0), capsule(workspace), num_threads(), opt(dgxt), opt(dght), opt(hpt))
    return dgx, dgh, dproj, dh0, dc0, dgxt, dght, hpt


def empty_cache() -> None:
    """Releases the calling thread's cached temporaries (_Scratch: the CPU backward's, the inference
    forward's, torch's input projection's; the training forwards' reserve pool) and cell workspaces
    (the Python one, and the compiled step's), the device copies of packed batches' lengths that no
    captured CUDA graph reads (_device_seq), packed batches' host forms (_listed_seq), and every inference
    cache entry (packed weights, folded biases, cell plans, casts) with its weak reference to its
    parameter (param_cache.clear)."""
    param_cache.clear()
    _seq.clear()
    _release_scratch()
    _C.RnnCellStep.release_workspace()


_OP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _require_float(op, **tensors):
    """A raw op's tensors in a dtype some kernel stores (the CPU's entries refuse float16 themselves):
    integer or complex ones had been told only "'dtype' must be ..., got 'int32'", naming no tensor."""
    for arg, t in tensors.items():
        if t is not None and t.dtype not in _OP_DTYPES:
            raise TypeError(f"pyseqkern::{op}: '{arg}' must be float32, float64 or bfloat16 (or float16 on CUDA), "
                            f"got {t.dtype}")


def _require_rows(op, **tensors):
    """A raw op's matrices of sequence rows ([N, cols]): a 0-d x_gates had raised a bare IndexError (a fuzzer,
    stop 32)."""
    for arg, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"pyseqkern::{op}: '{arg}' must be 2-D [rows, columns], got shape {tuple(t.shape)}")


def _storage_dtype(*tensors):
    """The storage dtype of a backward call: that of the first incoming gradient or state given (the
    reserve is float32 for bfloat16 layers, so it only decides when nothing else is there)."""
    for t in tensors[:-1]:
        if t is not None:
            return t.dtype
    return tensors[-1].dtype


LIB.impl("rnn_backward", _backward_impl, "CPU")


@torch.library.register_fake("pyseqkern::rnn_backward")
def _backward_fake(mode, reset_after, hidden, proj, steps, batch, dy, dh_n, dc_n, c0, reserve, packed, batch_sizes,
                   time_offsets, lengths, row_stride_t, row_stride_b, reverse, transposed, isa=None):
    K = proj if proj > 0 else hidden
    G = GATES_BY_CODE[mode]
    _require_rows("rnn_backward", reserve=reserve)
    n = reserve.shape[0]
    dtype = _storage_dtype(dy, dh_n, dc_n, c0, reserve)
    gru_after = mode == 1 and reset_after
    e = lambda *shape: reserve.new_empty(*shape, dtype=dtype)
    return (e(n, G * hidden), e(n if gru_after and not transposed else 0, G * hidden), e(n if proj > 0 else 0, proj),
            e(batch, K), e(batch if mode == 0 else 0, hidden), e(G * hidden if transposed else 0, n),
            e(G * hidden if transposed and gru_after else 0, n), e(K if transposed else 0, n))


def _fold_bias(mode, reset_after, hidden, b_ih, b_hh):
    """The biases that add outside every nonlinearity go into the input GEMM; GRU reset_after keeps
    b_hn apart (it sits inside r * (...))."""
    if mode == "gru" and reset_after and b_hh is not None:
        b_hn = b_hh[2 * hidden:].contiguous()  # the kernel reads it densely; b_hh may be any view
        b_hh = torch.cat([b_hh[: 2 * hidden], b_hh.new_zeros(hidden)])
    else:
        b_hn = None
    if b_ih is None:
        return b_hh, b_hn
    return (b_ih if b_hh is None else b_ih + b_hh), b_hn


def _prepare(mode, reset_after, x2d, w_ih, w_hh, b_ih, b_hh, w_hr, recording, scratch=None, reuse=False,
             narrow_batch=None):
    """What every forward call needs before the kernel: (code, hidden, proj, x_gates, b_hn, packed,
    x_bias). Folded biases and packed weights come from their caches unless autograd records
    (`recording`; then packed weights only where `reuse`, checked: _packed); x_gates (into `scratch`
    where given) and x_bias as rnn_gemms._input_projection gives them."""
    code, hidden, proj, bias, b_hn, packed = _prepare_weights(mode, reset_after, w_hh, b_ih, b_hh, w_hr, recording,
                                                              reuse, narrow_batch)
    x_gates, x_bias = _gemms._input_projection(x2d, w_ih, bias, scratch)
    return code, hidden, proj, x_gates, b_hn, packed, x_bias


def _prepare_weights(mode, reset_after, w_hh, b_ih, b_hh, w_hr, recording, reuse=False, narrow_batch=None):
    """_prepare's part that does not read x: (code, hidden, proj, bias, b_hn, packed), bias the folded
    one the projection adds."""
    code = MODES[mode]
    hidden = w_hh.shape[0] // GATES[mode]
    proj = 0 if w_hr is None else w_hr.shape[0]
    fold = _fold_bias if recording or torch.compiler.is_compiling() else _folded_bias
    bias, b_hn = fold(mode, reset_after, hidden, b_ih, b_hh)
    packed = _packed(code, reset_after, hidden, proj, w_hh, w_hr, recording, reuse, narrow_batch)
    return code, hidden, proj, bias, b_hn, packed


def _check_tensors(op, **args):
    """x, w_ih and w_hh tensors, the rest tensors or None (non-tensors had failed in an attribute lookup:
    'list' object has no attribute 'dtype'; a fuzzer, stop 35)."""
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            required = name in ("x", "w_ih", "w_hh")
            if t is not None or required:
                either = "" if required else " or None"
                raise TypeError(f"pyseqkern.{op}: '{name}' must be a tensor{either}, got {type(t).__name__}")


def _check_flags(op, **flags):
    """The ops' bool arguments (a string had reached the binding, whose error listed its signature)."""
    for name, v in flags.items():
        if not isinstance(v, (bool, int)):
            raise TypeError(f"pyseqkern.{op}: '{name}' must be a bool, got {type(v).__name__}")


def _check_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after):
    if mode not in MODES:
        raise ValueError(f"pyseqkern.rnn_layer: 'mode' must be one of {sorted(MODES)}, got {mode!r}")
    _check_tensors("rnn_layer", x=x, w_ih=w_ih, w_hh=w_hh, batch_sizes=batch_sizes, h0=h0, c0=c0, b_ih=b_ih,
                   b_hh=b_hh, w_hr=w_hr)
    _check_flags("rnn_layer", reverse=reverse, reset_after=reset_after)
    if x.dtype not in DTYPES and x.dtype != torch.float16:
        raise TypeError(f"pyseqkern.rnn_layer: 'x' must be float32, float64, bfloat16 or float16, got {x.dtype}")
    for name, t in (("h0", h0), ("c0", c0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh),
                    ("w_hr", w_hr)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"pyseqkern.rnn_layer: '{name}' has dtype {t.dtype} but 'x' has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"pyseqkern.rnn_layer: '{name}' is on {t.device} but 'x' is on {x.device}")


_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_is_tracing = torch.jit.is_tracing  # (Dynamo folds this one; torch._C._is_tracing breaks its graph)
_c_is_tracing = torch._C._is_tracing  # 45 against 210 ns, where Dynamo never gets (after is_compiling)
_torch_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch >= 2.5)


def _is_exporting() -> bool:
    """torch.export (strict or not) is recording a graph. Under a plain torch.compile, torch 2.9.1 and
    2.11.0 answer is_exporting() True (as they would is_compiling()), so compiled graphs took the
    export route, whose op runs the eager inference caches: a one-element `.data` write between compiled
    calls went unseen (0.0005 off, GRU(5, 64)). The flag torch.export itself sets is asked as well;
    Dynamo reads it as a constant (True under export, False under compile: checked on 2.9.1, 2.11.0, 2.13.0)."""
    return _torch_is_exporting() and getattr(torch.compiler, "_is_exporting_flag", True)


def capturing_graph() -> bool:
    """torch.compile or torch.export (strict or not) is recording a graph: a value read from a tensor
    (Tensor.item()) would break it or fail, so packed batch sizes are not read then."""
    return torch.compiler.is_compiling() or _is_exporting()


def _plain_eager(x: torch.Tensor) -> bool:
    """True when nothing would see a call through the dispatcher: eager mode, a plain CPU tensor, no
    dispatch or function modes, no functorch transforms, no forward-mode AD level, no jit tracing. Then
    an inference call may go straight to the kernel, skipping torch.library dispatch and the
    autograd.Function (about 5 us per call each, which is most of a cell step at batch 1)."""
    return type(x) is torch.Tensor and x.is_cpu and _unobserved()


def _plain_eager_cuda(x: torch.Tensor) -> bool:
    """_plain_eager for a CUDA tensor: an inference call may go straight to the CUDA impl (rnn_cuda.py)."""
    return type(x) is torch.Tensor and x.is_cuda and _unobserved()


def _unobserved() -> bool:
    return (not torch.compiler.is_compiling() and not _c_is_tracing()
            and _dispatch_stack_len is not None and _dispatch_stack_len() == 0
            and _functorch_active is not None and not _functorch_active()
            and not torch._C._is_torch_function_mode_enabled() and _fwad._current_level < 0)


def _shape_error(name, got, want):
    raise ValueError(f"pyseqkern.rnn_layer: '{name}' must have shape {tuple(want)}, got {tuple(got)}")


def _check_shapes(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, empty=False):
    """Everything the kernels index by: a wrong shape here would be an out-of-bounds read there.
    Returns the batch size. `empty`: input_size 0 and hidden_size 0 are allowed (rnn_cell's torch route)."""
    G = GATES[mode]
    if w_ih.dim() != 2 or w_hh.dim() != 2 or w_hh.shape[0] % G or w_hh.shape[0] == 0 and not empty:
        raise ValueError(f"pyseqkern.rnn_layer: 'w_ih' and 'w_hh' must be 2-D with {G}*hidden_size rows, got "
                         f"{tuple(w_ih.shape)} and {tuple(w_hh.shape)}")
    H = w_hh.shape[0] // G
    if w_hr is not None and mode != "lstm":
        raise ValueError("pyseqkern.rnn_layer: 'w_hr' (projection) is only for mode 'lstm'")
    K = H if w_hr is None else w_hr.shape[0]
    if w_hr is not None and (w_hr.dim() != 2 or w_hr.shape[1] != H or not 0 < K < H):
        raise ValueError(f"pyseqkern.rnn_layer: 'w_hr' must be [proj_size, hidden_size] with 0 < proj_size < "
                         f"hidden_size = {H} (w_hh's rows / {G}), got {tuple(w_hr.shape)}")
    I = x.shape[-1]
    if I == 0 and not empty:  # (torch.nn's layers refuse input_size 0 when made; a direct call had failed in a reshape)
        raise ValueError(f"pyseqkern.rnn_layer: 'x' must have at least one feature (input_size >= 1), got shape "
                         f"{tuple(x.shape)}")
    if w_ih.shape != (G * H, I):
        _shape_error("w_ih", w_ih.shape, (G * H, I))
    if w_hh.shape != (G * H, K):
        _shape_error("w_hh", w_hh.shape, (G * H, K))
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and b.shape != (G * H,):
            _shape_error(name, b.shape, (G * H,))
    if batch_sizes is None:
        if x.dim() != 3 or x.shape[0] == 0:
            raise ValueError(f"pyseqkern.rnn_layer: 'x' must be [T, B, I] with T >= 1, got {tuple(x.shape)}")
        B = x.shape[1]
    else:
        bs = batch_sizes  # (malformed packed input is a RuntimeError in torch.nn, so here too)
        if x.dim() != 2 or bs.dim() != 1 or bs.numel() == 0:
            raise RuntimeError("pyseqkern.rnn_layer: packed 'x' must be [N, I] with a 1-D, non-empty 'batch_sizes'")
        if bs.device.type != "cpu" or bs.dtype != torch.int64:
            raise RuntimeError("pyseqkern.rnn_layer: 'batch_sizes' must be an int64 CPU tensor (PackedSequence's)")
        if h0 is not None and (capturing_graph() or type(bs) is not torch.Tensor):
            # Each value read here would be a graph break (Tensor.item()), and a recompile for every new
            # set of lengths (or fail: FakeTensors hold none): the batch comes from h0 (the modules pass
            # zeros for none), and the kernel entry checks batch_sizes against it and x's rows when the
            # graph runs.
            B = h0.shape[0]
        else:
            # (zeros: steps no sequence reaches, which torch.nn runs too; no pack function makes them)
            listable = _seq._listable(bs)
            hit = _seq._listed_seq(bs, x.shape[0]) if listable else None
            if (hit is None) if listable else (
                    bool((bs < 0).any()) or bool((bs[1:] > bs[:-1]).any()) or int(bs.sum()) != x.shape[0]):
                raise RuntimeError("pyseqkern.rnn_layer: 'batch_sizes' must be >= 0, non-increasing and sum "
                                   f"to x.shape[0] = {x.shape[0]}, got {bs.tolist()}")
            B = hit[2].shape[0] if hit is not None else int(bs[0])  # (lengths: a row each)
    if h0 is not None and h0.shape != (B, K):
        _shape_error("h0", h0.shape, (B, K))
    if c0 is not None and mode == "lstm" and c0.shape != (B, H):
        _shape_error("c0", c0.shape, (B, H))
    return B


def _refuse_tracing(op):
    # The trace would hold the kernel's outputs as constants (the thin paths) or the reference's Python
    # loop unrolled to this call's length. The modules hand torch.jit.trace torch.nn's forward instead.
    raise RuntimeError(f"pyseqkern.ops.rnn.{op} cannot be recorded by torch.jit.trace; trace the pyseqkern.nn "
                       "modules (they trace as torch.nn's), or use torch.compile / torch.export")


def _records_gradient(*tensors) -> bool:
    """Whether autograd will want a backward of a layer call with these tensors: decided by the caller,
    where grad mode is visible (inside Function.forward it is off, and under torch.compile
    needs_input_grad is not yet known). Under vmap a BatchedTensor reports requires_grad False even
    where the tensor it maps does (the stacked parameters of an ensemble, stack_module_state): the
    unwrapped tensor is asked too, or the vmap rule's forward saves nothing for the autograd graph
    recorded around vmap."""
    wrapped = _functorch_active is not None and _functorch_active()
    return torch.is_grad_enabled() and any(
        t is not None and (t.requires_grad or (wrapped and _plain(t).requires_grad)) for t in tensors)


_DIRECT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def rnn_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after=True):
    if _is_tracing():
        _refuse_tracing("rnn_layer")
    to = _autocast.target(x) if isinstance(x, torch.Tensor) else None
    if to is not None:  # one op of autocast's lower-precision list (ops/rnn_autocast.py)
        dev = x.device.type
        (x, h0, c0), (w_ih, w_hh, b_ih, b_hh, w_hr) = _autocast.cast_args(to, dev, (x, h0, c0),
                                                                          (w_ih, w_hh, b_ih, b_hh, w_hr))
        with _autocast.off(dev):
            return rnn_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after)
    _check_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after)
    batch = _check_shapes(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if x.dtype == torch.float16 and x.device.type == "cpu":
        # torch.nn runs float16 on the CPU; the CPU kernels have no float16 storage (no fast float16 math
        # there either), so such a layer runs in float32, through casts autograd follows.
        up = [None if t is None else t.float() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)]
        y, h_n, c_n = rnn_layer(mode, up[0], batch_sizes, *up[1:], reverse, reset_after)
        return y.half(), h_n.half(), None if c_n is None else c_n.half()
    if _backend.use_reference("rnn_layer", x.device) or _transformed():
        return _reference.rnn_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after)
    seq = _Seq(x, batch_sizes, reverse, batch)
    x2d = x.reshape(-1, x.shape[-1])
    h0c = None if h0 is None else h0.contiguous()
    c0c = None if (c0 is None or mode != "lstm") else c0.contiguous()
    if c0c is not None and c0c is h0c and torch.compiler.is_compiling():
        c0c = c0c.clone()  # (Dynamo refuses one tensor as two inputs of an autograd.Function: hx=(z, z))
    training = _records_gradient(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if not training and _plain_eager(x) and x2d.shape[0]:  # (no rows, as B=0: no input panel to fill)
        projected = _forward_projecting(mode, reset_after, seq, x2d, h0c, c0c, w_ih, w_hh, b_ih, b_hh, w_hr)
        if projected is not None:
            y, h_n, c_n = projected
            return _rows_as(y, x), h_n, c_n
        chunks = _paths._chunks(seq, x2d, w_hh)
        if chunks:
            y, h_n, c_n = _forward_by_chunks(mode, reset_after, seq, x2d, h0c, c0c, w_ih, w_hh, b_ih, b_hh, w_hr,
                                             chunks)
            return _rows_as(y, x), h_n, c_n
        code, hidden, proj, x_gates, b_hn, packed, x_bias = _prepare(mode, reset_after, x2d, w_ih, w_hh, b_ih, b_hh,
                                                                     w_hr, False, _proj_scratch())
        y, h_n, c_n, _ = _forward_impl(code, reset_after, hidden, proj, seq.steps, seq.batch, x_gates, b_hn, h0c, c0c,
                                       packed, *seq.args(), False, x_bias)
        return _rows_as(y, x), h_n, (c_n if code == 0 else None)
    if not training and x2d.shape[0] and _plain_eager_cuda(x):
        # CUDA inference: the op route's calls (_RnnLayer.forward, then rnn_forward's CUDA impl) made
        # directly. The autograd.Function and the dispatcher's two round trips through Python were ~60% of
        # the host time of a cell step, which at small sizes is the whole step on a GPU (an LSTMCell at
        # B=1, H=256: 0.28 ms a call against torch.nn's 0.07 on the H200, stop 31).
        w_hh, w_hr = w_hh.contiguous(), None if w_hr is None else w_hr.contiguous()
        code, hidden, proj, x_gates, b_hn, packed, x_bias = _prepare(mode, reset_after, x2d, w_ih, w_hh, b_ih, b_hh,
                                                                     w_hr, False)
        y, h_n, c_n, _ = rnn_cuda._forward_cuda(code, reset_after, hidden, proj, seq.steps, seq.batch, x_gates, b_hn,
                                                h0c, c0c, packed, *seq.args(), False, x_bias)
        return _rows_as(y, x), h_n, (c_n if code == 0 else None)
    if (not training and x.shape[0] == 1 and batch_sizes is None and w_hr is None and x.is_cpu
            and torch.compiler.is_compiling() and not _is_exporting() and x.dtype in _DIRECT_DTYPES):
        # A compiled graph's inference step: one op reading the weights as they are (ops/rnn_direct.py).
        # (T = 1 is static here: Dynamo specializes sizes 0 and 1, so this adds no guard.)
        h_n, c_n = torch.ops.pyseqkern.rnn_step_direct(MODES[mode], bool(reset_after), x2d, h0c, c0c, w_ih, w_hh,
                                                        b_ih, b_hh, _backend.compiled_isa())
        return h_n.clone().view(*x.shape[:-1], h_n.shape[-1]), h_n, (c_n if mode == "lstm" else None)
    if _is_exporting():  # (an exported program keeps an op's autograd, not a Function's)
        y, h_n, c_n = torch.ops.pyseqkern.rnn_layer_op(
            MODES[mode], bool(reset_after), x, batch_sizes, h0c, c0c, w_ih, w_hh.contiguous(), b_ih, b_hh,
            None if w_hr is None else w_hr.contiguous(), seq.reverse)
        return y.view(*x.shape[:-1], y.shape[-1]), h_n, (c_n if mode == "lstm" else None)
    y, h_n, c_n, _, _ = _apply(_RnnLayer, mode, bool(reset_after), seq, training, x2d, h0c, c0c, w_ih,
                               w_hh.contiguous(), b_ih, b_hh, None if w_hr is None else w_hr.contiguous())
    return _rows_as(y, x), h_n, c_n


def _rows_as(y, x):
    """A layer's output rows y [N, H] shaped as x's rows: y itself where the shapes agree (packed rows), and
    y resized in place where it is this call's own tensor that nothing records (inference, plain eager), so
    that the module returns no view where torch.nn's output is none (`y.detach_()` raised "Can't detach
    views in-place" there; an auditing helper, stop 60). A recorded output stays a view of the autograd.Function's
    rows: reshaped without one it would cost a copy, or a Function whose output had the caller's shape (its vmap
    rule and its compiled forms work on rows)."""
    shape = (*x.shape[:-1], y.shape[-1])
    if y.shape == shape:
        return y
    return y.resize_(shape) if own_output(y) and y.is_contiguous() else y.view(shape)


def own_output(t) -> bool:
    """Whether an output made in this call may be reshaped in place (resize_, transpose_, unsqueeze_) rather
    than by a view: a plain tensor, no view, that autograd does not record (torch refuses `detach_()` on a
    view, which torch.nn's outputs are not; an auditing helper, stop 60). The caller knows nothing else holds it."""
    return type(t) is torch.Tensor and not t.requires_grad and t._base is None and _unobserved()


# Folded biases for inference, cached like the packed weights (same rules: only when no gradient is
# recorded, keyed by storage and version counter).
_BIAS_CACHE: dict = anchored({})


def _folded_bias(mode, reset_after, hidden, b_ih, b_hh):
    anchor = b_ih if b_ih is not None else b_hh
    if anchor is None:
        return None, None
    return cached(
        _BIAS_CACHE, anchor,
        lambda: (mode, reset_after, hidden, None if b_ih is None else (b_ih.data_ptr(), b_ih._version),
                 None if b_hh is None else (b_hh.data_ptr(), b_hh._version, id(b_hh))),
        lambda: _fold_bias(mode, reset_after, hidden, b_ih, b_hh), b_ih, b_hh)


# Input panels (w_ih packed for forwards that project the input themselves), cached like _PACK_CACHE.
_PACK_IN_CACHE: dict = anchored({})


def _fresh_input_panel(code, reset_after, hidden, w_ih):
    """w_ih's input panel, packed for this call; None where this CPU level has none for its dtype and size."""
    numel = _C.rnn_input_panel_numel(code, reset_after, hidden, w_ih.shape[1], str(w_ih.dtype).split(".")[-1])
    if not numel:
        return None
    panel = torch.empty(numel, dtype=_acc_dtype(w_ih.dtype))
    _C.rnn_pack_input(code, reset_after, hidden, capsule(w_ih.detach().contiguous()), capsule(panel))
    return panel


def _input_panel(code, reset_after, hidden, w_ih):
    """The packed input panel for w_ih, or None where this CPU level has none for its dtype and size."""
    def make():
        return _fresh_input_panel(code, reset_after, hidden, w_ih)

    return cached(_PACK_IN_CACHE, w_ih,
                  lambda: (code, reset_after, hidden, w_ih.data_ptr(), w_ih._version, w_ih.stride(), w_ih.dtype,
                           tuple(w_ih.shape), _backend.active_isa()),
                  make, w_ih)


def _forward_by_chunks(mode, reset_after, seq, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, chunks):
    """(y, h_n, c_n or None) of an inference sequence projected a chunk of steps at a time (rnn_paths._chunks), each
    chunk run by the kernel before the next is projected (from the last chunk back where `reverse`). A
    chunk runs the rows its first step has (packed: batch_sizes[start]) from the states so far, each row
    for its steps inside the chunk (its length past the start, at most the chunk's), forward or reverse
    (rnn.h); the states start as h0 / c0 and each chunk writes its rows' back, so a row that ends (or,
    reverse, starts) in an earlier chunk keeps its own. The same bits as projecting every row first
    wherever torch's GEMM gives a row the same sums at any row count (the tests hold the two to each
    other through oneDNN and MKL)."""
    code, hidden, proj, bias, b_hn, packed = _prepare_weights(mode, reset_after, w_hh, b_ih, b_hh, w_hr, False)
    B, K, dt = seq.batch, (proj if proj > 0 else hidden), x2d.dtype
    y = torch.empty(x2d.shape[0], K, dtype=dt)
    h = h0.clone() if h0 is not None else torch.zeros(B, K, dtype=dt)
    c = (torch.empty(0, hidden, dtype=dt) if code != 0 else c0.clone() if c0 is not None
         else torch.zeros(B, hidden, dtype=dt))
    h_n, c_n = torch.empty(B, K, dtype=dt), torch.empty(B if code == 0 else 0, hidden, dtype=dt)
    bs = seq.batch_sizes
    for s, e in reversed(chunks) if seq.reverse else chunks:
        if bs is None:
            rows, first = B, s * B
            seq_args = (None, None, None, B, 1, seq.reverse)
        else:
            rows, first = int(bs[s]), int(seq.time_offsets[s])
            seq_args = (bs[s:e], seq.time_offsets[s:e] - first, (seq.lengths[:rows] - s).clamp_(max=e - s), 0, 0,
                        seq.reverse)
        n = (e - s) * B if bs is None else int(bs[s:e].sum())
        x_gates, x_bias = _gemms._input_projection(x2d[first:first + n], w_ih, bias, _proj_scratch())
        out = (y[first:first + n], h_n[:rows], c_n[:rows] if code == 0 else c_n)
        _run_forward(code, reset_after, hidden, proj, e - s, rows, x_gates, b_hn, h[:rows],
                     c[:rows] if code == 0 else None, packed, seq_args, False, n, x_bias=x_bias, out=out)
        h[:rows].copy_(out[1])
        if code == 0:
            c[:rows].copy_(out[2])
    return y, h, (c if code == 0 else None)


def _forward_projecting(mode, reset_after, seq, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, recording=False):
    """(y, h_n, c_n or None) of an inference forward whose kernel projects the input, or None where
    torch's GEMM does it (no input panel for this dtype, size and level, or a panel too large).
    `recording`: a plain eager training forward (rnn_paths._records_projecting): (y, h_n, c_n, reserve,
    packed), its packs and folded bias made for the call (training changes the weights between calls)."""
    code = MODES[mode]
    hidden = w_hh.shape[0] // GATES[mode]
    proj = 0 if w_hr is None else w_hr.shape[0]
    path = _paths._projection_path(mode, _sizes(code, reset_after, hidden, proj, seq.batch, x2d.dtype), seq, x2d,
                                   w_ih.dtype, hidden, proj, w_hh.numel() + (0 if w_hr is None else w_hr.numel()))
    if path is None:
        return None
    each_step, ring = path
    if recording:
        ring = False  # (as each step's: x_gates of every row into the buffer, before the steps)
        panel = _fresh_input_panel(code, reset_after, hidden, w_ih)
        if panel is None:
            return None
        bias, b_hn = _fold_bias(mode, reset_after, hidden, b_ih, b_hh)
        packed = _packed(code, reset_after, hidden, proj, w_hh, w_hr, True, narrow_batch=seq.batch)
    else:
        panel = _input_panel(code, reset_after, hidden, w_ih)
        if panel is None:
            return None
        bias, b_hn = _folded_bias(mode, reset_after, hidden, b_ih, b_hh)
        packed = _packed(code, reset_after, hidden, proj, w_hh, w_hr, False)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y, h_n, c_n, reserve = _run_forward(code, reset_after, hidden, proj, seq.steps, seq.batch,
                                        None if bias is None else bias.contiguous(), b_hn, h0, c0, packed, seq.args(),
                                        recording, x2d.shape[0], x=x2d.detach(), panel=panel, each_step=each_step,
                                        ring=ring)
    if recording:
        return y, h_n, (c_n if code == 0 else None), reserve, packed
    return y, h_n, (c_n if code == 0 else None)


def _dense_states(mode, h, c):
    """(h, c) made contiguous where given; c None but for LSTM."""
    return (None if h is None else h.contiguous(),
            None if c is None or mode != "lstm" else c.contiguous())


def rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, reset_after=True, spread=False):
    """One step: a sequence of length 1 through the same kernels. `spread`: the caller runs several
    layers' steps in a row, so the planned step never takes the one-thread shortcut (RnnFwdParams)."""
    to = _autocast.target(x) if type(x) is torch.Tensor else None
    if to is not None:  # as in rnn_layer
        dev = x.device.type
        (x, h, c), (w_ih, w_hh, b_ih, b_hh) = _autocast.cast_args(to, dev, (x, h, c), (w_ih, w_hh, b_ih, b_hh))
        with _autocast.off(dev):
            return rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, reset_after, spread)
    # Both states given, or none (zeros: the kernel reads none; a decoding loop's first step).
    states = None if h is None and c is None else (h,) if mode != "lstm" else (h, c)
    thin_states = states is None or (h is not None and (c is not None or mode != "lstm"))
    if thin_states and type(x) is torch.Tensor and not torch.compiler.is_compiling():
        # Inference with parameters already planned: only this call's own tensors are checked here;
        # anything off goes the full way below, which says what is wrong. (Not while compiling: the
        # plan's lookup compares data pointers, which Dynamo refuses once an eager call made a plan.)
        try:
            fast = _thin.cell_fast(mode, reset_after, x, states, w_ih, w_hh, b_ih, b_hh, spread)
        except AttributeError:  # (a None weight: the checks below name it)
            fast = None
        if fast is not None:
            return fast[0], (fast[1] if mode == "lstm" else None)
    if _is_tracing():  # (never fast while tracing: _plain_eager)
        _refuse_tracing("rnn_cell")
    _check_tensors("rnn_cell", x=x, w_ih=w_ih, w_hh=w_hh, h=h, c=c, b_ih=b_ih, b_hh=b_hh)
    _check_flags("rnn_cell", reset_after=reset_after, spread=spread)
    # The thin inference paths below, or rnn_layer (autograd; also CPU float16, which it runs in float32).
    thin = x.dtype != torch.float16 and (not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, h, c, w_ih, w_hh, b_ih, b_hh)))
    if (thin and thin_states and type(x) is torch.Tensor and x.dim() == 2 and _plain_eager(x)
            and not _backend._REFERENCE_FORCED):
        plan = _thin.cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
        B = x.shape[0]
        if plan is not None and _thin.plan_takes(plan, x, B, plan.input) and all(
                _thin.plan_takes(plan, t, B, plan.hidden) for t in (states or ())):
            # planned, but not for the compiled step (more rows than it projects, or no input panel)
            return _thin.cell_inference(mode, x.contiguous(), *_dense_states(mode, h, c), w_ih, w_hh, b_ih, b_hh,
                                        reset_after, plan)
    if x.dim() != 2:
        raise ValueError(f"pyseqkern.rnn_cell: 'x' must be [B, I], got {tuple(x.shape)}")
    x3 = x.unsqueeze(0)
    try:
        if x.shape[1] == 0 or w_hh.dim() == 2 and w_hh.shape[0] == 0:
            # torch.nn's cells take input_size 0 and hidden_size 0 (its layers refuse both when made); the
            # kernels want features and units, so such a step is the equations in torch's ops (a sweep, stop 56)
            _check_layer(mode, x3, None, h, c, w_ih, w_hh, b_ih, b_hh, None, False, reset_after)
            _check_shapes(mode, x3, None, h, c, w_ih, w_hh, b_ih, b_hh, None, empty=True)
            return _reference.rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, reset_after)
        if thin and thin_states and _plain_eager(x) and not _backend.use_reference("rnn_layer", x.device):
            _check_layer(mode, x3, None, h, c, w_ih, w_hh, b_ih, b_hh, None, False, reset_after)
            _check_shapes(mode, x3, None, h, c, w_ih, w_hh, b_ih, b_hh, None)
            return _thin.cell_inference(mode, x.contiguous(), *_dense_states(mode, h, c), w_ih, w_hh, b_ih, b_hh,
                                        reset_after)
        # (rnn_layer makes the same checks, on the same x3: the same errors)
        y, h_n, c_n = rnn_layer(mode, x3, None, h, c, w_ih, w_hh, b_ih, b_hh, None, False, reset_after)
    except (ValueError, TypeError, RuntimeError) as e:
        renamed = _as_cell_error(e)
        if renamed is e:
            raise
        raise renamed from e
    return h_n, c_n


def _as_cell_error(error):
    """rnn_layer's argument errors from a cell call (rnn_cell checks and runs it as a layer of one step),
    in the cell's names: rnn_cell, h and c (an auditing helper, stop 53: "pyseqkern.rnn_layer: 'h0'
    must have shape (4, 5)" for rnn_cell's h); any other error as it is."""
    prefix = "pyseqkern.rnn_layer: "
    message = str(error)
    if type(error) not in (ValueError, TypeError, RuntimeError) or not message.startswith(prefix):
        return error
    rest = message[len(prefix):].replace("'h0'", "'h'").replace("'c0'", "'c'")
    return type(error)("pyseqkern.rnn_cell: " + rest)


from . import rnn_cuda  # noqa: E402  (registers the CUDA impls of the ops defined above)


# The layer op's autograd.Functions and torch.func rules; they use the helpers above.
from .rnn_autograd import _RnnLayer, _transformed, apply as _apply  # noqa: E402
from . import rnn_versions  # noqa: E402,F401  (fused optimizer steps bump what the caches key on)
from . import rnn_export  # noqa: E402,F401  (the layer as one op with autograd, for torch.export)
from . import rnn_thin as _thin  # noqa: E402  (the thin inference routes; rnn_cell's planned steps)
