"""Recurrent layers under the other autograd uses a drop-in must survive: double backward
(create_graph=True: gradient penalties, Hessian-vector products, MAML), torch.func transforms (grad,
vjp, jvp, jacfwd, hessian, vmap and per-sample gradients) and forward-mode AD, against torch.nn in
float64 with the same weights, or against the same computation done call by call where torch.nn has no
rule (vmap). Also the reference's zero states (h0/c0 None), which these routes and the env-forced
reference run on."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pyseqkern.nn as pnn
from pyseqkern import _backend
from pyseqkern.ops import rnn as rnn_ops
from pyseqkern.ops import rnn_autograd
from pyseqkern.reference import rnn as ref
from helpers import TOLERANCES, assert_within_torch_error, devices

F64 = torch.float64
T, B, I, H, P = 4, 3, 5, 4, 2

SEQ_KINDS = {
    "lstm": ("LSTM", {}),
    "lstm_proj-bidirectional-2layers": ("LSTM", dict(proj_size=P, bidirectional=True, num_layers=2)),
    "gru-2layers": ("GRU", dict(num_layers=2)),
    "gru_reset_before": ("GRU", dict(reset_after=False)),
    "rnn_tanh-bidirectional": ("RNN", dict(bidirectional=True)),
    "rnn_relu": ("RNN", dict(nonlinearity="relu")),
}
CELL_KINDS = {"lstm_cell": ("LSTMCell", {}), "gru_cell": ("GRUCell", {}), "rnn_cell": ("RNNCell", {}),
              "gru_cell_reset_before": ("GRUCell", dict(reset_after=False))}


def _pair(cls, kw):
    """(torch.nn module, ours) in float64 with the same weights; GRU reset_before has no torch.nn twin,
    so its oracle is ours run by the reference (PYSEQKERN_REFERENCE's route)."""
    torch.manual_seed(7)
    ours = getattr(pnn, cls)(I, H, **kw).to(F64)
    if kw.get("reset_after", True) is False:
        return None, ours
    theirs = getattr(torch.nn, cls)(I, H, **kw).to(F64)
    theirs.load_state_dict(ours.state_dict())
    return theirs, ours


def _oracle(theirs, ours, monkeypatch):
    if theirs is not None:
        return theirs
    monkeypatch.setattr(_backend, "_REFERENCE_FORCED", True)  # read per call: ours then runs the reference
    return ours


def _assert_close(actual, expected, name):
    """float64 tolerances relative to the tensor's largest value (sums of many products here)."""
    rtol, atol = TOLERANCES[F64]
    assert actual is not None and expected is not None, f"{name}: a gradient is missing"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3e} at scale {scale:.3e}"


def _inputs(cell):
    torch.manual_seed(3)
    return torch.randn(B, I, dtype=F64) if cell else torch.randn(T, B, I, dtype=F64)


def _case(kind):
    """(torch.nn twin or None, ours, input, a tangent for it) of a kind of SEQ_KINDS or CELL_KINDS."""
    theirs, ours = _pair(*{**SEQ_KINDS, **CELL_KINDS}[kind])
    x = _inputs(kind in CELL_KINDS)
    return theirs, ours, x, torch.randn_like(x)


def _run(m, x, packed):
    x = x.to(next(m.parameters()).device)
    if packed:
        out = m(pack_padded_sequence(x, [4, 1, 3], enforce_sorted=False))
        return out[0].data
    out = m(x)
    return out[0] if isinstance(out, tuple) else out


