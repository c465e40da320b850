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

from .rnn import _records_gradient, _Seq, GATES_BY_CODE, LIB, MODES, rnn_layer
from .rnn_autograd import _RnnLayer

_NAMES = {code: name for name, code in MODES.items()}

LIB.define(
    "rnn_layer_op(int mode, bool reset_after, Tensor x, Tensor? batch_sizes, Tensor? h0, Tensor? c0, Tensor w_ih, "
    "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse) -> (Tensor, Tensor, Tensor)"
)


def _layer(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """The eager layer call: rnn_layer itself when the program runs (its fastest inference paths), and
    _RnnLayer while something traces (rnn_layer would record this op again)."""
    if not torch.compiler.is_compiling():
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


# One function for every key. At the Autograd key it is the op's autograd (what torch.export keeps);
# below it (inference_mode, which skips autograd, or a trace that does) it runs the same code, which
# decides by grad mode and requires_grad as an eager call does. Fake and meta tensors take it too:
# _RnnLayer's ops have fake impls.
for _key in ("Autograd", "CPU", "CUDA", "Meta"):
    LIB.impl("rnn_layer_op", _layer, _key)
