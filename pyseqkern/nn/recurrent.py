"""Drop-in LSTM, GRU and RNN: torch.nn's classes (constructor, parameters, state_dict, repr) with a
forward that runs each layer and direction as one pyseqkern.ops.rnn.rnn_layer call (TorchScript gets
torch.nn's forward: _twin.py)."""
from __future__ import annotations

from torch import nn as _tnn

from ._checks import ResetAfter
from ._sequence import sequence_forward
from ._conversion import SwapsParameters
from ._twin import FxProxy, TorchScriptable, fx_leaf, torch_nn_records


class LSTM(TorchScriptable, SwapsParameters, _tnn.LSTM):
    """torch.nn.LSTM (proj_size included) on pyseqkern kernels."""

    def forward(self, input, hx=None):
        if torch_nn_records():
            return self._traced_forward(input, hx)
        if isinstance(input, FxProxy):
            return fx_leaf(self, input, hx)
        output, h_n, c_n = sequence_forward(self, input, hx)
        return output, (h_n, c_n)


class GRU(ResetAfter, TorchScriptable, SwapsParameters, _tnn.GRU):
    """torch.nn.GRU on pyseqkern kernels.

    reset_after (keyword-only, default True): True is torch's/cuDNN's candidate
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); False applies the reset gate before the recurrent
    product, n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), as Keras reset_after=False and ONNX's
    default (linear_before_reset=0) do. Parameter shapes and names are the same either way."""

    def forward(self, input, hx=None):
        if torch_nn_records():
            return self._traced_forward(input, hx)
        if isinstance(input, FxProxy):
            return fx_leaf(self, input, hx)
        output, h_n, _ = sequence_forward(self, input, hx, self.reset_after)
        return output, h_n


class RNN(TorchScriptable, SwapsParameters, _tnn.RNN):
    """torch.nn.RNN (tanh or relu) on pyseqkern kernels."""

    def forward(self, input, hx=None):
        if torch_nn_records():
            return self._traced_forward(input, hx)
        if isinstance(input, FxProxy):
            return fx_leaf(self, input, hx)
        output, h_n, _ = sequence_forward(self, input, hx)
        return output, h_n