def _second_order(m, x, packed):
    """First-order gradients of a scalar with create_graph, then gradients of their squared norm:
    what a gradient penalty does."""
    x = x.to(next(m.parameters()).device).requires_grad_()
    params = list(m.parameters())
    first = torch.autograd.grad(_run(m, x, packed).sin().sum(), [x] + params, create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    second = torch.autograd.grad(penalty, [x] + params)
    return first, second


def _assert_second_order_matches(kind, device, monkeypatch, second_order):
    """second_order(module, x, cell) -> (first-order gradients, gradients of their penalty): ours on
    `device` against the oracle (torch.nn, or the reference for reset_before) on the CPU."""
    cell = kind in CELL_KINDS
    cls, kw = (CELL_KINDS if cell else SEQ_KINDS)[kind]
    theirs, ours = _pair(cls, kw)
    ours.to(device)
    x = _inputs(cell)
    got_first, got_second = second_order(ours, x, cell)
    want_first, want_second = second_order(_oracle(theirs, ours, monkeypatch), x, cell)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for name, a, e in zip(names, got_first, want_first, strict=True):
        _assert_close(a, e, f"d/d{name}")
    for name, a, e in zip(names, got_second, want_second, strict=True):
        _assert_close(a, e, f"d(penalty)/d{name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,packed", [(k, p) for k in SEQ_KINDS for p in (False, True)]
                         + [(k, False) for k in CELL_KINDS])
def test_double_backward_matches_torch(kind, packed, device, monkeypatch):
    # Before the differentiable backward, the gradient of a gradient came back None or partial
    # (only the explicit dx = dG W_ih was in the graph): silently wrong gradient penalties.
    _assert_second_order_matches(kind, device, monkeypatch, lambda m, x, cell: _second_order(m, x, packed))


def _second_order_fed_back(m, x, cell):
    """_second_order of a module applied twice, the second call to a mix of the first's output and
    with its final states (a cell: its state): the second call's inputs depend on the weights."""
    x = x.to(next(m.parameters()).device).requires_grad_()
    params = list(m.parameters())
    first = m(x)
    out = first if not isinstance(first, tuple) else first[0]
    mix = torch.randn(out.shape[-1], I, dtype=F64, generator=torch.Generator().manual_seed(5)).to(x.device)
    second = m(out @ mix, first) if cell else m(out @ mix, first[1])
    loss = (second if not isinstance(second, tuple) else second[0]).sin().sum()
    grads = torch.autograd.grad(loss, [x] + params, create_graph=True)
    return grads, torch.autograd.grad(sum(g.square().sum() for g in grads), [x] + params)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", list(SEQ_KINDS) + list(CELL_KINDS))
def test_double_backward_of_a_module_fed_its_own_output(kind, device, monkeypatch):
    # The first-order gradients under create_graph are each call's partial derivatives: taken w.r.t.
    # the saved tensors themselves, the second call's weight gradient also ran back through its input
    # (the first call's output, a function of the same weights), a path the engine then counted again:
    # weight gradients 0.2-2x off, silently (found by a fuzzing helper, stop 24).
    _assert_second_order_matches(kind, device, monkeypatch, _second_order_fed_back)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode,proj,reset_after", [("lstm", 0, True), ("lstm", 1, True), ("gru", 0, True),
                                                   ("gru", 0, False), ("rnn_tanh", 0, True), ("rnn_relu", 0, True)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_op_gradgradcheck(mode, proj, reset_after, reverse, packed):
    torch.manual_seed(11)
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    h, k = 3, proj or 3
    bs = torch.tensor([2, 2, 1]) if packed else None
    x = torch.randn(5, 2, dtype=F64) if packed else torch.randn(3, 2, 2, dtype=F64)
    if mode == "rnn_relu":
        x = x + 0.5  # keep pre-activations away from relu's kink, where finite differences are wrong
    args = [x, torch.randn(2, k, dtype=F64), torch.randn(2, h, dtype=F64) if mode == "lstm" else None,
            torch.randn(G * h, 2, dtype=F64) * 0.5, torch.randn(G * h, k, dtype=F64) * 0.5,
            torch.randn(G * h, dtype=F64) * 0.1, torch.randn(G * h, dtype=F64) * 0.1,
            torch.randn(k, h, dtype=F64) * 0.5 if proj else None]
    live = [i for i, a in enumerate(args) if a is not None]

    def f(*tensors):
        full = list(args)
        for i, t in zip(live, tensors):
            full[i] = t
        y, h_n, c_n = rnn_ops.rnn_layer(mode, full[0], bs, *full[1:7], full[7], reverse, reset_after)
        return (y, h_n) if c_n is None else (y, h_n, c_n)

    inputs = [args[i].clone().requires_grad_() for i in live]
    assert torch.autograd.gradgradcheck(f, inputs)


def test_first_order_training_never_takes_the_differentiable_backward(monkeypatch):
    # The graph-recording backwards are for create_graph and torch.func only: plain backward stays on
    # the kernels, with no recomputation by the reference.
    def boom(*a, **k):
        raise AssertionError("plain backward left the kernels")
    monkeypatch.setattr(rnn_autograd._RnnLayerGrad, "apply", boom)
    monkeypatch.setattr(rnn_autograd, "_reference_vjp", boom)
    m = pnn.GRU(I, H, num_layers=2, bidirectional=True)
    m(torch.randn(T, B, I, requires_grad=True))[0].sum().backward()


def _count_reference(monkeypatch):
    """Counts calls of the reference layer (the slow route)."""
    calls = []
    real = ref.rnn_layer

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(ref, "rnn_layer", counted)
    return calls


@pytest.mark.parametrize("kind", list(SEQ_KINDS))
def test_nested_torch_func_grad_runs_the_kernels_until_differentiated(kind, monkeypatch):
    # Under grad(grad(f)) the inner gradient comes from the backward kernel (torch.func asks for its
    # graph either way); only the outer level, differentiating it, recomputes the layer by its reference.
    theirs, ours = _pair(*SEQ_KINDS[kind])
    oracle = _oracle(theirs, ours, monkeypatch)
    x = _inputs(False)

    def inner(m, calls=None):
        f = lambda u: _run(m, u, False).sin().sum()
        def penalty(u):
            g = torch.func.grad(f)(u)
            if calls is not None:
                assert not calls, "the inner torch.func.grad ran the reference"
            return g.square().sum()
        return torch.func.grad(penalty)(x)
    want = inner(oracle)
    if theirs is None:
        monkeypatch.setattr(_backend, "_REFERENCE_FORCED", False)
    calls = _count_reference(monkeypatch)
    got = inner(ours, calls)
    assert calls, "the gradient of the gradient did not come from the reference"
    _assert_close(got, want, "grad of grad")


def test_third_order_matches_torch():
    # Gradients of gradients of gradients: the graph-recording backward's own backward records a graph.
    theirs, ours = _pair("LSTM", {})
    x0 = _inputs(False)[:2, :1]

    def third(m):
        f = lambda u: m(u)[0].sin().sum()
        return torch.func.grad(lambda u: torch.func.grad(lambda v: torch.func.grad(f)(v).square().sum())(u)
                               .cos().sum())(x0)
    _assert_close(third(ours), third(theirs), "third order")


def _functional(m):
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, x):
        out = torch.func.functional_call(m, p, (x,))
        return (out[0] if isinstance(out, tuple) else out).sin().sum()
    return params, loss


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", list(SEQ_KINDS) + list(CELL_KINDS))
def test_torch_func_grad_jvp_hessian_match_torch(kind, device, monkeypatch):
    theirs, ours, x, tangent = _case(kind)

    def transformed(m):  # on m's device
        params, loss = _functional(m)
        z, dz = x.to(next(m.parameters()).device), tangent.to(next(m.parameters()).device)
        g = torch.func.grad(loss)(params, z)
        _, jvp = torch.func.jvp(lambda u: loss(params, u), (z,), (dz,))
        jac = torch.func.jacfwd(lambda u: loss(params, u))(z)
        hess = torch.func.hessian(lambda u: loss(params, u))(z[:1] if kind in CELL_KINDS else z[:2, :1])
        return g, jvp, jac, hess

    g, jvp, jac, hess = transformed(ours.to(device))
    # (the oracle after ours: for GRU reset_before it forces the reference on ours)
    g0, jvp0, jac0, hess0 = transformed(_oracle(theirs, ours, monkeypatch))
    for name in g0:
        _assert_close(g[name], g0[name], f"grad {name}")
    _assert_close(jvp, jvp0, "jvp")
    _assert_close(jac, jac0, "jacfwd")
    _assert_close(hess, hess0, "hessian")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", list(SEQ_KINDS) + list(CELL_KINDS))
