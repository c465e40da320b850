"""The layer stack of LSTM/GRU/RNN: one rnn_layer call per layer and direction, dropout between layers.

Follows ATen's apply_layer_stack (aten/src/ATen/native/RNN.cpp) so results, final-state order and the
random numbers dropout draws are the same as torch's: a bidirectional layer's output is [fwd, bwd]
along features, h_n/c_n are indexed layer * num_directions + direction, and dropout is applied in
training mode to every layer's whole output except the last layer's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The ops module is looked up at call time (attribute access), so a rewritten rnn_layer is picked up.
from ..ops import rnn as _rnn_ops
from ..ops import rnn_autocast as _autocast
from . import _checks


def layer_weights(module, layer: int, direction: int, weights=None):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction; absent ones are None. weights: the
    module's weights by name where they were read already (a parametrized module's), else None."""
    sfx = "_reverse" if direction else ""
    if weights is not None:
        return tuple(weights.get(f"{n}_l{layer}{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                 "weight_hr"))
    w_ih = getattr(module, f"weight_ih_l{layer}{sfx}")
    w_hh = getattr(module, f"weight_hh_l{layer}{sfx}")
    b_ih = getattr(module, f"bias_ih_l{layer}{sfx}") if module.bias else None
    b_hh = getattr(module, f"bias_hh_l{layer}{sfx}") if module.bias else None
    w_hr = getattr(module, f"weight_hr_l{layer}{sfx}") if module.proj_size > 0 else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def run_layers(module, x, batch_sizes, h0, c0, reset_after: bool = True, weights=None):
    """x time-major [T, B, I] or packed [N, I]; h0 [L*D, B, Hout] and c0 [L*D, B, H] (LSTM), or both
    None for zero states (the kernels read none then). Returns (y, h_n, c_n or None), h_n [L*D, B, Hout],
    c_n [L*D, B, H] for LSTM.

    One time step without autograd (decoding loops call a layer once per token) runs each layer and
    direction as a cell step (ops.rnn_cell), whose planned path skips the sequence machinery (checks,
    caches, scratch, capsules: ~60 of the 75 us an RNN T=1, B=1, H=256 call took, against torch.nn's
    36). In-process, time as sequences / as cells: 1.6-2.8 over LSTM, GRU and RNN at B=1 and 8, 1-2
    layers, either direction. Its h_n and c_n are stacked copies: no output shares memory. With more
    than one layer or direction the steps spread over every thread (rnn_cell's `spread`): their weights
    together overflow one core's L2 (RNN, 2 bidirectional layers at H=256: 2.5 MB), and on one thread
    each step streamed them from L3 (in-process, time spread / not: 0.76; 2 layers 0.90)."""
    mode = module.mode.lower()
    one_step = (batch_sizes is None and x.shape[0] == 1 and not torch.is_grad_enabled()
                and module.proj_size == 0 and x.is_cpu and not torch.compiler.is_compiling())

    def expected(idx, w_ih, w_hh, b_ih, b_hh, w_hr):
        """raise_for_module's `expected` of one layer and direction."""
        G, H, P = _rnn_ops.GATES[mode], module.hidden_size, module.proj_size
        width = module.input_size if idx < num_directions else (P or H) * num_directions
        bias = (G * H,) if module.bias else None
        return {"w_ih": (w_ih, (G * H, width)), "w_hh": (w_hh, (G * H, P or H)), "b_ih": (b_ih, bias),
                "b_hh": (b_hh, bias), "w_hr": (w_hr, (P, H) if P else None)}

    def suffix(idx, direction):
        return f"_l{idx // num_directions}{'_reverse' if direction else ''}"

    def step(layer_input, idx, direction, w_ih, w_hh, b_ih, b_hh, w_hr):
        """(output, h, c) of one layer and direction."""
        h, c = None if h0 is None else h0[idx], None if c0 is None else c0[idx]
        if module.bias and (b_ih is None or b_hh is None):
            # A bias set to None on a bias=True module: torch.nn raises (TypeError); the ops would take
            # it for bias=False and run it as zero.
            _checks.parameters_as_sized(type(module).__name__,
                                        expected(idx, w_ih, w_hh, b_ih, b_hh, w_hr),
                                        suffix(idx, direction))
        try:
            if one_step:
                h, c = _rnn_ops.rnn_cell(mode, layer_input, h, c, w_ih, w_hh, b_ih, b_hh, reset_after, spread)
                return h, h, c
            return _rnn_ops.rnn_layer(mode, layer_input, batch_sizes, h, c, w_ih, w_hh, b_ih, b_hh, w_hr,
                                      bool(direction), reset_after)
        except (ValueError, TypeError, AttributeError) as e:
            _checks.raise_for_module(type(module).__name__, e, suffix(idx, direction),
                                     expected(idx, w_ih, w_hh, b_ih, b_hh, w_hr))

    num_directions = 2 if module.bidirectional else 1
    spread = module.num_layers * num_directions > 1
    h_n, c_n = [], []
    layer_input = x[0] if one_step else x
    if num_directions == 2 and _autocast.any_enabled():
        # Both directions of the first layer read x: cast it for the region once, not once each (the
        # op would cast it the same way; later layers' inputs are already in the region's dtype).
        to = _autocast.target(layer_input)
        if to is not None:
            layer_input = _autocast.cast(layer_input, to, layer_input.device.type)
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(num_directions):
            y, h, c = step(layer_input, layer * num_directions + direction, direction,
                           *layer_weights(module, layer, direction, weights))
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
        if module.dropout != 0 and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    if one_step:  # (the states stacked first: a one-direction layer's output is its h)
        h_n, c_n = torch.stack(h_n, 0), (torch.stack(c_n, 0) if mode == "lstm" else None)
        return (layer_input.unsqueeze_(0) if _rnn_ops.own_output(layer_input) else layer_input.unsqueeze(0)), h_n, c_n
    # (stacked copies even of one layer: an unsqueezed view could not be detached in place, h_n.detach_(),
    # which torch.nn's h_n can; an auditing helper, stop 60)
    return layer_input, torch.stack(h_n, 0), (torch.stack(c_n, 0) if mode == "lstm" else None)
