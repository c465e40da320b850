"""The recurrent reference (pyseqkern.reference.rnn) is the oracle of every RNN test, so it is checked
here against torch.nn itself, in float64 with the same weights: outputs, final states and gradients
with respect to input, initial states and every weight, for all modes, full-length and packed
(sorted and unsorted), both directions, stacked layers. GRU reset_after=False has no torch.nn
counterpart and is checked against a formula written out gate by gate."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from pyseqkern.reference import rnn as ref
from helpers import assert_close_to_ref, assert_within_torch_error, randn, strided

F64 = torch.float64
T, B, I, H, P = 7, 5, 13, 7, 3
LENGTHS = {"packed_sorted": [7, 5, 5, 2, 1], "packed_unsorted": [2, 7, 1, 5, 5]}

# kind -> (torch.nn class, constructor keywords, reference mode)
KINDS = {
    "lstm": (torch.nn.LSTM, {}, "lstm"),
    "lstm_proj": (torch.nn.LSTM, {"proj_size": P}, "lstm"),
    "gru": (torch.nn.GRU, {}, "gru"),
    "rnn_tanh": (torch.nn.RNN, {"nonlinearity": "tanh"}, "rnn_tanh"),
    "rnn_relu": (torch.nn.RNN, {"nonlinearity": "relu"}, "rnn_relu"),
}
CELLS = {
    "lstm": lambda bias: torch.nn.LSTMCell(I, H, bias=bias, dtype=F64),
    "gru": lambda bias: torch.nn.GRUCell(I, H, bias=bias, dtype=F64),
    "rnn_tanh": lambda bias: torch.nn.RNNCell(I, H, bias=bias, nonlinearity="tanh", dtype=F64),
    "rnn_relu": lambda bias: torch.nn.RNNCell(I, H, bias=bias, nonlinearity="relu", dtype=F64),
}


def seed_parameters(module, seed):
    # Seeded, non-zero weights of a size that keeps tanh/sigmoid away from saturation, so gradients
    # carry information through all steps.
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(randn(p.shape, p.dtype, seed=seed + i, scale=0.5))
    return module


def make_module(kind, num_layers, bidirectional, bias=True, dtype=F64):
    cls, kwargs, _ = KINDS[kind]
    return seed_parameters(cls(I, H, num_layers=num_layers, bidirectional=bidirectional, bias=bias,
                               dtype=dtype, **kwargs), seed=100)


def reference_stack(module, mode, x, batch_sizes, h0, c0, reset_after=True):
    """The reference layers composed as torch.nn composes them (no dropout): [fwd, bwd] features,
    states indexed layer * num_directions + direction."""
    num_directions = 2 if module.bidirectional else 1
    hs, cs, layer_input = [], [], x
    for layer in range(module.num_layers):
        ys = []
        for d in range(num_directions):
            sfx = "_reverse" if d else ""
            w = {n: getattr(module, f"{n}_l{layer}{sfx}", None)
                 for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
            idx = layer * num_directions + d
            y, h, c = ref.rnn_layer(mode, layer_input, batch_sizes, h0[idx], None if c0 is None else c0[idx],
                                    w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], w["weight_hr"],
                                    bool(d), reset_after)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        layer_input = torch.cat(ys, dim=-1)
    return layer_input, torch.stack(hs), (torch.stack(cs) if c0 is not None else None)


def weighted_sum(tensors, seed):
    """A scalar that depends on every element of every tensor with a different (seeded) weight, so a
    gradient error anywhere shows."""
    return sum((t * randn(t.shape, t.dtype, seed=seed + i)).sum() for i, t in enumerate(tensors))


@pytest.mark.parametrize("layout", ["full", "packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (1, True), (2, True), (2, False)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_layers_match_torch(kind, layout, num_layers, bidirectional):
    module = make_module(kind, num_layers, bidirectional)
    mode, is_lstm = KINDS[kind][2], KINDS[kind][2] == "lstm"
    states = num_layers * (2 if bidirectional else 1)
    hout = P if kind == "lstm_proj" else H
    x = strided((T, B, I), F64, seed=1).requires_grad_()
    h0 = randn((states, B, hout), F64, seed=2).requires_grad_()
    c0 = randn((states, B, H), F64, seed=3).requires_grad_() if is_lstm else None

    if layout == "full":
        out_t, hx_t = module(x, (h0, c0) if is_lstm else h0)
        y_t = out_t
        y_r, h_r, c_r = reference_stack(module, mode, x, None, h0, c0)
    else:
        packed = pack_padded_sequence(x, torch.tensor(LENGTHS[layout]), enforce_sorted=layout == "packed_sorted")
        out_t, hx_t = module(packed, (h0, c0) if is_lstm else h0)
        y_t = out_t.data
        # torch.nn hands the kernels states in sorted order and gives them back in the caller's order.
        to_sorted = (lambda s: s) if packed.sorted_indices is None else (lambda s: s.index_select(1, packed.sorted_indices))
        to_caller = (lambda s: s) if packed.unsorted_indices is None else (lambda s: s.index_select(1, packed.unsorted_indices))
        y_r, h_r, c_r = reference_stack(module, mode, packed.data, packed.batch_sizes, to_sorted(h0),
                                        None if c0 is None else to_sorted(c0))
        h_r, c_r = to_caller(h_r), (None if c_r is None else to_caller(c_r))
    h_t, c_t = hx_t if is_lstm else (hx_t, None)

    assert_close_to_ref(y_r, y_t, "output")
    assert_close_to_ref(h_r, h_t, "h_n")
    if is_lstm:
        assert_close_to_ref(c_r, c_t, "c_n")

    names = ["input", "h0"] + (["c0"] if is_lstm else []) + [n for n, _ in module.named_parameters()]
    inputs = [x, h0] + ([c0] if is_lstm else []) + list(module.parameters())
    outs_t = [y_t, h_t] + ([c_t] if is_lstm else [])
    outs_r = [y_r, h_r] + ([c_r] if is_lstm else [])
    # The packing op is shared by both graphs, so the first pass must leave it in place.
    grads_t = torch.autograd.grad(weighted_sum(outs_t, seed=10), inputs, retain_graph=True)
    grads_r = torch.autograd.grad(weighted_sum(outs_r, seed=10), inputs)
    for name, g_r, g_t in zip(names, grads_r, grads_t, strict=True):
        assert_close_to_ref(g_r, g_t, f"grad {name}")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_layers_without_bias_match_torch(kind):
    module = make_module(kind, 1, True, bias=False)
    mode, is_lstm = KINDS[kind][2], kind == "lstm"
    x = strided((T, B, I), F64, seed=4).requires_grad_()
    h0 = randn((2, B, H), F64, seed=5).requires_grad_()
    c0 = randn((2, B, H), F64, seed=6).requires_grad_() if is_lstm else None
    y_t, hx_t = module(x, (h0, c0) if is_lstm else h0)
    h_t = hx_t[0] if is_lstm else hx_t
    y_r, h_r, _ = reference_stack(module, mode, x, None, h0, c0)
    assert_close_to_ref(y_r, y_t, "output")
    assert_close_to_ref(h_r, h_t, "h_n")
    inputs = [x, h0] + list(module.parameters())
    for g_r, g_t in zip(torch.autograd.grad(weighted_sum([y_r], 20), inputs),
                        torch.autograd.grad(weighted_sum([y_t], 20), inputs), strict=True):
        assert_close_to_ref(g_r, g_t, "grad")


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", list(CELLS))
def test_cell_matches_torch(mode, bias, batch):
    cell = seed_parameters(CELLS[mode](bias), seed=200)
    x = strided((batch, I), F64, seed=7).requires_grad_()
    h = randn((batch, H), F64, seed=8).requires_grad_()
    c = randn((batch, H), F64, seed=9).requires_grad_() if mode == "lstm" else None
    h_r, c_r = ref.rnn_cell(mode, x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if mode == "lstm":
        h_t, c_t = cell(x, (h, c))
        assert_close_to_ref(c_r, c_t, "c'")
        outs_r, outs_t, inputs = [h_r, c_r], [h_t, c_t], [x, h, c]
    else:
        assert c_r is None
        h_t = cell(x, h)
        outs_r, outs_t, inputs = [h_r], [h_t], [x, h]
    assert_close_to_ref(h_r, h_t, "h'")
    inputs += list(cell.parameters())
    for g_r, g_t in zip(torch.autograd.grad(weighted_sum(outs_r, 30), inputs),
                        torch.autograd.grad(weighted_sum(outs_t, 30), inputs), strict=True):
        assert_close_to_ref(g_r, g_t, "grad")


def gru_reset_before_step(x, h, w_ih, w_hh, b_ih, b_hh):
    """GRU with the reset gate applied to h before the recurrent product (Keras reset_after=False, ONNX
    linear_before_reset=0), written gate by gate with explicit row slices."""
    hs = h.shape[1]
    W = {g: w_ih[k * hs:(k + 1) * hs] for k, g in enumerate("rzn")}
    U = {g: w_hh[k * hs:(k + 1) * hs] for k, g in enumerate("rzn")}
    bw = {g: b_ih[k * hs:(k + 1) * hs] for k, g in enumerate("rzn")}
    bu = {g: b_hh[k * hs:(k + 1) * hs] for k, g in enumerate("rzn")}
    r = torch.sigmoid(torch.einsum("bi,hi->bh", x, W["r"]) + bw["r"] + torch.einsum("bj,hj->bh", h, U["r"]) + bu["r"])
    z = torch.sigmoid(torch.einsum("bi,hi->bh", x, W["z"]) + bw["z"] + torch.einsum("bj,hj->bh", h, U["z"]) + bu["z"])
    n = torch.tanh(torch.einsum("bi,hi->bh", x, W["n"]) + bw["n"] + torch.einsum("bj,hj->bh", r * h, U["n"]) + bu["n"])
    return (1 - z) * n + z * h


def gru_weights(seed):
    return [randn(s, F64, seed=seed + k, scale=0.5) for k, s in enumerate([(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)])]


def test_gru_reset_before_cell_matches_formula_and_differs_from_reset_after():
    w_ih, w_hh, b_ih, b_hh = gru_weights(300)
    x, h = randn((B, I), F64, seed=11), randn((B, H), F64, seed=12)
    before, c = ref.rnn_cell("gru", x, h, None, w_ih, w_hh, b_ih, b_hh, reset_after=False)
    assert c is None
    assert_close_to_ref(before, gru_reset_before_step(x, h, w_ih, w_hh, b_ih, b_hh), "h'")
    after, _ = ref.rnn_cell("gru", x, h, None, w_ih, w_hh, b_ih, b_hh, reset_after=True)
    assert (before - after).abs().max() > 1e-3, "reset_after=False computed the reset_after=True candidate"
    # Without biases the formula's missing terms are zeros.
    nobias, _ = ref.rnn_cell("gru", x, h, None, w_ih, w_hh, None, None, reset_after=False)
    zero = torch.zeros(3 * H, dtype=F64)
    assert_close_to_ref(nobias, gru_reset_before_step(x, h, w_ih, w_hh, zero, zero), "h' without bias")


@pytest.mark.parametrize("reverse", [False, True])
def test_gru_reset_before_layer_matches_formula(reverse):
    w_ih, w_hh, b_ih, b_hh = gru_weights(310)
    x, h0 = randn((T, B, I), F64, seed=13), randn((B, H), F64, seed=14)
    y, h_n, c_n = ref.rnn_layer("gru", x, None, h0, None, w_ih, w_hh, b_ih, b_hh, None, reverse, reset_after=False)
    assert c_n is None
    h, expected = h0, [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        h = gru_reset_before_step(x[t], h, w_ih, w_hh, b_ih, b_hh)
        expected[t] = h
    assert_close_to_ref(y, torch.stack(expected), "output")
    assert_close_to_ref(h_n, h, "h_n")


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_packed_reverse_runs_each_sequence_from_its_own_end(mode):
    # Independent of torch: reversed packed sequence b must equal a full-length run over that sequence
    # alone, flipped in time, started from h0[b].
    lengths = [7, 4, 4, 1]
    g = 4 if mode == "lstm" else 3 if mode == "gru" else 1
    w_ih, w_hh, b_ih, b_hh = [randn(s, F64, seed=320 + k, scale=0.5)
                              for k, s in enumerate([(g * H, I), (g * H, H), (g * H,), (g * H,)])]
    x = randn((T, len(lengths), I), F64, seed=15)
    h0 = randn((len(lengths), H), F64, seed=16)
    c0 = randn((len(lengths), H), F64, seed=17) if mode == "lstm" else None
    packed = pack_padded_sequence(x, torch.tensor(lengths))
    y, h_n, c_n = ref.rnn_layer(mode, packed.data, packed.batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), packed.batch_sizes.cumsum(0)[:-1]])
    for b, n in enumerate(lengths):
        seq = x[:n, b:b + 1].flip(0)
        y_b, h_b, c_b = ref.rnn_layer(mode, seq, None, h0[b:b + 1], None if c0 is None else c0[b:b + 1],
                                      w_ih, w_hh, b_ih, b_hh, None, False)
        rows = y[offsets[:n] + b]
        assert_close_to_ref(rows, y_b.flip(0)[:, 0], f"output of sequence {b}")
        assert_close_to_ref(h_n[b], h_b[0], f"h_n of sequence {b}")
        if mode == "lstm":
            assert_close_to_ref(c_n[b], c_b[0], f"c_n of sequence {b}")


GRADCHECK_CASES = [("lstm", False, True), ("lstm", True, True), ("gru", False, True), ("gru", False, False),
                   ("rnn_tanh", False, True), ("rnn_relu", False, True)]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode,proj,reset_after", GRADCHECK_CASES)
def test_rnn_layer_gradcheck(mode, proj, reset_after, packed, reverse):
    t, b, i, h, p = 3, 2, 3, 2, 1
    g = {"lstm": 4, "gru": 3}.get(mode, 1)
    hout = p if proj else h
    shapes = [(g * h, i), (g * h, hout), (g * h,), (g * h,)] + ([(p, h)] if proj else [])
    weights = [randn(s, F64, seed=400 + k, scale=0.5).requires_grad_() for k, s in enumerate(shapes)]
    batch_sizes = torch.tensor([2, 2, 1]) if packed else None
    x = randn((5, i) if packed else (t, b, i), F64, seed=18).requires_grad_()
    h0 = randn((b, hout), F64, seed=19).requires_grad_()
    c0 = randn((b, h), F64, seed=20).requires_grad_() if mode == "lstm" else None
    inputs = [x, h0] + ([c0] if c0 is not None else []) + weights

    def run(*args):
        x_, h0_ = args[0], args[1]
        rest = list(args[2:])
        c0_ = rest.pop(0) if mode == "lstm" else None
        w_ih, w_hh, b_ih, b_hh = rest[:4]
        w_hr_ = rest[4] if proj else None
        y, h_n, c_n = ref.rnn_layer(mode, x_, batch_sizes, h0_, c0_, w_ih, w_hh, b_ih, b_hh, w_hr_, reverse, reset_after)
        return (y, h_n) + ((c_n,) if c_n is not None else ())

    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_tanh"])
def test_reference_runs_in_low_precision(kind, dtype):
    # Same-dtype torch.nn is the yardstick: the reference in float32/bfloat16 stays within 2x its error.
    m64 = make_module(kind, 1, False)
    m = make_module(kind, 1, False, dtype=dtype)
    mode = KINDS[kind][2]
    hout = P if kind == "lstm_proj" else H
    x64 = randn((T, B, I), F64, seed=21)
    h64 = randn((1, B, hout), F64, seed=22)
    c64 = randn((1, B, H), F64, seed=23) if mode == "lstm" else None
    x, h = x64.to(dtype), h64.to(dtype)
    c = None if c64 is None else c64.to(dtype)
    y, _, _ = reference_stack(m, mode, x, None, h, c)
    assert y.dtype == dtype
    y_torch, _ = m(x, (h, c) if mode == "lstm" else h)
    y64, _ = m64(x64, (h64, c64) if mode == "lstm" else h64)
    assert_within_torch_error(y, y_torch, y64, "output")


def test_empty_batch_and_single_step():
    w_ih, w_hh, b_ih, b_hh = gru_weights(330)
    y, h_n, _ = ref.rnn_layer("gru", randn((T, 0, I), F64), None, randn((0, H), F64), None,
                              w_ih, w_hh, b_ih, b_hh, None, False)
    assert y.shape == (T, 0, H) and h_n.shape == (0, H)
    x, h0 = randn((1, 3, I), F64, seed=24), randn((3, H), F64, seed=25)
    for reverse in (False, True):
        y, h_n, _ = ref.rnn_layer("gru", x, None, h0, None, w_ih, w_hh, b_ih, b_hh, None, reverse)
        step, _ = ref.rnn_cell("gru", x[0], h0, None, w_ih, w_hh, b_ih, b_hh)
        assert_close_to_ref(y[0], step, "output")
        assert_close_to_ref(h_n, step, "h_n")


def test_unknown_mode_is_an_error():
    w_ih, w_hh, b_ih, b_hh = gru_weights(340)
    with pytest.raises(ValueError, match="unknown recurrent mode 'lstmx'"):
        ref.rnn_layer("lstmx", randn((T, B, I), F64), None, randn((B, H), F64), None, w_ih, w_hh, b_ih, b_hh,
                      None, False)
    with pytest.raises(ValueError, match="unknown recurrent mode 'GRU'"):
        ref.rnn_cell("GRU", randn((B, I), F64), randn((B, H), F64), None, w_ih, w_hh, b_ih, b_hh)