def test_torch_func_grad_and_vjp_run_the_kernels(kind, device, monkeypatch):
    # grad and vjp need only a backward: the kernels' (the reference only runs under vmap, jvp and
    # forward AD). Compared with torch.nn under the same transforms.
    theirs, ours, x, _ = _case(kind)
    oracle = _oracle(theirs, ours, monkeypatch)
    want_g = torch.func.grad(_functional(oracle)[1])(*_functional(oracle)[0:1], x)
    want_v = torch.func.vjp(lambda u: _run(oracle, u, False), x)[1](torch.ones_like(_run(oracle, x, False)))[0]
    want_p = _param_vjp(oracle, x)
    if theirs is None:
        monkeypatch.setattr(_backend, "_REFERENCE_FORCED", False)
    ours.to(device)
    calls = _count_reference(monkeypatch)
    params, loss = _functional(ours)
    z = x.to(device)
    g = torch.func.grad(loss)(params, z)
    out, pull = torch.func.vjp(lambda u: _run(ours, u, False), z)
    v = pull(torch.ones_like(out))[0]
    p = _param_vjp(ours, z)  # (its pull runs after vjp's level ended, on dead functorch wrappers)
    assert not calls, "torch.func.grad or vjp ran the reference"
    for name in want_g:
        _assert_close(g[name], want_g[name], f"grad {name}")
        _assert_close(p[name], want_p[name], f"vjp {name}")
    _assert_close(v, want_v, "vjp")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", list(SEQ_KINDS))
