"""torch.ops.pyseqkern.rnn_step_direct (ops/rnn_direct.py): one step read from torch's weight layout, the
path of a compiled graph's inference step (T = 1). Against the float64 reference at every CPU level, odd
sizes, states and biases given or not, strided views; torch's same-dtype cells for the 2x rule;
determinism and thread-count independence; bad inputs; opcheck; and that compiled modules take it and
see every write to their weights."""
from __future__ import annotations

import pytest
import torch

import pyseqkern
from helpers import assert_bitwise_equal, assert_matches, assert_within_torch_error, randn, strided
from pyseqkern.reference import rnn as ref

OP = torch.ops.pyseqkern.rnn_step_direct
# name -> (mode code, reference mode, reset_after, gates)
MODES = {"lstm": (0, "lstm", True, 4), "gru": (1, "gru", True, 3), "gru_rb": (1, "gru", False, 3),
         "rnn_tanh": (2, "rnn_tanh", True, 1), "rnn_relu": (3, "rnn_relu", True, 1)}
# (B, I, H); 40 rows: past every mode's DIRECT_MAX_ROWS, the op's packed step
SIZES = [(1, 7, 113), (3, 256, 256), (5, 33, 17), (9, 1, 1), (2, 300, 40), (40, 9, 23)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _args(kind, B, I, H, dtype, make=randn, states=True, bias=True, seed=0):
    code, _, reset_after, G = MODES[kind]
    x = make((B, I), dtype, seed=seed)
    h = make((B, H), dtype, seed=seed + 1) if states else None
    c = make((B, H), dtype, seed=seed + 2) if states and code == 0 else None
    w_ih = make((G * H, I), dtype, seed=seed + 3, scale=I ** -0.5)
    w_hh = make((G * H, H), dtype, seed=seed + 4, scale=H ** -0.5)
    b_ih = make((G * H,), dtype, seed=seed + 5) if bias else None
    b_hh = make((G * H,), dtype, seed=seed + 6) if bias else None
    return (code, reset_after, x, h, c, w_ih, w_hh, b_ih, b_hh)


def _reference(kind, args):
    _, mode, reset_after, _ = MODES[kind]
    up = [None if t is None else t.double() for t in args[2:]]
    h, c = ref.rnn_cell(mode, *up, reset_after=reset_after)
    return h, c


def _torch_cell(kind, args):
    """torch's own cell in the same dtype (none for GRU reset_before)."""
    _, _, x, h, c, w_ih, w_hh, b_ih, b_hh = args
    if kind == "lstm":
        return torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    if kind == "gru":
        return torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), None
    if kind.startswith("rnn"):
        cell = torch.rnn_tanh_cell if kind == "rnn_tanh" else torch.rnn_relu_cell
        return cell(x, h, w_ih, w_hh, b_ih, b_hh), None
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("kind", list(MODES))
def test_matches_the_reference_at_every_level(isa, kind, size, dtype):
    args = _args(kind, *size, dtype)
    h, c = OP(*args)
    rh, rc = _reference(kind, args)
    assert_matches(h, rh, "h_n")
    if kind == "lstm":
        assert_matches(c, rc, "c_n")
    else:
        assert c.shape == (0, size[2])
    theirs = _torch_cell(kind, args) if dtype != torch.float64 else None
    if theirs is not None:
        assert_within_torch_error(h, theirs[0], rh, "h_n")
        if kind == "lstm":
            assert_within_torch_error(c, theirs[1], rc, "c_n")


@pytest.mark.parametrize("kind", list(MODES))
@pytest.mark.parametrize("states,bias", [(False, True), (True, False), (False, False)])
def test_states_and_biases_left_out_are_zeros(kind, states, bias):
    args = _args(kind, 4, 19, 37, torch.float32, states=states, bias=bias)
    h, c = OP(*args)
    rh, rc = _reference(kind, args)
    assert_matches(h, rh, "h_n")
    if kind == "lstm":
        assert_matches(c, rc, "c_n")


@pytest.mark.parametrize("kind", list(MODES))
def test_strided_views_give_the_contiguous_bits(kind):
    a = _args(kind, 3, 21, 29, torch.float32, make=strided)
    b = tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in a)
    for got, want in zip(OP(*a), OP(*b), strict=True):
        assert_bitwise_equal(got, want)


@pytest.mark.parametrize("batch", [5, 40])
@pytest.mark.parametrize("kind", list(MODES))
def test_bits_do_not_depend_on_runs_or_threads(kind, batch):
    args = _args(kind, batch, 256, 256, torch.float32)
    first = OP(*args)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for got, want in zip(OP(*args), first, strict=True):
                assert_bitwise_equal(got, want)
    finally:
        torch.set_num_threads(before)


