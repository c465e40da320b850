"""Random sequences of weight changes and calls on one of our modules and its torch.nn twin (float64):
after every kind of change, each call must give torch.nn's result for the module's current weights and
gradients, so no cache (packed weights, the thin paths' plans, the sampled fingerprints) ever answers for
weights that changed. Each sequence derives from its seed; a failure names the seed and the operations
that led to it. (Tanh, sigmoid and ReLU at the default initialisation over at most 17 steps: float64
results of the two sides agree to ~1e-15, far inside the float64 tolerances.)"""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pyseqkern
import pyseqkern.nn as P
from helpers import assert_close_to_ref, randn, runnable_levels, weighted_sum

SEQUENCES = 100
OPERATIONS = 60
# The level switch is listed twice: many of its draws land on the level already set, or on one whose
# layouts for the dtype are the same.
CHANGES = ("sgd", "adam_fused", "adam_foreach", "data_add", "data_copy", "data_assign", "no_grad_mul", "one_element",
           "new_parameter", "load_state_dict", "dtype_round_trip", "deepcopy", "level", "level")


def _pair(rng):
    kind = rng.choice(["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
    I, H = rng.choice([1, 3, 7, 16, 33]), rng.choice([1, 3, 7, 16, 33])
    kw = dict(bias=rng.random() < 0.8)
    if kind in ("RNN", "RNNCell"):
        kw["nonlinearity"] = rng.choice(["tanh", "relu"])
    if not kind.endswith("Cell"):
        kw.update(num_layers=rng.randint(1, 2), bidirectional=rng.random() < 0.4, batch_first=rng.random() < 0.5)
        if kind == "LSTM" and H > 1 and rng.random() < 0.3:
            kw["proj_size"] = rng.randint(1, H - 1)
    ours = getattr(P, kind)(I, H, **kw).double()
    twin = getattr(torch.nn, kind)(I, H, **kw).double()
    twin.load_state_dict(ours.state_dict())
    return kind, I, H, kw, ours, twin


def _nudge(p, rng, scale=0.01):
    return randn(p.shape, p.dtype, seed=rng.getrandbits(31), scale=scale)


def _change(ours, rng, fresh):
    """One change to our module's weights (or to the module itself); returns (its name, the module).
    fresh(): a newly initialised module of the same configuration."""
    names = [n for n, _ in ours.named_parameters()]
    name = rng.choice(names)
    p = ours.get_parameter(name)
    what = rng.choice(CHANGES)
    if what in ("sgd", "adam_fused", "adam_foreach"):
        params = list(ours.parameters())
        for q in params:
            q.grad = _nudge(q, rng, 0.1)
        opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9) if what == "sgd"
               else torch.optim.Adam(params, lr=1e-2, fused=what == "adam_fused", foreach=what == "adam_foreach"))
        opt.step()
        opt.step()
        for q in params:
            q.grad = None
    elif what == "data_add":
        p.data.add_(_nudge(p, rng))
    elif what == "data_copy":
        p.data.copy_(p.data + _nudge(p, rng))
    elif what == "data_assign":
        p.data = p.data + _nudge(p, rng)
    elif what == "no_grad_mul":
        with torch.no_grad():
            p.mul_(1.05)
    elif what == "one_element":
        with torch.no_grad():
            p.view(-1)[rng.randrange(p.numel())] += 0.25
    elif what == "new_parameter":
        module, _, attr = name.rpartition(".")
        setattr(ours.get_submodule(module) if module else ours, attr,
                torch.nn.Parameter(p.detach() + _nudge(p, rng)))
    elif what == "load_state_dict":
        ours.load_state_dict(fresh().state_dict())
    elif what == "dtype_round_trip":
        ours.float()
        ours.double()
    elif what == "level":  # (the CPU kernel level: each keeps its own packed layouts)
        levels = runnable_levels()  # (one draw whatever their number: the sequence stays the same elsewhere)
        name = levels[int(rng.random() * len(levels))]  # (the level names the change)
        pyseqkern.set_cpu_isa(name)
    else:
        ours = copy.deepcopy(ours)
    return f"{what} {name}", ours