def test_torch_func_grad_of_packed_input_runs_the_kernels(kind, device, monkeypatch):
    # The packed layout's metadata (batch sizes, offsets, lengths) is computed under the grad level, where
    # every op's result is a functorch wrapper the kernels cannot read (it crashed before _plain; torch.nn's
    # own layers still crash there, "Cannot access data pointer of Tensor that doesn't have storage"). The
    # oracle is ours on the reference.
    _, ours, x, _ = _case(kind)

    def g(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        return torch.func.grad(lambda q, z: _run_with_packed(m, q, z).sin().sum())(
            params, x.to(next(m.parameters()).device))
    _forced_reference(monkeypatch, True)
    want = g(ours)
    _forced_reference(monkeypatch, False)
    ours.to(device)
    calls = _count_reference(monkeypatch)
    got = g(ours)
    assert not calls, "torch.func.grad of packed input ran the reference"
    for k in want:
        _assert_close(got[k], want[k], f"grad {k}")


def _run_with_packed(m, params, x):
    return torch.func.functional_call(m, params, (pack_padded_sequence(x, [4, 1, 3], enforce_sorted=False),))[0].data


@pytest.mark.parametrize("kind", ["lstm_proj-bidirectional-2layers", "gru-2layers", "rnn_tanh-bidirectional",
                                  "lstm_cell"])
def test_autograd_functional_vectorized_and_vjp_pull_without_grad(kind, monkeypatch):
    # torch.autograd.functional.jacobian/hessian(vectorize=True) run the backward under torch's legacy
    # vmap (is_grads_batched), whose batched gradients have no storage; and a torch.func.vjp pull called
    # under no_grad runs on dead functorch wrappers. Both crashed ("Cannot access data pointer of Tensor
    # that doesn't have storage"); against torch.nn.
    theirs, ours, x, _ = _case(kind)
    f = lambda m: (lambda z: _run(m, z, False))
    for name, fn in (("jacobian", torch.autograd.functional.jacobian),
                     ("hessian", lambda g, z, vectorize: torch.autograd.functional.hessian(
                         lambda u: g(u).sin().sum(), z[:2] if z.dim() == 3 else z[:1], vectorize=vectorize))):
        want = fn(f(theirs), x, vectorize=True)
        _assert_close(fn(f(ours), x, vectorize=True), want, f"{name} vectorized")
    for m in (theirs, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}
        out, pull = torch.func.vjp(lambda q: _run_with(m, q, x), params)
        with torch.no_grad():
            got = pull(torch.ones_like(out))[0]
        if m is theirs:
            want = got
    for k in want:
        _assert_close(got[k], want[k], f"vjp pull under no_grad {k}")


def test_torch_func_grad_under_torch_compile():
    # Dynamo traces torch.func.grad over the setup_context Functions (the functorch checks stay out of
    # the traced code: _transformed and _functorch_graph answer False while compiling).
    _, ours, x, _ = _case("gru-2layers")
    params, loss = _functional(ours)
    want = torch.func.grad(loss)(params, x)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(lambda p, z: torch.func.grad(loss)(p, z))(params, x)
    torch._dynamo.reset()
    for k in want:
        _assert_close(got[k], want[k], f"compiled grad {k}")


def _param_vjp(m, x):
    params = {k: v.detach() for k, v in m.named_parameters()}
    out, pull = torch.func.vjp(lambda q: _run_with(m, q, x), params)
    return pull(torch.ones_like(out))[0]


def _run_with(m, params, x):
    out = torch.func.functional_call(m, params, (x,))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", list(SEQ_KINDS) + list(CELL_KINDS))
def test_vmap_and_per_sample_grads_match_a_loop(kind):
    # torch.nn's layers have no vmap rule ("Batching rule not implemented for aten::gru.input"); ours
    # run their reference under vmap, so the oracle is the same module called sample by sample, on the
    # kernels, with plain autograd.
    _, ours, x, _ = _case(kind)
    xs = torch.stack([x, x.flip(0), x.cos()])
    params, loss = _functional(ours)
    outs = torch.vmap(lambda z: _run(ours, z, False))(xs)
    with torch.no_grad():
        want = torch.stack([_run(ours, z, False) for z in xs])
    _assert_close(outs, want, "vmap output")
    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    names = [n for n, _ in ours.named_parameters()]
    want = [torch.autograd.grad(_run(ours, z, False).sin().sum(), list(ours.parameters())) for z in xs]
    for i, name in enumerate(names):
        _assert_close(per_sample[name], torch.stack([w[i] for w in want]), f"per-sample grad {name}")


@pytest.mark.parametrize("kind", list(SEQ_KINDS) + list(CELL_KINDS))
def test_vmap_of_autograd_grad_over_an_eager_graph_matches_a_loop(kind):
    """torch.vmap over torch.autograd.grad of a graph recorded in plain eager mode (a batch of cotangents
    through one forward): the backward runs under the transform from what the eager forward saved,
    whose reserve and pack are saved as integers (rnn_autograd.opaque; a review found the transform's
    route reading them as they were, stop 56). Against one autograd.grad per cotangent."""
    _, ours, x, _ = _case(kind)
    x = x.clone().requires_grad_()
    leaves = [x] + list(ours.parameters())
    y = _run(ours, x, False)
    vs = torch.stack([torch.randn_like(y) for _ in range(3)])
    got = torch.vmap(lambda v: torch.autograd.grad(y, leaves, v, retain_graph=True))(vs)
    for i, v in enumerate(vs):
        want = torch.autograd.grad(y, leaves, v, retain_graph=True)
        for name, a, e in zip(["input"] + [n for n, _ in ours.named_parameters()], got, want, strict=True):
            _assert_close(a[i], e, f"d/d{name}, cotangent {i}")


def _forced_reference(monkeypatch, on):
    monkeypatch.setattr(_backend, "_REFERENCE_FORCED", on)  # read per call


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", list(SEQ_KINDS) + list(CELL_KINDS))
def test_vmap_runs_the_kernels_and_matches_the_reference(kind, device, monkeypatch):
    # vmap (outermost) over inputs, states or cotangents folds the mapped dimension into the batch of one
    # kernel call (_RnnLayer.vmap, _RnnLayerGrad.vmap); the oracle is the reference under the same
    # transforms. Mapped dims other than 0, unmapped inputs with mapped states, jacrev (mapped
    # cotangents over an unmapped forward) and per-sample gradients of a loss of y and the final states.
    _, ours, x, _ = _case(kind)
    ours.to(device)
    cell = kind in CELL_KINDS
    x = x.to(device)
    xs = torch.stack([x, x.flip(0), x.cos()], 1)  # mapped at dim 1
    params = {k: v.detach() for k, v in ours.named_parameters()}
    hidden = (ours.proj_size or ours.hidden_size) if not cell else ours.hidden_size
    layers = 1 if cell else ours.num_layers * (2 if ours.bidirectional else 1)
    h_shape = (B, hidden) if cell else (layers, B, hidden)
    hs = torch.randn(4, *h_shape, dtype=F64, device=device)
    lstm = isinstance(ours, (torch.nn.LSTM, torch.nn.LSTMCell))
    c_shape = h_shape if cell else (layers, B, ours.hidden_size)
    c0 = torch.randn(c_shape, dtype=F64, device=device).sin()

    def loss(p, z, h=None):
        hx = None if h is None else (h, c0) if lstm else h
        out = torch.func.functional_call(ours, p, (z,) if hx is None else (z, hx))
        if cell:
            return (out[0].sin().sum() + out[1].square().sum()) if lstm else out.sin().sum()
        h_n = out[1][0] if lstm else out[1]
        return out[0].sin().sum() + h_n.square().sum()

    def run():
        a = torch.vmap(lambda z: _run(ours, z, False), in_dims=1)(xs)
        b = torch.vmap(lambda h: loss(params, x, h), in_dims=0)(hs)
        c = torch.vmap(torch.func.grad(loss), in_dims=(None, 1))(params, xs)
        d = torch.func.jacrev(lambda z: _run(ours, z, False))(x[:2] if not cell else x)
        return a, b, c, d
    calls = _count_reference(monkeypatch)
    got = run()
    assert not calls, "vmap ran the reference"
    _forced_reference(monkeypatch, True)
    want = run()
    for name, a, e in zip(("vmap output", "vmap over states", "per-sample grads", "jacrev"), got, want):
        if isinstance(a, dict):
            for k in a:
                _assert_close(a[k], e[k], f"{name} {k}")
        else:
            _assert_close(a, e, name)


@pytest.mark.parametrize("cls,kw", [("LSTM", dict(batch_first=True, num_layers=2, bidirectional=True, proj_size=3)),
                                    ("GRU", dict(batch_first=True, reset_after=False)),
                                    ("RNN", dict(nonlinearity="relu", num_layers=3))])
def test_per_sample_grads_of_unbatched_sequences(cls, kw, monkeypatch):
    # DP-SGD's form: each sample an unbatched [T, I] sequence (B = 1 per call), odd sizes, vmap of grad;
    # the kernels run (folded into one batch of 6) and match a loop of torch.func.grad per sample.
    torch.manual_seed(5)
    m = getattr(pnn, cls)(7, 5, **kw).to(F64)
    xs = torch.randn(6, 11, 7, dtype=F64)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, z):
        out, h = torch.func.functional_call(m, p, (z,))
        return out.tanh().sum() + (h[0] if isinstance(h, tuple) else h).square().sum()
    calls = _count_reference(monkeypatch)
    got = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    assert not calls
    for i, z in enumerate(xs):
        want = torch.func.grad(loss)(params, z)
        for k in want:
            _assert_close(got[k][i], want[k], f"sample {i} {k}")


