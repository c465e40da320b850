"""Argument handling of LSTM/GRU/RNN.forward, as torch.nn.RNNBase subclasses do it: PackedSequence in
and out, batch_first, unbatched input, default zero states, and the sorted/unsorted permutations of
enforce_sorted=False (hx is given in the caller's order; the kernels see the sorted order)."""
from __future__ import annotations

import functools

import torch
from torch.nn.utils.rnn import PackedSequence

from . import _checks
from ._cell import CELL_PARAMETERS, planned_parameters
from ._stack import run_layers
# Looked up at call time (attribute access), so a patched function is picked up.
from ..ops import rnn as _rnn_ops
from ..ops import rnn_thin as _thin
from ..ops import rnn_cell_deferred as _deferred

_NAMES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}


def _permute(states, permutation):
    if permutation is None:
        return states
    if _rnn_ops.capturing_graph() and permutation.numel():
        # Inductor's index_select wraps negative indices where eager raises (a hand-made PackedSequence
        # with -1 in its indices read another row's states); checked when the graph runs.
        torch._assert_async(permutation.min() >= 0, "PackedSequence indices must be >= 0")
    return tuple(None if s is None else s.index_select(1, permutation) for s in states)


@functools.cache
def _layer_parameters(layer: int, reverse: bool = False) -> tuple:
    """The parameter names of a layer's forward (or reverse) direction, for planned_parameters."""
    return tuple(f"{n}_l{layer}{'_reverse' if reverse else ''}" for n in CELL_PARAMETERS)


def _built_weights(module) -> int:
    """How many weight tensors the module's structure attributes call for now (num_layers, bidirectional,
    bias, proj_size), to compare with those it was built with (_flat_weights_names)."""
    per = 2 + 2 * bool(module.bias) + (module.proj_size > 0)
    return module.num_layers * (2 if module.bidirectional else 1) * per


def _thin_states(hx, is_lstm):
    """(h0, c0) as the thin paths take hx: (None, None) without it, plain tensors (c0 None but for
    LSTM, whose hx is a pair); None for anything else (the full path checks and explains)."""
    if hx is None:
        return None, None
    if not is_lstm:
        return (hx, None) if type(hx) is torch.Tensor else None
    if type(hx) is not tuple or len(hx) != 2 or type(hx[0]) is not torch.Tensor or type(hx[1]) is not torch.Tensor:
        return None
    return hx


def _decode_step(module, input, hx, reset_after):
    """(output, h_n, c_n or None) of one time step of a one-direction module through the cells' planned
    entries, or None where anything differs (then the full path runs, with its checks and errors). A
    decoding loop calls a layer once per token; the general path's argument handling, layer stack and
    stacking cost more than the step itself (RNN T=1, B=1, H=256: 39 us against 17 for an RNNCell).
    Inference on contiguous tensors goes by data pointers (ops.rnn_thin.step_fast: no views, no copies);
    the rest layer by layer through ops.rnn_thin.cell_fast (recorded steps: its training route). The same
    kernel entries as the general path's (several layers spread over every thread there too), so the
    same bits."""
    layers = module.num_layers
    if (module.bidirectional or module.proj_size or (module.dropout and module.training and layers > 1)
            or torch.compiler.is_compiling()):
        return None
    batched = input.dim() == 3
    if batched:
        t_dim = 1 if module.batch_first else 0
        if input.shape[t_dim] != 1:
            return None
    elif input.dim() != 2 or input.shape[0] != 1:  # (one step of an unbatched sequence: a batch of one row)
        return None
    is_lstm = module.mode == "LSTM"
    # (zero states without hx: the kernel reads none, 117 -> 61 us for LSTM T=1, B=1, H=256)
    states = _thin_states(hx, is_lstm)
    if states is None or (is_lstm and hx is not None and states[1].dim() != input.dim()):
        return None
    h0, c0 = states
    if h0 is not None and (h0.dim() != input.dim() or h0.shape[0] != layers or (is_lstm and c0.shape[0] != layers)):
        return None
    mode, spread = module.mode.lower(), layers > 1
    params = [planned_parameters(module, _layer_parameters(layer)) for layer in range(layers)]
    if None in params or len(module._flat_weights_names) != layers * (4 if module.bias else 2):
        return None  # (structure attributes changed after construction: the full path says so)
    if input.is_contiguous():
        hidden = module.hidden_size
        state_shape = (layers, input.shape[1 - t_dim], hidden) if batched else (layers, hidden)
        step = _thin.step_fast(mode, reset_after, input, h0, c0, params, input.shape[:-1] + (hidden,),
                               state_shape, spread)
        if step is not None:
            return step
    x = input.select(t_dim, 0) if batched else input
    hs, cs = [], []
    for layer, layer_params in enumerate(params):
        at = layer if batched else slice(layer, layer + 1)
        states = None if h0 is None else (h0[at], c0[at]) if is_lstm else (h0[at],)
        out = _thin.cell_fast(mode, reset_after, x, states, *layer_params, spread)
        if out is None:
            return None
        x = out[0]
        hs.append(out[0] if batched else out[0][0])
        if is_lstm:
            cs.append(out[1] if batched else out[1][0])
    # (the output is a copy where it would be h_n's memory: torch.nn's never share memory)
    y = x.unsqueeze(1 if module.batch_first else 0) if batched else x
    # A recorded RNN step saves its output for its backward: torch.nn's y and h_n are copies, which the
    # caller may write in place (a mask on h_n), so ours are too.
    saved_out = x.requires_grad and mode.startswith("rnn")
    if layers == 1 and not saved_out:
        return y.clone(), torch.stack(hs), (torch.stack(cs) if is_lstm else None)  # (not views: h_n.detach_())
    h_n, c_n = torch.stack(hs), (torch.stack(cs) if is_lstm else None)
    if x.requires_grad:  # (recorded steps: the next call's states carry each layer's loop on)
        _deferred.carry_stacked(hs, h_n)
        if is_lstm:
            _deferred.carry_stacked(cs, c_n)
    return (y.clone() if layers == 1 or saved_out else y), h_n, c_n


