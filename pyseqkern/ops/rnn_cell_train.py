"""One cell step that records gradients, in plain eager mode on the CPU: a cell stepped in a training loop
(teacher forcing, attention decoders), and a layer fed one token a call (ops/rnn_thin.py cell_fast sends both).

The general route (rnn_cell -> rnn_layer -> _RnnLayer through the registered ops) pays its checks, op
dispatch and argument binding once per call, which a sequence spreads over its steps and a cell step
does not: at B=1, H=256 a training step of an RNNCell took 2.5x torch.nn's, the Python around the
kernels most of it. _CellStep runs the same pieces as _RnnLayer (folded bias, torch's input GEMM, the
packed weights, the forward kernel; layer_grads for the backward), so the same bits, with the checks
made inline once and nothing else around them. The packed weights are the previous step's where the
kernel finds them still current (_packed's `reuse`). Since stop 23 only bfloat16 steps come here:
float32 and float64 steps are one node each with the weight gradients of a whole loop formed at once
(by_torch, ops/rnn_cell_deferred.py), faster than both this route and torch.nn's (DESIGN.md).

Imported at the end of ops/rnn_thin.py (itself imported at the end of ops/rnn.py), whose helpers it uses.
"""
from __future__ import annotations

import torch

from .. import _backend
from . import rnn_autocast as _autocast
from .rnn import _fold_bias, _packed, _plain_eager, _run_forward
from .rnn_seq import _Seq
from .rnn_thin import cell_step_args
from .rnn_gemms import _input_projection
from .rnn_modes import MODES
from .rnn_scratch import _proj_scratch
from . import rnn_autograd as _autograd
from .rnn_autograd import layer_grads, save_layer, saved_layer
from . import rnn_cell_deferred as _deferred

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_on_cpu = torch.Tensor.is_cpu.__get__  # (t -> t.is_cpu, without a Python frame)


class _CellStep(torch.autograd.Function):
    """(h_n, c_n or None) of one step. Applied only where _plain_eager holds (never under torch.func,
    compilation or tracing), so the plain form with ctx serves. Its backward is _RnnLayer's
    (layer_grads: the kernels, or the reference's graph where create_graph asks for one)."""

    @staticmethod
    def forward(ctx, cfg, x, h, c, w_ih, w_hh, b_ih, b_hh):
        mode, code, reset_after, hidden, _, seq = cfg
        bias, b_hn = _fold_bias(mode, reset_after, hidden, b_ih, b_hh)
        x_gates, x_bias = _input_projection(x, w_ih, bias, _proj_scratch())
        packed = _packed(code, reset_after, hidden, 0, w_hh, None, True, reuse=True)
        _, h_n, c_n, reserve = _run_forward(code, reset_after, hidden, 0, 1, seq.batch, x_gates, b_hn, h, c, packed,
                                            seq.args(), True, seq.batch, x_bias=x_bias)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        save_layer(ctx, (*ctx.needs_input_grad[1:], False), 1, x, c, w_ih, reserve, packed, b_ih, b_hh, h, w_hh,
                   None)
        if code != 0:
            return h_n, None
        return h_n, c_n

    @staticmethod
    def backward(ctx, dh_n, dc_n):
        need = (*ctx.needs_input_grad[1:], False)  # x, h, c, w_ih, w_hh, b_ih, b_hh (and no w_hr)
        with _autocast.off("cpu"):  # (a backward inside an autocast region must not cast its GEMMs)
            grads = layer_grads(ctx.cfg, need, saved_layer(ctx), None, dh_n, dc_n)
        return (None, *grads[:7])


# step() runs only outside torch.func and compilation, where Function.apply ends in torch's C apply after
# unwrapping functorch's dead wrappers (there are none): called directly, 5-10 us less a step. Where
# rnn_autograd found torch's pieces moved, Function.apply.
_apply = _CellStep.apply if _autograd._unwrap_dead is None else super(torch.autograd.Function, _CellStep).apply


def step(mode, reset_after, x, states, w_ih, w_hh, b_ih, b_hh):
    """(h_n,) or (h_n, c_n) of one recorded step through _CellStep, or None where anything differs from a
    plain CPU call whose shapes and dtypes agree (then the general route runs, with its checks and
    errors). states: None (zeros) or (h,) / (h, c). The caller has seen that autograd records."""
    if type(x) is not torch.Tensor or x.dim() != 2 or not _plain_eager(x) or _backend._REFERENCE_FORCED:
        return None
    dtype = x.dtype
    args = None if dtype not in _DTYPES else cell_step_args(mode, x, states, w_ih, w_hh, b_ih, b_hh, _on_cpu)
    if args is None:
        return None
    B, H, h, c = args
    if _autocast.any_enabled():
        return None
    if by_torch(dtype):
        return _deferred.step("gru_before" if mode == "gru" and not reset_after else mode, x, h, c, w_ih, w_hh,
                              b_ih, b_hh)
    seq = _Seq(x.unsqueeze(0), None, False)
    cfg = (mode, MODES[mode], bool(reset_after), H, 0, seq)
    h_n, c_n = _apply(cfg, x.contiguous(), h, c, w_ih, w_hh.contiguous(), b_ih, b_hh)
    return (h_n,) if mode != "lstm" else (h_n, c_n)


def by_torch(dtype) -> bool:
    """Whether a recorded step runs as torch's GEMMs with deferred weight gradients
    (ops/rnn_cell_deferred.py): float32 and float64, every mode. bfloat16 keeps the kernels, which sum in
    float32 where torch rounds each GEMM's output."""
    return dtype in (torch.float32, torch.float64)