@pytest.mark.parametrize("kind", ["lstm_proj-bidirectional-2layers", "gru-2layers", "rnn_relu", "gru_cell"])
def test_plain_backward_through_vmap_matches_a_loop(kind, monkeypatch):
    # Parameters that require grad, used inside vmap, then .backward() outside: the folded kernel call
    # is recorded by plain autograd below the vmap level, and the gradients sum over the mapped inputs.
    _, ours, x, _ = _case(kind)
    xs = torch.stack([x, x.flip(0), x.cos()])
    calls = _count_reference(monkeypatch)
    torch.vmap(lambda z: _run(ours, z, False))(xs).sin().sum().backward()
    assert not calls
    got = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    sum(_run(ours, z, False).sin().sum() for z in xs).backward()
    for (name, p), g in zip(ours.named_parameters(), got):
        _assert_close(g, p.grad, f"d/d{name}")


@pytest.mark.parametrize("kind", ["lstm_proj-bidirectional-2layers", "gru-2layers", "gru_reset_before", "rnn_relu",
                                  "lstm_cell"])
def test_vmap_over_weights_or_packed_data_loops_over_the_kernels(kind, monkeypatch):
    # Mapped weights (ensembles: stack_module_state) or packed data cannot fold into one batch: the
    # rules call the kernels once per v. Outputs and per-member (per-sample) gradients against loops.
    _, ours, x, _ = _case(kind)
    cell = kind in CELL_KINDS
    params = {k: v.detach() for k, v in ours.named_parameters()}
    stacked = {k: torch.stack([v, v * 0.9, v.flip(-1)]) for k, v in params.items()}
    calls = _count_reference(monkeypatch)

    def loss(p, z):
        return _run_with(ours, p, z).sin().sum()
    ens = torch.vmap(lambda p: _run_with(ours, p, x))(stacked)
    ens_g = torch.vmap(torch.func.grad(loss), in_dims=(0, None))(stacked, x)
    packed = packed_g = None
    if not cell:
        p = pack_padded_sequence(x, [4, 1, 3], enforce_sorted=False)  # (torch's packing has no vmap rule)
        run_packed = lambda q, d: torch.func.functional_call(
            ours, q, (PackedSequence(d, p.batch_sizes, p.sorted_indices, p.unsorted_indices),))[0].data
        datas = torch.stack([p.data, p.data.cos(), p.data * 2])
        packed = torch.vmap(lambda d: run_packed(params, d))(datas)
        packed_g = torch.vmap(torch.func.grad(lambda q, d: run_packed(q, d).sin().sum()), in_dims=(None, 0))(
            params, datas)
    assert not calls, "vmap ran the reference"
    for i in range(3):
        member = {k: v[i] for k, v in stacked.items()}
        with torch.no_grad():
            _assert_close(ens[i], _run_with(ours, member, x), f"ensemble member {i}")
        want = torch.func.grad(loss)(member, x)
        for k in want:
            _assert_close(ens_g[k][i], want[k], f"ensemble grad {k}")
        if packed is not None:
            with torch.no_grad():
                _assert_close(packed[i], run_packed(params, datas[i]), f"packed {i}")
            want = torch.func.grad(lambda q: run_packed(q, datas[i]).sin().sum())(params)
            for k in want:
                _assert_close(packed_g[k][i], want[k], f"packed per-sample grad {k}")


