"""Reference for the recurrent ops (pyseqkern.ops.rnn), written from the cell equations.

Plain matmul and pointwise torch functions only (never torch.nn's RNN modules, their cells or _VF), a
Python loop over time steps, no in-place updates: it runs in any float dtype and autograd
differentiates it, so float64 runs of it are both the test oracle and a gradcheck target.
Shapes and semantics: the docstring of pyseqkern/ops/rnn.py.

Gate rows follow torch's layout: lstm i, f, g, o; gru r, z, n; rnn a single block."""
from __future__ import annotations

import torch

MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _linear(x, w, b):
    y = x @ w.t()
    return y if b is None else y + b


def _gru(x, h, w_ih, w_hh, b_ih, b_hh, reset_after):
    x_r, x_z, x_n = _linear(x, w_ih, b_ih).chunk(3, dim=1)
    w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
    b_hr, b_hz, b_hn = (None, None, None) if b_hh is None else b_hh.chunk(3, dim=0)
    r = torch.sigmoid(x_r + _linear(h, w_hr, b_hr))
    z = torch.sigmoid(x_z + _linear(h, w_hz, b_hz))
    if reset_after:
        n = torch.tanh(x_n + r * _linear(h, w_hn, b_hn))
    else:
        n = torch.tanh(x_n + _linear(r * h, w_hn, b_hn))
    return (1 - z) * n + z * h


def _step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, reset_after):
    """One time step of one cell; w_hr (lstm projection) maps o * tanh(c') to the emitted h'."""
    if mode == "lstm":
        gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        return h_new, c_new
    if mode == "gru":
        return _gru(x, h, w_ih, w_hh, b_ih, b_hh, reset_after), None
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    if mode == "rnn_tanh":
        return torch.tanh(pre), None
    if mode == "rnn_relu":
        return torch.relu(pre), None
    raise ValueError(f"unknown recurrent mode {mode!r}; expected one of {MODES}")


def _zero_states(mode, batch, x, h, c, w_hh, w_hr):
    """The ops take h (and c) None for zeros, as torch.nn takes hx None."""
    gates = {"lstm": 4, "gru": 3}.get(mode, 1)
    if h is None:
        h = x.new_zeros(batch, w_hh.shape[1] if w_hr is None else w_hr.shape[0])
    if c is None and mode == "lstm":
        c = x.new_zeros(batch, w_hh.shape[0] // gates)
    return h, c


def rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, reset_after=True):
    """One step: x [B, I], h [B, H] or None (zeros), c [B, H] (lstm) or None -> (h' [B, H], c' [B, H] or None)."""
    h, c = _zero_states(mode, x.shape[0], x, h, c, w_hh, None)
    return _step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, None, reset_after)


def rnn_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after=True):
    """One layer, one direction over a time-major [T, B, I] or packed [N, I] input -> (y, h_n, c_n);
    h0 and c0 None are zeros."""
    if mode not in MODES:
        raise ValueError(f"unknown recurrent mode {mode!r}; expected one of {MODES}")
    packed = batch_sizes is not None
    if packed:
        sizes = [int(s) for s in batch_sizes.tolist()]
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        steps = [x[o:o + s] for o, s in zip(offsets, sizes)]
    else:
        sizes = [x.shape[1]] * x.shape[0]
        steps = list(x.unbind(0))

    h, c = _zero_states(mode, (sizes[0] if sizes else 0) if packed else x.shape[1], x, h0, c0, w_hh, w_hr)
    ys = [None] * len(steps)
    # Batch sizes never grow, so the rows active at step t are always the first sizes[t] rows, and a row
    # that is inactive keeps its state untouched. Going forward, a row stops after its last step and keeps
    # its final state; going backward, a row is untouched (still h0) until its own last step, which is
    # where its reversed sequence starts. The same "update the leading rows" rule covers both.
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    for t in order:
        n = sizes[t]
        h_new, c_new = _step(mode, steps[t], h[:n], None if c is None else c[:n],
                             w_ih, w_hh, b_ih, b_hh, w_hr, reset_after)
        ys[t] = h_new
        h = torch.cat([h_new, h[n:]], dim=0)
        if c is not None:
            c = torch.cat([c_new, c[n:]], dim=0)

    hout = h.shape[1]
    if not steps:
        y = x.new_empty((0, hout) if packed else (0, x.shape[1], hout))
    else:
        y = torch.cat(ys, dim=0) if packed else torch.stack(ys, dim=0)
    return y, h, (c if mode == "lstm" else None)
