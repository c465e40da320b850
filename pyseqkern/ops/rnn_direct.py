"""One recurrent step from the weights as torch holds them: `torch.ops.pyseqkern.rnn_step_direct`.

A compiled graph's inference step (T = 1, CPU, no projection) runs through this op (rnn.rnn_layer):
one call for both products, the gates and the state update, reading each weight once and keeping
nothing between calls. The packed path there cost a pack op checked bit for bit against the weights,
a torch GEMM for the input, an Inductor kernel folding the biases and the forward op: four calls, and
the weights read twice (DESIGN.md "Ops"). Kernel contract: csrc/include/pyseqkern/rnn_direct.h.

The op records no gradient (rnn_layer sends only calls that record none; its Autograd kernel,
rnn_autograd._no_gradient_of_its_own, refuses any other)."""
from __future__ import annotations

import torch

from .. import _C, _backend
from .._handoff import num_threads
from ._library import LIB
from . import rnn_gemms as _gemms
from .rnn_modes import GATES_BY_CODE, NAMES

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 3}

# `isa`: as rnn_pack's (ops/rnn.py), the level a compiled graph was traced at; its sizes do not depend on the
# level, but its bits do (a compiled step ran at the calling thread's level until stop 58).
LIB.define("rnn_step_direct(int mode, bool reset_after, Tensor x, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
           "Tensor? b_ih, Tensor? b_hh, str? isa=None) -> (Tensor, Tensor)")


def _sizes(mode, x, w_ih, w_hh):
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"pyseqkern.rnn_step_direct: 'mode' must be 0 (lstm), 1 (gru), 2 (rnn_tanh) or 3 "
                         f"(rnn_relu), got {mode}")
    G = GATES_BY_CODE[mode]
    if x.dim() != 2 or w_ih.dim() != 2 or w_hh.dim() != 2 or w_hh.shape[0] % G or w_hh.shape[0] == 0:
        raise ValueError(f"pyseqkern.rnn_step_direct: 'x' must be [B, I], 'w_ih' and 'w_hh' 2-D with {G}*hidden "
                         f"rows; got {tuple(x.shape)}, {tuple(w_ih.shape)}, {tuple(w_hh.shape)}")
    H = w_hh.shape[0] // G
    return G, H, x.shape[0], x.shape[1]


def _checked(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    G, H, B, I = _sizes(mode, x, w_ih, w_hh)
    if x.dtype not in _DTYPES:
        raise TypeError(f"pyseqkern.rnn_step_direct: 'x' must be float32, float64 or bfloat16, got {x.dtype}")
    for name, t, want in (("x", x, None), ("h0", h0, (B, H)), ("c0", c0 if mode == 0 else None, (B, H)),
                          ("w_ih", w_ih, (G * H, I)), ("w_hh", w_hh, (G * H, H)), ("b_ih", b_ih, (G * H,)),
                          ("b_hh", b_hh, (G * H,))):
        if t is None:
            continue
        if want is not None and t.shape != want:
            raise ValueError(f"pyseqkern.rnn_step_direct: '{name}' must have shape {want}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"pyseqkern.rnn_step_direct: '{name}' is {t.dtype} but 'x' is {x.dtype}")
        if not t.is_cpu:
            raise ValueError(f"pyseqkern.rnn_step_direct: '{name}' must be a CPU tensor, got {t.device}")
    return G, H, B, I


def _addr(t):
    return 0 if t is None else t.data_ptr()


# Rows up to which the direct step runs, by mode; beyond, the packed kernels do (_packed_step). Each
# weight load feeds one row's FMA here, against 6-8 rows in the packed tiles. Compiled (1, B, 256)
# steps, time packed / direct, medians of 9 in-process alternations: B=4 LSTM 1.86, GRU 1.79, RNN 1.96;
# B=16 1.03 / 1.24 / 1.68; B=32 0.89 / 1.05 / 1.45.
DIRECT_MAX_ROWS = (16, 32, 32, 32)  # lstm, gru, rnn_tanh, rnn_relu


def _packed_step(mode, reset_after, x, h0, c0, w_ih, w_hh, b_ih, b_hh, H, B):
    """The step on the packed kernels, as a compiled graph ran it before this op: the pack op's CPU
    kernel (for a Parameter, the cached pack once checked bit for bit against the weights), torch's GEMM
    for the input, the forward kernel."""
    from . import rnn as _rnn  # (rnn imports this module)
    packed = _rnn._pack_impl(mode, reset_after, H, 0, w_hh, None)
    bias, b_hn = _rnn._fold_bias(NAMES[mode], reset_after, H, b_ih, b_hh)
    x_gates, x_bias = _gemms._input_projection(x, w_ih, bias)
    _, h_n, c_n, _ = _rnn._forward_impl(mode, reset_after, H, 0, 1, B, x_gates, b_hn, h0, c0, packed, None, None,
                                        None, B, 1, False, False, x_bias)
    return h_n, c_n


def _step_impl(mode, reset_after, x, h0, c0, w_ih, w_hh, b_ih, b_hh, isa=None):
    with _backend.at_isa("rnn_step_direct", isa):
        return _step_here(mode, reset_after, x, h0, c0, w_ih, w_hh, b_ih, b_hh)


def _step_here(mode, reset_after, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    G, H, B, I = _checked(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if B > DIRECT_MAX_ROWS[mode]:
        return _packed_step(mode, bool(reset_after), x.contiguous(), None if h0 is None else h0.contiguous(),
                            None if (c0 is None or mode != 0) else c0.contiguous(), w_ih, w_hh, b_ih, b_hh, H, B)
    x, w_ih, w_hh = x.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    h0, b_ih, b_hh = (None if t is None else t.contiguous() for t in (h0, b_ih, b_hh))
    c0 = None if (c0 is None or mode != 0) else c0.contiguous()
    h_n = torch.empty(B, H, dtype=x.dtype)
    c_n = torch.empty(B if mode == 0 else 0, H, dtype=x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ws = torch.empty(3 * B * H, dtype=acc) if (mode == 1 and not reset_after and B) else None
    if B and H:
        _C.rnn_direct_step(mode, bool(reset_after), H, _DTYPES[x.dtype], B, I, _addr(x), _addr(h0), _addr(c0),
                           _addr(w_ih), _addr(w_hh), _addr(b_ih), _addr(b_hh), _addr(h_n),
                           _addr(c_n) if mode == 0 else 0, _addr(ws), num_threads())
    return h_n, c_n


LIB.impl("rnn_step_direct", _step_impl, "CPU")
LIB.impl("rnn_step_direct", _step_impl, "CUDA")  # (CPU only: it says so, naming the argument)


@torch.library.register_fake("pyseqkern::rnn_step_direct")
def _step_fake(mode, reset_after, x, h0, c0, w_ih, w_hh, b_ih, b_hh, isa=None):
    G, H, B, I = _sizes(mode, x, w_ih, w_hh)
    return x.new_empty(B, H), x.new_empty(B if mode == 0 else 0, H)