def _ensemble(kind):
    """torch.func's ensembling recipe for three members of a kind: (members, stacked params, buffers, the
    meta-device base module, input)."""
    _, ours, x, _ = _case(kind)
    members = [copy.deepcopy(ours) for _ in range(3)]
    with torch.no_grad():
        for i, m in enumerate(members):
            for p in m.parameters():
                p.mul_(1 - 0.1 * i)
    params, buffers = torch.func.stack_module_state(members)
    return members, params, buffers, copy.deepcopy(ours).to("meta"), x


@pytest.mark.parametrize("kind", ["lstm_proj-bidirectional-2layers", "gru-2layers", "rnn_relu", "lstm_cell",
                                  "gru_cell"])
def test_ensemble_trained_through_vmap_by_plain_autograd(kind):
    """torch.func's ensembling recipe, then ordinary autograd around it: stack_module_state's stacked
    parameters require grad, vmap(functional_call) runs the members, .backward() / autograd.grad reach
    the stacked leaves. Under vmap a BatchedTensor reports requires_grad False, so the forward had saved
    nothing and the backward failed (found by a drop-in sweep, stop 16). Gradients against each member
    run alone."""
    members, params, buffers, base, x = _ensemble(kind)
    out = torch.vmap(lambda p, b: _run_with(base, (p, b), x))(params, buffers)
    got = torch.autograd.grad(out.sin().sum(), list(params.values()))
    for i, m in enumerate(members):
        want = torch.autograd.grad(_run(m, x, False).sin().sum(), list(m.parameters()))
        for (name, _), g, w in zip(m.named_parameters(), got, want, strict=True):
            _assert_close(g[i], w, f"member {i} d/d{name}")


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("kind", ["gru-2layers", "lstm_cell"])
def test_compiled_ensemble_through_vmap_is_right_or_refused(kind, backend):
    """The ensembling recipe of the test above under torch.compile: Dynamo breaks the graph inside the
    layer, and with backend="eager" the frame it resumes sees the vmapped parameters as not requiring
    grad and inlines _RnnLayer.forward, so the raw rnn_forward ran on recorded tensors with no autograd
    kernel: every parameter's .grad came out None, silently (stop 27's lead). The raw ops now refuse such
    a call naming the way out; aot_eager runs right. Either outcome, never a lost gradient."""
    members, params, buffers, base, x = _ensemble(kind)
    torch._dynamo.reset()
    try:
        out = torch.compile(torch.vmap(lambda p, b: _run_with(base, (p, b), x)), backend=backend)(params, buffers)
        out.sin().sum().backward()
    except RuntimeError as e:
        assert backend == "eager" and "rnn_forward was called on tensors that require grad" in str(e), e
        return
    finally:
        torch._dynamo.reset()
    for i, m in enumerate(members):
        want = torch.autograd.grad(_run(m, x, False).sin().sum(), list(m.parameters()))
        for (name, p), w in zip(params.items(), want, strict=True):
            assert p.grad is not None, f"d/d{name} lost"
            _assert_close(p.grad[i], w, f"member {i} d/d{name}")


def test_raw_ops_refuse_a_recorded_call():
    """rnn_forward / rnn_backward / rnn_pack have no gradient of their own (the autograd.Functions are
    theirs): called where autograd records, they raise rather than hand back outputs with no graph."""
    from pyseqkern.ops.rnn_seq import _Seq
    torch.manual_seed(3)
    H, T, B = 5, 4, 3
    x_gates = torch.randn(T * B, 3 * H, requires_grad=True)
    w_hh = torch.randn(3 * H, H)
    packed = torch.ops.pyseqkern.rnn_pack(1, True, H, 0, w_hh, None)
    seq = _Seq(torch.empty(T, B, 1), None, False)
    args = (1, True, H, 0, T, B, x_gates, torch.randn(H), None, None, packed, *seq.args(), False)
    with pytest.raises(RuntimeError, match="rnn_forward was called on tensors that require grad"):
        torch.ops.pyseqkern.rnn_forward(*args)
    with pytest.raises(RuntimeError, match="rnn_pack was called"):
        torch.ops.pyseqkern.rnn_pack(1, True, H, 0, w_hh.requires_grad_(), None)
    with torch.no_grad():
        y = torch.ops.pyseqkern.rnn_forward(*args)[0]
        reserve = torch.ops.pyseqkern.rnn_forward(*args[:-1], True)[3]
    assert torch.equal(y, torch.ops.pyseqkern.rnn_forward(1, True, H, 0, T, B, x_gates.detach(), *args[7:])[0])
    dy = torch.randn(T * B, H, requires_grad=True)
    bwd = (1, True, H, 0, T, B, dy, None, None, None, reserve, packed, *seq.args(), False)
    with pytest.raises(RuntimeError, match="rnn_backward was called on tensors that require grad"):
        torch.ops.pyseqkern.rnn_backward(*bwd)
    with torch.no_grad():
        assert torch.ops.pyseqkern.rnn_backward(*bwd)[0].shape == (T * B, 3 * H)


@pytest.mark.parametrize("kind", ["lstm", "gru-2layers", "rnn_tanh-bidirectional", "lstm_cell", "gru_cell",
                                  "rnn_cell"])
