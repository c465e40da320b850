"""Drop-in LSTMCell, GRUCell and RNNCell: torch.nn's classes with a forward that is one
pyseqkern.ops.rnn.rnn_cell call (TorchScript gets torch.nn's forward: _twin.py)."""
from __future__ import annotations

from torch import nn as _tnn

from ._cell import cell_forward
from ._checks import ResetAfter, split_lstm_hx
from ._conversion import SwapsParameters
from ._twin import FxProxy, TorchScriptable, fx_leaf


class LSTMCell(TorchScriptable, SwapsParameters, _tnn.LSTMCell):
    """torch.nn.LSTMCell on pyseqkern kernels."""

    def forward(self, input, hx=None):
        if isinstance(input, FxProxy):
            return fx_leaf(self, input, hx)
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                split_lstm_hx("LSTMCell", hx)  # raises, with torch.nn's exception type (the thin check
                # above keeps the cells' hot path free of split_lstm_hx's per-element checks)
            hx = tuple(hx)
        return cell_forward(self, "LSTMCell", "lstm", input, hx)


class GRUCell(ResetAfter, TorchScriptable, SwapsParameters, _tnn.GRUCell):
    """torch.nn.GRUCell on pyseqkern kernels; reset_after (keyword-only) as in pyseqkern.nn.GRU."""

    def forward(self, input, hx=None):
        if isinstance(input, FxProxy):
            return fx_leaf(self, input, hx)
        return cell_forward(self, "GRUCell", "gru", input, None if hx is None else (hx,), self.reset_after)[0]


class RNNCell(TorchScriptable, SwapsParameters, _tnn.RNNCell):
    """torch.nn.RNNCell (tanh or relu) on pyseqkern kernels."""

    def forward(self, input, hx=None):
        if isinstance(input, FxProxy):
            return fx_leaf(self, input, hx)
        if self.nonlinearity == "tanh":
            mode = "rnn_tanh"
        elif self.nonlinearity == "relu":
            mode = "rnn_relu"
        else:  # torch's constructor accepts any string and fails here, so do we
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return cell_forward(self, "RNNCell", mode, input, None if hx is None else (hx,))[0]
