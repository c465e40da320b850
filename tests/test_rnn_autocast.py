"""The modules inside torch.autocast regions (ops/rnn_autocast.py): a layer or cell step is one op of
autocast's lower-precision list, so inside a region it computes what the module converted to the
region's dtype computes on inputs converted to it. Two oracles say so:
- our own module converted that way gives the same bits (the wiring);
- torch.nn converted that way is the same computation by PyTorch: every output and gradient meets the
  2x-torch rule against float64 on the region-rounded inputs and weights (so that only the
  computations' errors count, not the rounding of the inputs, which both share).
Outputs come in the region's dtype; float32 leaves get float32 gradients; a backward called inside a
region is not cast; float64 stays float64; inference caches the casts."""
import contextlib
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pyseqkern.nn as pnn
from pyseqkern.ops import rnn as rnn_ops
from pyseqkern.ops import rnn_autocast
from pyseqkern.reference import rnn as ref
from helpers import (TOLERANCES, assert_bitwise_equal, assert_within_torch_error, randn, ready_for_backward,
                     stack_dropout, strided, torch_layer)
from test_rnn_modules import CONFIGS, DROPOUT_SEED, KINDS, LENGTHS, H, I, make_cell, make_inputs, make_pair, seed_parameters

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def region_dtypes():
    """(device, dtype) of the regions torch offers; the CUDA ones skip cleanly without a GPU."""
    cuda = pytest.mark.cuda
    return [("cpu", BF16), ("cpu", F16), pytest.param("cuda", F16, marks=cuda), pytest.param("cuda", BF16, marks=cuda)]


def loss_of(outs, seed=10):
    """One fixed float64 weighting of every output for all three runs, so each backward starts from the
    same cotangents (rounded to each output's dtype on the way in)."""
    return sum((o.double() * randn(o.shape, F64, device=o.device, seed=seed + i)).sum() for i, o in enumerate(outs))


def run_sequence(module, kind, cfg, device, values, leaf, region=None, backward_inside=True):
    """Outputs and gradients of one module: inputs with the values of make_inputs(values) held as
    `leaf` tensors, the forward inside a region of dtype `region` (None: none), the backward inside it
    or after it."""
    made = make_inputs(kind, cfg, values, device)
    x, h0, c0 = (None if t is None else t.detach().to(leaf).requires_grad_() for t in made)
    inp = x
    if "packed" in cfg:
        inp = pack_padded_sequence(x, torch.tensor(LENGTHS[cfg["packed"]]), batch_first=cfg.get("batch_first", False),
                                   enforce_sorted=cfg["packed"] == "sorted")
    is_lstm = KINDS[kind][0] == "LSTM"
    hx = None if h0 is None else ((h0, c0) if is_lstm else h0)
    leaves = {"input": x}
    if h0 is not None:
        leaves.update({"h0": h0} if c0 is None else {"h0": h0, "c0": c0})
    leaves.update(dict(module.named_parameters()))
    with torch.autocast(device, dtype=region or BF16, enabled=region is not None):
        torch.manual_seed(DROPOUT_SEED)
        out, hx_out = module(inp, hx)
        y = out.data if isinstance(out, PackedSequence) else out
        outs = [y] + (list(hx_out) if is_lstm else [hx_out])
        if backward_inside:
            grads = torch.autograd.grad(loss_of(outs), list(leaves.values()))
    if not backward_inside:
        grads = torch.autograd.grad(loss_of(outs), list(leaves.values()))
    return outs, dict(zip(leaves, grads))


