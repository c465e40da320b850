"""One layer and direction as one op with an autograd kernel of its own, for torch.export.

torch.export records the ops an autograd.Function runs but not the Function itself, so a program
exported from _RnnLayer held the raw kernels (rnn_pack of the detached weights, rnn_forward), which have
no autograd: a backward through the program gave no gradient to the input, the states or any weight,
only torch's warning (found in stop 18). Under export, rnn_layer records this op instead. Its Autograd
kernel runs when the program does, and is the eager call, rnn_layer: training with a reserve where a
gradient will be recorded, the inference paths where none will. So the program trains and infers like
the module, however it was exported.

rnn_layer_op(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
  Arguments as ops/rnn.py's rnn_layer, with mode its code (MODES); h0 and c0 contiguous or None.
  x [T, B, I], or packed [N, I] with batch_sizes. Returns y [rows, Hout], h_n [B, Hout], and c_n [B, H]
  (LSTM) or [0, H].
"""
from __future__ import annotations

import torch

from ._library import LIB
from .rnn import _check_layer, _check_shapes, _plain_eager, _records_gradient, rnn_cell, rnn_layer
from .rnn_seq import _Seq
from .rnn_autograd import _RnnLayer
from .rnn_modes import GATES_BY_CODE, MODES, NAMES


class _Names(dict):
    """mode code -> name; an unknown code is a ValueError naming the argument (was a bare KeyError)."""

    def __missing__(self, mode):
        raise ValueError(f"pyseqkern::rnn_layer_op: 'mode' must be 0 (lstm), 1 (gru), 2 (rnn_tanh) or 3 (rnn_relu), "
                         f"got {mode!r}")


_NAMES = _Names(enumerate(NAMES))

LIB.define(
    "rnn_layer_op(int mode, bool reset_after, Tensor x, Tensor? batch_sizes, Tensor? h0, Tensor? c0, Tensor w_ih, "
    "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse) -> (Tensor, Tensor, Tensor)"
)


def _layer(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """The eager layer call: rnn_layer itself when the program runs (its fastest inference paths), and
    _RnnLayer while something traces (rnn_layer would record this op again)."""
    if not torch.compiler.is_compiling():
        if (batch_sizes is None and x.shape[0] == 1 and w_hr is None and type(x) is torch.Tensor
                and not _records_gradient(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)):
            # One step of an exported program (a decoding loop's, or a cell's), for inference: the planned
            # cell step, as the modules take in eager mode. (y and h_n are one tensor there; an op's
            # outputs may not alias.)
            h_n, c_n = rnn_cell(_NAMES[mode], x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, reset_after)
            return h_n.clone(), h_n, c_n if c_n is not None else _no_c(h_n, w_hh, mode)
        y, h_n, c_n = rnn_layer(_NAMES[mode], x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                reset_after)
        return y.view(-1, y.shape[-1]), h_n, c_n if c_n is not None else _no_c(y, w_hh, mode)
    training = _records_gradient(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    batch = None if batch_sizes is None or h0 is None else h0.shape[0]  # (packed: not read from batch_sizes)
    y, h_n, c_n, _, _ = _RnnLayer.apply(_NAMES[mode], reset_after, _Seq(x, batch_sizes, reverse, batch), training,
                                        x.reshape(-1, x.shape[-1]), h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    return y, h_n, c_n if c_n is not None else _no_c(y, w_hh, mode)


def _no_c(y, w_hh, mode):
    return y.new_empty(0, w_hh.shape[0] // GATES_BY_CODE[mode])  # (an op returns tensors: GRU's, RNN's c_n)


def _autograd(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """The Autograd kernel. Where no gradient will be recorded the op goes on below autograd as itself:
    ExportedProgram.run_decompositions() retraces the program through this key with gradients off, and
    running _RnnLayer here recorded its raw kernels (rnn_pack, rnn_forward) in place of this op, which
    have no autograd: the decomposed program's backward gave no gradient at all (torch's warning only).
    (Where nothing traces, as when a program runs, the redispatch is skipped: _layer is what it reaches.)"""
    if not _records_gradient(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) and not _plain_eager(x):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.pyseqkern.rnn_layer_op(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                    w_hr, reverse)
    return _layer(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)


@torch.library.register_fake("pyseqkern::rnn_layer_op")
def _layer_fake(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """Shapes only, from the arguments' shapes. (Running _layer on fake tensors, as the Meta kernel did
    until stop 26, recursed without end in the copy of batch_sizes where the decomposed program's retrace
    reached it.) A packed batch without h0 is a size only the data holds."""
    _check_layer(_NAMES[mode], x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after)
    if batch_sizes is None or h0 is not None:
        batch = _check_shapes(_NAMES[mode], x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    else:
        batch = torch.library.get_ctx().new_dynamic_size()
    hidden = w_hh.shape[0] // GATES_BY_CODE[mode]
    out = hidden if w_hr is None else w_hr.shape[0]
    rows = x.shape[0] if batch_sizes is not None else x.shape[0] * x.shape[1]
    return x.new_empty(rows, out), x.new_empty(batch, out), x.new_empty(batch if mode == MODES["lstm"] else 0, hidden)


# At the Autograd key _layer is the op's autograd (what torch.export keeps); below it (inference_mode,
# which skips autograd, a trace that does, or _autograd with no gradient to record) it runs the same
# code, which decides by grad mode and requires_grad as an eager call does.
LIB.impl("rnn_layer_op", _autograd, "Autograd")
for _key in ("CPU", "CUDA"):
    LIB.impl("rnn_layer_op", _layer, _key)