def _sequence_fast(module, input, hx, reset_after):
    """(output, h_n, c_n or None) of a plain inference sequence through ops.rnn_thin.seq_fast, or None where
    anything differs (then the full path runs, with its checks and errors), or the layers' parameters
    where only their plans are missing (the full path runs, then makes them: sequence_forward). One
    direction or two, no projection, no dropout between layers in training mode, time-major, batch_first,
    batched or not, or packed; the same kernel entries, paths and bits as the full path."""
    layers = module.num_layers
    if module.proj_size or (module.dropout and module.training and layers > 1) or torch.compiler.is_compiling():
        return None
    packed = type(input) is PackedSequence
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        if type(x) is not torch.Tensor or (sorted_indices is None) != (unsorted_indices is None):
            return None
    else:
        x, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
        if x.dim() not in (2, 3):
            return None
    is_lstm = module.mode == "LSTM"
    states = _thin_states(hx, is_lstm)
    if states is None:
        return None
    h0, c0 = states
    directions = 2 if module.bidirectional else 1
    params = [planned_parameters(module, _layer_parameters(layer, bool(direction)))
              for layer in range(layers) for direction in range(directions)]
    if None in params or torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for p in params for t in p):
        return None  # (a recorded call: the full path, before any permutation of hx here)
    if len(module._flat_weights_names) != len(params) * (4 if module.bias else 2):
        return None  # (structure attributes changed after construction: the full path says so)
    if sorted_indices is not None and h0 is not None:
        # (the caller's order to the sorted one, as the full path's _permute; states it would refuse decline)
        for t in (h0, c0) if is_lstm else (h0,):
            if type(t) is not torch.Tensor or t.dim() != 3 or t.shape[1] != sorted_indices.shape[0]:
                return None
        h0, c0 = _permute((h0, c0), sorted_indices)
    out = _thin.seq_fast(module.mode.lower(), reset_after, x, h0, c0, params, module.hidden_size,
                         module.batch_first and x.dim() == 3 and not packed, batch_sizes, directions)
    if out is _thin.NO_PLAN:
        return params
    if out is None or not packed:
        return out
    y, h_n, c_n = out
    h_n, c_n = _permute((h_n, c_n), unsorted_indices)
    return PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices), h_n, c_n


def _parametrized_weights(module):
    """A parametrized module's weights by name, read as torch.nn's forward reads them (its
    _update_flat_weights), or None where nothing is parametrized (then each is read once, by name). A
    stateful parametrization sees every read: spectral_norm runs a power iteration per read in training
    mode, and read three times a forward where torch.nn reads four, its estimate drifted from torch.nn's
    (gradients 1e-5 apart after one call; found by a lifecycle fuzzer, stop 25)."""
    if module._modules.get("parametrizations") is None:
        return None
    module._update_flat_weights()
    return dict(zip(module._flat_weights_names, module._flat_weights))