def _inputs(kind, I, H, kw, rng):
    """(x, hx, label): the call's input, float64 (a tensor, or (data, lengths, enforce_sorted) to pack), and
    its states (None, a tensor, or LSTM's pair)."""
    seed = rng.getrandbits(31)
    B = rng.choice([1, 2, 7])
    unbatched = rng.random() < 0.15
    if kind.endswith("Cell"):
        lead = () if unbatched else (B,)
        x = randn((*lead, I), torch.float64, seed=seed)
        states = [randn((*lead, H), torch.float64, seed=seed + 1 + i, scale=0.5)
                  for i in range(2 if kind == "LSTMCell" else 1)]
        hx = None if rng.random() < 0.3 else tuple(states) if kind == "LSTMCell" else states[0]
        return x, hx, f"B={B} unbatched={unbatched} hx={hx is not None}"
    T = rng.choice([1, 2, 5, 17])
    D, L = 2 if kw["bidirectional"] else 1, kw["num_layers"]
    x = randn((T, I) if unbatched else (B, T, I) if kw["batch_first"] else (T, B, I), torch.float64, seed=seed)
    lead = (L * D,) if unbatched else (L * D, B)
    hx = None
    if rng.random() < 0.6:
        h = randn((*lead, kw.get("proj_size") or H), torch.float64, seed=seed + 1, scale=0.5)
        hx = (h, randn((*lead, H), torch.float64, seed=seed + 2, scale=0.5)) if kind == "LSTM" else h
    packed = not unbatched and rng.random() < 0.25
    label = f"T={T} B={B} unbatched={unbatched} packed={packed} hx={hx is not None}"
    if packed:
        lengths = [rng.randint(1, T) for _ in range(B)]
        lengths[rng.randrange(B)] = T
        sort = rng.random() < 0.5
        x = (x, sorted(lengths, reverse=True) if sort else lengths, sort)
    return x, hx, label


def _call(module, x, hx, kw, grad):
    """The module's outputs as a flat list of tensors; with `grad`, inputs and states are leaves that want
    gradients (returned too)."""
    leaves = []

    def leaf(t):
        t = t.clone().requires_grad_(grad)
        leaves.append(t)
        return t

    if isinstance(x, tuple):
        data, lengths, sort = x
        x = pack_padded_sequence(leaf(data), torch.tensor(lengths), batch_first=kw["batch_first"],
                                 enforce_sorted=sort)
    else:
        x = leaf(x)
    if hx is not None:
        hx = tuple(leaf(t) for t in hx) if isinstance(hx, tuple) else leaf(hx)
    out = module(x, hx)
    flat = []
    for t in (out if isinstance(out, tuple) else (out,)):
        if isinstance(t, PackedSequence):  # (a tuple too)
            flat.append(t.data)
        else:
            flat.extend(t if isinstance(t, tuple) else (t,))
    return flat, leaves


@pytest.fixture
def seeded(request):
    """torch's global generator (module initialisation) seeded by the test's seed, and the CPU kernel
    level, both restored after."""
    best = pyseqkern.backend_info()["cpu"]["isa_best"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(request.node.callspec.params["seed"])
        try:
            yield
        finally:
            pyseqkern.set_cpu_isa(best)


@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_calls_after_any_change_give_torch_nn_results_for_the_current_weights(seed, seeded):
    rng = random.Random(seed)
    kind, I, H, kw, ours, twin = _pair(rng)
    done = [f"{kind}({I}, {H}, {kw})"]
    for _ in range(OPERATIONS):
        if rng.random() < 0.4:
            what, ours = _change(ours, rng, lambda: getattr(P, kind)(I, H, **kw).double())
            twin.load_state_dict(ours.state_dict())
            done.append(what)
            continue
        train = rng.random() < 0.5
        ours.train(train)
        twin.train(train)
        grad = rng.random() < 0.5
        region = "enable_grad" if grad else rng.choice(["no_grad", "inference_mode", "enable_grad"])
        x, hx, label = _inputs(kind, I, H, kw, rng)
        done.append(f"call {region} train={train} grads={grad} {label}")
        where = f"seed {seed}: " + " -> ".join(done[-6:])
        results = []
        for m in (ours, twin):
            with getattr(torch, region)():
                results.append(_call(m, x, hx, kw, grad))
        (ours_out, ours_leaves), (twin_out, twin_leaves) = results
        for i, (a, b) in enumerate(zip(ours_out, twin_out)):
            assert_close_to_ref(a, b, f"{where}: output {i}")
        if grad:
            loss_seed = rng.getrandbits(31)
            for out in (ours_out, twin_out):
                weighted_sum(out, seed=loss_seed).backward()
            for i, (a, b) in enumerate(zip(ours_leaves, twin_leaves)):
                assert_close_to_ref(a.grad, b.grad, f"{where}: gradient of input {i}")
            twin_grads = dict(twin.named_parameters())
            for name, p in ours.named_parameters():
                assert_close_to_ref(p.grad, twin_grads[name].grad, f"{where}: gradient of {name}")
            ours.zero_grad(set_to_none=True)
            twin.zero_grad(set_to_none=True)
