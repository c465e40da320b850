"""Argument handling of the cells' forward, as torch.nn.RNNCellBase subclasses do it: unbatched 1-D
input, default zero states, then one pyseqkern.ops.rnn.rnn_cell call."""
from __future__ import annotations

import torch

from . import _checks
from ._twin import torch_nn_records
# Looked up at call time (attribute access), so a rewritten rnn_cell is picked up.
from ..ops import rnn as _rnn_ops
from ..ops import rnn_thin as _thin


CELL_PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_STRIDED = torch.strided


def planned_parameters(module, names=CELL_PARAMETERS):
    """(w_ih, w_hh, b_ih, b_hh) by `names` from the module's _parameters (attribute access through
    nn.Module.__getattr__ costs 0.5 us each), for the thin inference paths; None where they are not there
    as such (a parametrization or weight_norm computes them) or the biases disagree with `bias`: then
    the full path runs."""
    get = module._parameters.get  # (no generator: on the cells' path at B=1 every 0.1 us shows)
    w_ih, w_hh, b_ih, b_hh = get(names[0]), get(names[1]), get(names[2]), get(names[3])
    if w_ih is None or w_hh is None or not (b_ih is not None) == module.bias == (b_hh is not None):
        return None
    return w_ih, w_hh, b_ih, b_hh


def cell_forward(module, name: str, mode: str, input, states, reset_after: bool = True):
    """states: None, or the user's hidden states as a tuple ((h,) or (h, c) for lstm).
    Returns the tuple of new states, shaped like the input (unbatched in, unbatched out)."""
    # Inference on planned parameters: straight to the kernel entry; where anything differs, the full
    # path below runs.
    if (type(input) is torch.Tensor and input.layout is _STRIDED and not input.is_nested
            and not torch.compiler.is_compiling()):
        params = planned_parameters(module)
        if params is not None:
            out = _thin.cell_fast(mode, reset_after, input, states, *params)
            if out is not None:
                return out
    if torch_nn_records():  # (the thin path above is off there: _plain_eager, or FakeTensors)
        out = module._traced_forward(input, None if states is None else states if mode == "lstm" else states[0])
        return out if mode == "lstm" else (out,)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    input = _checks.dense(name, "input", input)
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    labels = ["hx"] if len(states or ()) == 1 else ["hx[0]", "hx[1]"]
    if states is not None:
        states = tuple(_checks.dense(name, label, s) for label, s in zip(labels, states))
        for label, s in zip(labels, states):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"{name}: {label} must be a Tensor, got {type(s).__name__}")
            if s.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {s.dim()}D instead")
            # torch unsqueezes a 2-D hx next to a 1-D input and then reports a wrong hidden_size of 1.
            if s.dim() != input.dim():
                kind = "batched 2-D" if input.dim() == 2 else "unbatched 1-D"
                raise RuntimeError(f"{name}: For {kind} input, {label} should also be {input.dim()}-D "
                                   f"but got {s.dim()}-D tensor")
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)

    w_ih = module.weight_ih
    if w_ih is None:
        _checks.parameters_as_sized(name, {"w_ih": (None, (_rnn_ops.GATES[mode] * module.hidden_size,
                                                           module.input_size))})
    _checks.input_dtype_and_device(name, x, w_ih, exc=RuntimeError)
    if x.size(1) != module.input_size:
        raise RuntimeError(f"{name}: input has inconsistent input_size: got {x.size(1)}, "
                           f"expected {module.input_size}")
    shape = (x.size(0), module.hidden_size)
    if states is None:
        # (two tensors: under torch.compile one tensor as both h and c is a duplicate input Dynamo refuses)
        h = torch.zeros(shape, dtype=x.dtype, device=x.device)
        c = torch.zeros(shape, dtype=x.dtype, device=x.device) if mode == "lstm" else None
    else:
        states = [s if batched else s.unsqueeze(0) for s in states]
        if mode == "lstm":
            states[1] = _checks.cell_state_as_input(states[1], x)
        for label, s in zip(labels, states):
            if s.size(0) != x.size(0):
                raise RuntimeError(f"{name}: Input batch size {x.size(0)} doesn't match {label} batch size {s.size(0)}")
            if s.size(1) != module.hidden_size:
                raise RuntimeError(f"{name}: {label} has inconsistent hidden_size: got {s.size(1)}, "
                                   f"expected {module.hidden_size}")
            _checks.state_matches(name, label, s, shape, x)
        h, c = states[0], (states[1] if mode == "lstm" else None)

    try:
        h_new, c_new = _rnn_ops.rnn_cell(mode, x, h, c, w_ih, module.weight_hh, module.bias_ih, module.bias_hh,
                                         reset_after)
    except (ValueError, TypeError, AttributeError) as e:
        G, H = _rnn_ops.GATES[mode], module.hidden_size
        bias = (G * H,) if module.bias else None
        _checks.raise_for_module(name, e, expected={
            "w_ih": (w_ih, (G * H, module.input_size)), "w_hh": (module.weight_hh, (G * H, H)),
            "b_ih": (module.bias_ih, bias), "b_hh": (module.bias_hh, bias)})
    out = (h_new,) if mode != "lstm" else (h_new, c_new)
    return out if batched else tuple(t.squeeze(0) for t in out)
