"""TorchScript: torch.jit.script and torch.jit.trace of models holding the drop-in modules record
torch.nn's own modules over the same Parameters (pyseqkern/nn/_twin.py): same results as eager at every
sequence length, saved and loaded without pyseqkern's ops, gradients into the shared Parameters. GRU
with reset_after=False and direct op calls refuse with an error that says why."""
import io
import warnings

import pytest
import torch

import pyseqkern
import pyseqkern.nn as pnn

F64 = torch.float64


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = pnn.LSTM(8, 6, num_layers=2, bidirectional=True, proj_size=3)
        self.gru = pnn.GRU(6, 5, batch_first=True)
        self.rnn = pnn.RNN(5, 5, nonlinearity="relu")
        self.lstm_cell = pnn.LSTMCell(5, 4)
        self.gru_cell = pnn.GRUCell(4, 4)
        self.rnn_cell = pnn.RNNCell(4, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        z, h = self.gru(y.transpose(0, 1))
        r, _ = self.rnn(z.transpose(0, 1), h)
        hc, cc = self.lstm_cell(r[-1])
        g = self.gru_cell(hc)
        return self.rnn_cell(g, None) + cc.sum()


def _eager_twin():
    torch.manual_seed(0)
    model = _Model().to(F64)
    eager = _Model().to(F64)  # an untouched copy: scripting rewrites the module tree it is given
    eager.load_state_dict(model.state_dict())
    return model, eager


@pytest.mark.parametrize("how", ["script", "trace"])
def test_scripted_and_traced_models_match_eager_at_every_length(how):
    model, eager = _eager_twin()
    x = torch.randn(5, 3, 8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.jit.script(model) if how == "script" else torch.jit.trace(model, (x,))
    buf = io.BytesIO()
    torch.jit.save(compiled, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for shape in ((5, 3, 8), (11, 2, 8), (1, 1, 8)):
        z = torch.randn(*shape, dtype=F64)
        want = eager(z)
        torch.testing.assert_close(compiled(z), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loaded(z), want, rtol=1e-12, atol=1e-12)
    compiled(x).sum().backward()  # into the very Parameters the eager model holds
    assert all(p.grad is not None for p in model.parameters())


def test_scripting_swaps_torch_nn_modules_into_the_tree_and_convert_restores():
    # torch's __prepare_scriptable__ protocol replaces submodules in the scripted module's own tree; the
    # README says so, and convert() brings the accelerated modules back over the same Parameters.
    model, _ = _eager_twin()
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model)
    assert type(model.lstm) is torch.nn.LSTM and type(model.gru_cell) is torch.nn.GRUCell
    pyseqkern.convert(model)
    assert type(model.lstm) is pnn.LSTM and type(model.gru_cell) is pnn.GRUCell
    assert all(a is b for a, b in zip(model.parameters(), params))


@pytest.mark.parametrize("cls", ["GRU", "GRUCell"])
def test_reset_before_has_no_torchscript_twin(cls):
    m = getattr(pnn, cls)(4, 3, reset_after=False)
    x = torch.randn(2, 1, 4) if cls == "GRU" else torch.randn(1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(RuntimeError, match=r"reset_after=False\) has no torch.nn counterpart, so torch.jit.script"):
            torch.jit.script(m)
        with pytest.raises(RuntimeError, match=r"reset_after=False\) has no torch.nn counterpart, so torch.jit.trace"):
            torch.jit.trace(m, (x,))


@pytest.mark.parametrize("op", ["rnn_layer", "rnn_cell"])
def test_tracing_an_op_directly_is_refused(op):
    # A trace of the thin paths would hold the kernel's outputs as constants.
    w_ih, w_hh = torch.randn(9, 4), torch.randn(9, 3)
    if op == "rnn_layer":
        def f(x):
            return pyseqkern.ops.rnn.rnn_layer("gru", x, None, None, None, w_ih, w_hh, None, None, None, False)[0]
        x = torch.randn(2, 1, 4)
    else:
        def f(x):
            return pyseqkern.ops.rnn.rnn_cell("gru", x, torch.randn(1, 3), None, w_ih, w_hh, None, None)[0]
        x = torch.randn(1, 4)
    with pytest.raises(RuntimeError, match=rf"pyseqkern.ops.rnn.{op} cannot be recorded by torch.jit.trace"):
        torch.jit.trace(f, (x,))
