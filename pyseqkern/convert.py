"""convert(model): swap pyseqkern.nn's drop-in modules in for torch.nn's recurrent modules, in place.

The replacement is a new object of the pyseqkern class holding the very same Parameter objects (no
copy, so optimizers, tied weights and anything else referring to them stay valid), with the same
attributes, training mode, device and dtype. Its attribute containers (_parameters, _buffers, the
flat-weight lists, ...) are shallow copies, so later changes to one module do not leak into the
other; the hook dictionaries are shared instead, so hooks registered before conversion keep firing and
their handles still remove them."""
from __future__ import annotations

import warnings

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


def _replacement(module: _tnn.Module, cls: type, name: str) -> _tnn.Module:
    new = rebuild_as(module, cls)
    if issubclass(cls, _WITH_RESET_AFTER):
        new.reset_after = True
    _rebind_module_hooks(module, new)
    if "forward" in new.__dict__:
        warnings.warn(f"pyseqkern.convert: {repr(name) if name else 'the model'} has its own 'forward' attribute "
                      f"(set on the instance, as accelerate and peft wrap modules), bound to the torch.nn module: "
                      f"the converted module keeps running torch.nn's forward. Convert before wrapping.",
                      stacklevel=3)
    return new


def _rebind_module_hooks(old: _tnn.Module, new: _tnn.Module) -> None:
    """Hooks that take the module as their first argument (register_load_state_dict_pre_hook: torch's
    _WrappedHook, holding a weak reference to the module) are bound to the replacement. Bound to the old
    module they passed it to the hook, or raised "the hook of a dead Module" in load_state_dict once it
    was gone (an auditing helper, stop 56). The dictionaries are shared (above): a kept old module's
    calls pass the new one too."""
    for key, hooks in new.__dict__.items():
        if "hooks" not in key or not isinstance(hooks, dict):
            continue
        for handle_id, hook in list(hooks.items()):
            bound = getattr(hook, "module", None) if getattr(hook, "with_module", False) else None
            if callable(bound) and bound() is old:
                hooks[handle_id] = type(hook)(hook.hook, new)


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


def _convert(module: _tnn.Module, memo: dict, name: str = "") -> _tnn.Module:
    # memo keeps a module that appears at several places in the tree one module after conversion.
    if id(module) in memo:
        return memo[id(module)]
    cls = _accelerated_class(module)
    if cls is not None:
        result = _replacement(module, cls, name)
    else:
        result = module
        # (_modules itself: named_children yields a module registered twice under one parent once, and
        # the second name kept torch's module)
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = _convert(child, memo, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
                if child_name == "_orig_mod" and "forward" in module.__dict__:
                    # torch.compile's OptimizedModule bound its forward to the module it wrapped
                    warnings.warn(f"pyseqkern.convert: {repr(name) if name else 'the model'} is compiled "
                                  f"(torch.compile) around {type(child).__name__}, and its compiled forward still "
                                  f"calls the torch.nn module: convert the model before compiling it.", stacklevel=3)
    memo[id(module)] = result
    return result


def convert(model: _tnn.Module) -> _tnn.Module:
    """Replace every torch.nn.LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell inside `model` (recursively, in
    place) by its pyseqkern.nn counterpart sharing the same parameters; returns `model`, or the
    replacement when `model` itself is one of those modules."""
    if not isinstance(model, _tnn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    return _convert(model, {})
