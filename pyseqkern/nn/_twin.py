"""One module rebuilt as another class over the same Parameters, and TorchScript through torch.nn.

`rebuild_as` serves pyseqkern.convert (torch.nn -> ours) and TorchScript (ours -> torch.nn): the new
object holds the very same Parameter objects (no copy: optimizers and tied weights stay valid), with
shallow copies of the attribute containers and the hook dictionaries shared.

TorchScript (torch.jit.script and torch.jit.trace; deprecated in torch, still how many models ship to
C++) cannot compile our Python forward, and tracing it would unroll the Python loops of the
reference into a graph fixed to one sequence length. So both see torch.nn's own module instead: a
scripted model holds torch.nn's scripted forward, a traced one aten::lstm / gru / rnn_* (and the cells'
ops), over the same Parameters; either loads without pyseqkern and runs at torch's speed. GRU and
GRUCell with reset_after=False have no torch.nn counterpart and refuse with an error saying so."""
from __future__ import annotations

import copy

import torch
from torch import nn as _tnn

_TORCH_RNN_CLASSES = (_tnn.LSTM, _tnn.GRU, _tnn.RNN, _tnn.LSTMCell, _tnn.GRUCell, _tnn.RNNCell)


def rebuild_as(module: _tnn.Module, cls: type) -> _tnn.Module:
    new = cls.__new__(cls)
    state = {}
    for key, value in module.__dict__.items():
        if isinstance(value, (dict, list, set)) and "hooks" not in key:
            value = copy.copy(value)
        state[key] = value
    # __dict__ is filled directly: going through __setattr__ would re-register (and re-check) every
    # parameter and submodule on a half-built module.
    new.__dict__.update(state)
    return new


def _torch_class(module) -> type:
    return next(c for c in type(module).__mro__ if c in _TORCH_RNN_CLASSES)


def _refuse(module, what: str):
    raise RuntimeError(
        f"{type(module).__name__}(reset_after=False) has no torch.nn counterpart, so {what} cannot record "
        f"it. torch.compile and torch.export can: pyseqkern's ops are registered with torch.library")


class TorchScriptable:
    """Mixin for the drop-in modules: TorchScript gets the torch.nn twin (module docstring)."""

    def __prepare_scriptable__(self):  # called by torch.jit.script on every submodule
        if not getattr(self, "reset_after", True):
            _refuse(self, "torch.jit.script")
        twin = rebuild_as(self, _torch_class(self))
        twin.__dict__.pop("reset_after", None)
        if hasattr(twin, "_init_flat_weights"):  # torch's scripted forward reads _flat_weights as they stand
            twin._init_flat_weights()
        return twin

    def _traced_forward(self, *args):
        """forward while torch.jit.trace or torch.onnx.export records: torch.nn's forward on the same
        parameters."""
        if not getattr(self, "reset_after", True):
            _refuse(self, "torch.onnx.export" if onnx_exporting() else "torch.jit.trace")
        return _torch_class(self).forward(self, *args)


is_tracing = torch.jit.is_tracing  # (Dynamo folds this one; torch._C._is_tracing breaks its graph)
def _onnx_flags_reader():
    """A function reading whether torch.onnx.export (either exporter) runs: its two flags directly (the
    attributes, not their properties: Dynamo refuses to call into torch.onnx, and the ONNX exporter
    may trace with Dynamo), or where they moved in another torch, the public check."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        _flags._is_onnx_exporting, GLOBALS._in_onnx_export  # noqa: B018  (still there?)
        return lambda: GLOBALS._in_onnx_export or _flags._is_onnx_exporting
    except (ImportError, AttributeError):
        try:
            import torch.onnx
            return torch.onnx.is_in_onnx_export
        except ImportError:  # (no exporter, no export)
            return lambda: False


# Resolved at import (35 ms, torch.onnx's own import), not on first use: resolved lazily, the first call
# under torch.compile assigned this global while Dynamo traced, so the graph guarded on its old value
# (None) and the next call recompiled (`fail_on_recompile` raised; found by a compile test that ran
# alone, stop 23).
_onnx_flags = _onnx_flags_reader()


def onnx_exporting() -> bool:
    """torch.onnx.export (either exporter) is running. The ONNX exporters translate torch.nn's layers
    (aten::lstm / gru / rnn_*, the cells' ops) to ONNX's LSTM, GRU and RNN, and know nothing of
    pyseqkern's ops: the default (dynamo) exporter failed on them ("No ONNX function found for
    pyseqkern.rnn_pack"; found by an interop sweep, stop 18), so the modules hand it torch.nn's forward
    as they do TorchScript. (torch.onnx.is_in_onnx_export() cost 2 us a call: two imports.)"""
    return _onnx_flags()


def torch_nn_records() -> bool:
    """A recorder that knows torch.nn's layers and not pyseqkern's ops is running (TorchScript tracing,
    ONNX export): the modules hand it torch.nn's forward."""
    return is_tracing() or onnx_exporting()


# torch.fx.symbolic_trace keeps torch.nn's modules as leaves (one call_module node: its default
# is_leaf_module asks whether the class's __module__ starts with "torch.nn") and traces into every other
# module's forward, where ours met Proxies: any model holding one failed to trace (found by an interop
# sweep, stop 18). Called with a Proxy, a forward records itself as that leaf node instead.
FxProxy = torch.fx.Proxy


def fx_leaf(module, *args):
    tracer = args[0].tracer
    name = tracer.path_of_module(module)
    if not name:  # (the traced root: torch.nn's own fails here too, on its Python control flow)
        raise RuntimeError(f"torch.fx cannot trace a {type(module).__name__} as the root module; trace a model "
                           "that holds it (it becomes one call_module node, as torch.nn's does)")
    while args[-1] is None:  # (hx=None as torch.nn's node records it: not at all)
        args = args[:-1]
    return tracer.create_proxy("call_module", name, args, {})