def exact_on_our_relu_kinks(converted, kind, cfg, dtype, dropout_masks=None):
    """The float64 reference of a relu module taking each relu's side from our own run (`converted`,
    whose bits are the region's): relu'(a) is a step, and where the exact pre-activation lies within
    the low-precision rounding of zero either side is a correct result, but the side taken changes the
    gradient by O(1) through everything downstream. (A Zen 3 run of the 3-layer bidirectional config
    put one pre-activation at +0.029 where the exact one is <= 0, in a row whose values reach 198,
    bfloat16's rounding there being ~0.4: the flipped step carried h_n's cotangent into the top
    layer's reverse weights, a 32% error in their gradient while torch.nn's own run took the exact
    side; on other inputs torch.nn flips instead, its error then 5-50x ours.) Built from the equations
    (pyseqkern.reference) layer by layer through our module's own stacking (dropout masks included),
    every relu replaced by a multiplication with the mask our run's layer output gives (y > 0): our run on
    `converted`'s device, the reference on the CPU. `dropout_masks`: recorded dropout masks (helpers.stack_dropout),
    replayed in both runs."""
    from pyseqkern.ops import rnn as ops
    recorded, depth = [], [0]
    real_layer = ops.rnn_layer

    def record(*args):  # (the op may call rnn_layer again inside: only the outermost call counts)
        depth[0] += 1
        try:
            out = real_layer(*args)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            recorded.append(out[0].detach().cpu())
        return out

    dropout = (lambda: stack_dropout(dropout_masks)) if dropout_masks is not None else contextlib.nullcontext
    with pytest.MonkeyPatch.context() as mp, dropout():
        mp.setattr(ops, "rnn_layer", record)
        run_sequence(converted, kind, cfg, next(converted.parameters()).device.type, dtype, dtype)
    masks = iter(recorded)
    real_step = ref._step

    def replay(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after=True):
        y = next(masks)
        if batch_sizes is None:
            rows = list(y.unbind(0))
        else:
            sizes = [int(n) for n in batch_sizes.tolist()]
            starts = [sum(sizes[:t]) for t in range(len(sizes))]
            rows = [y[a:a + n] for a, n in zip(starts, sizes)]
        steps = iter(reversed(rows) if reverse else rows)

        def step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, reset_after):
            pre = ref._linear(x, w_ih, b_ih) + ref._linear(h, w_hh, b_hh)
            return pre * (next(steps) > 0).to(pre.dtype), None

        with pytest.MonkeyPatch.context() as inner:
            inner.setattr(ref, "_step", step)
            return ref.rnn_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after)

    exact_module = copy.deepcopy(converted).cpu().double()
    with pytest.MonkeyPatch.context() as mp, dropout():
        mp.setattr(ops, "rnn_layer", replay)
        out = run_sequence(exact_module, kind, cfg, "cpu", dtype, F64)
    assert next(masks, None) is None and real_step is ref._step
    return out


def replayed(module, masks, layer, kind, cfg, device, values, leaf):
    """run_sequence of `module` with the recorded dropout `masks` replayed and each layer and direction computed
    by `layer` (ref.rnn_layer: the float64 oracle; helpers.torch_layer: torch's same-dtype baseline)."""
    with stack_dropout(masks), pytest.MonkeyPatch.context() as mp:
        mp.setattr(rnn_ops, "rnn_layer", layer)
        return run_sequence(module, kind, cfg, device, values, leaf)


SEQ_CONFIGS = ["plain", "bidirectional-2layers-hx", "unbatched-hx-2layers",
               "packed_unsorted-hx-bidirectional-2layers-batch_first", "packed_unsorted-no_hx",
               "dropout-train-3layers-bidirectional-hx", "no_bias-bidirectional"]