def test_bad_inputs_name_the_argument():
    code, ra, x, h, c, w_ih, w_hh, b_ih, b_hh = _args("lstm", 2, 5, 7, torch.float32)
    with pytest.raises(ValueError, match="'w_ih' must have shape"):
        OP(code, ra, x, h, c, w_ih[:, :4], w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="'h0' must have shape"):
        OP(code, ra, x, h[:1], c, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="'c0' must have shape"):
        OP(code, ra, x, h, c[:, :3], w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="'b_hh' must have shape"):
        OP(code, ra, x, h, c, w_ih, w_hh, b_ih, b_hh[:5])
    with pytest.raises(ValueError, match="'w_hh' 2-D with 4\\*hidden rows"):
        OP(code, ra, x, h, c, w_ih, w_hh[:27], b_ih, b_hh)
    with pytest.raises(TypeError, match="'w_hh' is torch.float64 but 'x' is torch.float32"):
        OP(code, ra, x, h, c, w_ih, w_hh.double(), b_ih, b_hh)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        OP(code, ra, x.half(), h.half(), c.half(), w_ih.half(), w_hh.half(), b_ih.half(), b_hh.half())
    with pytest.raises(ValueError, match="'mode' must be"):
        OP(7, ra, x, h, c, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="'x' must be \\[B, I\\]"):
        OP(code, ra, x[None], h, c, w_ih, w_hh, b_ih, b_hh)


@pytest.mark.cuda
def test_cuda_tensors_are_refused_by_name():
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in _args("gru", 2, 5, 7, torch.float32)]
    with pytest.raises(ValueError, match="'x' must be a CPU tensor"):
        OP(*args)


def test_refuses_a_recorded_call():
    """No gradient of its own (rnn_layer sends it only calls that record none)."""
    args = list(_args("gru", 2, 5, 7, torch.float32))
    args[5] = args[5].requires_grad_()
    with pytest.raises(RuntimeError, match="rnn_step_direct was called on tensors that require grad"):
        OP(*args)
    with torch.no_grad():
        assert OP(*args)[0].shape == (2, 7)


@pytest.mark.parametrize("kind", ["lstm", "gru_rb"])
def test_opcheck(kind):
    torch.library.opcheck(OP.default, _args(kind, 3, 6, 5, torch.float32))
    torch.library.opcheck(OP.default, _args(kind, 2, 4, 3, torch.float64, states=False, bias=False))


_MODULES = {"LSTM": {}, "GRU": {}, "GRU_rb": {"reset_after": False}, "RNN": {"nonlinearity": "relu"}}


@pytest.mark.parametrize("batch", [3, 40])
@pytest.mark.parametrize("name", list(_MODULES))
def test_compiled_inference_steps_take_it_and_see_every_write(name, batch):
    """A compiled decoding step (T = 1, no gradient) is this op alone, and the weights it reads are the
    weights as they are: one element written through `.data` (no version bump) shows in the next call
    (past DIRECT_MAX_ROWS rows too, where the op checks the cached pack bit for bit).
    (Eager inference can miss such a write: its cache samples the weights, DESIGN.md "Packed weights".)"""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    m = getattr(pyseqkern.nn, name.split("_")[0])(13, 29, num_layers=2, **_MODULES[name]).eval()
    x, h = randn((1, batch, 13), seed=1), randn((2, batch, 29), seed=2)
    hx = (h, randn((2, batch, 29), seed=3)) if name == "LSTM" else h
    with torch._dynamo.config.patch(allow_rnn=True):
        torch._dynamo.reset()
        for compiled in (torch.compile(m, backend=backend, fullgraph=True), torch.compile(m, fullgraph=True)):
            with torch.no_grad():
                for step in range(3):
                    out, state = compiled(x, hx)
                    want, want_state = _as64(m, x, hx)
                    assert_matches(out, want)
                    for got, ref64 in zip(state if name == "LSTM" else (state,),
                                          want_state if name == "LSTM" else (want_state,), strict=True):
                        assert_matches(got, ref64)
                    m.weight_hh_l1.data[5, 2] += 0.25
    assert graphs and all(code.count("pyseqkern.rnn_step_direct(") == 2 and "rnn_pack" not in code for code in graphs)


def _as64(m, x, hx):
    import copy
    m64 = copy.deepcopy(m).double()
    hx64 = tuple(t.double() for t in hx) if isinstance(hx, tuple) else hx.double()
    with torch.no_grad():
        return m64(x.double(), hx64)