def test_vmap_of_one_row_per_sample(kind, monkeypatch):
    # One row per v (cells on unbatched input, T=1 unbatched sequences, batch 1 with an unmapped state):
    # the fold of an unmapped tensor was a stride-0 view there, which the kernels refused (h0, c0) or,
    # for the backward's reserve, read out of bounds (jacrev wrong or NaN). Found by a fuzzing helper.
    _, ours, x, _ = _case(kind)
    cell = kind in CELL_KINDS
    one = x[0] if cell else x[:1, 0]  # unbatched: [I] for a cell, [T=1, I] for a sequence
    xs = torch.stack([one, one.cos(), one.sin()])
    hidden = ours.hidden_size if cell else (ours.proj_size or ours.hidden_size)
    h = torch.randn(hidden if cell else (ours.num_layers * (2 if ours.bidirectional else 1), hidden), dtype=F64)
    lstm = isinstance(ours, (torch.nn.LSTM, torch.nn.LSTMCell))
    hx = (h, torch.randn(ours.hidden_size if cell else h.shape[:-1] + (ours.hidden_size,), dtype=F64)) if lstm else h

    def run():
        return (torch.func.jacrev(lambda z: _run(ours, z, False))(one),
                torch.vmap(lambda z: _run(ours, z, False))(xs),
                torch.vmap(lambda z: _run(ours, z.unsqueeze(0 if cell else 1), False))(xs),
                torch.vmap(lambda z: _first(ours(z, hx)))(xs))
    calls = _count_reference(monkeypatch)
    got = run()
    assert not calls
    _forced_reference(monkeypatch, True)
    want = run()
    for name, a, e in zip(("jacrev", "vmap hx None", "vmap batch 1", "vmap shared hx"), got, want):
        _assert_close(a, e, name)


def _first(out):
    return out[0] if isinstance(out, tuple) else out




def test_vmap_inside_grad_takes_the_reference(monkeypatch):
    # Below a grad level the folded backward's raw ops would have to be differentiable: the reference.
    _, ours, x, _ = _case("gru-2layers")
    xs = torch.stack([x, x.cos()])
    calls = _count_reference(monkeypatch)
    g = torch.func.grad(lambda z: torch.vmap(lambda u: _run(ours, u, False))(z).sin().sum())(xs)
    assert calls
    xr = xs.clone().requires_grad_()
    want, = torch.autograd.grad(sum(_run(ours, u, False).sin().sum() for u in xr.unbind()), xr)
    _assert_close(g, want, "grad of vmap")