def sequence_forward(module, input, hx, reset_after: bool = True):
    """Returns (output, h_n, c_n or None), output a PackedSequence when input is one."""
    planless = None  # (the layers' parameters where the thin sequence path wants plans made)
    if isinstance(input, torch.Tensor) and (input.layout is not torch.strided or input.is_nested):
        input = _checks.dense(_NAMES[module.mode], "input", input)
    if hx is not None and not _checks.strided_states(hx):
        hx = _checks.dense_states(_NAMES[module.mode], hx, module.mode == "LSTM")
    if type(input) is torch.Tensor:
        step = _decode_step(module, input, hx, reset_after)
        if step is not None:
            return step
    if type(input) is torch.Tensor or type(input) is PackedSequence:
        fast = _sequence_fast(module, input, hx, reset_after)
        if type(fast) is tuple:
            return fast
        planless = fast
    name = _NAMES[module.mode]
    is_lstm = module.mode == "LSTM"
    built = len(module._flat_weights_names)
    if built != _built_weights(module):
        # num_layers, bidirectional, bias or proj_size set after construction: torch.nn's forward refuses
        # it ("Expected more weights in stacked_rnn", or an ArrayRef error); ours had run the layers the
        # attributes named, dropping the biases of a module set to bias=False (an auditing helper, stop 53).
        raise RuntimeError(
            f"{name}: the module was built with {built} weight tensors, but num_layers={module.num_layers}, "
            f"bidirectional={module.bidirectional}, bias={module.bias}, proj_size={module.proj_size} call for "
            f"{_built_weights(module)}; these attributes cannot change after construction: build a new "
            f"{name} with them and load the weights it should have")
    # (No _update_flat_weights(): the weights are read by name below, and torch's own forward and
    # __getstate__ refresh _flat_weights themselves; it cost 4 us a call.)

    if isinstance(input, PackedSequence):
        x, batch_sizes, sorted_indices, unsorted_indices = input
        if x.dim() != 2:
            raise RuntimeError(f"{name}: packed input data must have 2 dimensions, got {x.dim()}")
        if not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
            got = tuple(batch_sizes.shape) if isinstance(batch_sizes, torch.Tensor) else type(batch_sizes).__name__
            raise RuntimeError(f"{name}: packed input batch_sizes must be a non-empty 1-D tensor, got {got}")
        batched = True
        # Compiled, the batch is a shape where it can be (each read of batch_sizes is a graph break
        # and a recompile for every new set of lengths): the permutation's, or hx's below. The kernel
        # entry checks batch_sizes against it.
        batch = sorted_indices.shape[0] if sorted_indices is not None and _rnn_ops.capturing_graph() else None
    else:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        x, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
        batched = input.dim() == 3
        batch_dim = 0 if module.batch_first else 1
        if not batched:
            x = x.unsqueeze(batch_dim)
        batch = x.size(batch_dim)
        if x.size(1 - batch_dim) == 0:
            raise RuntimeError(f"{name}: Expected sequence length to be larger than 0 in RNN")

    h0 = c0 = None
    if hx is not None:
        h0, c0 = _checks.split_lstm_hx(name, hx) if is_lstm else (hx, None)
        if not isinstance(h0, torch.Tensor):
            raise TypeError(f"{name}: hx must be a Tensor, got {type(h0).__name__}")
        want = 3 if batched else 2
        if h0.dim() != want or (is_lstm and c0.dim() != want):
            kind = "PackedSequence" if batch_sizes is not None else ("batched 3-D" if batched else "unbatched 2-D")
            if is_lstm:
                got = f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                raise RuntimeError(f"{name}: For {kind} input, hx and cx should also be {want}-D but got {got}")
            raise RuntimeError(f"{name}: For {kind} input, hx should also be {want}-D but got {h0.dim()}-D tensor")
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)

    weights = _parametrized_weights(module)
    w_ih = module.weight_ih_l0 if weights is None else weights["weight_ih_l0"]
    if w_ih is None:
        _checks.parameters_as_sized(name, {"w_ih": (None, (_rnn_ops.GATES[module.mode.lower()] * module.hidden_size,
                                                           module.input_size))}, "_l0")
    _checks.input_dtype_and_device(name, x, w_ih)
    _checks.input_features(name, x, module.input_size)

    if batch is None:
        if h0 is not None and _rnn_ops.capturing_graph():
            batch = h0.shape[1]
        elif _rnn_ops._is_exporting():  # (torch's own error would name a symbol inside this file)
            raise RuntimeError(f"{name}: torch.export of a PackedSequence needs its batch size as a shape: pack "
                               "it with enforce_sorted=False (sorted_indices) or pass hx; a sorted "
                               "PackedSequence without hx holds it only as data (batch_sizes[0])")
        else:
            batch = int(batch_sizes[0])
    num_directions = 2 if module.bidirectional else 1
    hout = module.proj_size if module.proj_size > 0 else module.hidden_size
    h_shape = (module.num_layers * num_directions, batch, hout)
    c_shape = (module.num_layers * num_directions, batch, module.hidden_size)
    if hx is not None:
        _checks.state_matches(name, "hx[0]" if is_lstm else "hx", h0, h_shape, x)
        if is_lstm:
            c0 = _checks.cell_state_as_input(c0, x)
            _checks.state_matches(name, "hx[1]", c0, c_shape, x)
        h0, c0 = _permute((h0, c0), sorted_indices)
    elif batch_sizes is not None and _rnn_ops.capturing_graph():
        # zero states that carry the batch to each layer (rnn_layer reads it from h0 when compiled)
        h0 = x.new_zeros(h_shape)
        c0 = x.new_zeros(c_shape) if is_lstm else None

    if batch_sizes is None and module.batch_first:
        x = x.transpose(0, 1)
    y, h_n, c_n = run_layers(module, x, batch_sizes, h0, c0, reset_after, weights)
    h_n, c_n = _permute((h_n, c_n), unsorted_indices)

    if planless is not None:
        _thin.make_seq_plans(module.mode.lower(), reset_after, planless)
    if batch_sizes is not None:
        return PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices), h_n, c_n
    if module.batch_first:
        y = y.transpose_(0, 1) if _rnn_ops.own_output(y) else y.transpose(0, 1)
    if not batched:
        y = y.squeeze(batch_dim)
        h_n = h_n.squeeze(1)
        c_n = None if c_n is None else c_n.squeeze(1)
    return y, h_n, c_n
