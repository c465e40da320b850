"""One layer and direction as one op with registered autograd, for torch.export.

torch.export records the ops an autograd.Function runs but not the Function itself, so a program
exported from _RnnLayer held the raw kernels (rnn_pack of the detached weights, rnn_forward), which have
no autograd: a backward through the program gave no gradient to the input, the states or any weight,
only torch's warning (found in stop 18). Under export, rnn_layer calls this op instead; its autograd is
torch.library's, which an exported program keeps, and its backward is the kernels' (_kernel_grads),
as in eager training.

rnn_layer_op(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, training)
  Arguments as ops/rnn.py's rnn_layer, with mode its code (MODES). x [T, B, I], or packed [N, I] with
  batch_sizes. `training`: keep what a backward needs (decided when the program is exported: under
  torch.no_grad(), or with nothing requiring a gradient, the program keeps nothing and a backward through
  it raises). Returns y [rows, Hout], h_n [B, Hout], c_n [B, H] (LSTM) or [0, H], and two tensors only
  autograd reads (the reserve and the packed weights; empty without `training`).
"""
from __future__ import annotations

import torch

from .rnn import _acc_dtype, _sizes, _Seq, GATES_BY_CODE, LIB, MODES
from .rnn_autograd import _kernel_grads, _RnnLayer

_NAMES = {code: name for name, code in MODES.items()}

LIB.define(
    "rnn_layer_op(int mode, bool reset_after, Tensor x, Tensor? batch_sizes, Tensor? h0, Tensor? c0, Tensor w_ih, "
    "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool training) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _impl(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, training):
    seq = _Seq(x, batch_sizes, reverse)
    y, h_n, c_n, reserve, packed = _RnnLayer.forward(_NAMES[mode], reset_after, seq, training,
                                                     x.reshape(-1, x.shape[-1]), h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    empty = y.new_empty(0, dtype=_acc_dtype(y.dtype))
    # Outputs are fresh tensors: without `training` the packed weights are the cache's own (and the
    # "reserve" an empty stand-in for it), which must not leave.
    return (y, h_n, c_n if c_n is not None else y.new_empty(0, w_hh.shape[0] // GATES_BY_CODE[mode]),
            reserve if training else empty, packed if training else empty.clone())


LIB.impl("rnn_layer_op", _impl, "CPU")
LIB.impl("rnn_layer_op", _impl, "CUDA")


@torch.library.register_fake("pyseqkern::rnn_layer_op")
def _fake(mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, training):
    # (the weights' sizes as ints: they name a packed layout; symbolic, as aot's dynamic tracing makes
    # every size, they would specialize anyway)
    hidden = int(w_hh.shape[0]) // GATES_BY_CODE[mode]
    proj = 0 if w_hr is None else int(w_hr.shape[0])
    K = proj if proj > 0 else hidden
    if batch_sizes is None:
        rows, batch = x.shape[0] * x.shape[1], x.shape[1]
    else:  # (the batch is data: the first batch size)
        rows, batch = x.shape[0], torch.library.get_ctx().new_dynamic_size()
    acc = _acc_dtype(x.dtype)
    sizes = _sizes(mode, reset_after, hidden, proj, 1, x.dtype)  # (widths that do not depend on the batch)
    packed_numel = sizes[1]
    if x.device.type == "cuda":
        from . import rnn_cuda
        packed_numel = rnn_cuda.sizes(mode, reset_after, hidden, proj, 1, x.dtype)[1]
    return (x.new_empty(rows, K), x.new_empty(batch, K), x.new_empty(batch if mode == 0 else 0, hidden),
            x.new_empty(rows if training else 0, sizes[3], dtype=acc),
            x.new_empty(packed_numel if training else 0, dtype=acc))


def _setup_context(ctx, inputs, output):
    mode, reset_after, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, training = inputs
    _, _, _, reserve, packed = output
    ctx.mark_non_differentiable(reserve, packed)
    ctx.set_materialize_grads(False)
    hidden = w_hh.shape[0] // GATES_BY_CODE[mode]
    ctx.cfg = (_NAMES[mode], mode, reset_after, hidden, 0 if w_hr is None else w_hr.shape[0])
    ctx.training, ctx.reverse, ctx.batch = training, reverse, output[1].shape[0]
    ctx.save_for_backward(x, batch_sizes, c0, w_ih, reserve, packed)


def _backward(ctx, dy, dh_n, dc_n, _reserve, _packed):
    if not ctx.training:
        raise RuntimeError(
            "pyseqkern: this recurrent layer was exported without gradients (under torch.no_grad() or with "
            "nothing requiring one), so the program kept nothing a backward needs; export it with gradients "
            "enabled to train it")
    x, batch_sizes, c0, w_ih, reserve, packed = ctx.saved_tensors
    # (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr): the op's arguments 2 and 4..10
    need = (ctx.needs_input_grad[2],) + tuple(ctx.needs_input_grad[4:11])
    dy = None if dy is None else dy.reshape(-1, dy.shape[-1])
    if ctx.cfg[1] != 0:
        dc_n = None  # (the empty c_n of GRU and RNN)
    cfg = ctx.cfg + (_Seq(x, batch_sizes, ctx.reverse, ctx.batch),)
    grads = _kernel_grads(cfg, need, (x.reshape(-1, x.shape[-1]), c0, w_ih, reserve, packed), dy, dh_n, dc_n)
    dx = None if grads[0] is None else grads[0].view(x.shape)
    return (None, None, dx, None, *grads[1:], None, None)


torch.library.register_autograd("pyseqkern::rnn_layer_op", _backward, setup_context=_setup_context)
