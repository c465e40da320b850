"""convert(model): swap pyseqkern.nn's drop-in modules in for torch.nn's recurrent modules, in place.

The replacement is a new object of the pyseqkern class holding the very same Parameter objects (no
copy, so optimizers, tied weights and anything else referring to them stay valid), with the same
attributes, training mode, device and dtype. Its attribute containers (_parameters, _buffers, the
flat-weight lists, ...) are shallow copies, so later changes to one module do not leak into the
other; the hook dictionaries are shared instead, so hooks registered before conversion keep firing and
their handles still remove them."""
from __future__ import annotations

from torch import nn as _tnn
from torch.nn.utils import parametrize as _parametrize

from . import nn as _pnn
from .nn._twin import rebuild_as

_ACCELERATED = {
    _tnn.LSTM: _pnn.LSTM,
    _tnn.GRU: _pnn.GRU,
    _tnn.RNN: _pnn.RNN,
    _tnn.LSTMCell: _pnn.LSTMCell,
    _tnn.GRUCell: _pnn.GRUCell,
    _tnn.RNNCell: _pnn.RNNCell,
}
_WITH_RESET_AFTER = (_pnn.GRU, _pnn.GRUCell)


def _replacement(module: _tnn.Module, cls: type) -> _tnn.Module:
    new = rebuild_as(module, cls)
    if issubclass(cls, _WITH_RESET_AFTER):
        new.reset_after = True
    return new


# A class's own attributes that type() makes afresh for a new class.
_TYPE_SLOTS = ("__dict__", "__weakref__", "__module__", "__doc__", "__qualname__")


def _accelerated_class(module: _tnn.Module):
    """Our class for this module, or None. Exact types only (subclasses, ours included, may change
    forward), but for the classes torch.nn.utils.parametrize makes (ParametrizedLSTM, one per module,
    a direct subclass holding the parametrized tensors' properties): the same class made over ours, so
    that weight_norm'd or spectral_norm'd layers are accelerated too and remove_parametrizations
    leaves ours behind."""
    kind = type(module)
    cls = _ACCELERATED.get(kind)
    if cls is not None:
        return cls
    bases = kind.__bases__
    if len(bases) == 1 and bases[0] in _ACCELERATED and _parametrize.is_parametrized(module):
        own = {k: v for k, v in kind.__dict__.items() if k not in _TYPE_SLOTS}
        return type(kind.__name__, (_ACCELERATED[bases[0]],), own)
    return None


def _convert(module: _tnn.Module, memo: dict) -> _tnn.Module:
    # memo keeps a module that appears at several places in the tree one module after conversion.
    if id(module) in memo:
        return memo[id(module)]
    cls = _accelerated_class(module)
    if cls is not None:
        result = _replacement(module, cls)
    else:
        result = module
        # (_modules itself: named_children yields a module registered twice under one parent once, and
        # the second name kept torch's module)
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = _convert(child, memo)
            if new_child is not child:
                setattr(module, name, new_child)
    memo[id(module)] = result
    return result


def convert(model: _tnn.Module) -> _tnn.Module:
    """Replace every torch.nn.LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell inside `model` (recursively, in
    place) by its pyseqkern.nn counterpart sharing the same parameters; returns `model`, or the
    replacement when `model` itself is one of those modules."""
    if not isinstance(model, _tnn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    return _convert(model, {})