@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize("cfg_name", SEQ_CONFIGS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("device,dtype", region_dtypes())
def test_sequence_module_in_a_region_computes_the_converted_module(device, dtype, kind, cfg_name, backward_inside):
    cfg = CONFIGS[cfg_name]
    theirs, ours = make_pair(kind, cfg, F32)
    ours.to(device)
    outs, grads = run_sequence(ours, kind, cfg, device, dtype, F32, region=dtype, backward_inside=backward_inside)

    converted = copy.deepcopy(ours).to(dtype)
    # Dropout in training on CUDA: torch.nn on the CPU draws other masks, so the oracles take ours (recorded
    # here, the region's run drawing the same: its bits are asserted equal) through the float64 reference and
    # through torch.nn's same-dtype layers, layer by layer in our stack (as test_rnn_modules does).
    masked = device == "cuda" and cfg.get("train") and cfg.get("dropout")
    with stack_dropout() if masked else contextlib.nullcontext() as masks:
        same_outs, same_grads = run_sequence(converted, kind, cfg, device, dtype, dtype)
    for name, a, b in zip(["output", "h_n", "c_n"], outs, same_outs):
        assert a.dtype == dtype, f"{name} comes in {a.dtype}, not the region's {dtype}"
        assert_bitwise_equal(a, b, name)
    for name, g in grads.items():
        assert g.dtype == F32  # the leaves were float32
        # (Each float32 leaf is cast once, and its gradient is the cast's, widened: the converted
        # module's values exactly. A bidirectional layer casts its input once for both directions, as
        # torch.nn's fused layer does, so the two directions' gradients add in the region's dtype.)
        assert torch.equal(g.to(dtype).to(F32), g), f"grad {name} is not a widened {dtype} value"
        assert_bitwise_equal(g.to(dtype), same_grads[name], f"grad {name}")

    if masked:
        torch_outs, torch_grads = replayed(converted, masks, torch_layer, kind, cfg, device, dtype, dtype)
        exact, exact_grads = replayed(copy.deepcopy(converted).cpu().double(), masks, ref.rnn_layer, kind, cfg,
                                      "cpu", dtype, F64)
    else:
        baseline = copy.deepcopy(theirs).to(device=device, dtype=dtype)
        with ready_for_backward(baseline):
            torch_outs, torch_grads = run_sequence(baseline, kind, cfg, device, dtype, dtype)
        exact, exact_grads = run_sequence(copy.deepcopy(theirs).to(dtype).double(), kind, cfg, "cpu", dtype, F64)
    ours_exact, ours_exact_grads = exact, exact_grads
    if kind == "rnn_relu":
        ours_exact, ours_exact_grads = exact_on_our_relu_kinks(converted, kind, cfg, dtype, masks)
    for name, a, t, e, oe in zip(["output", "h_n", "c_n"], outs, torch_outs, exact, ours_exact):
        assert_within_torch_error(a, t, e, name, ours_ref64=oe)
    for name, g in grads.items():
        assert_within_torch_error(g.to(dtype), torch_grads[name], exact_grads[name], f"grad {name}",
                                  ours_ref64=ours_exact_grads[name])


CELL_KINDS = ["lstm", "gru", "gru_reset_before", "rnn_tanh", "rnn_relu"]


def run_cell(cell, kind, batched, hx, device, values, leaf, region=None):
    batch = (7,) if batched else ()
    x = strided((*batch, I), values, device=device, seed=4).detach().to(leaf).requires_grad_()
    states = [randn((*batch, H), values, device=device, seed=5 + k).to(leaf).requires_grad_()
              for k in range(2 if kind == "lstm" else 1)] if hx else []
    state_arg = None if not hx else (tuple(states) if kind == "lstm" else states[0])
    with torch.autocast(device, dtype=region or BF16, enabled=region is not None):
        out = cell(x, state_arg)
    outs = list(out) if kind == "lstm" else [out]
    return outs, list(torch.autograd.grad(loss_of(outs, 20), [x] + states + list(cell.parameters())))


class ReferenceGRUCell(torch.nn.Module):
    """GRUCell reset_after=False by pyseqkern's reference in any dtype (torch.nn has no such cell)."""

    def __init__(self, like, dtype):
        super().__init__()
        for name, p in like.named_parameters():
            self.register_parameter(name, torch.nn.Parameter(p.detach().to(dtype).clone()))

    def forward(self, x, h=None):
        x2 = x if x.dim() == 2 else x.unsqueeze(0)
        h2 = None if h is None else (h if h.dim() == 2 else h.unsqueeze(0))
        out, _ = ref.rnn_cell("gru", x2, h2, None, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                              reset_after=False)
        return out if x.dim() == 2 else out.squeeze(0)


@pytest.mark.parametrize("hx", [False, True])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("device,dtype", region_dtypes())
def test_cell_in_a_region_computes_the_converted_cell(device, dtype, kind, batched, hx):
    base = "gru" if kind == "gru_reset_before" else kind
    ours = seed_parameters(make_cell(base, **({"reset_after": False} if kind == "gru_reset_before" else {})), seed=200)
    ours.to(device)
    outs, grads = run_cell(ours, base, batched, hx, device, dtype, F32, region=dtype)

    same_outs, same_grads = run_cell(copy.deepcopy(ours).to(dtype), base, batched, hx, device, dtype, dtype)
    for a, b in zip(outs, same_outs, strict=True):
        assert a.dtype == dtype
        assert_bitwise_equal(a, b, "cell output")
    for a, b in zip(grads, same_grads, strict=True):
        assert a.dtype == F32
        assert_bitwise_equal(a, b.float(), "cell gradient")

    if kind == "gru_reset_before":
        theirs, exact_cell = ReferenceGRUCell(ours, dtype), ReferenceGRUCell(copy.deepcopy(ours).to("cpu", dtype), F64)
    else:
        twin = make_cell(base, ns=torch.nn)
        twin.load_state_dict(ours.state_dict())
        theirs, exact_cell = copy.deepcopy(twin).to(dtype), copy.deepcopy(twin).to(dtype).double()
    torch_outs, torch_grads = run_cell(theirs.to(device), base, batched, hx, device, dtype, dtype)
    exact, exact_grads = run_cell(exact_cell, base, batched, hx, "cpu", dtype, F64)
    for a, t, e in zip(outs, torch_outs, exact, strict=True):
        assert_within_torch_error(a, t, e, "cell output")
    for i, (a, t, e) in enumerate(zip(grads, torch_grads, exact_grads, strict=True)):
        assert_within_torch_error(a.to(dtype), t, e, f"cell gradient {i}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_float32_backward_called_inside_a_region_is_not_cast(kind):
    """The forward outside any region, the backward inside one: the gradients are bit for bit those of a
    backward outside. The backward's GEMMs are float32 work; cast to bfloat16 (as they were before
    rnn_autocast.off) a GRU's weight gradients were 1.7e-3 off, relatively."""
    cfg = CONFIGS["bidirectional-2layers-hx"]
    _, ours = make_pair(kind, cfg, F32)
    x, h0, c0 = make_inputs(kind, cfg, F32)
    hx = h0 if c0 is None else (h0, c0)
    leaves = [x, h0] + ([] if c0 is None else [c0]) + list(ours.parameters())
    loss = loss_of([ours(x, hx)[0]])
    with torch.autocast("cpu", dtype=BF16):
        grads = torch.autograd.grad(loss, leaves)
    plain = torch.autograd.grad(loss_of([ours(x, hx)[0]]), leaves)
    for a, b in zip(grads, plain, strict=True):
        assert_bitwise_equal(a, b, "gradient")


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell"])
def test_float64_modules_are_left_alone_in_a_region(cls):
    m = seed_parameters(getattr(pnn, cls)(I, H, dtype=F64))
    x = randn((7, 3, I) if "Cell" not in cls else (3, I), F64, seed=1)
    want = m(x)
    with torch.autocast("cpu", dtype=BF16):
        got = m(x)
    flat = lambda o: [t for t in (o if isinstance(o, tuple) else (o,)) for t in (t if isinstance(t, tuple) else (t,))]
    for a, b in zip(flat(got), flat(want), strict=True):
        assert a.dtype == F64
        assert_bitwise_equal(a, b)


def test_region_dtype_inputs_meet_float32_weights_only_inside_a_region():
    """As torch.nn: a bfloat16 input to a float32 module is an error outside a region and is cast inside
    one; a float64 input to a float32 module is an error either way (autocast leaves float64 alone)."""
    m = pnn.GRU(I, H)
    x = randn((7, 3, I), BF16, seed=1)
    with pytest.raises(ValueError, match="input dtype"):
        m(x)
    with torch.autocast("cpu", dtype=BF16):
        assert m(x)[0].dtype == BF16
        assert m(x.float(), randn((1, 3, H), F32, seed=2))[0].dtype == BF16
        with pytest.raises(ValueError, match="input dtype"):
            m(x.double())


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_inference_in_a_region_casts_the_parameters_once_and_follows_their_updates(monkeypatch, kind):
    name, kw = KINDS[kind]
    m = seed_parameters(getattr(pnn, name)(I, H, num_layers=2, **kw))
    x = randn((7, 3, I), F32, seed=1)
    packs = []
    real = rnn_ops._packed
    monkeypatch.setattr(rnn_ops, "_packed", lambda *a: packs.append(a[4].data_ptr()) or real(*a))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), torch.autocast("cpu", dtype=BF16):
            first = m(x)[0]
            again = m(x)[0]
        assert_bitwise_equal(first, again)
    # every call reads the packed weights of the same two cast w_hh (a fresh cast each call would be new
    # memory, packed again)
    assert len(packs) == 8 and len(set(packs)) == 2, packs
    with torch.no_grad():
        m.weight_hh_l1.mul_(0.5)  # an in-place update bumps the version, as optimizers do
        with torch.autocast("cpu", dtype=BF16):
            updated = m(x)[0]
            assert_bitwise_equal(updated, copy.deepcopy(m)(x)[0])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_planned_cell_steps_in_a_region_repeat_the_first_calls_bits(kind):
    cell = seed_parameters(make_cell(kind), seed=300)
    x, h = randn((1, I), F32, seed=1), randn((1, H), F32, seed=2)
    states = (h, randn((1, H), F32, seed=3)) if kind == "lstm" else h
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        outs = [cell(x, states) for _ in range(3)]
    for o in outs[1:]:
        for a, b in zip(o if kind == "lstm" else (o,), outs[0] if kind == "lstm" else (outs[0],)):
            assert a.dtype == BF16
            assert_bitwise_equal(a, b)


def test_model_in_a_region_compiles_fullgraph():
    lstm = seed_parameters(pnn.LSTM(I, H, num_layers=2))
    x = randn((7, 3, I), F32, seed=1).requires_grad_()

    def f(x):
        y = lstm(x)[0]
        return y, y.float().pow(2).sum()
    with torch._dynamo.config.patch(allow_rnn=True):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        with torch.autocast("cpu", dtype=BF16):
            (y, eager_loss), (yc, compiled_loss) = f(x), compiled(x)
    assert y.dtype == yc.dtype == BF16
    (ge,) = torch.autograd.grad(eager_loss, x)
    (gc,) = torch.autograd.grad(compiled_loss, x)
    # Compiled calls take the op path (torch's bfloat16 projection), eager ones may take the kernel's
    # own projection: other summation orders, then bfloat16 storage.
    rtol, atol = TOLERANCES[BF16]
    torch.testing.assert_close(yc, y, rtol=rtol, atol=atol)
    torch.testing.assert_close(gc, ge, rtol=rtol, atol=atol)


def test_target_names_the_region_dtype_and_off_ends_it():
    x = torch.randn(2)
    assert rnn_autocast.target(x) is None
    with torch.autocast("cpu", dtype=BF16):
        assert rnn_autocast.target(x) is BF16
        with rnn_autocast.off("cpu"):
            assert rnn_autocast.target(x) is None
        assert rnn_autocast.target(x) is BF16


def test_vmap_in_a_region_runs_the_region_dtype():
    """vmap over data and over stacked parameters (ensembles) inside a region, without grad: the casts
    of mapped (storage-less) parameters are made, not cached; each member as its own call."""
    m = seed_parameters(pnn.GRU(I, H))
    xs = randn((3, 7, 2, I), F32, seed=1)
    params = {k: v.detach() for k, v in m.named_parameters()}
    stacked = {k: torch.stack([v, v * 0.9]) for k, v in params.items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        over_data = torch.vmap(lambda z: m(z)[0])(xs)
        over_params = torch.vmap(lambda p: torch.func.functional_call(m, p, (xs[0],))[0])(stacked)
        for i in range(3):
            assert_bitwise_equal(over_data[i], m(xs[i])[0])
        for i in range(2):
            member = {k: v[i] for k, v in stacked.items()}
            assert_bitwise_equal(over_params[i], torch.func.functional_call(m, member, (xs[0],))[0])
    assert over_data.dtype == over_params.dtype == BF16
