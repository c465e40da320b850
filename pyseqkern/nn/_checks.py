"""Argument checks shared by the drop-in modules.

Each error names the module, the argument and the fix, and keeps the exception type torch raises for
the same mistake (ValueError for input dimensionality and input-vs-weight dtype, RuntimeError for the
rest), so code that catches torch's errors keeps working. Torch leaves several of these to its C++
kernels, whose messages ("mat1 and mat2 must have the same dtype", "get_mkldnn_dtype: unsupported data
type") do not say which argument is wrong; ours do."""
from __future__ import annotations

import inspect
import re

import torch

from ..ops import rnn_autocast as _autocast


def input_dtype_and_device(name: str, x: torch.Tensor, weight: torch.Tensor, exc=ValueError) -> None:
    # Inside an autocast region both are cast to its dtype first (ops/rnn_autocast.py), as torch's are.
    to = _autocast.target(x)
    if _autocast.effective(x.dtype, to) != _autocast.effective(weight.dtype, to):
        raise exc(
            f"{name}: input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})"
        )
    if x.device != weight.device:
        raise RuntimeError(
            f"{name}: input is on {x.device} but the parameters are on {weight.device}. "
            f"Move input: input.to('{weight.device}'), or move model: model.to('{x.device}')"
        )


_OP_PREFIX = re.compile(r"pyseqkern\.rnn_(?:layer|cell): ")
_OP_WEIGHT = re.compile(r"'(w_ih|w_hh|b_ih|b_hh|w_hr)'")
_PARAMETER_OF = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr"}


def raise_for_module(name: str, error: Exception, suffix: str = "", expected: dict | None = None):
    """Re-raises an op's error from inside a module's forward: one about the op's weight arguments (a
    parameter replaced by one of another shape or dtype) as a RuntimeError naming the module's parameters,
    weight_hh + `suffix` (`_l0`, `_l1_reverse`), as torch.nn raises for them; any other as it is. The ops'
    names meant nothing to a module's user (a fuzzer, stop 33: "pyseqkern.rnn_layer: 'w_hh' must have
    shape ...", a cell's too).

    `expected`: {op argument: (the parameter passed, the shape the module's sizes give it, or None where
    it has none)}. A parameter that is None or of another shape is named first, with that shape: the op
    sees only its arguments, takes the hidden size from w_hh, and so blamed a replaced weight_hh on
    weight_ih, or said "must have shape (8, 8), got (8, 8)" of a projection as wide as the hidden size;
    a parameter set to None failed in an attribute lookup (a fuzzer, stop 35). None is a TypeError, as
    torch.nn's ("expected Tensor as element 1 in argument 2, but got NoneType")."""
    try:
        parameters_as_sized(name, expected or {}, suffix)
    except (TypeError, RuntimeError) as mismatch:
        raise mismatch from error
    if isinstance(error, AttributeError):
        raise error
    message = str(error)
    prefix = _OP_PREFIX.match(message)
    if prefix is None or not _OP_WEIGHT.search(message):
        raise error
    rest = _OP_WEIGHT.sub(lambda m: f"'{_PARAMETER_OF[m.group(1)]}{suffix}'", message[prefix.end():])
    raise RuntimeError(f"{name}: " + rest.replace("'x'", "the input")) from error


def parameters_as_sized(name: str, expected: dict, suffix: str = "") -> None:
    """Each {op argument: (parameter, shape or None)} as raise_for_module's `expected`: a TypeError for a
    None where a shape is expected, a RuntimeError naming the parameter for another shape."""
    for arg, (tensor, want) in expected.items():
        label = f"'{_PARAMETER_OF[arg]}{suffix}'"
        if tensor is None and want is not None:
            raise TypeError(f"{name}: {label} is None; expected a tensor of shape {want}")
        if tensor is not None and want is not None and tuple(tensor.shape) != want:
            raise RuntimeError(f"{name}: {label} must have shape {want}, got {tuple(tensor.shape)}")


def input_features(name: str, x: torch.Tensor, input_size: int) -> None:
    if x.size(-1) != input_size:
        raise RuntimeError(
            f"{name}: input.size(-1) must be equal to input_size. Expected {input_size}, got {x.size(-1)}"
        )


def state_matches(name: str, label: str, state: torch.Tensor, expected_shape: tuple, x: torch.Tensor) -> None:
    """`label` names the state as the user passed it (hx, hx[0], hx[1])."""
    if tuple(state.shape) != tuple(expected_shape):
        raise RuntimeError(f"{name}: Expected {label} size {tuple(expected_shape)}, got {list(state.shape)}")
    to = _autocast.target(x)
    if _autocast.effective(state.dtype, to) != _autocast.effective(x.dtype, to):
        raise RuntimeError(
            f"{name}: {label} dtype ({state.dtype}) does not match input dtype ({x.dtype}); "
            f"convert it: {label}.to({x.dtype})"
        )
    if state.device != x.device:
        raise RuntimeError(
            f"{name}: {label} is on {state.device} but the input is on {x.device}; "
            f"move it: {label}.to('{x.device}')"
        )