@pytest.mark.parametrize("kind", ["lstm_proj-bidirectional-2layers", "gru-2layers", "lstm_cell", "gru_cell"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_ad_dual_tensors_match_torch(kind, grad_mode):
    # Inside dual_level even an inference call must carry the tangent: the kernels' thin paths do not.
    theirs, ours, x, tangent = _case(kind)
    got = []
    for m in (ours, theirs):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            out = _run(m, fwAD.make_dual(x, tangent), False)
            primal, tan = fwAD.unpack_dual(out)
            got.append((primal.detach().clone(), tan.detach().clone()))
    _assert_close(got[0][0], got[1][0], "primal")
    _assert_close(got[0][1], got[1][1], "tangent")


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_reference_takes_zero_states_as_none(mode):
    # The ops take h0/c0 None for zeros; so must the reference they fall back to (it crashed on None).
    torch.manual_seed(2)
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    x = torch.randn(T, B, I, dtype=F64)
    w = (torch.randn(G * H, I, dtype=F64), torch.randn(G * H, H, dtype=F64), torch.randn(G * H, dtype=F64), None)
    zeros = torch.zeros(B, H, dtype=F64)
    y, h_n, c_n = ref.rnn_layer(mode, x, None, None, None, *w, None, False)
    y0, h0_n, c0_n = ref.rnn_layer(mode, x, None, zeros, zeros if mode == "lstm" else None, *w, None, False)
    assert torch.equal(y, y0) and torch.equal(h_n, h0_n)
    assert (c_n is None) == (mode != "lstm") and (c_n is None or torch.equal(c_n, c0_n))
    hc, cc = ref.rnn_cell(mode, x[0], None, None, w[0], w[1], w[2], None)
    hc0, cc0 = ref.rnn_cell(mode, x[0], zeros, zeros if mode == "lstm" else None, w[0], w[1], w[2], None)
    assert torch.equal(hc, hc0) and (cc is None or torch.equal(cc, cc0))


def test_forced_reference_runs_modules_without_hx(monkeypatch):
    monkeypatch.setattr(_backend, "_REFERENCE_FORCED", True)
    torch.manual_seed(4)
    ours = pnn.LSTM(I, H, num_layers=2).to(F64)
    theirs = torch.nn.LSTM(I, H, num_layers=2).to(F64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=F64)
    _assert_close(ours(x)[0], theirs(x)[0], "output")


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("kind", ["lstm_cell", "gru_cell", "rnn_cell"])
def test_compiled_torch_func_grad_of_a_cell_is_right_or_refused(kind, fullgraph):
    """torch.compile of torch.func.grad over a cell: without fullgraph it breaks the graph and runs the
    kernels' grad rules (torch.nn's gradients); with fullgraph Dynamo refuses functorch's wrapper checks
    (torch.nn's compiles there). Never a wrong gradient: letting Dynamo trace the call as recording
    (stop 24, tried) gave gradients 0.15-1.5 off, so that check stays; this test holds either outcome
    to torch.nn's eager gradients. (backend="eager" fails inside Dynamo's resume function after the
    break, an AssertionError of torch's own; aot_eager and inductor run.)"""
    theirs, ours = _pair(*CELL_KINDS[kind])
    x = _inputs(True)
    params = {k: v.detach() for k, v in theirs.named_parameters()}

    def loss_of(m):
        def loss(p, x):
            out = torch.func.functional_call(m, p, (x,))
            return (out[0] if isinstance(out, tuple) else out).sin().sum()
        return loss

    want = torch.func.grad(loss_of(theirs))(params, x)
    torch._dynamo.reset()
    try:
        got = torch.compile(torch.func.grad(loss_of(ours)), fullgraph=fullgraph, backend="aot_eager")(params, x)
    except torch._dynamo.exc.Unsupported:
        assert fullgraph, "without fullgraph the call must break the graph, not fail"
        return
    finally:
        torch._dynamo.reset()
    for name in want:
        _assert_close(got[name], want[name], f"d/d{name}")


@pytest.mark.parametrize("kind", list(SEQ_KINDS))
def test_jacrev_in_float32_of_a_forward_below_split_rows(kind, monkeypatch):
    """jacrev maps the backward over the output's basis vectors: one call of V*B rows for a forward of B.
    On the amx level a float32 recording forward below RnnSizes::split_rows packs without the piece
    sections (ops.rnn._pack_narrow), which a call of V*B rows reads: the backward's vmap rule packs whole
    (ops.rnn._pack_for_rows; it raised before, found by an auditing helper). Held to the rule against the
    reference run in float32, float64 the truth, at whichever level runs."""
    cls, kw = SEQ_KINDS[kind]
    torch.manual_seed(11)
    ours = getattr(pnn, cls)(I, H, **kw)
    x = torch.randn(T, 2, I)  # (output basis: V = T * 2 * hidden >= 32 rows of 2)
    ours64 = copy.deepcopy(ours).double()
    params = {k: v.detach() for k, v in ours.named_parameters()}  # (nothing outer to differentiate: one folded call)
    folded = []
    real = rnn_autograd._pack_for_rows
    monkeypatch.setattr(rnn_autograd, "_pack_for_rows", lambda *a: folded.append(1) or real(*a))

    def jac(m, p):
        return torch.func.jacrev(lambda z: _run(m, z, False) if p is None else
                                 torch.func.functional_call(m, p, (z,))[0])(x if m is not ours64 else x.double())
    got = [jac(ours, None), jac(ours, params)]
    assert folded, "the mapped backward took no folded call"
    _forced_reference(monkeypatch, True)
    theirs, want = jac(ours, None), jac(ours64, None)
    assert got[0].numel() // x.numel() * 2 >= 32 and got[0].dtype == torch.float32
    for g in got:
        assert_within_torch_error(g, theirs, want, name="jacrev")


@pytest.mark.parametrize("kind", list(SEQ_KINDS) + list(CELL_KINDS))
def test_gradients_through_a_mapped_backward(kind, monkeypatch):
    """An outer differentiation of a vmapped backward: a Jacobian penalty's gradients with respect to the
    parameters (jacrev(f)(x).square().sum().backward()) and the gradient of a function of vjp's pull under
    vmap (what jacrev(jacrev(f)) does). The backward's vmap rule ran its kernels and GEMMs outside any graph
    there: gradients zero, partial or None without a word (an auditing helper, stop 50). Against torch.nn in
    float64 (the reference for reset_before)."""
    theirs, ours, x, _ = _case(kind)
    torch.manual_seed(5)
    ct = torch.randn(3, *_run(ours, x, False).shape, dtype=F64)

    def grads(m):
        m.zero_grad()
        torch.func.jacrev(lambda z: _run(m, z, False))(x).square().sum().backward()

        def f(z):
            _, pull = torch.func.vjp(lambda z: _run(m, z, False), z)
            return torch.vmap(pull)(ct)[0].square().sum()
        return [p.grad for p in m.parameters()] + [torch.func.grad(f)(x)]
    got = grads(ours)
    want = grads(_oracle(theirs, ours, monkeypatch))
    names = [n for n, _ in ours.named_parameters()] + ["d/dx of vmap(pull)"]
    for name, a, e in zip(names, got, want, strict=True):
        _assert_close(a, e, f"{kind}: {name}")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", list(SEQ_KINDS))
def test_per_sample_input_gradients_of_a_module_with_its_parameters(kind, batch, monkeypatch):
    """vmap(grad(loss of x)) with the module's own Parameters (which require grad, so the backward's vmap
    rule takes a Function call per v): each v's slice of the folded reserve is a strided view at B=1, which
    the kernel refused until it was made contiguous (an auditing helper, stop 50). Against torch.nn in
    float64 (the reference for reset_before), sample by sample."""
    theirs, ours, _, _ = _case(kind)
    torch.manual_seed(9)
    xs = torch.randn(3, T, batch, I, dtype=F64)
    got = torch.vmap(torch.func.grad(lambda z: _run(ours, z, False).square().sum()))(xs)
    oracle = _oracle(theirs, ours, monkeypatch)
    want = torch.stack([torch.autograd.grad(_run(oracle, z, False).square().sum(), z)[0]
                        for z in xs.clone().requires_grad_()])
    _assert_close(got, want, f"{kind} B={batch}")
