"""Recorded cell steps with deferred weight gradients (pyseqkern/ops/rnn_cell_deferred.py): a loop's
weight gradients formed once per backward pass, with autograd's semantics kept (partial gradients,
retain_graph, create_graph, hooks, threads) and every gradient on the float64 reference."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import pyseqkern.nn as pnn
from pyseqkern.ops import rnn_cell_deferred as deferred
from pyseqkern.reference import rnn as ref
from helpers import assert_bitwise_equal, assert_matches, randn, strided, weighted_sum

I, H = 11, 9
KINDS = {"lstm": ("LSTMCell", {}), "gru": ("GRUCell", {}), "gru_before": ("GRUCell", {"reset_after": False}),
         "rnn_tanh": ("RNNCell", {"nonlinearity": "tanh"}), "rnn_relu": ("RNNCell", {"nonlinearity": "relu"})}


def make(kind, dtype=torch.float32, bias=True, seed=300):
    name, kw = KINDS[kind]
    cell = getattr(pnn, name)(I, H, bias=bias, dtype=dtype, **kw)
    with torch.no_grad():
        for k, p in enumerate(cell.parameters()):
            p.copy_(randn(p.shape, dtype, seed=seed + k, scale=0.5))
    return cell


def states_of(kind, batch, dtype, seed=310):
    h = randn((batch, H), dtype, seed=seed, scale=0.5).requires_grad_()
    if kind == "lstm":
        return h, randn((batch, H), dtype, seed=seed + 1, scale=0.5).requires_grad_()
    return h


def loop(cell, kind, xs, st):
    """The outputs of a loop of steps (h, and c for LSTM, each step)."""
    outs = []
    for x in xs:
        st = cell(x, st)
        outs += list(st) if kind == "lstm" else [st]
    return outs


def reference(cell, kind, xs, st):
    """(outputs, params64, xs64, states64) of the same loop through the float64 reference."""
    params = [p.detach().double().requires_grad_() for p in cell.parameters()]
    w_ih, w_hh, b_ih, b_hh = params if len(params) == 4 else (*params, None, None)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    st64 = None if st is None else [s.detach().double().requires_grad_() for s in (st if kind == "lstm" else (st,))]
    h, c = (None, None) if st64 is None else (st64[0], st64[-1] if kind == "lstm" else None)
    outs = []
    for x in xs64:
        h, c = ref.rnn_cell("gru" if kind == "gru_before" else kind, x, h, c, w_ih, w_hh, b_ih, b_hh,
                            reset_after=kind != "gru_before")
        outs += [h, c] if kind == "lstm" else [h]
    return outs, params, xs64, st64 or []


def counting_deferred_steps(monkeypatch):
    """A list that grows by one for each step whose backward defers its weight gradients."""
    left, real = [], deferred._Accumulator.leave
    monkeypatch.setattr(deferred._Accumulator, "leave", lambda self, *a: left.append(1) or real(self, *a))
    return left


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hx", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 5, "most", "above"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_loop_gradients_match_the_reference(monkeypatch, kind, batch, bias, hx, dtype):
    """Every output and gradient of a 7-step loop (x strided, states given or zeros) on the float64
    reference, the weight gradients deferred up to _DEFER_MAX_BATCH rows (every step's backward), and
    two runs bit for bit alike."""
    most = deferred._DEFER_MAX_BATCH[kind]
    batch = {"most": most, "above": most + 1}.get(batch, batch)
    cell = make(kind, dtype, bias)
    left = counting_deferred_steps(monkeypatch)
    xs = [strided((batch, I), dtype, seed=320 + t).requires_grad_() for t in range(7)]
    st = states_of(kind, batch, dtype) if hx else None
    runs = []
    for _ in range(2):
        outs = loop(cell, kind, xs, st)
        weighted_sum(outs, 30).backward()
        grads = [p.grad.clone() for p in cell.parameters()] + [x.grad.clone() for x in xs]
        grads += [s.grad.clone() for s in (st if kind == "lstm" else (st,))] if hx else []
        runs.append([o.detach() for o in outs] + grads)
        cell.zero_grad(set_to_none=True)
        for t in xs + (list(st if kind == "lstm" else (st,)) if hx else []):
            t.grad = None
    assert len(left) == (14 if batch <= most else 0)
    outs64, params64, xs64, st64 = reference(cell, kind, xs, st)
    grads64 = torch.autograd.grad(weighted_sum(outs64, 30), params64 + xs64 + st64)
    for k, (a, a2, e) in enumerate(zip(runs[0], runs[1], outs64 + list(grads64), strict=True)):
        assert_bitwise_equal(a, a2, name=f"output/gradient {k}")
        assert_matches(a, e, name=f"output/gradient {k}")


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_before"])
def test_partial_gradients_retain_graph_and_two_losses_over_one_loop(kind):
    """autograd.grad of the inputs only leaves nothing behind; a second backward pass over the retained
    graph, and a loss over part of the loop, each get their own steps' weight gradients."""
    cell = make(kind)
    xs = [randn((2, I), seed=330 + t).requires_grad_() for t in range(6)]
    outs = loop(cell, kind, xs, states_of(kind, 2, torch.float32))
    per_step = 2 if kind == "lstm" else 1
    early, full = weighted_sum(outs[:3 * per_step], 40), weighted_sum(outs, 41)
    outs64, params64, xs64, _ = reference(cell, kind, xs, states_of(kind, 2, torch.float32))
    want_early = torch.autograd.grad(weighted_sum(outs64[:3 * per_step], 40), params64, retain_graph=True)
    want_full = torch.autograd.grad(weighted_sum(outs64, 41), params64 + xs64)

    dxs = torch.autograd.grad(full, xs, retain_graph=True)  # (inputs only: the token does not run)
    for k, (a, e) in enumerate(zip(dxs, want_full[len(params64):])):
        assert_matches(a, e, name=f"dx {k}")
    for rep in range(2):  # the retained graph, twice
        got = torch.autograd.grad(early, list(cell.parameters()), retain_graph=True)
        for k, (a, e) in enumerate(zip(got, want_early)):
            assert_matches(a, e, name=f"early loss, pass {rep}, parameter gradient {k}")
    full.backward()
    for k, (p, e) in enumerate(zip(cell.parameters(), want_full)):
        assert_matches(p.grad, e, name=f"full loss, parameter gradient {k}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradcheck_and_gradgradcheck_of_a_loop(kind):
    """float64 gradcheck (its perturbations go through .data between calls) and gradgradcheck
    (create_graph: each step's own weight gradients, from differentiable ops)."""
    cell = make(kind, torch.float64)
    xs = [randn((2, I), torch.float64, seed=340 + t).requires_grad_() for t in range(3)]
    st = states_of(kind, 2, torch.float64)
    states = list(st) if kind == "lstm" else [st]

    def g(*args):  # the cell's own Parameters among the inputs, so that the route is the recorded one
        s = tuple(args[:len(states)])
        return tuple(loop(cell, kind, args[len(states):], s if kind == "lstm" else s[0]))

    params = list(cell.parameters())
    assert torch.autograd.gradcheck(lambda *a: g(*a[len(params):]), (*params, *states, *xs))
    assert torch.autograd.gradgradcheck(lambda *a: g(*a[len(params):]), (*params, *states, *xs), fast_mode=True)


def test_hooks_threads_and_frozen_weights():
    """A parameter hook sees the loop's gradient once; loops in two threads at once over one module each
    get their own gradients; frozen weights defer nothing and still give x its gradient."""
    cell = make("lstm")
    seen = []
    cell.weight_hh.register_hook(lambda g: seen.append(g.clone()))
    xs = [randn((3, I), seed=350 + t) for t in range(5)]
    outs64, params64, _, _ = reference(cell, "lstm", xs, None)
    want = torch.autograd.grad(weighted_sum(outs64, 50), params64)
    weighted_sum(loop(cell, "lstm", xs, None), 50).backward()
    assert len(seen) == 1
    assert_matches(seen[0], want[1], "hooked dW_hh")

    results, errors = {}, []

    def worker(k):
        try:
            for _ in range(20):
                outs = loop(cell, "lstm", [x * (k + 1) for x in xs], None)
                results[k] = torch.autograd.grad(weighted_sum(outs, 50), list(cell.parameters()))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(2):
        o64, p64, _, _ = reference(cell, "lstm", [x * (k + 1) for x in xs], None)
        for j, (a, e) in enumerate(zip(results[k], torch.autograd.grad(weighted_sum(o64, 50), p64))):
            assert_matches(a, e, f"thread {k} gradient {j}")

    for p in cell.parameters():
        p.requires_grad_(False)
    xg = [x.clone().requires_grad_() for x in xs]
    outs = loop(cell, "lstm", xg, None)
    dx = torch.autograd.grad(weighted_sum(outs, 51), xg)
    o64, _, x64, _ = reference(cell, "lstm", xg, None)
    for j, (a, e) in enumerate(zip(dx, torch.autograd.grad(weighted_sum(o64, 51), x64))):
        assert_matches(a, e, f"dx {j} with frozen weights")


def test_a_loop_left_without_backward_keeps_nothing_alive():
    """The token's graph holds the parameters: a loop stepped with grad and dropped must not keep its
    module (nor the states' bookkeeping) alive."""
    cell = make("gru")
    ref_cell = weakref.ref(cell)
    h = None
    for t in range(4):
        h = cell(randn((2, I), seed=360 + t), h)
    del cell, h
    gc.collect()
    assert ref_cell() is None
    assert not deferred._LOOPS
    module = pnn.LSTM(I, H, num_layers=3)  # (its states stacked each call: carry_stacked's entries)
    ref_module, hx = weakref.ref(module), None
    for t in range(4):
        y, hx = module(randn((1, 2, I), seed=365 + t), hx)
    del module, hx, y
    gc.collect()
    assert ref_module() is None
    assert not deferred._LOOPS


def test_states_computed_between_steps_start_new_loops():
    """A state the caller computes from the outputs (here h * 1) carries no loop: each step its own
    token, the gradients the same."""
    cell = make("rnn_tanh")
    xs = [randn((2, I), seed=370 + t) for t in range(4)]
    h, outs = None, []
    for x in xs:
        h = cell(x, h) * 1.0
        outs.append(h)
    weighted_sum(outs, 60).backward()
    o64, p64, _, _ = reference(cell, "rnn_tanh", xs, None)
    for j, (p, e) in enumerate(zip(cell.parameters(), torch.autograd.grad(weighted_sum(o64, 60), p64))):
        assert_matches(p.grad, e, f"parameter gradient {j}")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_before", "rnn_relu"])
def test_activation_checkpointing_over_a_loop(kind, reentrant):
    """torch.utils.checkpoint over chunks of a loop (the steps recomputed in the backward, their tokens
    and accumulators made afresh there), under saved-tensor hooks: the float64 reference's gradients."""
    from torch.utils.checkpoint import checkpoint

    cell = make(kind, torch.float64)
    xs = randn((6, 3, I), torch.float64, seed=380).requires_grad_()
    h0 = states_of(kind, 3, torch.float64)

    def chunk(xs_part, *st):
        outs = loop(cell, kind, list(xs_part), st if kind == "lstm" else st[0])
        step = 2 if kind == "lstm" else 1
        return (torch.stack(outs[::step]), *outs[-step:])

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        first = checkpoint(chunk, xs[:3], *(h0 if kind == "lstm" else (h0,)), use_reentrant=reentrant)
        second = checkpoint(chunk, xs[3:], *first[1:], use_reentrant=reentrant)
    weighted_sum([first[0], second[0]], 70).backward()
    o64, p64, xs64, s64 = reference(cell, kind, list(xs.detach()), h0)
    hs64 = torch.stack(o64[::2] if kind == "lstm" else o64)
    want = torch.autograd.grad(weighted_sum([hs64[:3], hs64[3:]], 70), xs64 + p64 + s64)
    want = [torch.stack(want[:6])] + list(want[6:])
    got = [xs.grad] + [p.grad for p in cell.parameters()] + [s.grad for s in (h0 if kind == "lstm" else (h0,))]
    for k, (a, e) in enumerate(zip(got, want, strict=True)):
        assert_matches(a, e, f"gradient {k}")


MODULES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "gru_before": ("GRU", {"reset_after": False}),
           "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}), "rnn_relu": ("RNN", {"nonlinearity": "relu"})}


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("kind", list(MODULES))
def test_a_module_of_several_layers_fed_one_token_a_call(monkeypatch, kind, layers, batched):
    """A layer stack fed one token a call with grad (each call's h_n, c_n stacked from its layers' steps,
    the next call's states views of them): one token per layer for the whole loop, every step deferring
    (not a loop per step), and every output and gradient on the float64 reference, layer by layer."""
    name, kw = MODULES[kind]
    module = getattr(pnn, name)(I, H, num_layers=layers, batch_first=True, **kw)
    with torch.no_grad():
        for k, p in enumerate(module.parameters()):
            p.copy_(randn(p.shape, seed=390 + k, scale=0.5))
    tokens, real = [], deferred._weight_grads
    monkeypatch.setattr(deferred, "_weight_grads", lambda *a: tokens.append(1) or real(*a))
    left = counting_deferred_steps(monkeypatch)
    steps, batch = 5, 3 if batched else 1
    xs = [randn((batch, 1, I) if batched else (1, I), seed=400 + t).requires_grad_() for t in range(steps)]
    hx, outs = None, []
    for x in xs:
        y, hx = module(x, hx)
        outs += [y, *(hx if kind == "lstm" else (hx,))]
    weighted_sum(outs, 80).backward()
    assert len(tokens) == layers and len(left) == layers * steps

    params64 = [p.detach().double().requires_grad_() for p in module.parameters()]
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    states = [(None, None)] * layers
    outs64 = []
    for x in xs64:
        inp = x.reshape(batch, I)
        for layer in range(layers):
            w_ih, w_hh, b_ih, b_hh = params64[4 * layer:4 * layer + 4]
            h, c = ref.rnn_cell("gru" if kind == "gru_before" else kind, inp, *states[layer], w_ih, w_hh, b_ih, b_hh,
                                reset_after=kind != "gru_before")
            states[layer], inp = (h, c), h
        shape = (layers, batch, H) if batched else (layers, H)
        outs64 += [inp.reshape(xs[0].shape[:-1] + (H,)), torch.stack([s[0] for s in states]).reshape(shape)]
        if kind == "lstm":
            outs64.append(torch.stack([s[1] for s in states]).reshape(shape))
    grads64 = torch.autograd.grad(weighted_sum(outs64, 80), params64 + xs64)
    got = [o.detach() for o in outs] + [p.grad for p in module.parameters()] + [x.grad for x in xs]
    for k, (a, e) in enumerate(zip(got, outs64 + list(grads64), strict=True)):
        assert_matches(a, e, name=f"output/gradient {k}")


def torch_twin(cell, kind):
    """torch.nn's cell with the same weights, in float64 (GRU reset_before has none: None)."""
    if kind == "gru_before":
        return None
    name, kw = KINDS[kind]
    twin = getattr(torch.nn, name)(I, H, bias=cell.bias_ih is not None, **kw).double()
    twin.load_state_dict(cell.state_dict())
    return twin


@pytest.mark.parametrize("kind", list(KINDS))
def test_writes_and_freezes_in_the_middle_of_a_loop(kind):
    """What torch.nn allows between a loop's steps and its backward, with its gradients: a bias updated
    in place (torch.nn saves no bias), W_ih updated in place where x wants no gradient, a parameter
    rebound through `.data` (the backward uses what the forward multiplied), and weight_ih frozen for
    some steps (those steps give it nothing; the loop's token is made for the parameters wanting
    gradients when it starts)."""
    cell = make(kind, torch.float64)
    twin = torch_twin(cell, kind)
    xs = [randn((3, I), torch.float64, seed=420 + t) for t in range(4)]

    def run(m, write):
        for p in m.parameters():
            p.grad = None
        h, outs = None, []
        for t, x in enumerate(xs):
            m.weight_ih.requires_grad_(t != 2)
            h = m(x, h)
            outs += list(h) if kind == "lstm" else [h]
        m.weight_ih.requires_grad_(True)
        saved = [p.detach().clone() for p in m.parameters()]
        write(m)
        weighted_sum(outs, 90).backward()
        grads = [p.grad for p in m.parameters()]
        with torch.no_grad():
            for p, v in zip(m.parameters(), saved):
                p.data = v
        return outs, grads

    def expected():  # the float64 reference, weight_ih detached at step 2
        params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
        h = c = None
        outs = []
        for t, x in enumerate(xs):
            w_ih = params[0] if t != 2 else params[0].detach()
            h, c = ref.rnn_cell("gru" if kind == "gru_before" else kind, x, h, c, w_ih, *params[1:],
                                reset_after=kind != "gru_before")
            outs += [h, c] if kind == "lstm" else [h]
        return outs, torch.autograd.grad(weighted_sum(outs, 90), params)

    def in_place(name, op):
        def write(m):
            with torch.no_grad():
                op(getattr(m, name))
        return write

    writes = {
        "bias in place": in_place("bias_hh", lambda p: p.add_(0.25)),
        "W_ih in place (x wants no gradient)": in_place("weight_ih", lambda p: p.mul_(0.5)),
        "W_hh rebound through .data": lambda m: setattr(m.weight_hh, "data", m.weight_hh.data * 2),
    }
    want_outs, want_grads = expected()
    for what, write in writes.items():
        outs, grads = run(cell, write)
        for k, (a, e) in enumerate(zip(outs + grads, want_outs + list(want_grads), strict=True)):
            assert_matches(a, e, name=f"{what}: output/gradient {k}")
        if twin is not None:  # (and torch.nn agrees that the write is allowed)
            run(twin, write)


@pytest.mark.parametrize("kind", ["gru", "gru_before"])
@pytest.mark.parametrize("module", ["cell", "layer"])
def test_frozen_gru_takes_a_write_to_its_state_before_the_backward(kind, module):
    """A frozen GRU's state written in place between a step and its backward (RL code resetting h where an
    episode ends): torch.nn's fused GRU cell keeps h in its workspace and gives the gradient; ours saved h
    itself and raised autograd's in-place error (a module fuzzer, stop 33). It keeps a copy where W_hh wants
    no gradient: the gradient of the state as it was at the step, for GRUCell and a one-step GRU alike."""
    torch.manual_seed(0)
    reset_after = kind == "gru"
    m = make(kind, torch.float64) if module == "cell" else pnn.GRU(I, H, reset_after=reset_after).double()
    m.requires_grad_(False)
    x = randn((3, I), torch.float64, seed=440)
    x = x if module == "cell" else x.unsqueeze(0)
    h0 = randn((3, H) if module == "cell" else (1, 3, H), torch.float64, seed=441)

    def grad(write):
        h = h0.clone().requires_grad_()
        out = m(x, h)
        y = out if module == "cell" else out[0]
        if write:
            with torch.no_grad():
                h.mul_(3)
        return torch.autograd.grad(weighted_sum([y], 91), [h])[0]

    want = grad(False)
    assert_bitwise_equal(grad(True), want)
    params = [p.detach() for p in m.parameters()]
    h = h0.reshape(3, H).clone().requires_grad_()
    y, _ = ref.rnn_cell("gru", x.reshape(3, I), h, None, *params, reset_after=reset_after)
    assert_matches(want.reshape(3, H), torch.autograd.grad(weighted_sum([y.reshape(want.shape)], 91), [h])[0])
    if reset_after:  # (and torch.nn agrees that the write is allowed)
        twin = getattr(torch.nn, "GRUCell" if module == "cell" else "GRU")(I, H).double().requires_grad_(False)
        twin.load_state_dict(m.state_dict())
        h = h0.clone().requires_grad_()
        out = twin(x, h)
        with torch.no_grad():
            h.mul_(3)
        torch.autograd.grad(weighted_sum([out if module == "cell" else out[0]], 91), [h])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_create_graph_after_an_in_place_write_raises(kind):
    """create_graph recomputes a step from its inputs: a bias written in place since then would change
    the recomputation, so it raises torch's in-place error rather than answer for other values."""
    cell = make(kind, torch.float64)
    h = None
    for t in range(2):
        h = cell(randn((2, I), torch.float64, seed=430 + t), h)
    with torch.no_grad():
        cell.bias_hh.add_(1.0)
    with pytest.raises(RuntimeError, match="bias_hh is at version"):
        torch.autograd.grad((h[0] if kind == "lstm" else h).sum(), cell.weight_hh, create_graph=True)


def test_tied_gru_cells_of_both_variants_in_one_loop():
    """A GRUCell and a reset_before GRUCell sharing their parameters, stepped alternately: each variant's
    steps keep their own accumulator (its layout differs)."""
    after = make("gru", torch.float64)
    before = pnn.GRUCell(I, H, reset_after=False, dtype=torch.float64)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(before, name, getattr(after, name))
    xs = [randn((2, I), torch.float64, seed=440 + t) for t in range(4)]
    for order in ((after, before), (before, after)):
        after.zero_grad(set_to_none=True)
        h, outs = None, []
        for t, x in enumerate(xs):
            h = order[t % 2](x, h)
            outs.append(h)
        weighted_sum(outs, 91).backward()
        params = [p.detach().clone().requires_grad_() for p in after.parameters()]
        h, want = None, []
        for t, x in enumerate(xs):
            h, _ = ref.rnn_cell("gru", x, h, None, *params, reset_after=order[t % 2] is after)
            want.append(h)
        for k, (p, e) in enumerate(zip(after.parameters(), torch.autograd.grad(weighted_sum(want, 91), params))):
            assert_matches(p.grad, e, name=f"gradient {k}")


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_module_fed_one_token_a_call_takes_in_place_writes_to_its_outputs(nonlinearity, layers):
    """A recorded RNN step saves its output; the module's y and h_n must be memory of their own, as
    torch.nn's are: a mask written into h_n (and y) before the next call is allowed, and the gradients
    are the reference's."""
    module = pnn.RNN(I, H, num_layers=layers, nonlinearity=nonlinearity).double()
    twin = torch.nn.RNN(I, H, num_layers=layers, nonlinearity=nonlinearity).double()
    twin.load_state_dict(module.state_dict())
    xs = [randn((1, 2, I), torch.float64, seed=450 + t) for t in range(4)]
    results = []
    for m in (module, twin):
        hx, outs = None, []
        for x in xs:
            y, hx = m(x, hx)
            hx[:, 1] = 0.0  # (a finished beam's state)
            y.mul_(0.5)
            outs += [y, hx]
        weighted_sum(outs, 92).backward()
        results.append([o.detach() for o in outs] + [p.grad for p in m.parameters()])
    for k, (a, e) in enumerate(zip(*results, strict=True)):
        assert_matches(a, e, name=f"output/gradient {k}")