def cell_state_as_input(c0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An LSTM's c_0 in a float dtype below the input's, converted to it: torch.nn's LSTMCell and its
    generic LSTM take one (their math promotes it: the numbers of converting it first), where they refuse
    such an h_0 (a fuzzer, stop 33); its oneDNN LSTM (float32 on the CPU) fails for a bfloat16 or float16
    c_0 instead. One above the input's stays, for state_matches to refuse: there torch.nn's LSTMCell
    computes in the higher dtype and returns it, and its LSTM fails."""
    if (c0.dtype != x.dtype and c0.is_floating_point() and x.is_floating_point()
            and torch.promote_types(c0.dtype, x.dtype) == x.dtype):
        return c0.to(x.dtype)
    return c0


def dense(name: str, label: str, t):
    """t as a strided tensor: a sparse one (COO, CSR, ...) made dense (differentiably), as torch.nn's cells
    take a sparse input or state into their GEMMs, and its LSTM and RNN a sparse h_0; a nested tensor
    refused by name. The kernels read strided memory: such tensors had reached the thin paths' checks and
    failed inside torch ("unsupported memory format option Contiguous", "Sparse CSR tensors do not have
    strides"; an auditing helper, stop 60). Anything else as it is, for the checks that follow."""
    if not isinstance(t, torch.Tensor) or (t.layout is torch.strided and not t.is_nested):
        return t
    if t.is_nested:
        raise RuntimeError(f"{name}: {label} is a nested tensor, which the recurrent layers do not take; pack "
                           "sequences of different lengths with torch.nn.utils.rnn.pack_sequence")
    return t.to_dense()


def strided_states(hx) -> bool:
    """Whether hx is a strided tensor or a pair of them, as nearly every call's is (the cheap test before
    dense_states, which looks at anything else: ~0.1 us where it took 0.6 for an LSTM's pair)."""
    if type(hx) is torch.Tensor:
        return hx.layout is torch.strided
    if type(hx) is tuple and len(hx) == 2 and type(hx[0]) is torch.Tensor and type(hx[1]) is torch.Tensor:
        return hx[0].layout is torch.strided and hx[1].layout is torch.strided
    return False


def dense_states(name: str, hx, is_lstm: bool):
    """hx with dense() applied to its tensors (an LSTM's pair as a new tuple or list, anything else as it
    is); called where strided_states said no."""
    if isinstance(hx, torch.Tensor):
        return dense(name, "hx", hx)
    if is_lstm and isinstance(hx, (tuple, list)) and len(hx) == 2:
        return type(hx)(dense(name, f"hx[{i}]", t) for i, t in enumerate(hx))
    return hx


def split_lstm_hx(name: str, hx) -> tuple[torch.Tensor, torch.Tensor]:
    # torch indexes hx[0], hx[1] without looking, so a plain tensor there fails later with a message about
    # dimensions; say what is expected instead. A tuple of the wrong length is a RuntimeError in torch.nn.
    if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, torch.Tensor) for t in hx):
        got = type(hx).__name__
        if isinstance(hx, (tuple, list)):
            got += "(" + ", ".join(type(t).__name__ for t in hx) + ")"
        exc = RuntimeError if isinstance(hx, (tuple, list)) and len(hx) != 2 else TypeError
        raise exc(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got {got}")
    return hx[0], hx[1]


def reset_after_flag(reset_after) -> bool:
    if not isinstance(reset_after, bool):
        raise TypeError(f"reset_after should be of type bool, got: {type(reset_after).__name__}")
    return reset_after


class _ClassSignature:
    """The `__signature__` of one class, which neither its instances (inspect.signature(module) stays
    the forward's, as torch.nn's) nor its subclasses inherit."""

    def __init__(self, signature, cls):
        self.signature, self.cls = signature, cls

    def __get__(self, obj, owner):
        if obj is not None or owner is not self.cls:
            raise AttributeError("__signature__")
        return self.signature


class ResetAfter:
    """The one constructor keyword pyseqkern's GRU and GRUCell add to torch's (keyword-only), and its
    place in repr. Listed before the torch.nn base class. The class's signature is the torch.nn class's
    plus that keyword: code that inspects constructors (torch.nn.utils.skip_init asks for `device`)
    would otherwise see only *args and **kwargs."""

    def __init__(self, *args, reset_after: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset_after = reset_after_flag(reset_after)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # a subclass with a constructor of its own: inspect reads that
            return
        base = next(b for b in cls.__mro__ if b.__module__ == "torch.nn.modules.rnn")
        signature = inspect.signature(base)
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("reset_after", inspect.Parameter.KEYWORD_ONLY, default=True,
                                            annotation=bool))
        cls.__signature__ = _ClassSignature(signature.replace(parameters=params), cls)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.reset_after else s + ", reset_after=False"
