"""The recurrent ops (pyseqkern.ops.rnn) against the float64 reference, on every CPU ISA level and on
CUDA through both kernel paths (persistent and per-step, forced): outputs, final states and every
gradient, for every mode and option; bfloat16 (and float16 on CUDA) by the 2x-torch rule; raw kernels
with poisoned outputs; determinism, gradcheck, opcheck, torch.compile, weight-cache invalidation, bad
inputs; on CUDA also CUDA-graph capture, side streams and larger shapes (several blocks, batch and k
tiles). CUDA cases skip cleanly without a usable GPU."""
import copy
import math
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import pyseqkern
from pyseqkern import _C
from pyseqkern._handoff import capsule
from pyseqkern.ops import rnn as ops
from pyseqkern.ops import rnn_autograd, rnn_cell_train, rnn_cuda, rnn_thin
from pyseqkern.ops import rnn_gemms
from pyseqkern.ops import rnn_paths
from pyseqkern.ops import rnn_scratch
from pyseqkern.ops import rnn_seq
from pyseqkern.reference import rnn as ref
from helpers import (BF16_DOT_LEVELS, assert_bitwise_equal, assert_close_to_ref, assert_matches,
                     assert_within_torch_error, randn, runnable_levels, strided)

SUPPORTED = runnable_levels()  # the CPU runs them and the build has them
# (mode, proj, reset_after): every kernel variant
VARIANTS = [("lstm", 0, True), ("lstm", 3, True), ("gru", 0, True), ("gru", 0, False), ("rnn_tanh", 0, True),
            ("rnn_relu", 0, True)]
CUDA_PATHS = [pytest.param(f"cuda-{p}", marks=pytest.mark.cuda) for p in ("persistent", "step")]


def _run_on(param):
    """Context for one parametrized place to run: "cpu[-isa]" or "cuda-<path>" (the CUDA kernel path
    forced, and afterwards checked to be the one backend_info() reports for every call made)."""
    kind, _, what = param.partition("-")
    if kind == "cpu":
        best = pyseqkern.backend_info()["cpu"]["isa_best"]
        if what and what not in SUPPORTED:
            pytest.skip(f"this CPU does not run {what}")
        pyseqkern.set_cpu_isa(what or best)
        yield "cpu"
        pyseqkern.set_cpu_isa(best)
        return
    old = rnn_cuda.path()
    paths = pyseqkern._backend.CUDA_RNN_PATHS
    for direction in ("forward", "backward"):
        paths.pop(direction, None)
    rnn_cuda.set_path(what)
    try:
        yield "cuda"
        for direction in ("forward", "backward"):
            assert paths.get(direction, what) == what, f"{direction} ran {paths[direction]!r}, not the forced {what!r}"
    finally:
        rnn_cuda.set_path(old)


@pytest.fixture(params=[f"cpu-{level}" for level in pyseqkern.ISA_LEVELS] + CUDA_PATHS)
def target(request):
    """Every CPU ISA level, and CUDA through each kernel path."""
    yield from _run_on(request.param)


@pytest.fixture(params=["cpu"] + CUDA_PATHS)
def device(request):
    """The CPU at its best level, and CUDA through each kernel path."""
    yield from _run_on(request.param)


def make_case(mode, proj, dtype, T=7, B=5, I=13, H=11, lengths=None, seed=0, bias=True, strided_inputs=True,
              device="cpu"):
    """Seeded layer inputs; x strided when asked; packed when lengths are given (sorted, longest first).
    Weights have torch's initial scale (1/sqrt(fan-in)): a recurrence with a much larger recurrent matrix
    is chaotic, and there float32 rounding, ours and torch's alike, grows without bound."""
    G = ops.GATES[mode]
    K = proj or H

    def mk(shape, s, scale=1.0):
        if strided_inputs:
            return strided(shape, dtype, device=device, seed=seed * 100 + s, scale=scale)
        return randn(shape, dtype, device=device, seed=seed * 100 + s, scale=scale)

    x = mk((T, B, I), 1)
    t = dict(h0=mk((B, K), 2, 0.5), c0=mk((B, H), 3, 0.5) if mode == "lstm" else None,
             w_ih=mk((G * H, I), 4, I ** -0.5), w_hh=mk((G * H, K), 5, K ** -0.5),
             b_ih=mk((G * H,), 6, H ** -0.5) if bias else None, b_hh=mk((G * H,), 7, H ** -0.5) if bias else None,
             w_hr=mk((proj, H), 8, H ** -0.5) if proj else None)
    batch_sizes = None
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths))
        x, batch_sizes = packed.data, packed.batch_sizes
    return x, batch_sizes, t


def call(fn, mode, x, batch_sizes, t, reverse, reset_after):
    return fn(mode, x, batch_sizes, t["h0"], t["c0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["w_hr"], reverse,
              reset_after)


def leaves(x, t, dtype=None):
    """Leaves that require grad, in a fixed order. detach() keeps each input's strides (a clone of a
    strided view would be contiguous, and the strided layouts would never reach the op)."""
    out = {"x": x}
    out.update(t)
    return {k: (None if v is None else (v.detach().to(dtype) if dtype else v.detach()).requires_grad_())
            for k, v in out.items()}


def outputs_and_grads(fn, mode, x, batch_sizes, t, reverse, reset_after, seed=9):
    """Outputs, then gradients of a fixed random weighting of all outputs wrt every input."""
    lv = leaves(x, t)
    outs = call(fn, mode, lv["x"], batch_sizes, {k: v for k, v in lv.items() if k != "x"}, reverse, reset_after)
    outs = [o for o in outs if o is not None]
    weights = [randn(o.shape, torch.float64, device=o.device, seed=seed + i) for i, o in enumerate(outs)]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    names = [k for k, v in lv.items() if v is not None]
    grads = torch.autograd.grad(loss, [lv[k] for k in names])
    return outs, dict(zip(names, grads))


def check_against_reference(mode, proj, reset_after, dtype, reverse, lengths, **kw):
    """float64: elementwise tolerances. Lower precision is a recurrence: the project's rule, our error
    against float64 at most twice that of the same computation done by PyTorch in the same dtype."""
    x, bs, t = make_case(mode, proj, dtype, lengths=lengths, **kw)
    outs, grads = outputs_and_grads(ops.rnn_layer, mode, x, bs, t, reverse, reset_after)
    x64, t64 = x.double(), {k: None if v is None else v.double() for k, v in t.items()}
    routs, rgrads = outputs_and_grads(ref.rnn_layer, mode, x64, bs, t64, reverse, reset_after)
    if dtype == torch.float64:
        for name, o, r in zip(["y", "h_n", "c_n"], outs, routs):
            assert_close_to_ref(o, r, name=f"{mode} {name}")
        for name in rgrads:
            assert_close_to_ref(grads[name], rgrads[name], name=f"{mode} d{name}")
        return
    touts, tgrads = outputs_and_grads(ref.rnn_layer, mode, x, bs, t, reverse, reset_after)
    for name, o, th, r in zip(["y", "h_n", "c_n"], outs, touts, routs):
        assert_within_torch_error(o, th, r, name=f"{mode} {name}")
    for name in rgrads:
        assert_within_torch_error(grads[name], tgrads[name], rgrads[name], name=f"{mode} d{name}")


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [7, 7, 4, 2, 1]])
def test_layer_matches_reference(target, mode, proj, reset_after, dtype, reverse, lengths):
    check_against_reference(mode, proj, reset_after, dtype, reverse, lengths, device=target)


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
@pytest.mark.parametrize("T, B, I, H", [(1, 1, 1, 1), (3, 1, 7, 17), (2, 9, 5, 33), (4, 6, 3, 113), (2, 3, 65, 64)])
def test_odd_sizes(device, mode, proj, reset_after, T, B, I, H):
    # Sizes straddle the unit blocks (16 lanes in float32 on AVX-512, 8 on AVX2, 4 on SSE) and the
    # register tile's row count; H=113 spreads blocks over both threads. The CPU tiles sum over k in
    # blocks of 64 (kSumBlock): I=65 ends in a block of one, H=64 and 4H fill theirs exactly, H=113 does
    # not. On CUDA: warp-sized k chunks, the 4-row register tile and the 8-row batch tile.
    check_against_reference(mode, min(proj, H - 1) if H > 1 else 0, reset_after, torch.float32, True, None,
                            T=T, B=B, I=I, H=H, device=device)


@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS[:4] + [("lstm", 200, True)])
@pytest.mark.parametrize("lengths", [None, [6, 6, 6, 5, 5, 5, 5, 5, 5, 4, 4, 3, 3, 3, 2, 2, 2, 1, 1, 1]])
def test_cuda_larger_shapes(path, mode, proj, reset_after, lengths):
    # Many blocks (H=300 over the multiprocessors), three batch tiles of 8 with a partial one, and in the
    # per-step path k tiles (its tile holds 1024 columns; the backward's longest product has 4*300).
    for _ in _run_on(path):
        check_against_reference(mode, proj, reset_after, torch.float32, True, lengths, T=6, B=20, I=50, H=300,
                                strided_inputs=False, device="cuda")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("mode, proj, reset_after", [("lstm", 40, True), ("gru", 0, False), ("gru", 0, True)])
def test_thread_counts_agree(threads, mode, proj, reset_after):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_against_reference(mode, proj, reset_after, torch.float32, False, [9, 8, 8, 5, 3, 1], T=9, B=6, I=20,
                                H=96)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("lengths", [None, [6, 6, 6, 6, 6, 5, 4, 4, 3, 3, 2, 1, 1]])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_threads_owning_rows_or_units_agree_bitwise(isa, mode, proj, reset_after, dtype, reverse, lengths):
    """Where each core's cache holds the whole forward panel, the forward's threads own row tiles (all
    units of them, no barrier per step) instead of unit blocks; in packed batches the tiles split by
    valid steps, not by count. Each sum runs over k in the same order either way, so one, two and three
    threads give the same bits: outputs, final states and reserve. B = 13 leaves a partial row tile;
    H = 64 makes the step large enough for several threads."""
    if dtype == torch.bfloat16 and proj:
        proj = 32  # bfloat16 pair sections need even sizes to be taken; keep the case on them
    x, bs, t = make_case(mode, proj, dtype, T=6, B=13, I=10, H=64, strided_inputs=False, lengths=lengths)
    code, K = ops.MODES[mode], proj or 64
    seq = rnn_seq._Seq(x, bs, reverse)
    packed = torch.ops.pyseqkern.rnn_pack(code, reset_after, 64, proj, t["w_hh"], t["w_hr"])
    xg = randn((x.reshape(-1, x.shape[-1]).shape[0], ops.GATES[mode] * 64), dtype, seed=3)
    b_hn = t["b_hh"][128:] if mode == "gru" and reset_after else None
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torch.ops.pyseqkern.rnn_forward(code, reset_after, 64, proj, seq.steps, seq.batch, xg, b_hn,
                                                           t["h0"], t["c0"], packed, *seq.args(), True))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for name, a, b in zip(["y", "h_n", "c_n", "reserve"], results[0], other):
            assert_bitwise_equal(b, a, name=name)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_packed_rows_split_by_length_meet_the_reference(mode, proj, reset_after, reverse):
    """A packed batch whose forward splits rows between threads by their valid steps (rnn_fwd.cpp,
    split_quanta_by_length; B = 13 and H = 64 are large enough for two threads): outputs and every
    gradient against float64."""
    check_against_reference(mode, proj, reset_after, torch.float32, reverse, [6, 6, 6, 6, 6, 5, 4, 4, 3, 3, 2, 1, 1],
                            T=6, B=13, I=10, H=64)


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_no_bias_no_initial_state(device, mode, proj, reset_after):
    x, bs, t = make_case(mode, proj, torch.float64, bias=False, device=device)
    zeros = dict(t, h0=torch.zeros_like(t["h0"]), c0=None if t["c0"] is None else torch.zeros_like(t["c0"]))
    outs = call(ops.rnn_layer, mode, x, bs, dict(t, h0=None, c0=None), False, reset_after)
    routs = call(ref.rnn_layer, mode, x, bs, zeros, False, reset_after)
    for o, r in zip(outs, routs):
        if r is not None:
            assert_close_to_ref(o, r)


@pytest.mark.parametrize("H", [40, 41])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_types_within_twice_torch_error(device, half, mode, proj, reset_after, H):
    # "torch" here is the same reference run by PyTorch in the half type (torch.nn has no GRU
    # reset_before): our half storage with float32 math must not be further from float64 than twice
    # that, outputs and gradients. float16 on the CPU runs in float32 (no float16 kernels there). The
    # float64 result is the one for the half-rounded inputs, so only the computations' own errors count
    # (measured, stop 16: our gradients' errors are 0.2-0.8x the reference's on the CPU). H = 41: an odd
    # state size, where the bfloat16 pair products (avx512bf16, amx) pad the last pair of k.
    x, bs, t = make_case(mode, proj, torch.float32, T=20, B=4, I=24, H=H, lengths=[20, 15, 9, 2], device=device)
    x16 = x.to(half)
    t16 = {k: None if v is None else v.to(half) for k, v in t.items()}
    t64 = {k: None if v is None else v.double() for k, v in t16.items()}
    ours, grads = outputs_and_grads(ops.rnn_layer, mode, x16, bs, t16, True, reset_after)
    theirs, tgrads = outputs_and_grads(ref.rnn_layer, mode, x16, bs, t16, True, reset_after)
    exact, egrads = outputs_and_grads(ref.rnn_layer, mode, x16.double(), bs, t64, True, reset_after)
    for name, o, th, e in zip(["y", "h_n", "c_n"], ours, theirs, exact):
        if o is not None:
            assert o.dtype == half
            assert_within_torch_error(o, th, e, name=f"{mode} {name}")
    assert grads.keys() == egrads.keys()
    for name in grads:
        assert grads[name].dtype == half
        assert_within_torch_error(grads[name], tgrads[name], egrads[name], name=f"{mode} d{name}")


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_deterministic(device, mode, proj, reset_after):
    x, bs, t = make_case(mode, proj, torch.float32, T=12, B=7, I=30, H=70, lengths=[12, 12, 9, 7, 4, 4, 1],
                         device=device)
    a, ga = outputs_and_grads(ops.rnn_layer, mode, x, bs, t, True, reset_after)
    b, gb = outputs_and_grads(ops.rnn_layer, mode, x, bs, t, True, reset_after)
    for o1, o2 in zip(a, b):
        assert_bitwise_equal(o1, o2)
    for k in ga:
        assert_bitwise_equal(ga[k], gb[k], name=f"d{k}")


def gradcheck_case(mode, proj, device="cpu", **kw):
    """A float64 case of H=3 small enough for gradcheck (proj at most 2), and the names of its tensors."""
    x, bs, t = make_case(mode, proj, torch.float64, B=3, I=2, H=3, strided_inputs=False, device=device, **kw)
    proj = min(proj, 2)
    if proj:
        t["w_hr"] = randn((proj, 3), torch.float64, device=device, seed=50)
        t["h0"] = randn((3, proj), torch.float64, device=device, seed=51)
        t["w_hh"] = randn((12, proj), torch.float64, device=device, seed=52)
    return x, bs, t, [k for k, v in t.items() if v is not None]


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_gradcheck(device, mode, proj, reset_after):
    x, bs, t, names = gradcheck_case(mode, proj, device, T=3, lengths=[3, 2, 1])

    def fn(x_, *tensors):
        tt = dict(t, **dict(zip(names, tensors)))
        return tuple(o for o in call(ops.rnn_layer, mode, x_, bs, tt, True, reset_after) if o is not None)

    inputs = [x.clone().requires_grad_()] + [t[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_gradcheck_of_one_step_calls(mode, proj, reset_after):
    """One step a call that records gradients reuses the previous call's packed weights where the kernel
    finds them unchanged (_packed's `reuse`). gradcheck perturbs its inputs through `.data`, which bumps
    no version counter: every perturbation of w_hh and w_hr must still reach the kernel, as a layer of
    T=1 and as a cell step."""
    x, bs, t, names = gradcheck_case(mode, proj, T=1)

    def layer(x_, *tensors):
        tt = dict(t, **dict(zip(names, tensors)))
        return tuple(o for o in call(ops.rnn_layer, mode, x_, bs, tt, False, reset_after) if o is not None)

    inputs = [x.clone().requires_grad_()] + [t[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(layer, inputs)
    if proj:
        return

    def cell(x_, *tensors):
        tt = dict(t, **dict(zip(names, tensors)))
        h, c = ops.rnn_cell(mode, x_, tt["h0"], tt["c0"], tt["w_ih"], tt["w_hh"], tt["b_ih"], tt["b_hh"], reset_after)
        return (h,) if c is None else (h, c)

    inputs[0] = x[0].clone().requires_grad_()
    assert torch.autograd.gradcheck(cell, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS + [("lstm", 37, True)])
def test_packs_are_the_same_bytes_at_every_thread_count(isa, mode, proj, reset_after, dtype):
    """rnn_pack splits every section's unit blocks over its threads (from 2^16 weights): H = 263 leaves a
    tail block of 7 units and blocks that do not split evenly; the weights are column slices of wider
    buffers (rows read through their leading dimension)."""
    H, code = 263, ops.MODES[mode]
    K = proj or H
    w_hh = randn((ops.GATES[mode] * H, 2 * K), dtype, seed=1)[:, K:]
    w_hr = randn((proj, 2 * H), dtype, seed=2)[:, :H] if proj else None
    numel = ops._sizes(code, reset_after, H, proj, 1, dtype)[1]
    packs = []
    for threads in (1, 2, 3):
        out = torch.full((numel,), float("nan"), dtype=ops._acc_dtype(dtype))
        _C.rnn_pack(code, reset_after, H, proj, to_dlpack(w_hh), None if w_hr is None else to_dlpack(w_hr),
                    to_dlpack(out), num_threads=threads)
        packs.append(out)
    assert all(p.view(torch.uint8).equal(packs[0].view(torch.uint8)) for p in packs[1:])
    assert _C.rnn_pack_current(code, reset_after, H, proj, to_dlpack(w_hh),
                               None if w_hr is None else to_dlpack(w_hr), to_dlpack(packs[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_pack_current_sees_every_changed_weight(isa, mode, proj, reset_after, dtype):
    """_C.rnn_pack_current: true for the weights a pack was made from, false once any one of them changed
    (each unit block and its tail past H=11, w_hr's too), a sign of zero included; a pack of another size or
    dtype is not current."""
    _, _, t = make_case(mode, proj, dtype, T=1, B=1, H=11, strided_inputs=False)
    code = ops.MODES[mode]
    w_hh, w_hr = t["w_hh"], t["w_hr"]
    packed = torch.ops.pyseqkern.rnn_pack(code, reset_after, 11, proj, w_hh, w_hr)

    def current(a, b):
        return _C.rnn_pack_current(code, reset_after, 11, proj, to_dlpack(a), None if b is None else to_dlpack(b),
                                   to_dlpack(packed))

    assert current(w_hh, w_hr)
    for w in [w_hh] + ([w_hr] if proj else []):
        for (i, j) in [(0, 0), (w.shape[0] - 1, w.shape[1] - 1), (w.shape[0] // 2, 1)]:
            changed = w.clone()
            changed[i, j] = -changed[i, j] if changed[i, j] != 0 else -0.0
            assert not current(changed, w_hr) if w is w_hh else not current(w_hh, changed)
        zero = w.clone()
        zero[1, 2] = 0.0
        other = zero.clone()
        other[1, 2] = -0.0  # equal as numbers, not as bits (the products' signs of zero differ)
        repacked = torch.ops.pyseqkern.rnn_pack(code, reset_after, 11, proj, zero if w is w_hh else w_hh,
                                                zero if w is w_hr else w_hr)
        assert _C.rnn_pack_current(code, reset_after, 11, proj, to_dlpack(other if w is w_hh else w_hh),
                                   None if w_hr is None else to_dlpack(other if w is w_hr else w_hr),
                                   to_dlpack(repacked)) is False
    # A pack shorter than this level's layout (another level's) or of another dtype is not current, read no
    # further than its size (it had raised "'out' must hold ...", naming no argument of this call: stop 33).
    for other in (packed[:-1], packed.double() if dtype != torch.float64 else packed.float()):
        assert _C.rnn_pack_current(code, reset_after, 11, proj, to_dlpack(w_hh),
                                   None if w_hr is None else to_dlpack(w_hr), to_dlpack(other)) is False


def test_cell_matches_reference(device):
    for mode, reset_after in [("lstm", True), ("gru", True), ("gru", False), ("rnn_tanh", True), ("rnn_relu", True)]:
        G = ops.GATES[mode]
        x, h = randn((5, 9), device=device, seed=1), randn((5, 17), device=device, seed=2)
        c = randn((5, 17), device=device, seed=3) if mode == "lstm" else None
        w = [randn(s, device=device, seed=4 + i) for i, s in enumerate([(G * 17, 9), (G * 17, 17), (G * 17,), (G * 17,)])]
        got = ops.rnn_cell(mode, x, h, c, *w, reset_after=reset_after)
        want = ref.rnn_cell(mode, x.double(), h.double(), None if c is None else c.double(), *[v.double() for v in w],
                            reset_after=reset_after)
        for g, e in zip(got, want):
            if e is not None:
                assert_close_to_ref(g, e, name=f"{mode} cell")


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_raw_kernel_writes_every_output(device, mode, proj, reset_after):
    # The op allocates its outputs with torch.empty; here the kernels get NaN-filled ones directly.
    x, bs, t = make_case(mode, proj, torch.float32, lengths=[7, 5, 5, 2, 1], strided_inputs=False, device=device)
    code, H = ops.MODES[mode], 11
    K = proj or H
    seq = rnn_seq._Seq(x, bs, True)
    bias, b_hn = ops._fold_bias(mode, reset_after, H, t["b_ih"], t["b_hh"])
    x_gates = torch.addmm(bias, x, t["w_ih"].t())
    cuda = device == "cuda"
    if cuda:
        packed = rnn_cuda._pack_cuda(code, reset_after, H, proj, t["w_hh"], t["w_hr"])
        ws, rcols = rnn_cuda.sizes(code, reset_after, H, proj, seq.batch, torch.float32)[2:4]
        tail = (1, torch.cuda.current_stream().cuda_stream, rnn_cuda.PATHS[rnn_cuda.path()])
    else:
        packed = ops._pack_impl(code, reset_after, H, proj, t["w_hh"], t["w_hr"])
        ws, rcols = ops._sizes(code, reset_after, H, proj, seq.batch, torch.float32)[2:4]
        tail = (2,)
    n, B = x.shape[0], seq.batch
    nan = lambda *shape: torch.full(shape, float("nan"), device=device)  # noqa: E731
    y, h_n = nan(n, K), nan(B, K)
    c_n = nan(B, H) if mode == "lstm" else None
    reserve = nan(n, rcols)
    cap = lambda v: None if v is None else to_dlpack(v)  # noqa: E731
    _C.rnn_forward(code, reset_after, H, proj, seq.steps, B, cap(seq.batch_sizes), cap(seq.time_offsets),
                   cap(seq.lengths), 0, 0, True, cap(x_gates), cap(b_hn), cap(t["h0"]), cap(t["c0"]), cap(y), K,
                   cap(h_n), cap(c_n), cap(packed), cap(reserve), cap(torch.empty(ws, device=device)), *tail)
    want = ref.rnn_layer(mode, x.double(), bs, *[None if t[k] is None else t[k].double() for k in
                                                 ("h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")], True, reset_after)
    assert_close_to_ref(y, want[0], name="y")
    assert_close_to_ref(h_n, want[1], name="h_n")
    if c_n is not None:
        assert_close_to_ref(c_n, want[2], name="c_n")
    assert not torch.isnan(reserve).any(), "reserve has unwritten entries"

    # Backward into poisoned outputs: every element written, and the same bits as the op's call.
    G = ops.GATES[mode]
    gru_after = mode == "gru" and reset_after
    dy, dh_n = randn((n, K), device=device, seed=21), randn((B, K), device=device, seed=22)
    dc_n = randn((B, H), device=device, seed=23) if mode == "lstm" else None
    dgx, dgh = nan(n, G * H), nan(n, G * H) if gru_after else None
    dproj, dh0 = nan(n, proj) if proj else None, nan(B, K)
    dc0 = nan(B, H) if mode == "lstm" else None
    _C.rnn_backward(code, reset_after, H, proj, seq.steps, B, cap(seq.batch_sizes), cap(seq.time_offsets),
                    cap(seq.lengths), 0, 0, True, cap(dy), K, cap(dh_n), cap(dc_n), cap(t["c0"]), cap(reserve),
                    cap(packed), cap(dgx), cap(dgh), cap(dproj), cap(dh0), cap(dc0),
                    cap(torch.empty(ws, device=device)), *(tail[:1] + (None, None, None) + tail[1:]))
    op = torch.ops.pyseqkern.rnn_backward(code, reset_after, H, proj, seq.steps, B, dy, dh_n, dc_n, t["c0"], reserve,
                                          packed, *seq.args(), False)
    for name, got, expected in (("d_gates_x", dgx, op[0]), ("d_gates_h", dgh, op[1]), ("d_proj", dproj, op[2]),
                                ("dh0", dh0, op[3]), ("dc0", dc0, op[4])):
        if got is not None:
            assert not torch.isnan(got).any(), f"{name} has unwritten entries"
            assert_bitwise_equal(got, expected, name=name)
    if proj:  # both kernels write d_proj at row * P + k: a strided one is refused, not written past
        wide = nan(n, proj + 3)[:, :proj]
        with pytest.raises(ValueError, match=f"'d_proj' must hold {n} rows of {proj} float32 values, {proj} apart"):
            _C.rnn_backward(code, reset_after, H, proj, seq.steps, B, cap(seq.batch_sizes), cap(seq.time_offsets),
                            cap(seq.lengths), 0, 0, True, cap(dy), K, cap(dh_n), cap(dc_n), cap(t["c0"]),
                            cap(reserve), cap(packed), cap(dgx), cap(dgh), cap(wide), cap(dh0), cap(dc0),
                            cap(torch.empty(ws, device=device)), *(tail[:1] + (None, None, None) + tail[1:]))


@pytest.mark.parametrize("updated", ["w_hh", "b_ih", "b_hh"])
def test_cached_weights_follow_in_place_updates(device, updated):
    x, bs, t = make_case("gru", 0, torch.float32, strided_inputs=False, device=device)
    before = call(ops.rnn_layer, "gru", x, bs, t, False, True)[0]
    with torch.no_grad():
        t[updated].mul_(0.5)  # same storage, new version: the cached packing / folded bias must not be served
    after = call(ops.rnn_layer, "gru", x, bs, t, False, True)[0]
    want = call(ref.rnn_layer, "gru", x.double(), bs, {k: None if v is None else v.double() for k, v in t.items()},
                False, True)[0]
    assert not torch.equal(before, after)
    assert_close_to_ref(after, want)


def test_opcheck(device):
    x, bs, t = make_case("gru", 0, torch.float32, strided_inputs=False, device=device)
    seq = rnn_seq._Seq(x.view(7, 5, 13), None, False)
    xg = randn((35, 33), device=device, seed=3)
    packed = torch.ops.pyseqkern.rnn_pack(1, True, 11, 0, t["w_hh"], None)
    torch.library.opcheck(torch.ops.pyseqkern.rnn_pack.default, (1, True, 11, 0, t["w_hh"], None))
    fwd_args = (1, True, 11, 0, 7, 5, xg, t["b_hh"][22:], t["h0"], None, packed, *seq.args(), True)
    torch.library.opcheck(torch.ops.pyseqkern.rnn_forward.default, fwd_args)
    torch.library.opcheck(torch.ops.pyseqkern.rnn_forward.default, fwd_args + (randn((33,), device=device, seed=6),))
    y, h_n, c_n, reserve = torch.ops.pyseqkern.rnn_forward(*fwd_args)
    for transposed in (False, True):
        bwd_args = (1, True, 11, 0, 7, 5, randn((35, 11), device=device, seed=4),
                    randn((5, 11), device=device, seed=5), None, None, reserve, packed, *seq.args(), transposed)
        torch.library.opcheck(torch.ops.pyseqkern.rnn_backward.default, bwd_args)
    # The layer op torch.export records (ops/rnn_export.py), with its autograd; packed too, where the
    # batch comes from h0 (a packed batch's size is data, which no trace reads).
    xs, _, u = make_case("gru", 0, torch.float32, strided_inputs=False, device=device)
    args = [v.detach().clone().requires_grad_() for v in (xs, u["h0"], u["w_ih"], u["w_hh"], u["b_ih"], u["b_hh"])]
    torch.library.opcheck(torch.ops.pyseqkern.rnn_layer_op.default,
                          (1, True, args[0], None, args[1], None, *args[2:], None, False))
    bs = torch.tensor([5, 5, 4, 4, 2, 1, 1])
    rows = args[0].detach().reshape(-1, args[0].shape[-1])[: int(bs.sum())].clone().requires_grad_()
    torch.library.opcheck(torch.ops.pyseqkern.rnn_layer_op.default,
                          (1, True, rows, bs, args[1], None, *args[2:], None, False))
    # LSTM with a projection (c_n has hidden columns, y and h_n proj), reversed, packed and padded, one
    # bias: the fake impl's shapes against the kernel's.
    w_ih, w_hh, w_hr, b_hh, h0, c0 = (randn(s, device=device, seed=20 + i).requires_grad_() for i, s in
                                      enumerate([(28, 13), (28, 3), (3, 7), (28,), (5, 3), (5, 7)]))
    torch.library.opcheck(torch.ops.pyseqkern.rnn_layer_op.default,
                          (0, True, rows, bs, h0, c0, w_ih, w_hh, None, b_hh, w_hr, True))
    torch.library.opcheck(torch.ops.pyseqkern.rnn_layer_op.default,
                          (0, True, args[0], None, h0, c0, w_ih, w_hh, None, b_hh, w_hr, True))


def test_onednn_serves_a_bounded_number_of_row_counts(monkeypatch):
    """oneDNN's linear keeps a primitive per GEMM shape: packed training whose row count changed every
    step held +465 MB of native memory (found by a leak sweep, stop 18). It serves the first
    _ONEDNN_MAX_ROWS row counts seen; each row count keeps the path it got first."""
    if rnn_gemms._onednn_linear is None:
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(rnn_gemms, "_ONEDNN_ROWS", set())
    monkeypatch.setattr(rnn_gemms, "_ONEDNN_BF16", True)  # (the bookkeeping only: no GEMM runs)
    rows = list(range(32, 32 + 3 * rnn_gemms._ONEDNN_MAX_ROWS))
    first = [rnn_gemms._onednn_ok(r, torch.bfloat16, torch.device("cpu")) for r in rows]
    assert sum(first) == rnn_gemms._ONEDNN_MAX_ROWS and all(first[:rnn_gemms._ONEDNN_MAX_ROWS])
    assert [rnn_gemms._onednn_ok(r, torch.bfloat16, torch.device("cpu")) for r in reversed(rows)] == first[::-1]
    assert not rnn_gemms._onednn_ok(31, torch.bfloat16, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lengths", [None, "spread"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode,proj,reset_after", VARIANTS)
@pytest.mark.parametrize("T, B", [(7, 5), (3, 37)])
def test_backward_transposed_outputs_are_exact_transposes(device, T, B, mode, proj, reset_after, reverse, lengths,
                                                          dtype):
    """The weight-gradient GEMMs read d_gates^T and h_prev^T written by the backward kernel: they must be
    the row-major results transposed, bit for bit, for every row mapping (padded, packed, reverse).
    B = 37: whole 16-row register transposes, and for bfloat16 a whole 32-row line and a tail."""
    spread = None if lengths is None else [T - (T - 1) * i // (B - 1) for i in range(B)]
    check_transposed_outputs(device, mode, proj, reset_after, reverse, spread, dtype, T=T, B=B, H=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [None, "spread"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode,proj,reset_after", VARIANTS)
def test_backward_transposed_outputs_at_streaming_sizes(mode, proj, reset_after, reverse, lengths, dtype):
    """From 8 MB (kStreamBytes) the kernels write the reserve, d_gates_x and the transposed copies by
    non-temporal stores, and the transposes read dG instead of d_gates_x: the same exactness there.
    (bfloat16 at B = 64, for the 8 MB; its copies go out a 32-row line at a time.)"""
    B = 32 if dtype == torch.float32 else 64
    spread = [100 - (98 * i) // (B - 1) for i in range(B)] if lengths else None
    # H = 200: the last unit block is partial and reserve rows are not all 64-byte aligned (plain stores)
    check_transposed_outputs("cpu", mode, proj, reset_after, reverse, spread, dtype, T=100, B=B, H=200)


@pytest.mark.parametrize("gemm", ["onednn", "mkl"])
@pytest.mark.parametrize("mode, proj, reset_after", [("lstm", 0, True), ("gru", 0, True), ("gru", 0, False),
                                                     ("lstm", 64, True)])
def test_layer_matches_reference_at_streaming_sizes(monkeypatch, mode, proj, reset_after, gemm):
    """Outputs and every gradient where the kernels store past the caches (kStreamBytes), with either
    library's float32 GEMMs (ops/rnn.py picks one by CPU vendor; the oneDNN one reads the kernel's
    transposed copies)."""
    use_gemm(monkeypatch, gemm)
    check_against_reference(mode, proj, reset_after, torch.float32, False, None, T=100, B=32, H=200)


@pytest.mark.parametrize("gemm", ["onednn", "mkl"])
@pytest.mark.parametrize("reverse, lengths", [(False, None), (True, [9, 9, 8, 6, 5, 5, 3, 2, 1])])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_training_gemms_of_either_library_meet_the_reference(monkeypatch, mode, proj, reset_after, reverse, lengths,
                                                              gemm):
    """The backward's float32 GEMMs from 32 rows on: oneDNN's linear on the kernel's transposed copies, or
    MKL's mm on views (_backend.FP32_GEMM)."""
    use_gemm(monkeypatch, gemm)
    check_against_reference(mode, proj, reset_after, torch.float32, reverse, lengths, T=9, B=9)


def use_gemm(monkeypatch, gemm):
    """The backward's float32 GEMMs from `gemm`'s library, gates of any width (rnn_gemms._MKL_GATES_UP_TO sends
    narrow ones to MKL where oneDNN serves the rest; these tests' layers are that narrow)."""
    monkeypatch.setattr(ops._backend, "FP32_GEMM", gemm)
    monkeypatch.setattr(rnn_gemms, "_MKL_GATES_UP_TO", 0)


def test_narrow_gates_take_mkl_for_the_backward_gemms(monkeypatch):
    """Float32 layers whose gates are _MKL_GATES_UP_TO wide or less take MKL's mm on views for the backward's
    GEMMs where oneDNN serves the rest, without taking one of oneDNN's row counts; wider ones and bfloat16
    take oneDNN."""
    if rnn_gemms._onednn_linear is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(ops._backend, "FP32_GEMM", "onednn")
    monkeypatch.setattr(rnn_gemms, "_ONEDNN_ROWS", set())
    cpu = torch.device("cpu")
    narrow = rnn_gemms._MKL_GATES_UP_TO
    assert not rnn_gemms._Gemms(3200, torch.float32, cpu, narrow).fast and not rnn_gemms._ONEDNN_ROWS
    assert rnn_gemms._Gemms(3200, torch.float32, cpu, narrow + 1).fast and rnn_gemms._ONEDNN_ROWS == {3200}
    assert rnn_gemms._Gemms(3200, torch.bfloat16, cpu, narrow).fast == rnn_gemms._ONEDNN_BF16


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode, proj, reset_after", [("lstm", 0, True), ("gru", 0, True), ("gru", 0, False),
                                                     ("rnn_tanh", 0, True), ("lstm", 40, True)])
def test_layer_and_cell_match_the_reference_where_the_panel_exceeds_the_cache(mode, proj, reset_after, dtype, threads):
    """Where a thread's blocks exceed half its L2, the products take the blocks in chunks that fit, every
    row tile over one chunk before the next (rnn_product.h tiled_product): H is chosen so that the
    recurrent panel is larger than this machine's whole L2, forward (sequence and cell) and backward."""
    G = ops.GATES[mode]
    H = int((rnn_paths._L2_BYTES / (G * dtype.itemsize)) ** 0.5) + 17
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(mode, proj, reset_after, dtype, False, None, T=3, B=9, I=20, H=H)
        if not proj:
            x, h = strided((9, 20), dtype, seed=1), strided((9, H), dtype, seed=2, scale=0.5)
            c = strided((9, H), dtype, seed=3, scale=0.5) if mode == "lstm" else None
            w = [randn(sh, dtype, seed=4 + i, scale=H ** -0.5) for i, sh in enumerate([(G * H, 20), (G * H, H), (G * H,),
                                                                                       (G * H,)])]
            with torch.no_grad():
                got = ops.rnn_cell(mode, x, h, c, *w, reset_after=reset_after)
            got = got if isinstance(got, tuple) else (got,)
            want = ref.rnn_cell(mode, x.double(), h.double(), None if c is None else c.double(),
                                *[v.double() for v in w], reset_after=reset_after)
            want = want if isinstance(want, tuple) else (want,)
            for name, a, b in zip(["h", "c"], got, want):
                if b is not None:
                    assert_close_to_ref(a, b, name=f"{mode} cell {name}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("lengths", [None, [6, 6, 6, 6, 6, 5, 4, 4, 3, 3, 2, 1, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode, reset_after", [("lstm", True), ("gru", True), ("rnn_relu", True)])
def test_threads_owning_units_agree_bitwise_forward_and_backward(mode, reset_after, dtype, lengths):
    """Where the recurrent panel exceeds a core's L2 the threads own unit blocks and meet at a barrier
    every step, forward and backward. One, two and three threads give the same bits: outputs, final
    states and the initial states' gradients (the kernels' own; the input and weight gradients are
    torch's GEMMs, whose bits follow its threads). B = 13 makes several row tiles; the packed rows stop at
    different steps. (Written for stop 35's per-row waits in place of the barrier, measured and not
    kept: with them taken out of the forward's or the backward's product, every case here failed.)"""
    G = ops.GATES[mode]
    H = int((rnn_paths._L2_BYTES / (G * dtype.itemsize)) ** 0.5) + 17
    x, bs, t = make_case(mode, 0, dtype, T=6, B=13, I=10, H=H, strided_inputs=False, lengths=lengths)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs, grads = outputs_and_grads(ops.rnn_layer, mode, x, bs, t, False, reset_after)
            runs.append([o for o in outs] + [grads["h0"]] + ([grads["c0"]] if mode == "lstm" else []))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for name, a, b in zip(["y", "h_n", "c_n", "dh0", "dc0"] if mode == "lstm" else ["y", "h_n", "dh0"],
                              runs[0], other, strict=True):
            assert_bitwise_equal(b, a, name=name)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [6] * 20 + [5] * 20 + [4] * 18 + [3] * 16 + [2] * 16 + [1] * 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode, proj, reset_after", [("lstm", 0, True), ("lstm", 24, True), ("gru", 0, True),
                                                     ("gru", 0, False), ("rnn_tanh", 0, True)])
def test_threads_owning_rows_agree_bitwise_in_the_backward(mode, proj, reset_after, dtype, lengths, reverse):
    """Where the panel fits half a core's L2 and each thread gets a cache line's worth of rows (16 float32,
    32 bfloat16), the backward's threads own rows (every unit of them) and take no barrier per step
    (rnn_bwd.cpp, split_rows). One thread owns everything; two and three split the 100 rows (H = 64:
    enough work per step for three). Every output of the kernel call, the transposed copies included,
    has the same bits for each team."""
    args, _ = backward_args("cpu", mode, proj, reset_after, reverse, lengths, dtype, T=6, B=100, H=64, I=10)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append([torch.ops.pyseqkern.rnn_backward(*args, transposed) for transposed in (False, True)])
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for outs, want in zip(other, runs[0]):
            for i, (a, b) in enumerate(zip(outs, want, strict=True)):
                assert_bitwise_equal(a, b, name=f"output {i}")


def backward_args(device, mode, proj, reset_after, reverse, lengths, dtype, T, B, H, I=13):
    """The raw backward op's arguments (all but `transposed`) after a training forward of a seeded case, and
    that forward's reserve."""
    x, bs, t = make_case(mode, proj, dtype, T=T, B=B, I=I, H=H, lengths=lengths, strided_inputs=False, device=device)
    code, G, K = ops.MODES[mode], ops.GATES[mode], proj or H
    seq = rnn_seq._Seq(x, bs, reverse)
    n = x.shape[0] * (1 if bs is not None else x.shape[1])
    xg = randn((n, G * H), dtype, device=device, seed=3)
    packed = torch.ops.pyseqkern.rnn_pack(code, reset_after, H, proj, t["w_hh"], t["w_hr"])
    b_hn = t["b_hh"][2 * H:] if mode == "gru" and reset_after else None
    _, _, _, reserve = torch.ops.pyseqkern.rnn_forward(code, reset_after, H, proj, seq.steps, seq.batch, xg, b_hn,
                                                       t["h0"], t["c0"], packed, *seq.args(), True)
    grads = (randn((n, K), dtype, device=device, seed=4), randn((seq.batch, K), dtype, device=device, seed=5),
             randn((seq.batch, H), dtype, device=device, seed=6) if mode == "lstm" else None)
    return (code, reset_after, H, proj, seq.steps, seq.batch, *grads, t["c0"], reserve, packed, *seq.args()), reserve


def check_transposed_outputs(device, mode, proj, reset_after, reverse, lengths, dtype, T, B, H):
    args, reserve = backward_args(device, mode, proj, reset_after, reverse, lengths, dtype, T, B, H)
    K = proj or H
    plain = torch.ops.pyseqkern.rnn_backward(*args, False)
    tr = torch.ops.pyseqkern.rnn_backward(*args, True)
    for i in range(5):  # dgx, (dgh), dproj, dh0, dc0 agree between the two calls
        if tr[i].numel():
            assert_bitwise_equal(tr[i], plain[i])
    assert_bitwise_equal(tr[5], plain[0].t())
    if mode == "gru" and reset_after:
        assert tr[1].numel() == 0
        assert_bitwise_equal(tr[6], plain[1].t())
    assert_bitwise_equal(tr[7], reserve[:, reserve.shape[1] - K:].to(dtype).t())


def test_compile_fullgraph_forward_and_backward(device):
    x, bs, t = make_case("lstm", 0, torch.float32, strided_inputs=False, device=device)
    params = {k: v.clone().requires_grad_() for k, v in t.items() if v is not None}

    def f(x_):
        y, h, c = ops.rnn_layer("lstm", x_, None, params["h0"], params["c0"], params["w_ih"], params["w_hh"],
                                params["b_ih"], params["b_hh"], None, False)
        return y.sum() + h.sum() + c.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, got = f(xe), compiled(xc)
    assert_close_to_ref(got, eager.double())
    (ge,) = torch.autograd.grad(eager, xe)
    (gc,) = torch.autograd.grad(got, xc)
    assert_close_to_ref(gc, ge.double())


@pytest.mark.parametrize("field, value, match", [
    ("h0", lambda t: t["h0"][:3], r"'h0' must have shape \(5, 11\), got \(3, 11\)"),
    ("c0", lambda t: t["c0"][:, :4], r"'c0' must have shape \(5, 11\)"),
    ("w_ih", lambda t: t["w_ih"][:, :6], r"'w_ih' must have shape \(44, 13\)"),
    ("w_hh", lambda t: t["w_hh"][:42], r"4\*hidden_size rows"),
    ("b_hh", lambda t: t["b_hh"][:7], r"'b_hh' must have shape \(44,\)"),
])
def test_shape_mismatches_are_refused_before_any_kernel_read(field, value, match):
    x, bs, t = make_case("lstm", 0, torch.float32, strided_inputs=False)
    t = dict(t, **{field: value(t)})
    with pytest.raises(ValueError, match=match):
        call(ops.rnn_layer, "lstm", x, bs, t, False, True)


@pytest.mark.parametrize("batch_sizes, match", [
    ([2, 5, 1], "non-increasing"),
    ([9, -1], ">= 0"),
    ([5, 3, 1], "sum to"),
])
def test_malformed_batch_sizes_are_refused(batch_sizes, match):
    _, _, t = make_case("gru", 0, torch.float32, strided_inputs=False)
    x = randn((8, 13), seed=3)
    with pytest.raises(RuntimeError, match=match):  # (torch.nn's type for malformed packed input)
        call(ops.rnn_layer, "gru", x, torch.tensor(batch_sizes), t, False, True)


@pytest.mark.parametrize("sizes", [[1], [7], [5, 5, 5], [9, 4, 4, 1], [3, 3, 0, 0], [0, 0], [113] + [60] * 7 + [2]])
def test_packed_host_forms_listed_equal_torchs_and_are_ours(sizes):
    """A packed batch's copy of batch_sizes, time offsets and lengths come from one listing of its values,
    cached by them (ops/rnn_seq.py, _listed_seq): equal to the torch ops' forms (_seq_host), never the caller's
    tensor, and unchanged by a write to it; malformed sizes, or sizes that do not sum to the data's rows,
    give None (the caller raises)."""
    bs = torch.tensor(sizes)
    mine, offsets, lengths, total = rnn_seq._listed_seq(bs, sum(sizes))
    want_offsets, want_lengths = rnn_seq._seq_host(bs.clone())
    assert torch.equal(mine, bs) and torch.equal(offsets, want_offsets) and torch.equal(lengths, want_lengths)
    assert total == sum(sizes) and mine.data_ptr() != bs.data_ptr()
    bs[0] += 1
    assert mine.tolist() == sizes and rnn_seq._listed_seq(bs, sum(sizes) + 1)[0].tolist() == bs.tolist()
    grown = sizes[::-1] + [sizes[0] + 1]
    assert rnn_seq._listed_seq(torch.tensor(grown), sum(grown)) is None
    assert rnn_seq._listed_seq(torch.tensor([2, -1]), 1) is None
    assert rnn_seq._listed_seq(torch.tensor([sizes[0] + 1] + sizes[1:]), sum(sizes)) is None


@pytest.mark.parametrize("change, error, match", [
    (dict(mode="lstmx"), ValueError, "'mode' must be one of"),
    (dict(x_dtype=torch.int32), TypeError, "'x' must be float32, float64, bfloat16 or float16, got torch.int32"),
    (dict(h0_dtype=torch.float64), TypeError, "'h0' has dtype torch.float64 but 'x' has torch.float32"),
])
def test_bad_inputs(change, error, match):
    x, bs, t = make_case("lstm", 0, torch.float32, strided_inputs=False)
    if "x_dtype" in change:
        x = x.to(change["x_dtype"])
    if "h0_dtype" in change:
        t["h0"] = t["h0"].to(change["h0_dtype"])
    with pytest.raises(error, match=match):
        call(ops.rnn_layer, change.get("mode", "lstm"), x, bs, t, False, True)


@pytest.mark.parametrize("op", ["rnn_layer", "rnn_cell"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("arg, value, match", [
    ("x", [1.0, 2.0], r"'x' must be a tensor, got list"),
    ("w_ih", None, r"'w_ih' must be a tensor, got NoneType"),
    ("h0", 3, r"'(h0|h)' must be a tensor or None, got int"),
    ("reset_after", "no", r"'reset_after' must be a bool, got str"),
])
def test_raw_ops_name_an_argument_of_the_wrong_kind(op, grad, arg, value, match):
    """Non-tensors and non-bools reaching the raw ops: a TypeError naming the argument (a fuzzer, stop 35:
    "'list' object has no attribute 'dtype'", or the binding's list of signatures for reset_after='no')."""
    x, _, t = make_case("gru", 0, torch.float32, strided_inputs=False)
    t = {k: v if v is None else v.requires_grad_(grad) for k, v in t.items()}
    args = dict(x=x if op == "rnn_layer" else x[0], reset_after=True, **t)
    args[arg] = value
    with pytest.raises(TypeError, match=match):
        if op == "rnn_layer":
            call(ops.rnn_layer, "gru", args["x"], None, args, False, args["reset_after"])
        else:
            ops.rnn_cell("gru", args["x"], args["h0"], None, args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
                         args["reset_after"])


def test_inference_fast_path_equals_the_op_path(monkeypatch):
    # Without grad, plain eager calls skip the dispatcher; where torch's GEMM projects the input (the
    # kernel projecting it is tested below), the result must be the op's, bit for bit.
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", 0)
    x, bs, t = make_case("gru", 0, torch.float32, lengths=[7, 6, 3, 3, 1])
    with torch.no_grad():
        fast = call(ops.rnn_layer, "gru", x, bs, t, True, True)
    # (detach keeps the weights' strides: a clone made the op path's W_ih contiguous, and at 3 or more threads
    # MKL gives a strided and a contiguous operand other last bits, which is torch's to decide; a helper's
    # 8-thread run, stop 58)
    grad_t = {k: None if v is None else v.detach().requires_grad_() for k, v in t.items()}
    slow = call(ops.rnn_layer, "gru", x, bs, grad_t, True, True)
    for a, b in zip(fast, slow):
        if a is not None:
            assert_bitwise_equal(a, b.detach())


CHUNKED_CASES = [("lstm", 0, False, True), ("lstm", 5, True, True), ("gru", 0, True, True), ("gru", 0, False, False),
                 ("rnn_tanh", 0, True, True), ("rnn_relu", 0, False, True)]
# (packed: 16 sequences of 40 down to 3 steps, 347 rows)
CHUNKED_LENGTHS = [40 - (37 * i) // 15 for i in range(16)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("h0_given", [True, False])
@pytest.mark.parametrize("gemm", ["onednn", "mkl"])
@pytest.mark.parametrize("mode,proj,reverse,reset_after", CHUNKED_CASES)
def test_inference_by_chunks_equals_the_op_path(monkeypatch, mode, proj, reverse, reset_after, gemm, h0_given, packed):
    """Where torch projects an inference sequence, it projects a chunk of steps at a time and the kernel
    runs them before the next chunk (rnn_paths._chunks): outputs and final states bit for bit those of the op
    path, which projects every row first, through oneDNN and MKL, three chunks taken in either direction,
    padded (5, 4 and 4 steps) or packed (rows ending and, reverse, starting inside a chunk); and on the
    float64 reference (the 2x-torch rule over the packed case's 40 steps)."""
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", 0)  # (torch projects)
    monkeypatch.setattr(ops._backend, "FP32_GEMM", gemm)
    monkeypatch.setattr(rnn_gemms, "_ONEDNN_ROWS", set())  # (every row count may take oneDNN, as in a fresh process)
    monkeypatch.setattr(rnn_paths, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(rnn_paths, "_CHUNK_MIN_ROWS", 96 if packed else 32)
    seen = []
    real = ops._forward_by_chunks
    monkeypatch.setattr(ops, "_forward_by_chunks", lambda *a: seen.append(a[-1]) or real(*a))
    if packed:
        x, bs, t = make_case(mode, proj, torch.float32, T=40, B=16, I=20, H=24, lengths=CHUNKED_LENGTHS)
    else:
        x, bs, t = make_case(mode, proj, torch.float32, T=13, B=8, I=20, H=24)
    if not h0_given:
        t = dict(t, h0=None, c0=None)
    with torch.no_grad():
        fast = call(ops.rnn_layer, mode, x, bs, t, reverse, reset_after)
    if packed:
        [chunks] = seen
        rows = [int(bs[s:e].sum()) for s, e in chunks]
        assert len(chunks) == 3 and chunks[0][0] == 0 and chunks[-1][1] == 40 and min(rows) >= 32, (chunks, rows)
    else:
        assert seen == [[(0, 5), (5, 9), (9, 13)]]
    slow = call(ops.rnn_layer, mode, x.detach().requires_grad_(), bs, t, reverse, reset_after)
    for a, b in zip(fast, slow):
        if a is not None:
            assert_bitwise_equal(a, b.detach())
    assert_runs_meet_reference([fast], mode, x, bs, t, reverse, reset_after, packed)  # (40 steps: the 2x rule)


def test_inference_chunks_cover_the_steps_evenly(monkeypatch):
    """rnn_paths._chunks: (start, stop) steps covering the sequence in order; padded, sizes one step apart at most,
    at most one step over _CHUNK_BYTES of x_gates each, never under half of _CHUNK_MIN_ROWS rows; packed,
    the padded chunks where every step has the batch, and where the batch shrinks, rows near an equal
    share each and never under a quarter of _CHUNK_MIN_ROWS; whole (None) where one chunk would do, and
    for float64 and bfloat16 (rnn_paths._chunks says why)."""
    monkeypatch.setattr(rnn_paths, "_CHUNK_BYTES", 12 << 20)
    monkeypatch.setattr(rnn_paths, "_CHUNK_MIN_ROWS", 256)

    def chunks(T, B, H, G=4, dtype=torch.float32, batch_sizes=None):
        x = torch.empty(T, B, 3, dtype=dtype)
        seq = rnn_seq._Seq(x, batch_sizes, False)
        rows = T * B if batch_sizes is None else int(batch_sizes.sum())
        return rnn_paths._chunks(seq, x.view(-1, 3)[:rows], torch.empty(G * H, 3, dtype=dtype))

    def covers(got, T):
        return got[0][0] == 0 and got[-1][1] == T and all(a[1] == b[0] and a[0] < a[1] for a, b in zip(got, got[1:]))

    for T, B, H in ((200, 64, 512), (201, 64, 512), (50, 256, 512), (1000, 3, 4096), (7, 1000, 300), (97, 129, 2048)):
        got = chunks(T, B, H)
        assert covers(got, T)
        steps = [e - s for s, e in got]
        assert max(steps) - min(steps) <= 1 and min(steps) * B >= 128
        # (at most one step over, or fewer chunks where the rows would be too few)
        assert (max(steps) - 1) * B * 4 * H * 4 <= (12 << 20) or max(steps) * B < 2 * 256
        assert chunks(T, B, H, batch_sizes=torch.full((T,), B)) == got
    assert len(chunks(200, 64, 512)) == 9  # 105 MB of x_gates
    assert chunks(100, 32, 256) is not None and chunks(100, 8, 256) is None  # 13 MB; 3.3 MB
    assert chunks(3, 2, 100000) is None  # (rows too few to split)
    assert chunks(200, 64, 512, dtype=torch.float64) is None and chunks(200, 64, 512, dtype=torch.bfloat16) is None
    for B, H, top in ((64, 512, 200), (300, 512, 9), (8, 4096, 300)):
        lengths = [top - ((top - 1) * i) // (B - 1) for i in range(B)]  # (top down to 1 step)
        bs = torch.tensor([sum(n > t for n in lengths) for t in range(top)] + [0, 0])  # (and steps of no rows)
        got = chunks(top + 2, B, H, batch_sizes=bs)
        assert covers(got, top + 2)
        rows = [int(bs[s:e].sum()) for s, e in got]
        total = sum(rows)
        assert len(rows) == min(-(-total * 4 * H * 4 // (12 << 20)), total // 256)
        assert min(rows) >= 256 // 4 and max(rows) <= total / len(rows) + 2 * B
    # A step crossing several shares at once leaves chunks of a step or two behind it, which join the next
    # one; a small last chunk joins the one before (here the only other: whole).
    assert chunks(51, 1000, 4096, batch_sizes=torch.tensor([1000] + [10] * 50)) == [(0, 1), (1, 21), (21, 51)]
    assert chunks(51, 1000, 4096, batch_sizes=torch.tensor([1000] + [1] * 50)) is None


def poison_forward_scratch():
    """NaN bytes over the inference forward's cached buffers (rnn_scratch._fwd_scratch): a value the kernel
    failed to write cannot then pass as the one an earlier call left there."""
    for buf in rnn_scratch._fwd_scratch().buffers:
        buf.fill_(255)


def inference_runs(x, bs, t, mode, reverse, reset_after, thread_counts, poison=False):
    """ops.rnn_layer's inference outputs, once at each of thread_counts threads (after poisoning the
    forward's scratch, if asked)."""
    runs = []
    for threads in thread_counts:
        if poison:
            poison_forward_scratch()
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                runs.append(call(ops.rnn_layer, mode, x, bs, t, reverse, reset_after))
        finally:
            torch.set_num_threads(before)
    return runs


def assert_runs_meet_reference(runs, mode, x, bs, t, reverse, reset_after, torch_rule):
    """Every run's outputs and final states bit for bit the first's, and the first's against the
    float64 reference: by the 2x-torch rule where torch_rule (bfloat16, long float32 recurrences),
    else elementwise by the dtype's tolerances."""
    x64, t64 = x.double(), {k: None if v is None else v.double() for k, v in t.items()}
    exact = call(ref.rnn_layer, mode, x64, bs, t64, reverse, reset_after)
    theirs = call(ref.rnn_layer, mode, x, bs, t, reverse, reset_after) if torch_rule else None
    for i, name in enumerate(["y", "h_n", "c_n"]):
        if exact[i] is None:
            continue
        for other in runs[1:]:
            assert_bitwise_equal(runs[0][i], other[i], name=name)
        if torch_rule:
            assert_within_torch_error(runs[0][i], theirs[i], exact[i], name=f"{mode} {name}")
        else:
            assert_close_to_ref(runs[0][i], exact[i], name=f"{mode} {name}")


class ProjectingSpy:
    """Counts inference forwards whose kernel projected the input itself (ops._forward_projecting), and
    of those the ones that projected each step's rows inside the step (`each_step`) and the ones whose
    x_gates buffer was the ride's ring (`ring`). The tests that use
    it check the kernel's projection before the steps unless `each_step` is True, so the measured
    choices that would take their cases elsewhere are set aside: MKL's share of LSTM float32 (where
    FP32_GEMM is "mkl", test_mkl_projects_lstm_sequences_from_four_rows) and, unless asked for,
    projecting each step (rnn_paths._EACH_STEP_MAX_ROWS)."""

    def __init__(self, monkeypatch, each_step=False):
        self.taken = self.declined = self.each_step = self.ring = 0
        monkeypatch.setattr(rnn_paths, "_MKL_PROJECTS_LSTM_FROM", 1 << 62)
        if not each_step:
            monkeypatch.setattr(rnn_paths, "_EACH_STEP_MAX_ROWS", {})
        real, run = ops._forward_projecting, ops._run_forward

        def spy(*args):
            out = real(*args)
            if out is None:
                self.declined += 1
            else:
                self.taken += 1
            return out

        def run_spy(*args, **kw):
            self.each_step += bool(kw.get("each_step"))
            self.ring += bool(kw.get("ring"))
            return run(*args, **kw)

        monkeypatch.setattr(ops, "_forward_projecting", spy)
        monkeypatch.setattr(ops, "_run_forward", run_spy)


@pytest.mark.parametrize("mode, reset_after", [("lstm", True), ("gru", True), ("gru", False), ("rnn_tanh", True),
                                               ("rnn_relu", True)])
@pytest.mark.parametrize("B, reverse, lengths", [
    (6, False, None), (6, True, None), (6, False, [9, 9, 7, 4, 2, 1]), (6, True, [9, 8, 3, 3, 2, 1]),
    (13, False, None), (13, True, [9, 9, 9, 8, 8, 7, 5, 4, 4, 3, 2, 1, 1]), (13, False, [9] + [1] * 12),
    (70, False, None), (70, True, [9] * 20 + [7] * 25 + [3] * 15 + [1] * 10)])
@pytest.mark.parametrize("I", [20, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_kernel_projecting_each_step_meets_the_reference(monkeypatch, isa, mode, reset_after, B, reverse,
                                                                   lengths, I, dtype):
    """Float32 and bfloat16 sequences of a few rows a step project each step's rows inside the step (the
    kernel's fused mode, rnn_paths._projects_each_step, every mode): outputs and final states against float64 (bfloat16 by the 2x-torch rule), bit for
    bit at 1, 2 and 3 threads and run after run, padded and packed, either direction, at every level.
    H = 37 leaves a partial unit block; I = 13 an odd input width; B = 13 (over 2 and 3 row quanta,
    panels this small) has threads owning rows instead of units (forward_variant; packed ones split by
    cost, split_rows_by_cost: one long row and twelve of one step leave a third thread no rows); B = 70, beyond 32
    rows, by the thin-input rule (_EACH_STEP_THIN_INPUT: I <= H here). bfloat16 has an input panel only
    at levels with bfloat16 dot products and an even I: elsewhere torch projects, as the spy sees."""
    spy = ProjectingSpy(monkeypatch, each_step=True)
    monkeypatch.setattr(rnn_paths, "_TORCH_PROJECTS_BF16_ON", frozenset())  # (amx: the kernel's panel too)
    x, bs, t = make_case(mode, 0, dtype, T=9, B=B, I=I, H=37, lengths=lengths)
    runs = inference_runs(x, bs, t, mode, reverse, reset_after, (2, 2, 1, 3), poison=True)
    panel = dtype == torch.float32 or (isa in BF16_DOT_LEVELS and I % 2 == 0)
    assert (spy.taken, spy.declined, spy.each_step) == ((4, 0, 4) if panel else (0, 4, 0))
    assert_runs_meet_reference(runs, mode, x, bs, t, reverse, reset_after, dtype == torch.bfloat16)


@pytest.mark.parametrize("mode, B, I, dtype, proj, expect", [
    ("lstm", 1, 16, torch.float32, 0, False), ("lstm", 2, 16, torch.float32, 0, True),
    ("lstm", 32, 48, torch.float32, 0, True), ("lstm", 33, 48, torch.float32, 0, False),
    ("lstm", 70, 16, torch.float32, 0, True), ("gru", 32, 16, torch.float32, 0, True),
    ("gru", 70, 32, torch.float32, 0, True), ("gru", 70, 33, torch.float32, 0, False),
    ("rnn_tanh", 8, 16, torch.float32, 0, True), ("rnn_relu", 70, 48, torch.float32, 0, True), ("lstm", 8, 16, torch.float64, 0, False),
    ("lstm", 8, 16, torch.bfloat16, 0, "dot"), ("gru", 8, 16, torch.bfloat16, 0, "dot"),
    ("lstm", 8, 15, torch.bfloat16, 0, False), ("lstm", 8, 16, torch.float32, 10, False)])
def test_which_sequences_project_each_step(monkeypatch, mode, B, I, dtype, proj, expect):
    """The measured rule (rnn_paths._EACH_STEP_MAX_ROWS, _EACH_STEP_THIN_INPUT): every mode, float32 and
    bfloat16 (where the level has an input panel for it: bfloat16 dot products, an even I), no
    proj_size, 2 to 32 rows a step (RNN: any number from 2) or more where the input is no wider than the
    hidden size (H=32 here) nor _EACH_STEP_THIN_INPUT, both panels' per-thread shares within _EACH_STEP_L2S L2s."""
    if expect == "dot":
        expect = pyseqkern.backend_info()["cpu"]["isa_active"] in BF16_DOT_LEVELS
    monkeypatch.setattr(rnn_paths, "_TORCH_PROJECTS_BF16_ON", frozenset())
    spy = ProjectingSpy(monkeypatch, each_step=True)
    x, bs, t = make_case(mode, proj, dtype, T=3, B=B, I=I, H=32, strided_inputs=False)
    with torch.no_grad():
        call(ops.rnn_layer, mode, x, bs, t, False, True)
    assert spy.each_step == int(expect)
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", ops.GATES[mode] * 32 * (I + 32) * dtype.itemsize
                        // (rnn_paths._EACH_STEP_L2S * rnn_paths._PATH_THREADS) - 64)
    with torch.no_grad():
        call(ops.rnn_layer, mode, x, bs, t, False, True)
    assert spy.each_step == int(expect)  # both panels no longer fit: projected before the steps, or by torch


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("share", [0.3, 0.45])
@pytest.mark.parametrize("B", [8, 32])
def test_each_step_budget_where_the_tile_unit_projects_before_the_steps(monkeypatch, mode, share, B):
    """Where the projection before the steps runs on the tile unit (amx, float32, 32 rows or more) and each
    step's would not (fewer than 32 rows a step), each step projects only while a thread's share of both
    panels is within _EACH_STEP_TILE_L2S of its L2 (measured, rnn_paths.py); elsewhere within
    _EACH_STEP_L2S. LSTM there projects before the steps on the tile unit, not by MKL."""
    monkeypatch.setattr(ops._backend, "FP32_GEMM", "mkl")
    H = I = 32
    T, G = 9, ops.GATES[mode]
    x2d = torch.empty((T * B, I), device="meta")
    seq = rnn_seq._Seq(torch.empty((T, B, I), device="meta"), None, False)
    sizes = ops._sizes(ops.MODES[mode], True, H, 0, B, torch.float32)
    panels = G * H * (I + H) * 4
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", int(panels / (share * rnn_paths._PATH_THREADS)))
    tile = pyseqkern.backend_info()["cpu"]["isa_active"] == "amx"
    assert rnn_paths._projects_on_tile(sizes, x2d) == tile
    path = rnn_paths._projection_path(mode, sizes, seq, x2d, torch.float32, H, 0, G * H * H)
    budget = rnn_paths._EACH_STEP_TILE_L2S if tile and B < 32 else rnn_paths._EACH_STEP_L2S
    each_step = share <= budget
    if mode == "lstm" and not each_step and not tile and B >= rnn_paths._MKL_PROJECTS_LSTM_FROM:
        assert path is None  # (MKL's)
    else:
        assert path == (each_step, False)
    assert rnn_paths._EACH_STEP_TILE_L2S < 0.45 <= rnn_paths._EACH_STEP_L2S or rnn_paths._L3_STREAMS_FAST


@pytest.mark.parametrize("outpaces", [False, True])
@pytest.mark.parametrize("share", [0.8, 0.95, 1.5])
@pytest.mark.parametrize("B", [2, 8, 9, 32])
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_each_step_room_where_the_l2_outpaces_the_l3(monkeypatch, mode, B, share, outpaces):
    """Where the L2 streams at twice the L3's rate (rnn_paths._L2_OUTPACES_L3: Zen 5), a sequence whose
    threads' shares of both panels pass _EACH_STEP_L2_ROOM of their L2s projects before the steps at
    _EACH_STEP_STREAM_ROWS rows a step or fewer, and each step above (measured, rnn_paths.py); within
    the room, or where the L2 does not outpace the L3, each step within _EACH_STEP_L2S L2s."""
    monkeypatch.setattr(ops._backend, "FP32_GEMM", "onednn")
    monkeypatch.setattr(rnn_paths, "_projects_on_tile", lambda sizes, x2d: False)
    monkeypatch.setattr(rnn_paths, "_L3_STREAMS_FAST", True)
    monkeypatch.setattr(rnn_paths, "_EACH_STEP_L2S", 2)
    monkeypatch.setattr(rnn_paths, "_L2_OUTPACES_L3", outpaces)
    H = I = 32
    T, G = 9, ops.GATES[mode]
    x2d = torch.empty((T * B, I), device="meta")
    seq = rnn_seq._Seq(torch.empty((T, B, I), device="meta"), None, False)
    sizes = ops._sizes(ops.MODES[mode], True, H, 0, B, torch.float32)
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", int(G * H * (I + H) * 4 / (share * rnn_paths._PATH_THREADS)))
    path = rnn_paths._projection_path(mode, sizes, seq, x2d, torch.float32, H, 0, G * H * H)
    rows_fit = B <= rnn_paths._EACH_STEP_MAX_ROWS[mode]
    before = outpaces and share > rnn_paths._EACH_STEP_L2_ROOM and B <= rnn_paths._EACH_STEP_STREAM_ROWS
    assert path == (rows_fit and not before, False)
    assert 0.8 < rnn_paths._EACH_STEP_L2_ROOM < 0.95 and 2 <= rnn_paths._EACH_STEP_STREAM_ROWS < 9  # (cases straddle)
    assert rnn_paths._EACH_STEP_TILE_L2S < rnn_paths._EACH_STEP_L2_ROOM  # (so the tile unit's budget never meets it)


def _fill_hidden(mode, dtype, isa, fill, both):
    """A hidden size (even) whose panel as the kernel stores it (bfloat16 as pairs where the level has
    bfloat16 dot products, else float32) fills `fill` of a core's L2: both panels at I = H where the
    kernel projects each step (`both`), else the recurrent one."""
    size = 2 if dtype == torch.bfloat16 and isa in BF16_DOT_LEVELS else 4
    l2 = ops._backend._C.cpu_isa_report()["l2_bytes"]
    return int((fill * l2 / (ops.GATES[mode] * size * (2 if both else 1))) ** 0.5) // 2 * 2


def _both_l2_rules(fn):
    """fn() under the fast-L3 rules with the L2 outpacing the L3 off, then on (isa.h); the rules of the
    environment after."""
    outs = []
    try:
        for outpaces in (0, 1):
            ops._backend._C.set_cpu_l3_streams_fast(1)
            ops._backend._C.set_cpu_l2_outpaces_l3(outpaces)
            outs.append(fn())
    finally:
        ops._backend._apply_l3_streams_env()
    return outs


# B: rows the threads would own at 2 threads (GRU's 8-row tiles take 4-row halves by rows only from 12 rows;
# RNN's each-step tiles never split 8 rows: that case checks that the rule changes nothing there).
@pytest.mark.parametrize("mode, B, lengths, fill, dtype", [
    ("lstm", 8, None, 0.9, torch.float32), ("lstm", 8, [9, 8, 6, 5, 4, 2, 2, 1], 0.9, torch.float32),
    ("gru", 12, None, 0.8, torch.float32), ("rnn_tanh", 8, None, 0.95, torch.float32),
    ("lstm", 8, None, 0.9, torch.bfloat16)])
@pytest.mark.parametrize("each_step", [False, True])
def test_split_where_the_l2_outpaces_the_l3_gives_the_same_bits(monkeypatch, isa, mode, B, lengths, fill, dtype,
                                                                 each_step):
    """Where the L2 outpaces the L3 (isa.h, cpu_l2_outpaces_l3: Zen 5), the forward's threads own unit
    blocks instead of rows below 8 rows a thread (of the batch) when the panel a thread would
    stream passes three quarters of its L2 (rnn_fwd.cpp). Split either way (forced both ways with the
    fast-L3 rules, the L2 as the OS reports it), a sequence of B rows whose recurrent panel (projected
    before the steps) or both panels (each step) fill `fill` of the L2 gives the same bits at 1, 2 and 3
    threads, at every level, and meets the float64 reference (bfloat16 by the 2x-torch rule; it has an
    input panel where the level has bfloat16 dot products, elsewhere torch projects)."""
    panel = dtype == torch.float32 or isa in BF16_DOT_LEVELS
    H = _fill_hidden(mode, dtype, isa, fill, each_step and panel)
    I = H if each_step else 14
    spy = ProjectingSpy(monkeypatch, each_step=each_step)
    monkeypatch.setattr(rnn_paths, "_TORCH_PROJECTS_BF16_ON", frozenset())
    monkeypatch.setattr(rnn_paths, "_projects_each_step", lambda *args: each_step)
    x, bs, t = make_case(mode, 0, dtype, T=9, B=B, I=I, H=H, lengths=lengths)
    runs = sum(_both_l2_rules(lambda: inference_runs(x, bs, t, mode, False, True, (2, 1, 3))), [])
    assert spy.each_step == (6 if each_step and panel else 0) and spy.taken == (6 if panel else 0)
    assert_runs_meet_reference(runs, mode, x, bs, t, False, True, dtype == torch.bfloat16)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_training_where_the_l2_outpaces_the_l3_gives_the_same_bits(mode):
    """A training step (the recording forward, torch projecting below 32 rows, then the backward) of 8 rows
    whose recurrent panel fills 90% of the L2 gives the same outputs and gradients bit for bit with the
    L2 outpacing the L3 or not (the forward's threads by units or by rows, rnn_fwd.cpp), and meets the
    float64 reference."""
    H = _fill_hidden(mode, torch.float32, None, 0.9, False)
    x, _, t = make_case(mode, 0, torch.float32, T=9, B=8, I=13, H=H)
    g = randn((9, 8, H), seed=31)

    def grads(fn, x, t):
        x, t = x.detach().requires_grad_(), {k: v if v is None else v.detach().requires_grad_() for k, v in t.items()}
        y = call(fn, mode, x, None, t, False, True)[0]
        wrt = [x] + [v for v in t.values() if v is not None]
        return [y.detach()] + list(torch.autograd.grad(y, wrt, g.to(y.dtype)))

    runs = _both_l2_rules(lambda: grads(ops.rnn_layer, x, t))
    exact = grads(ref.rnn_layer, x.double(), {k: None if v is None else v.double() for k, v in t.items()})
    names = ["y", "x"] + [k for k, v in t.items() if v is not None]
    for name, a, b, e in zip(names, runs[0], runs[1], exact):
        assert_bitwise_equal(a, b, name=name)
        assert_matches(a, e, name=f"{mode} {name}")  # (the suite's rule for float32 recurrent gradients)


@pytest.mark.parametrize("gemm", ["onednn", "mkl"])
@pytest.mark.parametrize("mode, B", [("lstm", 1), ("lstm", 3), ("lstm", 4), ("lstm", 9), ("gru", 9)])
def test_mkl_projects_lstm_sequences_from_four_rows(monkeypatch, mode, B, gemm):
    """Where MKL serves float32 (_backend.FP32_GEMM "mkl"), LSTM inference sequences of 4 rows a step or more are
    projected by torch's GEMM, not the kernel (measured, ops/rnn.py), unless the kernel projects them before
    the steps on the tile unit (amx, 32 rows or more: rnn_paths._projects_on_tile, measured faster); bits as
    the op path's."""
    monkeypatch.setattr(ops._backend, "FP32_GEMM", gemm)
    spy = ProjectingSpy(monkeypatch)
    monkeypatch.setattr(rnn_paths, "_MKL_PROJECTS_LSTM_FROM", 4)
    x, bs, t = make_case(mode, 0, torch.float32, T=9, B=B, I=20, H=37)
    with torch.no_grad():
        fast = call(ops.rnn_layer, mode, x, bs, t, False, True)
    on_tile = rnn_paths._projects_on_tile(ops._sizes(0, True, 37, 0, B, torch.float32), x.reshape(-1, 20))
    assert on_tile == (pyseqkern.backend_info()["cpu"]["isa_active"] == "amx" and 9 * B >= 32)
    torch_projects = gemm == "mkl" and mode == "lstm" and B >= 4 and not on_tile
    assert (spy.taken, spy.declined) == ((0, 1) if torch_projects else (1, 0))
    if torch_projects:
        slow = call(ops.rnn_layer, mode, x.detach().requires_grad_(), bs, t, False, True)  # the op path
        for a, b in zip(fast, slow):
            assert_bitwise_equal(a, b.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_leaves_bfloat16_sequences_to_torchs_gemm(monkeypatch, isa, dtype):
    spy = ProjectingSpy(monkeypatch)
    x, bs, t = make_case("lstm", 0, dtype, I=20, H=37)
    with torch.no_grad():
        call(ops.rnn_layer, "lstm", x, bs, t, False, True)
    taken = dtype == torch.float32 or isa == "avx512bf16"
    assert (spy.taken, spy.declined) == ((1, 0) if taken else (0, 1))


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse, lengths", [(False, None), (True, None), (False, [7, 7, 4, 2, 1]),
                                              (True, [7, 6, 3, 3, 1])])
@pytest.mark.parametrize("I", [20, 13])
def test_inference_kernel_projecting_the_input_meets_the_reference(monkeypatch, isa, mode, proj, reset_after, dtype,
                                                                   reverse, lengths, I):
    """Inference forwards whose input panel fits the cache project the input inside the kernel, before
    the steps (a different summation order than torch's GEMM): outputs and final states must meet the
    float64 reference as the dtype requires (float64 elementwise, half types by the 2x-torch rule),
    bit for bit run after run and at 1, 2 and 3 threads. bfloat16 has a panel only on levels with
    bf16 dot products and an even I; elsewhere torch projects. (amx leaves bfloat16 to torch's GEMM by
    default, a measured choice, test_amx_leaves_bfloat16_sequences_to_torchs_gemm; its kernel path is
    checked here all the same.)"""
    monkeypatch.setattr(rnn_paths, "_TORCH_PROJECTS_BF16_ON", frozenset())
    spy = ProjectingSpy(monkeypatch)
    x, bs, t = make_case(mode, proj, dtype, I=I, H=37, lengths=lengths)
    expect = dtype != torch.bfloat16 or (isa in BF16_DOT_LEVELS and I % 2 == 0)
    runs = inference_runs(x, bs, t, mode, reverse, reset_after, (2, 2, 1, 3))
    assert (spy.taken, spy.declined) == ((4, 0) if expect else (0, 4))
    assert_runs_meet_reference(runs, mode, x, bs, t, reverse, reset_after, dtype == torch.bfloat16)


@pytest.mark.parametrize("mode, reset_after, T", [("lstm", True, 100), ("gru", True, 120), ("gru", False, 120),
                                                  ("rnn_tanh", True, 340)])
def test_inference_kernel_projecting_at_streaming_sizes(monkeypatch, mode, reset_after, T):
    """From 8 MB (kStreamBytes) the kernel writes the x_gates it projects before the steps by
    non-temporal stores (aligned whole vectors; H = 200 leaves a partial last block and gate sections
    off 64-byte boundaries, which take plain stores): outputs and final states within the 2x-torch rule
    of a long float32 recurrence, bit for bit at 1 and 2 threads."""
    spy = ProjectingSpy(monkeypatch)
    # The input panel (G * 200 * 200 floats, 640 KB for LSTM) within the read rule whatever this
    # machine's L2 (512 KB per core on a Zen 3 put it out).
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", max(rnn_paths._L2_BYTES, 2 * ops.GATES[mode] * 200 * 200 * 4))
    x, bs, t = make_case(mode, 0, torch.float32, T=T, B=32, I=200, H=200)
    assert T * 32 * ops.GATES[mode] * 200 * 4 >= 8 << 20  # x_gates bytes: T * B rows of G * H floats
    runs = inference_runs(x, bs, t, mode, False, reset_after, (2, 1), poison=True)
    assert (spy.taken, spy.declined) == (2, 0)
    assert_runs_meet_reference(runs, mode, x, bs, t, False, reset_after, True)


RIDE_MODES = [("lstm", True, 0), ("lstm", True, 5), ("gru", True, 0), ("gru", False, 0), ("rnn_tanh", True, 0),
              ("rnn_relu", True, 0)]


@pytest.mark.parametrize("mode, reset_after, proj", RIDE_MODES)
@pytest.mark.parametrize("T", [9, 16, 17, 41])
@pytest.mark.parametrize("I, H", [(13, 37), (40, 16), (16, 70), (40, 37)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_row_sequences_projected_inside_the_recurrent_tiles(monkeypatch, isa, mode, reset_after, proj, T, I, H,
                                                               reverse, packed, dtype):
    """B = 1 sequences whose kernel projects the input project the rows past the first kRideRows (8)
    inside the recurrent tiles of earlier steps, on levels with 32 vector registers (rnn_fwd.cpp,
    ride_tile; float32 and float64; bfloat16 by pair dot products where the level has them, not amx):
    outputs and final states against the float64 reference (bfloat16 by the 2x-torch rule), bit for bit
    at 1, 2 and 3 threads and run after run, and bit for bit what the kernel gives projecting each step's
    row inside that step instead (its fused mode; no proj_size there). T = 9, 16, 17, 41 end on every phase of the
    row groups; H = 37 and 70 leave a partial unit block and an odd count of blocks per thread (so
    tiles of one block, and on RNN every power of two up to 8; H = 37 an odd count of k pairs); I < H,
    I > H and an odd I (the input and the state sums end in different kSumBlock blocks: K and KI
    differ). bfloat16 has an input panel only at levels with bf16 dot products and an even I;
    elsewhere torch projects, as the spy sees."""
    monkeypatch.setattr(rnn_paths, "_TORCH_PROJECTS_BF16_ON", frozenset())  # (amx: the kernel's panel too)
    spy = ProjectingSpy(monkeypatch)
    x, bs, t = make_case(mode, proj, dtype, T=T, B=1, I=I, H=H, lengths=[T] if packed else None)
    runs = inference_runs(x, bs, t, mode, reverse, reset_after, (2, 2, 1, 3), poison=True)
    panel = dtype != torch.bfloat16 or (isa in BF16_DOT_LEVELS and I % 2 == 0)
    assert (spy.taken, spy.declined, spy.each_step) == ((4, 0, 0) if panel else (0, 4, 0))
    # Riding, x_gates lives in a ring of 16 rows (T = 17 and 41 wrap it, 41 more than twice); the kernel
    # refuses the ring where it would not ride, so a wrong guess here fails the runs above.
    rides = panel and isa in (("avx512bf16",) if dtype == torch.bfloat16 else ("avx512", "avx512bf16", "amx"))
    assert spy.ring == (4 if rides else 0)
    assert_runs_meet_reference(runs, mode, x, bs, t, reverse, reset_after, dtype == torch.bfloat16)
    if proj or not panel:
        return
    monkeypatch.setattr(rnn_paths, "_projects_each_step", lambda *args: True)
    for each in inference_runs(x, bs, t, mode, reverse, reset_after, (2, 1)):
        for name, a, b in zip(["y", "h_n", "c_n"], runs[0], each):
            if a is not None:
                assert_bitwise_equal(a, b, name=name)
    assert spy.each_step == 2


@pytest.mark.parametrize("mode, reset_after, proj", RIDE_MODES)
def test_which_one_row_sequences_the_kernel_projects_past_the_read_rule(monkeypatch, isa, mode, reset_after, proj):
    """Past the read rule (the input panel over _READ_L2S of the L2s), B = 1 sequences still project
    inside the kernel where its recurrent tiles carry the projection (rnn_paths._rides: float32 and float64 on
    the AVX-512 levels, bfloat16 on avx512bf16, more than 8 steps) and both panels, in
    the bytes the products read (2 a weight for bfloat16's pair sections), fit _RIDE_L3_SHARE of the L3,
    at any length (x_gates in the ride's ring: a sequence whose rows would overflow _CHUNK_BYTES rides
    too); otherwise torch's GEMM projects. Either way the same reference is met. The share is half the L3
    where it streams near the L2's rate (_L3_STREAMS_FAST), none elsewhere (test_backend_info,
    test_l3_streams_by_env): nothing rides past the read rule there."""
    spy = ProjectingSpy(monkeypatch)
    I, H = 40, 16
    G, K = ops.GATES[mode], proj or 16
    panels = G * H * (I + K) + proj * H  # (weights)
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", 64)  # (the read rule always exceeded)
    # (and the amx level's share for the tile unit, which so small an L2 would always exceed, set aside:
    # test_one_row_sequences_ride_or_project_on_the_tile_unit)
    monkeypatch.setattr(rnn_paths, "_RIDE_TILES_L2_SHARE", math.inf)
    monkeypatch.setattr(rnn_paths, "_CHUNK_BYTES", 4 * G * H * 4)  # (x_gates of 4 rows: every case is longer)
    rides = isa in ("avx512", "avx512bf16", "amx")
    rides_bf16 = rides and isa == "avx512bf16"
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    for T, B, l3, share, dtype, expect in [
            (9, 1, 8 * panels, 0.5, f32, rides), (40, 1, 8 * panels, 0.5, f32, rides),
            (8, 1, 8 * panels, 0.5, f32, False), (9, 1, 8 * panels - 8, 0.5, f32, False),
            (9, 2, 8 * panels, 0.5, f32, False), (9, 1, 16 * panels, 0.5, f64, rides),
            (9, 1, 16 * panels - 8, 0.5, f64, False), (9, 1, 4 * panels, 0.5, bf16, rides_bf16),
            (40, 1, 4 * panels, 0.5, bf16, rides_bf16), (9, 1, 4 * panels - 8, 0.5, bf16, False),
            (40, 1, 1 << 40, 0.0, f32, False)]:  # (the last: a slow L3, however large)
        monkeypatch.setattr(rnn_paths, "_L3_BYTES", l3)
        monkeypatch.setattr(rnn_paths, "_RIDE_L3_SHARE", share)
        x, bs, t = make_case(mode, proj, dtype, T=T, B=B, I=I, H=H)
        taken, ring = spy.taken, spy.ring
        runs = inference_runs(x, bs, t, mode, False, reset_after, (2,))
        assert (spy.taken - taken, spy.ring - ring) == (int(expect), int(expect)), (T, B, l3, dtype)
        assert_runs_meet_reference(runs, mode, x, bs, t, False, reset_after, dtype == bf16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode, reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False), ("lstm", True)])
def test_inference_threads_projecting_their_own_rows(monkeypatch, isa, mode, reset_after, reverse, dtype):
    """Where threads split rows and both panels fit half a core's L2, each thread projects its own rows
    (every unit) before the steps (FwdCtx::project_own_rows). B = 16 splits as 8 + 8 rows at 2 threads
    and 8 + 4 + 4 at 3, the rows of a tile then spanning steps: outputs and final states as the
    reference requires (float64 elementwise, float32 too at T = 11, bfloat16 by the 2x-torch rule), bit
    for bit at 1, 2 and 3 threads. bfloat16 projects in the kernel only on levels with bf16 dot
    products (amx's default of torch's GEMM set aside, as in the test above)."""
    monkeypatch.setattr(rnn_paths, "_TORCH_PROJECTS_BF16_ON", frozenset())
    spy = ProjectingSpy(monkeypatch)
    x, bs, t = make_case(mode, 0, dtype, T=11, B=16, I=24, H=64)
    runs = inference_runs(x, bs, t, mode, reverse, reset_after, (1, 2, 3, 2), poison=True)
    expect = dtype != torch.bfloat16 or isa in BF16_DOT_LEVELS
    assert (spy.taken, spy.declined) == ((4, 0) if expect else (0, 4))
    assert_runs_meet_reference(runs, mode, x, bs, t, reverse, reset_after, dtype == torch.bfloat16)


@pytest.mark.parametrize("B", [5, 6, 8, 9, 64, 65, 97])
@pytest.mark.parametrize("mode, reset_after", [("rnn_tanh", True), ("gru", True), ("lstm", True)])
def test_inference_rows_split_by_tile_cost(isa, mode, reset_after, B):
    """Threads that own rows of a padded batch split it by the cost of their row tiles
    (split_rows_by_tiles: bisection up to 64 rows, whole tiles evenly beyond), and a thread's rows run
    as tiles of next_tile_rows (5 rows as 3 + 2 with 4-row tiles): every batch size around those
    boundaries, at 1, 2 and 3 threads, bit for bit alike and elementwise on the float64 reference."""
    x, bs, t = make_case(mode, 0, torch.float64, T=21, B=B, I=24, H=64)
    runs = inference_runs(x, bs, t, mode, False, reset_after, (1, 2, 3), poison=True)
    assert_runs_meet_reference(runs, mode, x, bs, t, False, reset_after, False)


@pytest.mark.parametrize("natural", [False, True])
@pytest.mark.parametrize("mode, reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False), ("lstm", True)])
def test_small_calls_split_by_rows_on_one_thread_cover_every_row(monkeypatch, isa, mode, reset_after, natural):
    """A call too small to wake a second thread (kOneThreadMacs) keeps the row split made for two and runs
    on one, whose range must then be every row. Bisecting a cost that is not monotonic in the rows (a
    GRU at AVX-512: 9 and 10 rows cost more than 11) gave that thread 8 of 11 rows (of 19, 27, ...), and
    rows 8-10 of every step were never projected (a fuzzer, stop 46). Every batch size to 40 at 2
    threads and 1, the kernel projecting before the steps (or, `natural`, as the measured choices go: each
    step where they say so), scratch poisoned: bit for bit alike and elementwise on the float64 reference."""
    spy = ProjectingSpy(monkeypatch, each_step=natural)
    for B in range(1, 41):
        x, bs, t = make_case(mode, 0, torch.float64, T=3, B=B, I=3, H=32, seed=B)
        runs = inference_runs(x, bs, t, mode, False, reset_after, (2, 1), poison=True)
        assert_runs_meet_reference(runs, mode, x, bs, t, False, reset_after, False)
    assert (spy.taken, spy.declined) == (80, 0)


def test_inference_input_panels_past_the_l2_go_to_torch(monkeypatch):
    """A panel whose per-thread share exceeds a core's L2 (_READ_L2S of it) would stream from memory for
    every row tile: torch's GEMM projects instead, and the result is the op path's bit for bit."""
    spy = ProjectingSpy(monkeypatch)
    x, bs, t = make_case("lstm", 0, torch.float32, I=64, H=40)
    read = 4 * 40 * 64 * 4  # G * H * I * sizeof(float)
    fits = read // (rnn_paths._READ_L2S * rnn_paths._PATH_THREADS)
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", fits)  # just fits
    with torch.no_grad():
        call(ops.rnn_layer, "lstm", x, bs, t, False, True)
    assert (spy.taken, spy.declined) == (1, 0)
    monkeypatch.setattr(rnn_paths, "_L2_BYTES", fits - 64)
    with torch.no_grad():
        fast = call(ops.rnn_layer, "lstm", x, bs, t, False, True)
    assert (spy.taken, spy.declined) == (1, 1)
    slow = call(ops.rnn_layer, "lstm", x.detach().requires_grad_(), bs, t, False, True)  # the op path
    for a, b in zip(fast, slow):
        assert_bitwise_equal(a, b.detach())


@pytest.mark.parametrize("mode, hidden, rides_on_amx", [("lstm", 256, False), ("lstm", 128, True), ("gru", 256, True),
                                                     ("gru", 384, False), ("rnn_tanh", 512, False),
                                                     ("rnn_tanh", 256, True)])
def test_one_row_sequences_ride_or_project_on_the_tile_unit(isa, mode, hidden, rides_on_amx):
    """A one-row float32 sequence rides where its level can (the AVX-512 levels), except on amx where both
    panels exceed rnn_paths._RIDE_TILES_L2_SHARE of the L2s: it then projects every row before the steps,
    on the tile unit from kSplitRows rows (rnn_fwd.cpp, project_split). Either way the module's result is
    the op path's, bit for bit, and within twice torch.nn's error against float64 (T = 40: row groups of
    16 and a partial one)."""
    T, name = 40, {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[mode]
    panels = 2 * ops.GATES[mode] * hidden * hidden * 4
    ride = isa in ("avx512", "avx512bf16", "amx") and (
        isa != "amx" or panels <= rnn_paths._RIDE_TILES_L2_SHARE * rnn_paths._L2_BYTES * rnn_paths._PATH_THREADS)
    expected = rides_on_amx if isa == "amx" and rnn_paths._L2_BYTES == 2 << 20 and rnn_paths._PATH_THREADS == 2 else ride
    # (the kernel projects where the input panel passes the read rule or the sequence rides past it; else, as
    # on a 512 KB L2 at the levels without a ride (GRU at 384), torch's GEMM does)
    read = ops.GATES[mode] * hidden * hidden * 4
    kernel = (read <= rnn_paths._READ_L2S * rnn_paths._L2_BYTES * rnn_paths._PATH_THREADS
              or ride and panels <= rnn_paths._RIDE_L3_SHARE * rnn_paths._L3_BYTES)
    want = (False, ride) if kernel else None
    assert rnn_thin._seq_path(mode, True, hidden, hidden, torch.float32, T, 1, T) == want and ride == expected
    theirs = getattr(torch.nn, name)(hidden, hidden)
    theirs.load_state_dict({k: randn(v.shape, seed=290 + i, scale=hidden ** -0.5)
                            for i, (k, v) in enumerate(theirs.state_dict().items())})
    ours = getattr(pyseqkern.nn, name)(hidden, hidden)
    ours.load_state_dict(theirs.state_dict())
    x = randn((T, 1, hidden), seed=291)
    with torch.no_grad():
        got = ours(x)[0]
        p = dict(ours.named_parameters())
        op = ops.rnn_layer(mode, x, None, None, None, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                           p["bias_hh_l0"], None, False, True)[0]
        assert_bitwise_equal(got, op)
        assert_within_torch_error(got, theirs(x)[0], theirs.double()(x.double())[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode, reset_after", [("lstm", True), ("gru", False)])
def test_the_ride_ring_is_checked(isa, mode, reset_after, dtype):
    """A forward asked to ride (`ride`: B = 1, more than 8 steps, float32 and float64 on the AVX-512
    levels, as the kernel's sizes report) runs with a 16-row x_gates_buf (the ride's ring, rnn.h
    kRnnRideRing) or one of every row, bit for bit as the same forward not riding (its rows projected
    before the steps: fewer than kSplitRows, so on the FMA tiles at every level); where it cannot ride
    (the other levels, or B = 2) the kernel refuses `ride`, and a forward not riding refuses the ring, each
    with an error naming it. Fewer than 16 rows of x take no ring at all, and `ride` needs the buffer (the
    binding's checks)."""
    code, H, I, T = ops.MODES[mode], 24, 20, 21
    G = ops.GATES[mode]
    w_ih, w_hh = randn((G * H, I), seed=1).to(dtype), randn((G * H, H), seed=2).to(dtype)
    panel = ops._input_panel(code, reset_after, H, w_ih)
    packed = ops._packed(code, reset_after, H, 0, w_hh, None, False)
    ws = torch.empty(ops._sizes(code, reset_after, H, 0, 1, dtype)[2], dtype=dtype)

    def run(T, rows, ride, B=1, buf=True):
        x = randn((T * B, I), seed=3).to(dtype)
        y = torch.full((T * B, H), math.nan, dtype=dtype)
        hn, cn = torch.empty(B, H, dtype=dtype), torch.empty(B if code == 0 else 0, H, dtype=dtype)
        wsb = torch.empty(ops._sizes(code, reset_after, H, 0, B, dtype)[2], dtype=dtype)
        _C.rnn_forward(code, reset_after, H, 0, T, B, None, None, None, B, 1, False, None, None, None, None,
                       capsule(y), H, capsule(hn), capsule(cn) if code == 0 else None, capsule(packed), None,
                       capsule(wsb if B > 1 else ws), 2, x=capsule(x), packed_in=capsule(panel),
                       x_gates_buf=capsule(torch.full((rows, G * H), math.nan, dtype=dtype)) if buf else None,
                       ride=ride)
        return y

    assert _C.RNN_RIDE_RING == rnn_paths._RIDE_RING == 16
    rides = isa in ("avx512", "avx512bf16", "amx")
    # The kernel's sizes say where it can ride (rnn_paths._kernel_rides reads them): B = 1 only.
    assert [ops._sizes(code, reset_after, H, 0, b, dtype)[5] for b in (1, 2)] == [16 if rides else 0, 0]
    full = run(T, T, False)
    cannot = "'ride' projects a one-row sequence inside its steps"
    if rides:
        assert_bitwise_equal(run(T, 16, True), full)
        assert_bitwise_equal(run(T, T, True), full)
    else:
        with pytest.raises(ValueError, match=cannot):
            run(T, T, True)
    with pytest.raises(ValueError, match=f"'x_gates_buf' holds 16 rows, a ring .* needs all of x's {T} rows"):
        run(T, 16, False)
    with pytest.raises(ValueError, match=cannot + ".* this call has B = 2"):
        run(T, 2 * T, True, B=2)
    with pytest.raises(ValueError, match="'ride' projects inside the steps into 'x_gates_buf'"):
        run(T, T, True, buf=False)
    with pytest.raises(ValueError, match="'x_gates_buf' must be a CPU \\[N, G\\*H\\] tensor .* \\(or 16, a ring"):
        run(12, 16, True)


def test_kernel_projection_buffer_is_checked():
    """x_gates_buf (where the kernel projects every row first) must be [N, G*H] in x's dtype, and only
    comes with x."""
    H, I, T, B = 8, 6, 3, 2
    w_ih, w_hh = randn((4 * H, I), seed=1), randn((4 * H, H), seed=2)
    x = randn((T * B, I), seed=3)
    panel = ops._input_panel(0, True, H, w_ih)
    packed = ops._packed(0, True, H, 0, w_hh, None, False)
    ws = torch.empty(ops._sizes(0, True, H, 0, B, torch.float32)[2])
    y, hn, cn = torch.empty(T * B, H), torch.empty(B, H), torch.empty(B, H)

    def run(buf, with_x=True):
        _C.rnn_forward(0, True, H, 0, T, B, None, None, None, B, 1, False,
                       None if with_x else capsule(torch.zeros(T * B, 4 * H)), None, None, None, capsule(y), H,
                       capsule(hn), capsule(cn), capsule(packed), None, capsule(ws), 1,
                       x=capsule(x) if with_x else None, packed_in=capsule(panel) if with_x else None,
                       x_gates_buf=capsule(buf))

    for bad in (torch.empty(T * B, 4 * H - 1), torch.empty(T * B - 1, 4 * H), torch.empty(T * B, 4 * H).double()):
        with pytest.raises(ValueError, match="x_gates_buf' must be a CPU \\[N, G\\*H\\] tensor"):
            run(bad)
    with pytest.raises(ValueError, match="pass 'x' too"):
        run(torch.empty(T * B, 4 * H), with_x=False)
    run(torch.empty(T * B, 4 * H))  # and the right one runs
    # The input panel by its dtype and size: a float64 call had read the stamp of a float32 panel of as many
    # elements past its end (a review, stop 33).
    x64, w64 = x.double(), w_ih.double()
    panel32 = torch.zeros(_C.rnn_input_panel_numel(0, True, H, I, "float64"))
    with pytest.raises(ValueError, match="'packed_in' must be a contiguous float64 tensor of at least"):
        _C.rnn_forward(0, True, H, 0, T, B, None, None, None, B, 1, False, None, None, None, None,
                       capsule(y.double()), H, capsule(hn.double()), capsule(cn.double()),
                       capsule(ops._packed(0, True, H, 0, w_hh.double(), None, False)), None, capsule(ws.double()), 1,
                       x=capsule(x64), packed_in=capsule(panel32))
    assert ops._input_panel(0, True, H, w64) is not None
    with pytest.raises(ValueError, match="'x_bias' goes with x_gates made outside the kernel"):
        _C.rnn_forward(0, True, H, 0, T, B, None, None, None, B, 1, False, None, None, None, None, capsule(y), H,
                       capsule(hn), capsule(cn), capsule(packed), None, capsule(ws), 1, x=capsule(x),
                       packed_in=capsule(panel), x_bias=capsule(torch.zeros(4 * H)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_x_bias_is_the_bias_inside_x_gates(device, mode, proj, reset_after, dtype):
    """rnn_forward's x_bias (a row the kernel adds to every x_gates row as it reads it, where torch's GEMM
    left the bias out) gives the bits of the same row added to x_gates first, every output and the
    reserve; and only goes with x_gates made outside the kernel, in their dtype and [G*H] shape."""
    code, G, H = ops.MODES[mode], ops.GATES[mode], 11
    x, bs, t = make_case(mode, proj, dtype, strided_inputs=False, device=device)
    seq = rnn_seq._Seq(x.view(7, 5, 13), None, False)
    packed = torch.ops.pyseqkern.rnn_pack(code, reset_after, H, proj, t["w_hh"], t["w_hr"])
    b_hn = t["b_hh"][2 * H:].contiguous() if mode == "gru" and reset_after else None
    xg, row = randn((35, G * H), dtype, device=device, seed=3), randn((G * H,), dtype, device=device, seed=5)
    args = (code, reset_after, H, proj, 7, 5)
    rest = (b_hn, t["h0"], t["c0"], packed, *seq.args(), True)
    apart = torch.ops.pyseqkern.rnn_forward(*args, xg, *rest, row)
    inside = torch.ops.pyseqkern.rnn_forward(*args, xg + row, *rest)
    for name, a, b in zip(["y", "h_n", "c_n", "reserve"], apart, inside):
        assert_bitwise_equal(a, b, name=name)
    if device != "cpu":
        return
    K = proj or H
    y, hn, cn = torch.empty(35, K, dtype=dtype), torch.empty(5, K, dtype=dtype), torch.empty(5, H, dtype=dtype)
    ws = torch.empty(ops._sizes(code, reset_after, H, proj, 5, dtype)[2], dtype=dtype)
    from pyseqkern._handoff import capsule

    def run(bias):
        _C.rnn_forward(code, reset_after, H, proj, 7, 5, None, None, None, 5, 1, False, capsule(xg),
                       None if b_hn is None else capsule(b_hn), None, None, capsule(y), K, capsule(hn),
                       capsule(cn) if code == 0 else None, capsule(packed), None, capsule(ws), 1, x_bias=capsule(bias))

    for bad in (row[:-1], row.float() if dtype == torch.float64 else row.double(), torch.stack([row, row])[:, ::2]):
        with pytest.raises(ValueError, match="'x_bias' must be a contiguous CPU \\[G\\*H\\] row"):
            run(bad)


@pytest.mark.parametrize("B", [1, 7, 40, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode, reset_after", [("lstm", True), ("gru", True), ("gru", False), ("rnn_tanh", True),
                                               ("rnn_relu", True)])
@pytest.mark.parametrize("I", [19, 20])
def test_cell_inference_path_equals_the_op_path(monkeypatch, isa, mode, reset_after, dtype, B, I):
    """rnn_cell without grad takes its own thin path (y and h_n in one buffer, cached folded biases). Up
    to rnn_thin._INPUT_PANEL_MAX_BATCH rows the kernel also projects the input itself (a different summation
    order than torch's GEMM): there the results must meet the reference as the dtype requires; above
    it, and where the level has no input panel (bfloat16 without dot products or with odd I), they
    must be the autograd path's bit for bit. Also for strided states, and after a bias update. (The op
    path: recorded RNN steps would otherwise be torch's GEMMs, ops/rnn_cell_train.py _TORCH_STEPS.)"""
    monkeypatch.setattr(rnn_cell_train, "step", lambda *args: None)
    G, H = ops.GATES[mode], 37
    x, h = strided((B, I), dtype, seed=1), strided((B, H), dtype, seed=2, scale=0.5)
    c = strided((B, H), dtype, seed=3, scale=0.5) if mode == "lstm" else None
    w = [randn(s, dtype, seed=4 + i, scale=0.3) for i, s in enumerate([(G * H, I), (G * H, H), (G * H,), (G * H,)])]
    fused = B <= rnn_thin._INPUT_PANEL_MAX_BATCH and ops._input_panel(ops.MODES[mode], reset_after, H, w[0]) is not None
    assert fused == (B <= rnn_thin._INPUT_PANEL_MAX_BATCH and (dtype != torch.bfloat16 or (isa in BF16_DOT_LEVELS and I % 2 == 0)))
    for _ in range(2):
        with torch.no_grad():
            thin = ops.rnn_cell(mode, x, h, c, *w, reset_after=reset_after)
            again = ops.rnn_cell(mode, x, h, c, *w, reset_after=reset_after)
        grad_w = [v.clone().requires_grad_() for v in w]
        full = ops.rnn_cell(mode, x, h, c, *grad_w, reset_after=reset_after)
        c64 = None if c is None else c.double()
        exact = ref.rnn_cell(mode, x.double(), h.double(), c64, *[v.double() for v in w], reset_after=reset_after)
        theirs = ref.rnn_cell(mode, x, h, c, *w, reset_after=reset_after)
        for name, a, a2, b, e, th in zip(["h", "c"], thin, again, full, exact, theirs):
            if b is None:
                continue
            assert_bitwise_equal(a, a2, name=name)
            if not fused:
                assert_bitwise_equal(a, b.detach(), name=name)
            elif dtype == torch.bfloat16:
                assert_within_torch_error(a, th, e, name=name)
            else:
                assert_close_to_ref(a, e, name=name)
        with torch.no_grad():
            w[3].add_(0.25)  # the cached folded bias must follow
            w[0].mul_(0.75)  # and the cached input panel


@pytest.mark.parametrize("mode, reset_after", [("lstm", True), ("gru", True), ("gru", False), ("rnn_tanh", True),
                                               ("rnn_relu", True)])
def test_wide_input_cells_meet_twice_torchs_error(isa, mode, reset_after):
    """A cell at I = 4096 without grad: the kernel projects the input itself, a sum of 4096 products per
    gate. Summed in one run it had 2.3-3.0x torch's error (stop 27, found by a size fuzzer); the kernels
    sum k in blocks now (csrc/cpu/rnn_tiles.h, kSumBlock)."""
    G, I, H, B = ops.GATES[mode], 4096, 37, 9
    x, h = randn((B, I), torch.float32, seed=1), randn((B, H), torch.float32, seed=2, scale=0.5)
    c = randn((B, H), torch.float32, seed=3, scale=0.5) if mode == "lstm" else None
    w = [randn(s, torch.float32, seed=4 + i, scale=sc) for i, (s, sc) in
         enumerate([((G * H, I), I ** -0.5), ((G * H, H), H ** -0.5), ((G * H,), 0.3), ((G * H,), 0.3)])]
    assert ops._input_panel(ops.MODES[mode], reset_after, H, w[0]) is not None  # the kernel's own projection
    with torch.no_grad():
        ours = ops.rnn_cell(mode, x, h, c, *w, reset_after=reset_after)
    c64 = None if c is None else c.double()
    exact = ref.rnn_cell(mode, x.double(), h.double(), c64, *[v.double() for v in w], reset_after=reset_after)
    theirs = ref.rnn_cell(mode, x, h, c, *w, reset_after=reset_after)
    for name, a, th, e in zip(["h", "c"], ours, theirs, exact):
        if e is not None:
            assert_within_torch_error(a, th, e, name=f"{mode} {name}")


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_wide_hidden_layers_meet_twice_torchs_error(isa, mode, proj, reset_after):
    """H = 1024 (K = 1024 a step, G x 1024 in the backward): outputs and every gradient within twice
    torch's error, the sums over k blocked as for wide inputs."""
    check_against_reference(mode, proj * 100, reset_after, torch.float32, False, None, T=3, B=3, I=5, H=1024)


@pytest.mark.parametrize("B, H, lengths", [(31, 113, False), (32, 113, False), (33, 113, True), (64, 37, True),
                                          (32, 1024, False)])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_float32_calls_of_32_rows_meet_twice_torchs_error(isa, mode, proj, reset_after, B, H, lengths):
    """float32 calls of kSplitRows (32) rows or more multiply on the amx level's tile unit, each float as
    three bfloat16 pieces (rnn_amx.h, amx_split_pass2): the forward's recurrent and input products and
    the backward's recurrent one. Around the threshold, odd and partial tiles of k (H = 113), packed
    batches whose active rows fall below 32 (the call's choice holds) and past the steps' thresholds to
    the FMA tiles (kSplitStepRows: 13 rows, 9 for GRU), and K = 1024: outputs and every gradient within
    twice torch's error; other levels take the FMA tiles as before."""
    spread = [9 - (8 * i) // (B - 1) for i in range(B)] if lengths else None
    T = 2 if H == 1024 else 9
    check_against_reference(mode, proj * (H // 8), reset_after, torch.float32, False, spread, T=T, B=B, I=37, H=H)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("where", ["input", "weight_ih", "weight_hh"])
def test_float32_tile_unit_keeps_infinite_values_as_torch_does(isa, cls, where):
    """On the tile unit an infinite row value or weight meets the other factor's three pieces (inf x hi +
    inf x mid of opposite signs is NaN where the float product is +-inf): such sums are summed again from
    the float panel (rnn_amx.h, resum_nan). Fed +-inf at B = 32, torch.nn's saturated outputs, not NaN."""
    torch.manual_seed(3)
    theirs = getattr(torch.nn, cls)(16, 24)
    ours = getattr(pyseqkern.nn, cls)(16, 24)
    x = torch.randn(4, 32, 16)
    with torch.no_grad():
        if where == "input":
            x[0, :, 3] = float("inf")
            x[2, 5:, 7] = -float("inf")
        else:
            w = getattr(theirs, where + "_l0")
            w[3, 5] = float("inf")
            w[9, 2] = -float("inf")
        ours.load_state_dict(theirs.state_dict())
        got, want = ours(x)[0], theirs(x)[0]
    assert torch.isfinite(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_wide_bfloat16_layers_meet_twice_torchs_error(isa, mode, proj, reset_after):
    """bfloat16 at H = 1040: rows of more than 1024 values in the forward's product (K = 1040) and the
    backward's (G x 1040 gate rows), which the amx level stages for the tile unit since stop 42
    (rnn_amx.h, amx_stage; before, the vdpbf16ps tile took them); other levels as before."""
    check_against_reference(mode, proj * 100, reset_after, torch.bfloat16, False, None, T=3, B=3, I=5, H=1040)


def test_dispatch_modes_still_see_the_op():
    # A TorchDispatchMode must observe pyseqkern's ops, so the fast path must step aside for it.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, bs, t = make_case("lstm", 0, torch.float32, strided_inputs=False)
    with torch.no_grad(), Spy():
        call(ops.rnn_layer, "lstm", x, bs, t, False, True)
    assert any("pyseqkern.rnn_forward" in s for s in seen), seen


def test_devices_without_kernels_fall_back_loudly():
    # No silent fallback: a device pyseqkern has no kernels for runs the reference with a warning that
    # says why, and backend_info() names the op.
    x, bs, t = make_case("rnn_tanh", 0, torch.float32, strided_inputs=False)
    meta = {k: None if v is None else v.to("meta") for k, v in t.items()}
    with pytest.warns(RuntimeWarning, match="no kernels for meta tensors"):
        y, h_n, _ = call(ops.rnn_layer, "rnn_tanh", x.to("meta"), bs, meta, False, True)
    assert y.shape == (7, 5, 11) and y.device.type == "meta"
    assert "rnn_layer" in pyseqkern.backend_info()["reference_fallback"]["active_for"]


# ---- CUDA only ------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_states_on_another_device_are_refused():
    x, bs, t = make_case("lstm", 0, torch.float32, strided_inputs=False, device="cuda")
    with pytest.raises(ValueError, match=r"'h0' is on cpu but 'x' is on cuda"):
        call(ops.rnn_layer, "lstm", x, bs, dict(t, h0=t["h0"].cpu()), False, True)
    with pytest.raises(ValueError, match=r"'w_hh' is on cpu but 'x' is on cuda"):
        call(ops.rnn_layer, "lstm", x, bs, dict(t, w_hh=t["w_hh"].cpu()), False, True)


def test_cuda_packed_op_calls_read_only_the_metadata_batch_sizes_implies(monkeypatch):
    """The CUDA kernels index rows with a packed call's device time_offsets and lengths unchecked; a raw op
    call's own, where batch_sizes does not imply them, would have had y, the reserve and h_n written out of
    bounds (a review, stop 33; read, not seen on a GPU). The CUDA impls read _device_seq's copies made from
    batch_sizes and only compare the caller's with them: on the host for CPU tensors (a ValueError naming
    the tensor), by an asynchronous device assert for device ones
    (test_cuda_raw_op_with_other_device_lengths_fails_in_a_device_assert). Stood in for on the CPU
    (_device_seq caching CPU copies)."""
    made = {}

    def device_seq(bs, off, lens, device, sizes=None):
        assert sizes is None or sizes == tuple(bs.tolist())
        return made.setdefault(tuple(bs.tolist()), rnn_seq._seq_host(bs) if off is None else (off.clone(), lens.clone()))

    monkeypatch.setattr(rnn_seq, "_device_seq", device_seq)
    cpu, bs = torch.device("cpu"), torch.tensor([3, 2, 2, 1])
    got = rnn_cuda._trusted_seq("rnn_forward", bs, torch.tensor([0, 3, 5, 7]), torch.tensor([4, 3, 1]), cpu)
    assert got[0] is made[(3, 2, 2, 1)][0] and got[1] is made[(3, 2, 2, 1)][1]
    assert got[0].tolist() == [0, 3, 5, 7] and got[1].tolist() == [4, 3, 1]
    again = rnn_cuda._trusted_seq("rnn_backward", bs, *got, cpu)  # (the layers' own copies: taken as they are)
    assert again[0] is got[0] and again[1] is got[1]
    with pytest.raises(ValueError, match=r"rnn_forward: 'lengths' must be what 'batch_sizes' implies"):
        rnn_cuda._trusted_seq("rnn_forward", bs, got[0], torch.tensor([4, 3, 2]), cpu)
    with pytest.raises(ValueError, match=r"rnn_backward: 'time_offsets' must be .*\(4,\), got torch.int64 \(3,\)"):
        rnn_cuda._trusted_seq("rnn_backward", bs, torch.tensor([0, 3, 5]), got[1], cpu)
    with pytest.raises(ValueError, match=r"'lengths' must be .* an int64 tensor of shape \(3,\), got torch.int32"):
        rnn_cuda._trusted_seq("rnn_forward", bs, got[0], got[1].int(), cpu)
    assert rnn_cuda._trusted_seq("rnn_forward", None, None, None, cpu) == (None, None)
    # batch_sizes itself, checked before anything is read by it (a 2-D one had passed the caller's own
    # lengths through: a review, stop 33)
    for bad, match in ((bs.view(2, 2), "a non-empty 1-D int64 CPU tensor, got torch.int64 \\(2, 2\\)"),
                       (bs.int(), "1-D int64 CPU tensor, got torch.int32"), (bs[:0], "non-empty"),
                       (torch.tensor([3, 4, 1]), "non-increasing"), (torch.tensor([3, -1]), "non-increasing and >= 0")):
        with pytest.raises(ValueError, match=match):
            rnn_cuda._trusted_seq("rnn_forward", bad, got[0], got[1], cpu)


@pytest.mark.cuda
def test_cuda_raw_op_with_other_device_lengths_fails_in_a_device_assert():
    """A raw CUDA call whose device lengths batch_sizes does not imply ends in a device-side assert (in a child
    process: it ends the CUDA context, as torch's own index asserts do), never an out-of-bounds write; with
    the implied ones it gives the layer's results."""
    script = """
import torch, pyseqkern
from pyseqkern.ops import rnn as ops
H, bs = 4, torch.tensor([3, 2, 1])
xg = torch.randn(6, 4 * H, device="cuda")
packed = torch.ops.pyseqkern.rnn_pack(0, True, H, 0, torch.randn(4 * H, H, device="cuda"), None)
off, lens = torch.tensor([0, 3, 5], device="cuda"), torch.tensor([3, 2, 1], device="cuda")
run = lambda o, l: torch.ops.pyseqkern.rnn_forward(0, True, H, 0, 3, 3, xg, None, None, None, packed, bs, o, l,
                                                   0, 0, True, False)
good = run(off, lens)[0]
assert torch.equal(good, run(off.cpu(), lens.cpu())[0])
torch.cuda.synchronize()
print("GOOD", flush=True)
run(off, torch.tensor([3, 3, 3], device="cuda"))
torch.cuda.synchronize()
print("NOT REFUSED", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "GOOD" in done.stdout, done.stderr[-2000:]
    assert "NOT REFUSED" not in done.stdout and done.returncode != 0
    assert "device-side assert" in done.stderr, done.stderr[-2000:]


def test_cuda_path_override_is_validated():
    with pytest.raises(ValueError, match="PYSEQKERN_CUDA_RNN_PATH"):
        rnn_cuda.set_path("fastest")
    assert rnn_cuda.path() in rnn_cuda.PATHS


@pytest.mark.cuda
def test_cuda_forced_persistent_refuses_what_does_not_fit_and_auto_steps():
    # An LSTM with H=3000 needs megabytes of recurrent weights per block: no GPU holds that on chip.
    x, bs, t = make_case("lstm", 0, torch.float32, T=2, B=2, I=4, H=3000, strided_inputs=False, device="cuda")
    with torch.no_grad():
        for _ in _run_on("cuda-step"):
            want = call(ops.rnn_layer, "lstm", x, bs, t, False, True)
        old = rnn_cuda.path()
        try:
            rnn_cuda.set_path("persistent")
            with pytest.raises(ValueError, match="do not fit on chip"):
                call(ops.rnn_layer, "lstm", x, bs, t, False, True)
            rnn_cuda.set_path("auto")
            got = call(ops.rnn_layer, "lstm", x, bs, t, False, True)
        finally:
            rnn_cuda.set_path(old)
    assert pyseqkern.backend_info()["cuda"]["rnn_paths"]["forward"] == "step"
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_cuda_paths_agree(mode, proj, reset_after):
    # The two paths may split the sums differently (their blocks own different slices), never more.
    x, bs, t = make_case(mode, proj, torch.float32, T=9, B=11, I=20, H=37, lengths=[9, 9, 8, 8, 7, 5, 5, 3, 2, 1, 1],
                         device="cuda")
    results = {}
    for path in ("persistent", "step"):
        for _ in _run_on(f"cuda-{path}"):
            results[path] = outputs_and_grads(ops.rnn_layer, mode, x, bs, t, True, reset_after)
            assert pyseqkern.backend_info()["cuda"]["rnn_paths"]["backward"] == path
    (o1, g1), (o2, g2) = results["persistent"], results["step"]
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"d{k}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("mode, proj, reset_after", [("lstm", 3, True), ("gru", 0, True), ("gru", 0, False),
                                                     ("rnn_relu", 0, True)])
def test_cuda_graph_capture_replays_forward_and_backward(path, mode, proj, reset_after):
    for _ in _run_on(path):
        code, G, H = ops.MODES[mode], ops.GATES[mode], 11
        K = proj or H
        x, _, t = make_case(mode, proj, torch.float32, strided_inputs=False, device="cuda")
        seq = rnn_seq._Seq(x, None, False)
        packed = torch.ops.pyseqkern.rnn_pack(code, reset_after, H, proj, t["w_hh"], t["w_hr"])
        b_hn = t["b_hh"][2 * H:].contiguous() if mode == "gru" and reset_after else None
        xg, dy = randn((35, G * H), device="cuda", seed=3), randn((35, K), device="cuda", seed=4)

        def step():
            y, h_n, _, reserve = torch.ops.pyseqkern.rnn_forward(code, reset_after, H, proj, 7, 5, xg, b_hn, t["h0"],
                                                                 t["c0"], packed, *seq.args(), True)
            grads = torch.ops.pyseqkern.rnn_backward(code, reset_after, H, proj, 7, 5, dy, None, None, t["c0"],
                                                     reserve, packed, *seq.args(), False)
            return (y, h_n) + tuple(grads[:5])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: plans and kernel attributes are made here
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        xg.copy_(randn((35, G * H), device="cuda", seed=13))
        dy.copy_(randn((35, K), device="cuda", seed=14))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(captured, eager)):
            assert_bitwise_equal(a, b, name=f"output {i} of the replayed graph")


def test_packed_device_lengths_are_copied_once_per_stream_and_kept_for_captures(monkeypatch):
    """The bookkeeping of rnn_seq._device_seq, with the device, the stream and the capture state stood in for
    (the CUDA test below runs it for real): one copy per (device, stream, batch sizes), reused; the
    oldest dropped past the limit; a capture takes a copy made outside it and keeps it for good; sizes
    first seen inside a capture are refused."""
    state = {"capturing": False, "stream": 1}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: type("S", (), {"cuda_stream": state["stream"]})())
    monkeypatch.setattr(rnn_seq, "_DEVICE_SEQ", {})
    monkeypatch.setattr(rnn_seq, "_DEVICE_SEQ_CAPTURED", {})
    monkeypatch.setattr(rnn_seq, "_DEVICE_SEQ_MAX", 3)
    dev = torch.device("cpu")

    def seq(*sizes):
        bs = torch.tensor(sizes)
        return rnn_seq._device_seq(bs, torch.cumsum(bs, 0) - bs, bs.clone(), dev)

    first = seq(3, 2, 1)
    assert seq(3, 2, 1)[0] is first[0]  # reused on the same stream
    state["stream"] = 2
    other_stream = seq(3, 2, 1)
    assert other_stream[0] is not first[0] and torch.equal(other_stream[0], first[0])
    state["capturing"] = True
    with pytest.raises(RuntimeError, match="first seen inside CUDA graph capture"):
        seq(4, 4)
    captured = seq(3, 2, 1)
    assert captured[0] is first[0] or captured[0] is other_stream[0]
    assert seq(3, 2, 1)[0] is captured[0]
    state["capturing"] = False
    for n in range(1, 6):  # past the limit: the oldest copies go, the captured one stays
        seq(n)
    assert len(rnn_seq._DEVICE_SEQ) == 3 and list(rnn_seq._DEVICE_SEQ_CAPTURED.values())[0][0] is captured[0]
    ops.empty_cache()
    assert not rnn_seq._DEVICE_SEQ and rnn_seq._DEVICE_SEQ_CAPTURED


def test_packed_device_lengths_made_under_a_grad_transform_are_plain(monkeypatch):
    """Under torch.func.grad every op's result is a functorch wrapper, which has no storage for the
    kernels (nor for tolist()): the device copies of a packed batch's lengths are cached and handed to
    the kernels unwrapped (found by a review of the CUDA path: packed CUDA input under torch.func.grad
    crashed; the CUDA transform tests run it for real)."""
    from pyseqkern.ops.rnn_autograd import _is_functorch_wrapped

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 7})())
    monkeypatch.setattr(rnn_seq, "_DEVICE_SEQ", {})
    seen = {}

    def f(w):
        bs = torch.tensor([3, 2, 2, 1])
        offsets, lengths = torch.cumsum(bs, 0) - bs, bs.clone()  # wrapped, as in _Seq under the transform
        seen["wrapped"] = _is_functorch_wrapped(offsets)
        seen["out"] = rnn_seq._device_seq(bs, offsets, lengths, torch.device("cpu"))
        return (w * w).sum()

    torch.func.grad(f)(torch.ones(2))
    assert seen["wrapped"], "the stand-in no longer makes wrapped tensors"
    assert not any(_is_functorch_wrapped(t) for t in seen["out"])
    assert torch.equal(seen["out"][0], torch.tensor([0, 3, 5, 7]))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode,proj,reset_after", VARIANTS)
def test_cuda_inference_route_calls_the_impl_as_the_op_does(monkeypatch, mode, proj, reset_after, packed):
    """CUDA inference goes straight to rnn_cuda._forward_cuda (rnn_layer, _plain_eager_cuda), skipping the
    autograd.Function and the dispatcher. Stood in for on the CPU (the CPU impl as the CUDA one, the CPU
    eager paths off): the same bits as the op route, for every variant, packed or not, both directions,
    and a cell step; the CUDA tests run it for real."""
    calls = []

    def impl(*args):
        calls.append(len(args))
        return ops._forward_impl(*args)

    lengths = [7, 6, 6, 3, 1] if packed else None
    x, bs, t = make_case(mode, proj, torch.float32, lengths=lengths)
    monkeypatch.setattr(ops, "_plain_eager", lambda x: False)
    monkeypatch.setattr(ops.rnn_cuda, "_forward_cuda", impl)
    with torch.no_grad():
        for reverse in (False, True):
            want = call(ops.rnn_layer, mode, x, bs, t, reverse, reset_after)
            monkeypatch.setattr(ops, "_plain_eager_cuda", lambda x: True)
            got = call(ops.rnn_layer, mode, x, bs, t, reverse, reset_after)
            monkeypatch.setattr(ops, "_plain_eager_cuda", lambda x: False)
            for name, a, b in zip(["y", "h_n", "c_n"], got, want):
                assert (a is None) == (b is None)
                if a is not None:
                    assert_bitwise_equal(a, b, name)
        if proj == 0:
            x0, h0, c0 = x[:5] if packed else x[0], t["h0"], t["c0"]
            want = ops.rnn_cell(mode, x0, h0, c0, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], reset_after)
            monkeypatch.setattr(ops, "_plain_eager_cuda", lambda x: True)
            monkeypatch.setattr(rnn_thin, "_plain_eager_cuda", lambda x: True)
            got = ops.rnn_cell(mode, x0, h0, c0, t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], reset_after)
            for a, b in zip(got, want):
                if a is not None:
                    assert_bitwise_equal(a, b, "cell state")
    assert len(calls) == (3 if proj == 0 else 2)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode,proj,reset_after", VARIANTS)
def test_cuda_training_route_calls_the_impls_as_the_ops_do(monkeypatch, mode, proj, reset_after, packed):
    """A CUDA layer that records gradients runs the CUDA impls of rnn_forward and rnn_backward straight
    from _RnnLayer in plain eager mode. Stood in for on the CPU (the CPU impls as the CUDA ones, the CPU
    eager paths off): outputs and every gradient bitwise those of the op route, both directions."""
    calls = []

    def fwd(*args):
        calls.append("forward")
        return ops._forward_impl(*args)

    def bwd(*args):
        calls.append("backward")
        return ops._backward_impl(*args)

    lengths = [7, 6, 6, 3, 1] if packed else None
    x, bs, t = make_case(mode, proj, torch.float32, lengths=lengths)
    monkeypatch.setattr(ops, "_plain_eager", lambda x: False)
    monkeypatch.setattr(rnn_autograd, "_plain_eager", lambda x: False)
    monkeypatch.setattr(ops.rnn_cuda, "_forward_cuda", fwd)
    monkeypatch.setattr(ops.rnn_cuda, "_backward_cuda", bwd)

    def run(reverse):
        inputs = {k: v.detach().clone().requires_grad_() for k, v in dict(t, x=x).items() if v is not None}
        out = ops.rnn_layer(mode, inputs["x"], bs, inputs["h0"], inputs.get("c0"), inputs["w_ih"], inputs["w_hh"],
                            inputs["b_ih"], inputs["b_hh"], inputs.get("w_hr"), reverse, reset_after)
        outs = [o for o in out if o is not None]
        grads = torch.autograd.grad(sum((o * randn(o.shape, seed=9 + i)).sum() for i, o in enumerate(outs)),
                                    list(inputs.values()))
        return outs + list(grads)

    for reverse in (False, True):
        want = run(reverse)
        monkeypatch.setattr(ops, "_plain_eager_cuda", lambda x: True)
        monkeypatch.setattr(rnn_autograd, "_plain_eager_cuda", lambda x: True)
        got = run(reverse)
        monkeypatch.setattr(ops, "_plain_eager_cuda", lambda x: False)
        monkeypatch.setattr(rnn_autograd, "_plain_eager_cuda", lambda x: False)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_bitwise_equal(a, b, f"output or gradient {i}")
    assert calls == ["forward", "backward"] * 2


@pytest.mark.parametrize("hx", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_reset_before", "rnn_tanh", "rnn_relu"])
def test_cuda_cell_steps_take_the_thin_route_with_the_op_routes_bits(monkeypatch, kind, hx):
    """A CUDA cell step in inference runs _cuda_cell (checks inline, then _prepare and the CUDA impl) from
    the module's own thin path. Stood in for on the CPU as above: the same bits as the op route, zero
    states where hx is None; anything it does not take (a wrong hx shape, unbatched input, grad mode on
    a parameter that records) goes the general route, whose errors and results are unchanged."""
    import pyseqkern.nn as pnn
    calls = []

    def impl(*args):
        calls.append(args[4])  # steps
        return ops._forward_impl(*args)

    cls = {"lstm": pnn.LSTMCell, "rnn_tanh": pnn.RNNCell, "rnn_relu": pnn.RNNCell}.get(kind, pnn.GRUCell)
    kw = ({"nonlinearity": "relu"} if kind == "rnn_relu" else
          {"reset_after": False} if kind == "gru_reset_before" else {})
    torch.manual_seed(3)
    cell = cls(13, 11, **kw)
    x = randn((7, 13), seed=1)
    h = randn((7, 11), seed=2)
    state = None if not hx else (h, randn((7, 11), seed=3)) if kind == "lstm" else h
    monkeypatch.setattr(ops, "_plain_eager", lambda x: False)  # (the CPU's own thin paths off)
    monkeypatch.setattr(ops.rnn_cuda, "_forward_cuda", impl)
    one = None if state is None else tuple(t[0] for t in state) if kind == "lstm" else h[0]
    leaves = torch.utils._pytree.tree_leaves
    taken = []
    real_cuda_cell = rnn_thin._cuda_cell
    monkeypatch.setattr(rnn_thin, "_cuda_cell", lambda *a: taken.append(real_cuda_cell(*a)) or taken[-1])
    with torch.no_grad():
        want, want_one = cell(x, state), cell(x[0], one)
        monkeypatch.setattr(ops, "_plain_eager_cuda", lambda x: True)
        monkeypatch.setattr(rnn_thin, "_plain_eager_cuda", lambda x: True)
        got = cell(x, state)
        assert calls == [1] and len(taken) == 1 and taken[0] is not None  # (the op route runs the CPU op)
        got_one = cell(x[0], one)  # (unbatched: the general route, rnn_layer's CUDA inference route)
        for a, b in zip(leaves((got, got_one)), leaves((want, want_one)), strict=True):
            assert_bitwise_equal(a, b, "state")
        bad = (h[:, :5], h) if kind == "lstm" else h[:, :5]
        with pytest.raises(RuntimeError, match="hidden_size"):
            cell(x, bad)
        # A build without CUDA kernels (use_reference): declined, so the general route runs the reference.
        monkeypatch.setattr(ops._backend, "use_reference", lambda op, device, *a: True)
        taken.clear()
        ref_out = cell(x, state)
        assert taken and not any(taken) and calls == [1, 1]  # (declined; the reference runs no kernel)
        for a, b in zip(leaves(ref_out), leaves(want), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(ops._backend, "use_reference", lambda op, device, *a: False)
    got = cell(x, state)  # (records a gradient: not the inference route)
    assert got[0].requires_grad if kind == "lstm" else got.requires_grad


def test_the_timing_only_skip_mask_warns_when_set(monkeypatch):
    """PYSEQKERN_CUDA_RNN_SKIP (bench/gpu_phases.py) leaves parts of the CUDA forward out, wrong outputs
    by design; left set in a shell it would corrupt every CUDA forward silently, so each call warns."""
    monkeypatch.delenv(rnn_cuda.SKIP_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn_cuda._warn_if_skipping()
        monkeypatch.setenv(rnn_cuda.SKIP_ENV, "0")
        rnn_cuda._warn_if_skipping()
    monkeypatch.setenv(rnn_cuda.SKIP_ENV, "4")
    with pytest.warns(RuntimeWarning, match="PYSEQKERN_CUDA_RNN_SKIP=4 is set: .* outputs are wrong"):
        rnn_cuda._warn_if_skipping()


def test_packed_device_lengths_of_a_traced_batch_are_only_moved(monkeypatch):
    """Fake batch sizes with symbolic values (opcheck's test_aot_dispatch_dynamic traces rnn_layer_op that
    way) are moved, not cached: their tolist() gives SymInts, which no dict key takes (the first GPU
    run, stop 31: "unhashable type: non-nested SymInt"). The stream is never asked for."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: pytest.fail("a traced batch was cached"))
    monkeypatch.setattr(rnn_seq, "_DEVICE_SEQ", {})
    mode = FakeTensorMode(shape_env=ShapeEnv())
    bs = mode.from_tensor(torch.tensor([3, 2, 2, 1]))
    with mode:
        assert isinstance(bs.tolist()[0], torch.SymInt)  # (what the cache key would have held)
        offsets, lengths = torch.cumsum(bs, 0) - bs, bs.clone()
        out = rnn_seq._device_seq(bs, offsets, lengths, torch.device("cpu"))
    assert [tuple(t.shape) for t in out] == [(4,), (4,)] and not rnn_seq._DEVICE_SEQ


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_cuda_graph_capture_replays_a_packed_batch(path):
    """A module over a PackedSequence captured after a warm-up (as torch.cuda.graphs asks): the replay
    gives the eager bits, from the batch's device lengths copied once outside the capture (rnn_seq._device_seq);
    batch sizes first seen inside a capture are refused with an error saying what to do."""
    for _ in _run_on(path):
        torch.manual_seed(0)
        lstm = pyseqkern.nn.LSTM(24, 11).cuda()
        lengths = [7, 5, 5, 2]
        x = torch.randn(7, 4, 24, device="cuda")
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)

        def step():
            with torch.no_grad():
                out, (h, c) = lstm(packed)
            return out.data, h, c

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        packed.data.copy_(torch.randn_like(packed.data))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(captured, eager)):
            assert_bitwise_equal(a, b, name=f"output {i} of the replayed graph")
        other = torch.nn.utils.rnn.pack_padded_sequence(x, [7, 6, 3, 1])
        with pytest.raises(RuntimeError, match="first seen inside CUDA graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                with torch.no_grad():
                    lstm(other)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_cuda_runs_on_the_current_stream(path):
    # Inputs made on a side stream and consumed there at once: a launch on any other stream would race.
    for _ in _run_on(path):
        x, bs, t = make_case("gru", 0, torch.float32, T=30, B=16, I=64, H=128, strided_inputs=False, device="cuda")
        with torch.no_grad():
            want = call(ops.rnn_layer, "gru", x, bs, t, False, True)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                x2 = x * 1.0
                torch.cuda._sleep(1_000_000)  # keeps the side stream busy, so a wrong stream would overtake it
                x2.mul_(1.0)
                got = call(ops.rnn_layer, "gru", x2, bs, t, False, True)
            torch.cuda.current_stream().wait_stream(side)
        for a, b in zip(got, want):
            if a is not None:
                assert_bitwise_equal(a, b)


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_pair_and_piece_sections_only_where_the_level_reads_them(isa, mode, proj, reset_after):
    """avx512bf16 and amx pack bfloat16 weights a second time as pairs of k for their dot products, the
    forward's sections and the backward's main one (rnn_layout.h; amx pads each block's pairs to whole
    tiles of 16); other dtypes and levels pack exactly what the float kernels read, but float32 on amx,
    which adds the three bfloat16 pieces of the forward's and the backward's main sections (Layout::split)."""
    code, H = ops.MODES[mode], 37
    (L, bf), f32 = (ops._sizes(code, reset_after, H, proj, 3, dt)[:2] for dt in (torch.bfloat16, torch.float32))
    f32 = f32[1]
    G, K, tile = ops.GATES[mode], proj or H, 16 if isa == "amx" else 1

    def blocks(n):
        return -(-n // L)

    def pairs(k):
        return -(-(-(-k // 2)) // tile) * tile

    floats = blocks(H) * K * G * L + blocks(K) * G * H * L + (blocks(proj) * H * L + blocks(H) * proj * L if proj else 0)
    main = blocks(H) * pairs(K) * G * L, blocks(K) * pairs(G * H) * L  # the forward's and the backward's
    stamp = f32 - floats - (3 * sum(main) if isa == "amx" else 0)  # (the layout's stamp: bindings.cpp)
    assert 0 < stamp <= 16
    forward = main[0] + (blocks(proj) * pairs(H) * L if proj else 0)
    assert bf == floats + (forward + main[1] if isa in BF16_DOT_LEVELS else 0) + stamp


def _piece_pairs(w, units, tile):
    """The three bfloat16 pieces of float32 rows w [G, units, K] (hi = bf16(w), mid = bf16(w - hi), lo =
    bf16(w - hi - mid), rounding to nearest even) as pair sections: [3, blocks of 16 units, pairs of k
    padded to whole tiles, G, 16] of int32, k = 2j in the low half, 2j + 1 in the high one."""
    G, n, K = w.shape
    U, K2 = -(-n // 16), -(-(-(-K // 2)) // tile) * tile
    wp = torch.zeros(G, U * 16, 2 * K2)
    wp[:, :n, :K] = w
    hi = wp.to(torch.bfloat16)
    rest = wp - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    out = []
    for piece in (hi, mid, lo):
        bits = piece.view(torch.int16).to(torch.int32) & 0xFFFF
        pairs = bits[..., 0::2] | (bits[..., 1::2] << 16)  # [G, U*16, K2]
        out.append(pairs.view(G, U, 16, K2).permute(1, 3, 0, 2))
    return torch.stack(out)


@pytest.mark.parametrize("mode, H, proj", [(mode, H, 0) for mode in ("lstm", "gru", "rnn_tanh")
                                           for H in (7, 37, 113, 256)] + [("lstm", 37, 5)])
def test_float32_piece_sections_hold_each_weights_three_pieces(mode, H, proj):
    """On amx, float32 packs hold each weight of W_hh as three bfloat16 pieces, laid out as pair sections
    (Layout::split): the forward's [3][U][K2][G][16] after the float sections, then the backward's (W_hh
    transposed) [3][UK][GH2][16]; pack_split writes them a register at a time (stop 45). Exactly the pieces
    torch's own conversions give, at odd sizes and partial blocks (H = 7, 37, 113) and with projection."""
    if pyseqkern.backend_info()["cpu"]["isa_active"] != "amx":
        pytest.skip("the piece sections exist on the amx level only")
    code, G, K = ops.MODES[mode], ops.GATES[mode], proj or H
    w = randn((G * H, K), torch.float32, seed=31)
    packed = torch.ops.pyseqkern.rnn_pack(code, True, H, proj, w, randn((proj, H), torch.float32, seed=32)
                                          if proj else None).view(torch.int32)
    blocks = lambda n: -(-n // 16)  # noqa: E731
    floats = blocks(H) * K * G * 16 + blocks(K) * G * H * 16 + (blocks(proj) * H * 16 + blocks(H) * proj * 16
                                                              if proj else 0)
    forward = _piece_pairs(w.view(G, H, K), H, 16)
    backward = _piece_pairs(w.t().reshape(1, K, G * H), K, 16)
    got_f = packed[floats:floats + forward.numel()].view(forward.shape)
    at = floats + forward.numel()
    got_b = packed[at:at + backward.numel()].view(backward.shape)
    assert torch.equal(got_f, forward) and torch.equal(got_b, backward)


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_bfloat16_backward_in_a_nan_workspace(isa, mode, proj, reset_after):
    """The bfloat16 backward's recurrent product on dot-product levels reads each step's dG in pairs from
    the workspace; where G*H is odd (H = 11: GRU, RNN) the last pair's second value is padding, whose
    weight is 0, but 0 x NaN is NaN: the kernel zeroes it. A NaN-filled workspace gives the op's bits."""
    H = 11
    args, _ = backward_args("cpu", mode, proj, reset_after, False, [7, 5, 5, 2, 1], torch.bfloat16, T=7, B=5, H=H)
    want = torch.ops.pyseqkern.rnn_backward(*args, False)
    (code, _, _, _, steps, B, dy, dh_n, dc_n, c0, reserve, packed, batch_sizes, time_offsets, lengths, st, sb,
     reverse) = args
    K, G = proj or H, ops.GATES[mode]
    ws = ops._sizes(code, reset_after, H, proj, B, torch.bfloat16)[2]
    out = [torch.empty_like(w) for w in want[:5]]
    cap = lambda v: None if v is None or v.numel() == 0 else to_dlpack(v)  # noqa: E731
    _C.rnn_backward(code, reset_after, H, proj, steps, B, cap(batch_sizes), cap(time_offsets), cap(lengths), st, sb,
                    reverse, cap(dy), K, cap(dh_n), cap(dc_n), cap(c0), cap(reserve), cap(packed), *map(cap, out),
                    cap(torch.full((ws,), float("nan"))), 2, None, None, None)
    for name, got, expected in zip(["d_gates_x", "d_gates_h", "d_proj", "dh0", "dc0"], out, want):
        if expected.numel():
            assert torch.isfinite(got).all(), name
            assert_bitwise_equal(got, expected, name=name)
    assert G * H % 2 == (mode != "lstm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_backward_scratch_gives_the_op_paths_gradients(monkeypatch, mode, proj, reset_after, dtype):
    """The eager CPU backward keeps its temporaries in a per-thread scratch (rnn_scratch._Scratch) reused across
    calls of different sizes; its gradients must be those of the op path bit for bit, call after call,
    and empty_cache() must leave it working."""
    cases = [make_case(mode, proj, dtype, T=T, B=B, H=H, lengths=lengths, seed=T)
             for T, B, H, lengths in [(9, 6, 11, None), (5, 3, 11, [5, 4, 2]), (12, 7, 11, None)]]
    pooled = [outputs_and_grads(ops.rnn_layer, mode, x, bs, t, False, reset_after)[1] for x, bs, t in cases]
    pyseqkern.empty_cache()
    again = outputs_and_grads(ops.rnn_layer, mode, *cases[0], False, reset_after)[1]
    monkeypatch.setattr(ops, "_plain_eager", lambda x: False)  # everything through torch.ops
    for (x, bs, t), got in zip(cases, pooled):
        want = outputs_and_grads(ops.rnn_layer, mode, x, bs, t, False, reset_after)[1]
        for k in want:
            assert_bitwise_equal(got[k], want[k], name=f"d{k}")
    for k in again:
        assert_bitwise_equal(again[k], pooled[0][k], name=f"d{k}")


@pytest.mark.parametrize("projects", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_inference_forward_scratch_keeps_the_results(monkeypatch, mode, proj, reset_after, dtype, projects):
    """The eager inference forward takes its x_gates buffer from a per-thread scratch reused across calls
    of different sizes: the kernel's projection with its workspace (rnn_scratch._fwd_scratch), torch's GEMM
    into its own (rnn_scratch._proj_scratch). Every call's results must be what the call gives alone (after
    empty_cache(), from fresh buffers), and no returned tensor may share memory with the scratch or
    with another call's results."""
    if projects == "torch":
        monkeypatch.setattr(ops, "_forward_projecting", lambda *args: None)
    cases = [make_case(mode, proj, dtype, T=T, B=B, H=H, lengths=lengths, seed=T)
             for T, B, H, lengths in [(9, 6, 11, None), (5, 3, 11, [5, 4, 2]), (12, 7, 11, None), (9, 6, 11, None)]]
    with torch.no_grad():
        pooled = [call(ops.rnn_layer, mode, x, bs, t, False, reset_after) for x, bs, t in cases]
        for (x, bs, t), got in zip(cases, pooled):
            pyseqkern.empty_cache()
            want = call(ops.rnn_layer, mode, x, bs, t, False, reset_after)
            for name, a, b in zip(["y", "h_n", "c_n"], got, want):
                if b is not None:
                    assert_bitwise_equal(a, b, name=name)
    ptrs = [o.untyped_storage().data_ptr() for outs in pooled for o in outs if o is not None and o.numel()]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("mode, proj, reset_after", VARIANTS)
def test_training_reserves_reuse_only_buffers_nothing_holds(monkeypatch, mode, proj, reset_after):
    """Training forwards take their reserves from a per-thread pool (rnn_scratch._ReservePool) and reuse a buffer
    only once nothing else holds it. Graphs alive together (two forwards before one backward, a graph
    kept by retain_graph while others run, packed and padded calls of other sizes) must each keep
    their own reserve: every gradient is the one the same call gives from a fresh pool, bit for bit,
    and a backward run twice gives the same bits twice. Once the graphs are gone, steps of the same
    sizes reuse the pool's buffers instead of adding new ones."""
    monkeypatch.setattr(rnn_scratch, "_RESERVE_POOL_FROM", 0)  # (these reserves are small)
    # (cases 0 and 2: the same sizes, other values)
    cases = [make_case(mode, proj, torch.float32, T=T, B=B, H=H, lengths=lengths, seed=i)
             for i, (T, B, H, lengths) in enumerate([(9, 6, 11, None), (5, 3, 11, [5, 4, 2]), (9, 6, 11, None),
                                                     (12, 7, 11, None)])]

    def alone(case):
        pyseqkern.empty_cache()
        return outputs_and_grads(ops.rnn_layer, mode, *case, False, reset_after)[1]

    want = [alone(c) for c in cases]
    pyseqkern.empty_cache()
    graphs = []
    for x, bs, t in cases:  # every forward before any backward
        lv = leaves(x, t)
        outs = [o for o in call(ops.rnn_layer, mode, lv["x"], bs, {k: v for k, v in lv.items() if k != "x"}, False,
                                reset_after) if o is not None]
        loss = sum((o.double() * randn(o.shape, torch.float64, seed=9 + i)).sum() for i, o in enumerate(outs))
        graphs.append((loss, lv))
    kept_loss, kept_lv = graphs[0]
    names = [k for k, v in kept_lv.items() if v is not None]
    first = torch.autograd.grad(kept_loss, [kept_lv[k] for k in names], retain_graph=True)
    for (loss, lv), w in list(zip(graphs, want))[1:]:
        got = torch.autograd.grad(loss, [lv[k] for k in names])
        for k, g in zip(names, got):
            assert_bitwise_equal(g, w[k], name=f"d{k}")
    again = outputs_and_grads(ops.rnn_layer, mode, *cases[2], False, reset_after)[1]  # while graph 0 is kept
    second = torch.autograd.grad(kept_loss, [kept_lv[k] for k in names])
    for k, a, b in zip(names, first, second):
        assert_bitwise_equal(a, want[0][k], name=f"d{k}")
        assert_bitwise_equal(b, want[0][k], name=f"d{k} (second backward)")
    for k in names:
        assert_bitwise_equal(again[k], want[2][k], name=f"d{k}")
    del graphs, kept_loss, kept_lv
    held = len(rnn_scratch._reserves().bufs)
    assert held > 0
    for _ in range(3):
        outputs_and_grads(ops.rnn_layer, mode, *cases[0], False, reset_after)
    assert len(rnn_scratch._reserves().bufs) == held


@pytest.mark.parametrize("change, error, match", [
    (lambda a: dict(a, h=a["h"][:, :5]), ValueError, r"rnn_cell: 'h' must have shape \(3, 11\), got \(3, 5\)"),
    (lambda a: dict(a, h=a["h"][:2]), ValueError, r"rnn_cell: 'h' must have shape \(3, 11\), got \(2, 11\)"),
    (lambda a: dict(a, c=a["c"].double()), TypeError, "rnn_cell: 'c' has dtype torch.float64"),
    (lambda a: dict(a, x=a["x"][:, :6]), ValueError, r"rnn_cell: 'w_ih' must have shape \(44, 6\)"),
    (lambda a: dict(a, x=a["x"].double()), TypeError, "rnn_cell: 'h' has dtype torch.float32 but 'x' has torch.float64"),
])
def test_cell_errors_after_the_parameters_are_planned(change, error, match):
    """Once a cell's parameters have a plan (rnn_thin.cell_plan), the thin path checks only the call's own
    tensors; anything off must still reach the full checks and their errors."""
    w = [randn(s, seed=4 + i, scale=0.3) for i, s in enumerate([(44, 13), (44, 11), (44,), (44,)])]
    a = dict(x=randn((3, 13), seed=1), h=randn((3, 11), seed=2), c=randn((3, 11), seed=3))
    with torch.no_grad():
        ops.rnn_cell("lstm", a["x"], a["h"], a["c"], *w)
        assert rnn_thin.cell_plan("lstm", True, *w) is not None
        bad = change(a)
        with pytest.raises(error, match=match):
            ops.rnn_cell("lstm", bad["x"], bad["h"], bad["c"], *w)


def _raw_ops_case():
    H, T_, B_ = 4, 3, 2
    packed = ops._packed(0, True, H, 0, torch.randn(4 * H, H), None, True)
    xg = torch.randn(T_ * B_, 4 * H)
    _, _, _, reserve = torch.ops.pyseqkern.rnn_forward(0, True, H, 0, T_, B_, xg, None, None, None, packed, None,
                                                       None, None, B_, 1, False, True)
    return H, T_, B_, packed, xg, reserve


@pytest.mark.parametrize("change,match", [
    ("reserve_strided", "'reserve' must be a contiguous float32"),
    ("reserve_short", "'d_gates_x' must hold 6 rows"),  # (the op sizes its outputs by the reserve's rows)
    ("reserve_dtype", "'reserve' must be a contiguous float32"),
    ("more_steps", "must hold 8 rows"),
    ("dy_short", "'dy' must hold 6 rows"),
    ("h_n_dtype", "'dh_n' must be a contiguous float32"),
    ("packed_short", "'packed' must be a contiguous float32"),
    ("batch_sizes_int32", "'batch_sizes' must be a 1-D contiguous int64"),
    ("lengths_2d", "'lengths' must be a 1-D contiguous int64"),  # (read flat before: a review, stop 33)
    ("batch_sizes_growing", "non-increasing"),
    ("lengths_wrong", "'lengths' must be the steps"),
    ("offsets_wrong", "exclusive cumsum"),
    ("forward_more_steps", "'x_gates' must hold 8 rows"),
    ("forward_h0_short", "'h0' must be a contiguous float32"),
    # Found by an edge-case helper (stop 16): a stride so large the last row wrapped past int64 passed
    # every check (segfault, double free); zero steps or a packed row of length 0 left h_n unwritten.
    ("forward_stride_overflow", r"reach past any tensor \(overflow\)"),
    ("stride_overflow", r"reach past any tensor \(overflow\)"),
    ("forward_zero_steps", "'steps' must be >= 1 where 'batch' > 0"),
    ("batch_sizes_short", "'batch_sizes' must start at 'batch'"),
    # Found by a fuzzer (stop 32): rows no step writes came back uninitialised in y or d_gates_x.
    ("forward_extra_rows", "must have exactly the 6 rows"),
    ("forward_gapped_strides", "lay the steps' rows out densely"),
    ("reserve_extra_rows", "'reserve' \\(and 'd_gates_x'\\) must have exactly the 6 rows"),
])
def test_raw_ops_refuse_what_the_kernels_would_index_out_of_bounds(change, match):
    # torch.ops.pyseqkern.rnn_forward/rnn_backward are public: the C++ entries hold every row-indexed
    # tensor, state, packed weight, reserve and the packed metadata to what the kernels reach. Before,
    # a short reserve or more steps than rows was a heap overflow ("double free or corruption").
    H, T_, B_, packed, xg, reserve = _raw_ops_case()
    dy, dh_n, steps, seq, batch = torch.randn(T_ * B_, H), None, T_, (None, None, None, B_, 1), B_
    if change == "reserve_strided":
        reserve = reserve[:1].expand(T_ * B_, -1)
    elif change == "reserve_short":
        reserve = reserve[:-1]
    elif change == "reserve_dtype":
        reserve = reserve.double()
    elif change == "more_steps":
        steps = T_ + 1
    elif change == "dy_short":
        dy = dy[:-1]
    elif change == "h_n_dtype":
        dh_n = torch.randn(B_, H, dtype=torch.float64)
    elif change == "packed_short":
        packed = packed[:-1]
    elif change.endswith("stride_overflow"):
        seq = (None, None, None, 2 ** 63 - 1, 1)
    elif change == "forward_zero_steps":
        steps, xg = 0, xg[:0]
    elif change == "forward_extra_rows":
        xg = torch.cat([xg, xg[:1]])
    elif change == "forward_gapped_strides":  # (rows 2 and 5 of 8 belong to no step)
        seq, xg = (None, None, None, 3, 1), torch.randn(8, xg.shape[1])
    elif change == "reserve_extra_rows":
        reserve = torch.cat([reserve, reserve])
    elif not change.startswith("forward"):
        bs, off, lengths = torch.tensor([2, 2, 2]), torch.tensor([0, 2, 4]), torch.tensor([3, 3])
        if change == "batch_sizes_int32":
            bs = bs.int()
        elif change == "batch_sizes_growing":
            bs = torch.tensor([1, 2, 2])
        elif change == "lengths_wrong":
            lengths = torch.tensor([3, 2])
        elif change == "lengths_2d":
            lengths = torch.tensor([[3, 3]])
        elif change == "offsets_wrong":
            off = torch.tensor([0, 2, 5])
        elif change == "batch_sizes_short":  # a third row of length 0
            batch, lengths = B_ + 1, torch.tensor([3, 3, 0])
        seq = (bs, off, lengths, 0, 0)
    with pytest.raises(ValueError, match=match):
        if change.startswith("forward"):
            h0 = torch.randn(B_ - 1, H) if change == "forward_h0_short" else None
            torch.ops.pyseqkern.rnn_forward(0, True, H, 0, steps + (change == "forward_more_steps"), batch, xg, None,
                                            h0, None, packed, *seq, False, True)
        else:
            torch.ops.pyseqkern.rnn_backward(0, True, H, 0, steps, batch, dy, dh_n, None, None, reserve, packed, *seq,
                                             False, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int32, torch.uint8])
@pytest.mark.parametrize("op", ["rnn_pack", "rnn_forward", "rnn_backward"])
def test_raw_ops_refuse_dtypes_the_cpu_kernels_do_not_have(op, dtype):
    """The CPU kernels store float32, float64 or bfloat16 and took anything else as float32: rnn_forward on
    float16 CPU x_gates wrote 4-byte values into 2-byte rows and corrupted the heap (a crash of the
    interpreter, found in stop 32). Each CPU entry refuses other dtypes with a TypeError naming the tensor
    (integer dtypes before the op sizes its buffers: they had been told "'dtype' must be ...", no tensor
    named)."""
    H, T_, B_, packed, xg, reserve = _raw_ops_case()
    arg = {"rnn_pack": "w_hh", "rnn_forward": "x_gates", "rnn_backward": "d_gates_x|dy"}[op]
    with pytest.raises(TypeError, match=rf"'({arg})[^']*' must be float32, float64 or bfloat16"):
        if op == "rnn_pack":
            torch.ops.pyseqkern.rnn_pack(0, True, H, 0, torch.ones(4 * H, H).to(dtype), None)
        elif op == "rnn_forward":
            torch.ops.pyseqkern.rnn_forward(0, True, H, 0, T_, B_, xg.to(dtype), None, None, None, packed, None,
                                            None, None, B_, 1, False, False)
        else:
            torch.ops.pyseqkern.rnn_backward(0, True, H, 0, T_, B_, torch.ones(T_ * B_, H).to(dtype), None, None,
                                             None, reserve, packed, None, None, None, B_, 1, False, False)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_plan_is_not_served_for_reshaped_parameters(cls):
    """A parameter re-pointed at a view of its own start keeps its address and version: the cell plan
    made for the old shapes was served, a (2, 8) output where torch.nn gives (2, 4) (a fuzzer, stop 32).
    The plan's key holds the weights' shapes."""
    import pyseqkern.nn as pnn
    torch.manual_seed(5)
    ours, theirs = getattr(pnn, cls)(5, 8), getattr(torch.nn, cls)(5, 8)
    theirs.load_state_dict(ours.state_dict())
    x = randn((2, 5), seed=3)
    G = {"LSTMCell": 4, "GRUCell": 3, "RNNCell": 1}[cls]
    with torch.no_grad():
        ours(x)  # (the plan for H=8)
        for m in (ours, theirs):
            for n in ("weight_ih", "bias_ih", "bias_hh"):
                getattr(m, n).data = getattr(m, n).data[:G * 4]
            m.weight_hh.data = m.weight_hh.data.flatten()[:G * 16].view(G * 4, 4)
            m.hidden_size = 4
        got, want = ours(x), theirs(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        assert a.shape == b.shape == (2, 4)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ops_run_at_the_level_they_name():
    """rnn_pack, rnn_forward, rnn_backward and rnn_step_direct take `isa`, the level a compiled graph was traced
    at (its fake impls gave that level's sizes): a call naming one runs there, as a call from a thread at that level does,
    bit for bit, and leaves the thread's own level as it was; a name that is no level raises, naming `isa`."""
    H, T_, B_ = 11, 3, 2
    w_hh, xg = randn((4 * H, H), seed=1, scale=0.3), randn((T_ * B_, 4 * H), seed=2)
    dy = randn((T_ * B_, H), seed=4)
    fwd, seq = (0, True, H, 0, T_, B_, xg, None, None, None), (None, None, None, B_, 1, False)

    def calls(isa=None):
        packed = torch.ops.pyseqkern.rnn_pack(0, True, H, 0, w_hh, None, isa)
        y, h_n, c_n, reserve = torch.ops.pyseqkern.rnn_forward(*fwd, packed, *seq, True, None, isa)
        dgx = torch.ops.pyseqkern.rnn_backward(0, True, H, 0, T_, B_, dy, None, None, None, reserve, packed, *seq,
                                               False, isa)[0]
        return packed, y, reserve, dgx

    x, h, w_ih = randn((B_, 5), seed=5), randn((B_, H), seed=6), randn((3 * H, 5), seed=7, scale=0.3)
    w3, b3 = randn((3 * H, H), seed=8, scale=0.3), randn((3 * H,), seed=9)

    def calls(isa=None, pack_and_run=calls):  # (and a compiled graph's one-step op)
        return (*pack_and_run(isa), *torch.ops.pyseqkern.rnn_step_direct(1, True, x, h, None, w_ih, w3, b3, b3, isa))

    active = pyseqkern._backend.active_isa()
    for level in SUPPORTED:
        with pyseqkern._backend.thread_isa(level):
            want = calls()
        got = calls(level)
        assert pyseqkern._backend.active_isa() == active
        for a, b in zip(got, want, strict=True):
            assert_bitwise_equal(a, b, f"ops named {level}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    for bad in ("avx1024", ""):
        with pytest.raises(ValueError, match="pyseqkern::rnn_pack: 'isa' must be None or one of baseline"):
            torch.ops.pyseqkern.rnn_pack(0, True, H, 0, w_hh, None, bad)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match="pyseqkern::rnn_forward: 'isa' must be"):
            torch.ops.pyseqkern.rnn_forward(*fwd[:6], mode.from_tensor(xg), None, None, None,
                                            mode.from_tensor(torch.empty(1)), *seq, True, None, bad)


def _levels_packing_apart():
    """Two runnable CPU levels whose float32 packs at H=11 have the same size and different lanes, or None."""
    best = pyseqkern.backend_info()["cpu"]["isa_best"]
    seen = {}
    try:
        for level in SUPPORTED:
            pyseqkern.set_cpu_isa(level)
            lanes, numel = _C.rnn_sizes(0, True, 11, 0, 1, "float32")[:2]
            for other, (lanes_o, numel_o) in seen.items():
                if numel_o == numel and lanes_o != lanes:
                    return other, level
            seen[level] = (lanes, numel)
    finally:
        pyseqkern.set_cpu_isa(best)
    return None


def test_raw_ops_refuse_a_pack_laid_out_for_another_level_or_layer():
    """A pack is a plain tensor. Made at avx512 (16 lanes) and read at avx2 (8 lanes), an LSTM's at H=11 has the
    same size, and the raw ops returned wrong numbers in bounds (a fuzzer, stop 32; the modules key their caches
    on the level). A CPU pack and input panel now end in a stamp of their layout, which every entry reading them
    checks: another level's, another layer's or a hand-made tensor is refused by name, and rnn_pack_current
    calls another level's pack stale."""
    apart = _levels_packing_apart()
    if apart is None:
        pytest.skip("this CPU runs no two levels with packs of one size and different lanes")
    made_at, read_at = apart
    best = pyseqkern.backend_info()["cpu"]["isa_best"]
    H, T_, B_ = 11, 3, 2
    w_hh, xg, w_ih = randn((4 * H, H), seed=1, scale=0.3), randn((T_ * B_, 4 * H), seed=2), randn((4 * H, H), seed=3)
    fwd = (0, True, H, 0, T_, B_, xg, None, None, None)
    seq = (None, None, None, B_, 1, False)
    try:
        pyseqkern.set_cpu_isa(made_at)
        packed = torch.ops.pyseqkern.rnn_pack(0, True, H, 0, w_hh, None)
        panel = torch.empty(_C.rnn_input_panel_numel(0, True, H, H, "float32"))
        _C.rnn_pack_input(0, True, H, capsule(w_ih), capsule(panel))
        y, h_n, c_n, reserve = torch.ops.pyseqkern.rnn_forward(*fwd, packed, *seq, True)
        bwd = (0, True, H, 0, T_, B_, randn((T_ * B_, H), seed=4), None, None, None, reserve)
        dgx = torch.ops.pyseqkern.rnn_backward(*bwd, packed, *seq, False)[0]
        pyseqkern.set_cpu_isa(read_at)
        level = r"'packed' does not fit this call: it was packed at another CPU level"
        with pytest.raises(ValueError, match="rnn_forward: " + level):
            torch.ops.pyseqkern.rnn_forward(*fwd, packed, *seq, True)
        with pytest.raises(ValueError, match="rnn_backward: " + level):
            torch.ops.pyseqkern.rnn_backward(*bwd, packed, *seq, False)
        assert not _C.rnn_pack_current(0, True, H, 0, capsule(w_hh), None, capsule(packed))
        with pytest.raises(ValueError, match="RnnCellStep: 'packed_in' does not fit this call: it was packed at an"):
            _C.RnnCellStep(0, True, H, H, "float32", capsule(torch.ops.pyseqkern.rnn_pack(0, True, H, 0, w_hh, None)),
                           capsule(panel), None, None)
        # The same call at the level that packed it: the results it gave before, bit for bit.
        pyseqkern.set_cpu_isa(made_at)
        again = torch.ops.pyseqkern.rnn_forward(*fwd, packed, *seq, True)
        assert_bitwise_equal(again[0], y)
        assert_bitwise_equal(torch.ops.pyseqkern.rnn_backward(*bwd, packed, *seq, False)[0], dgx)
        assert _C.rnn_pack_current(0, True, H, 0, capsule(w_hh), None, capsule(packed))
    finally:
        pyseqkern.set_cpu_isa(best)
    # Packs of other sizes at other levels: a larger layout's names itself from the stamp at its own end; a
    # smaller one is not current for rnn_pack_current (it had raised "'out' must hold ...").
    sizes = {}
    for level in SUPPORTED:
        pyseqkern.set_cpu_isa(level)
        sizes[level] = (torch.ops.pyseqkern.rnn_pack(0, True, H, 0, w_hh, None), _C.rnn_sizes(0, True, H, 0, 1,
                                                                                               "float32")[1])
    try:
        for level in SUPPORTED:
            pyseqkern.set_cpu_isa(level)
            for other, (pack, _) in sizes.items():
                if pack.numel() > sizes[level][1]:
                    with pytest.raises(ValueError, match="it was packed at another CPU level"):
                        torch.ops.pyseqkern.rnn_forward(*fwd, pack, *seq, False)
                if pack.numel() != sizes[level][1]:
                    assert not _C.rnn_pack_current(0, True, H, 0, capsule(w_hh), None, capsule(pack))
    finally:
        pyseqkern.set_cpu_isa(best)
    # Another layer's pack of the same size (bfloat16 weights, float32 call) and a tensor made by hand.
    other = torch.ops.pyseqkern.rnn_pack(0, True, H, 0, w_hh.bfloat16(), None)
    if other.numel() == packed.numel():
        with pytest.raises(ValueError, match=r"it was packed for another layer \(4 gates, dtype bfloat16, hidden 11"):
            torch.ops.pyseqkern.rnn_forward(*fwd, other, *seq, True)
    with pytest.raises(ValueError, match="'packed' does not fit this call: it is not a CPU pack"):
        mine = torch.ops.pyseqkern.rnn_pack(0, True, H, 0, w_hh, None)  # (this level's size)
        torch.ops.pyseqkern.rnn_forward(*fwd, torch.randn(mine.numel()), *seq, True)
    # A GRU's two variants share one layout: either's pack serves the other, and an RNN's serves relu and tanh.
    gru_w = randn((3 * H, H), seed=5, scale=0.3)
    gx = randn((T_ * B_, 3 * H), seed=6)
    for reset_after in (True, False):
        p = torch.ops.pyseqkern.rnn_pack(1, not reset_after, H, 0, gru_w, None)
        got = torch.ops.pyseqkern.rnn_forward(1, reset_after, H, 0, T_, B_, gx, None, None, None, p, *seq, False)[0]
        want = torch.ops.pyseqkern.rnn_forward(1, reset_after, H, 0, T_, B_, gx, None, None, None,
                                               torch.ops.pyseqkern.rnn_pack(1, reset_after, H, 0, gru_w, None),
                                               *seq, False)[0]
        assert_bitwise_equal(got, want)


@pytest.mark.parametrize("mode, proj, reset_after", [("lstm", 0, True), ("lstm", 5, True), ("gru", 0, True),
                                                      ("gru", 0, False), ("rnn_tanh", 0, True)])
def test_a_pack_without_pieces_serves_only_calls_below_split_rows(isa, mode, proj, reset_after):
    """rnn_pack(pieces=False) leaves out the amx level's float32 piece sections (pack_stamp.h), which no call
    below RnnSizes::split_rows reads: there forward and backward give the bits of a whole pack; a call of
    split_rows rows is refused by name (it would read unwritten memory), and so are rnn_pack_current and a
    cell plan (which serve calls of any batch). Where the layout has no pieces the flag changes nothing."""
    code, H, T_ = ops.MODES[mode], 19, 3
    G, K = ops.GATES[mode], proj or 19
    w_hh = randn((G * H, K), seed=1, scale=0.3)
    w_hr = randn((proj, H), seed=2, scale=0.3) if proj else None
    sizes = _C.rnn_sizes(code, reset_after, H, proj, 1, "float32")
    numel, split_rows = sizes[1], sizes[6]

    def pack(pieces):
        out = torch.full((numel,), float("nan"))
        _C.rnn_pack(code, reset_after, H, proj, capsule(w_hh), None if w_hr is None else capsule(w_hr),
                    capsule(out), num_threads=2, pieces=pieces)
        return out

    whole, narrow = pack(True), pack(False)
    if split_rows == 0:
        assert isa != "amx"
        assert_bitwise_equal(narrow, whole)
        return
    assert isa == "amx" and split_rows == 32
    assert not _C.rnn_pack_current(code, reset_after, H, proj, capsule(w_hh), _none(w_hr), capsule(narrow))
    assert _C.rnn_pack_current(code, reset_after, H, proj, capsule(w_hh), _none(w_hr), capsule(whole))

    def run(packed, B):
        xg = randn((T_ * B, G * H), seed=3)
        b_hn = randn((H,), seed=4) if mode == "gru" and reset_after else None
        seq = (None, None, None, B, 1, False)
        y, h_n, c_n, reserve = torch.ops.pyseqkern.rnn_forward(code, reset_after, H, proj, T_, B, xg, b_hn, None,
                                                               None, packed, *seq, True)
        dy = randn((T_ * B, K), seed=5)
        grads = torch.ops.pyseqkern.rnn_backward(code, reset_after, H, proj, T_, B, dy, None, None, None, reserve,
                                                 packed, *seq, False)
        return [y, h_n, reserve] + [g for g in grads if g is not None]

    for B in (1, 7, split_rows - 1):
        for a, b in zip(run(narrow, B), run(whole, B), strict=True):
            assert_bitwise_equal(a, b)
    why = "'packed' does not fit this call: it was packed without the piece sections"
    with pytest.raises(ValueError, match="rnn_forward: " + why):
        run(narrow, split_rows)
    run(whole, split_rows)
    if not proj:
        panel = torch.empty(_C.rnn_input_panel_numel(code, reset_after, H, 6, "float32"))
        _C.rnn_pack_input(code, reset_after, H, capsule(randn((G * H, 6), seed=6)), capsule(panel))
        with pytest.raises(ValueError, match="RnnCellStep: " + why):
            _C.RnnCellStep(code, reset_after, H, 6, "float32", capsule(narrow), capsule(panel), None, None)


def _none(t):
    return None if t is None else capsule(t)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_training_below_split_rows_packs_without_pieces_and_keeps_its_bits(monkeypatch, isa, kind):
    """Training calls (recording, plain eager) below split_rows rows pack without the piece sections
    (ops._pack_narrow): outputs and every gradient are the bits of a whole pack; from split_rows rows the
    pack is whole."""
    import pyseqkern.nn as pnn
    made = []
    real = ops._pack_narrow

    def spy(*args):
        got = real(*args)
        made.append(got is not None)
        return got

    for B in (5, 32):
        results = []
        for narrow in (True, False):
            monkeypatch.setattr(ops, "_pack_narrow", spy if narrow else lambda *a: None)
            torch.manual_seed(0)
            m = getattr(pnn, kind)(9, 21, num_layers=2, bidirectional=True)
            x = randn((6, B, 9), seed=7).requires_grad_()
            y, h = m(x)
            h = h[0] if isinstance(h, tuple) else h
            (y * randn(y.shape, seed=8)).sum().backward()
            results.append([y, h, x.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*results, strict=True):
            assert_bitwise_equal(a, b)
        assert made and all(made) == (B < 32 and isa == "amx")
        made.clear()


@pytest.mark.parametrize("kind, kw", [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}),
                                      ("LSTM", {"bidirectional": True, "num_layers": 2}), ("RNN", {})])
@pytest.mark.parametrize("packed", [False, True])
def test_training_forwards_project_as_inference_does(monkeypatch, kind, kw, packed):
    """A plain eager training forward of LSTM or GRU at rnn_paths._RECORDS_PROJECTING_FROM rows or more takes
    the path an inference call takes (the kernel projecting its input where rnn_paths._projection_path says
    so): its outputs are the inference call's bits, and its gradients torch.nn's within float32's error.
    Below that batch, and for RNN, torch's GEMM projects as before."""
    import pyseqkern.nn as pnn
    calls = []
    real = ops._forward_projecting

    def spy(*args, **kwargs):
        got = real(*args, **kwargs)
        calls.append((args[-1] if len(args) == 12 else kwargs.get("recording", False), got is not None))
        return got

    monkeypatch.setattr(rnn_autograd, "_forward_projecting", spy)
    for B in (31, 32, 45):
        torch.manual_seed(0)
        m = getattr(pnn, kind)(23, 40, **kw)
        theirs = getattr(torch.nn, kind)(23, 40, **{k: v for k, v in kw.items() if k != "reset_after"})
        theirs.load_state_dict(m.state_dict())
        lengths = torch.tensor([9] * (B // 2) + [6] * (B - B // 2))
        x = randn((9, B, 23), seed=3)

        def call(module, x):
            xi = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
            y, h = module(xi)
            y = torch.nn.utils.rnn.pad_packed_sequence(y)[0] if packed else y
            return y, (h[0] if isinstance(h, tuple) else h)

        with torch.no_grad():
            y_inf, h_inf = call(m, x)
        calls.clear()
        xg = x.clone().requires_grad_()
        y, h = call(m, xg)
        projecting = kind != "RNN" and B >= rnn_paths._RECORDS_PROJECTING_FROM
        assert bool(calls) == projecting and all(r for r, _ in calls)
        # (the first layer's input of 23 is thin: each step projects it at any batch; the second's of 80
        # takes the inference rule's path too, which at 45 rows is torch's GEMM where MKL serves float32
        # (rnn_paths._MKL_PROJECTS_LSTM_FROM), unless the kernel's projection before the steps runs on the
        # tile unit (rnn_paths._projects_on_tile); where oneDNN serves float32 (AMD) the kernel projects)
        on_tile = rnn_paths._projects_on_tile(ops._sizes(0, True, 40, 0, B, torch.float32), x.view(-1, 23))
        kernel = on_tile or pyseqkern._backend.FP32_GEMM != "mkl"
        assert [ok for _, ok in calls] == ([True] * len(calls) if B <= 32 or "num_layers" not in kw else
                                           [True, True, kernel, kernel])
        if projecting and all(ok for _, ok in calls):
            assert_bitwise_equal(y.detach(), y_inf)
            assert_bitwise_equal(h.detach(), h_inf)
        w = randn(y.shape, seed=4)
        (y * w).sum().backward()
        # The project's rule against torch.nn in float32 and float64; for reset_before, which torch.nn has
        # not, against the reference run in each dtype (one layer, one direction: the cases here).
        grads = {}
        for dt in (torch.float32, torch.float64):
            mod = copy.deepcopy(theirs).to(dt)
            xt = x.detach().to(dt, copy=True).requires_grad_()
            if kw.get("reset_after", True):
                yt, _ = call(mod, xt)
            else:  # (the reference on the module's own Parameters, whose .grad the loop below reads)
                xs = torch.nn.utils.rnn.pack_padded_sequence(xt, lengths, enforce_sorted=False) if packed else None
                yr, _, _ = ref.rnn_layer("gru", xs.data if packed else xt, xs.batch_sizes if packed else None,
                                         None, None, mod.weight_ih_l0, mod.weight_hh_l0, mod.bias_ih_l0,
                                         mod.bias_hh_l0, None, False, reset_after=False)
                yt = (torch.nn.utils.rnn.pad_packed_sequence(torch.nn.utils.rnn.PackedSequence(
                    yr, xs.batch_sizes, xs.sorted_indices, xs.unsorted_indices))[0] if packed else yr)
            (yt * w.to(dt)).sum().backward()
            grads[dt] = [yt.detach(), xt.grad] + [q.grad for q in mod.parameters()]
        names = ["y", "dx"] + [n for n, _ in m.named_parameters()]
        ours = [y.detach(), xg.grad] + [q.grad for q in m.parameters()]
        for n, a, b, c in zip(names, ours, grads[torch.float32], grads[torch.float64], strict=True):
            assert_within_torch_error(a, b, c, name=n)


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_gru_training_on_an_empty_batch(kind):
    """GRU with batch 0 in training raised "GRU with reset_after needs 'd_gates_h'" (its zero-row buffer
    arrives as None); torch.nn gives empty outputs and zero gradients (a fuzzer, stop 32)."""
    import pyseqkern.nn as pnn
    m = getattr(pnn, kind)(5, 6)
    x = torch.randn((4, 0, 5) if kind == "GRU" else (0, 5), requires_grad=True)
    out = m(x)
    y = out[0] if kind == "GRU" else out
    y.sum().backward()
    assert y.shape[-2] == 0 and x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())


def test_layer_op_names_an_unknown_mode():
    """rnn_layer_op with a mode code outside 0..3 raised a bare KeyError (a fuzzer, stop 32)."""
    x, h0 = randn((3, 2, 5), seed=1), randn((2, 4), seed=2)
    w_ih, w_hh = randn((4, 5), seed=3), randn((4, 4), seed=4)
    with pytest.raises(ValueError, match=r"'mode' must be 0 \(lstm\), 1 \(gru\), .* or 3 \(rnn_relu\), got 9"):
        torch.ops.pyseqkern.rnn_layer_op(9, True, x, None, h0, None, w_ih, w_hh, None, None, None, False)


@pytest.mark.parametrize("case, error, match", [
    ("proj_without_w_hr", ValueError, r"rnn_pack: 'w_hr' \[P, H\] is required where 'proj' > 0"),
    ("w_hr_int32", ValueError, r"'w_hr' must be \[P, H\] = \[2, 4\] of w_hh's dtype float32, got \[2, 4\] int32"),
    ("w_hr_uint8", TypeError, r"argument 'w_hr': unsupported dtype uint8 \(pyseqkern takes float32"),
    ("w_hr_shape", ValueError, r"'w_hr' must be \[P, H\] = \[2, 4\] of w_hh's dtype float32, got \[3, 4\] float32"),
    ("x_gates_0d", ValueError, r"rnn_forward: 'x_gates' must be 2-D \[rows, columns\], got shape \(\)"),
    ("reserve_1d", ValueError, r"rnn_backward: 'reserve' must be 2-D \[rows, columns\], got shape \(10,\)"),
    ("layer_input_size_0", ValueError, r"rnn_layer: 'x' must have at least one feature \(input_size >= 1\)"),
])
def test_unclear_errors_a_fuzzer_found_name_the_argument(case, error, match):
    """Errors the stop-32 fuzzer found unclear: a projection without w_hr ("expected an unconsumed DLPack
    capsule"), w_hr of another dtype or shape ("like 'w_hh'", or raw DLPack codes), a 0-d x_gates or 1-d reserve
    (a bare IndexError from the op), an input of no features (a reshape's RuntimeError)."""
    H = 4
    packed = torch.ops.pyseqkern.rnn_pack(0, True, H, 0, randn((4 * H, H), seed=1), None)
    w_hr = {"w_hr_int32": torch.ones(2, H, dtype=torch.int32), "w_hr_uint8": torch.ones(2, H, dtype=torch.uint8),
            "w_hr_shape": randn((3, H), seed=2)}.get(case)
    with pytest.raises(error, match=match):
        if case.startswith(("proj", "w_hr")):
            torch.ops.pyseqkern.rnn_pack(0, True, H, 2, randn((4 * H, 2), seed=3), w_hr)
        elif case == "x_gates_0d":
            torch.ops.pyseqkern.rnn_forward(0, True, H, 0, 1, 1, torch.tensor(1.0), None, None, None, packed, None,
                                            None, None, 1, 1, False, False)
        elif case == "reserve_1d":
            torch.ops.pyseqkern.rnn_backward(0, True, H, 0, 1, 1, randn((1, H), seed=4), None, None, None,
                                             randn((10,), seed=5), packed, None, None, None, 1, 1, False, False)
        else:
            ops.rnn_layer("lstm", torch.randn(3, 2, 0), None, None, None, torch.randn(4 * H, 0),
                          randn((4 * H, H), seed=6), None, None, None, False)


def test_sizes_that_would_overflow_or_run_away_are_refused():
    """Found by an auditing helper (stop 53): hidden = 2^62 with a zero-element w_hh made 4 x hidden wrap to
    0 in int64, passed the binding's checks and packed out of bounds (a segfault); a negative batch gave
    negative sizes; a hand-made batch_sizes of [10^9] on 8 rows had the op list a billion lengths (minutes,
    gigabytes) before it checked their sum. Each is now refused at once, naming what is wrong."""
    with pytest.raises(ValueError, match=r"'hidden' and 'proj' must be at most 2\^24, got 4611686018427387904"):
        torch.ops.pyseqkern.rnn_pack(0, True, 2**62, 0, torch.empty(0, 2**62), None)
    with pytest.raises(ValueError, match=r"'batch' must be in \[0, 2\^31\], got -5"):
        _C.rnn_sizes(0, True, 4, 0, -5, "float32")
    x, w_ih, w_hh = randn((8, 4), seed=1), randn((20, 4), seed=2), randn((20, 5), seed=3)
    for bs in ([10**9], [10**9, 10**9 - 1]):
        with pytest.raises(RuntimeError, match=r"'batch_sizes' must be >= 0, non-increasing and sum to x.shape\[0\] = 8"):
            ops.rnn_layer("lstm", x, torch.tensor(bs), None, None, w_ih, w_hh, None, None, None, False)
    packed = torch.nn.utils.rnn.PackedSequence(x, torch.tensor([10**9]), None, None)
    with pytest.raises(RuntimeError, match=r"sum to x.shape\[0\] = 8"):
        pyseqkern.nn.LSTM(4, 5)(packed)
    # (the same batch sizes, now fitting the rows, are still listed and run)
    y, _, _ = ops.rnn_layer("lstm", x, torch.tensor([5, 3]), None, None, w_ih, w_hh, None, None, None, False)
    assert y.shape == (8, 5)


def test_cell_op_errors_name_the_cell_and_its_arguments():
    """rnn_cell checks and runs a step as a layer of one step; its errors named rnn_layer, the unsqueezed
    shape and h0 (an auditing helper, stop 53). They name rnn_cell, the caller's shape, h and c."""
    x, h, c = randn((4, 3), seed=1), randn((4, 5), seed=2), randn((4, 5), seed=3)
    w_ih, w_hh = randn((20, 3), seed=4), randn((20, 5), seed=5)
    with pytest.raises(ValueError, match=r"^pyseqkern.rnn_cell: 'x' must be \[B, I\], got \(1, 4, 3\)$"):
        ops.rnn_cell("lstm", x.unsqueeze(0), h, c, w_ih, w_hh, None, None)
    with pytest.raises(ValueError, match=r"^pyseqkern.rnn_cell: 'h' must have shape \(4, 5\), got \(2, 5\)$"):
        ops.rnn_cell("lstm", x, h[:2], c, w_ih, w_hh, None, None)
    with pytest.raises(ValueError, match=r"^pyseqkern.rnn_cell: 'c' must have shape \(4, 5\), got \(3, 5\)$"):
        ops.rnn_cell("lstm", x, h, c[:3], w_ih, w_hh, None, None)
    with pytest.raises(ValueError, match=r"^pyseqkern.rnn_cell: 'c' must have shape"):  # (recorded: the op path)
        ops.rnn_cell("lstm", x, h.requires_grad_(), c[:3], w_ih, w_hh, None, None)


def test_sizes_memo_stays_bounded(monkeypatch):
    """ops._sizes memoizes the kernels' sizes per (shape, batch, dtype, level): a server seeing every batch
    size must not grow it for good, and an entry made after a clear is the same as before."""
    monkeypatch.setattr(ops, "_SIZES", {})
    monkeypatch.setattr(ops, "_SIZES_MAX", 3)
    first = [ops._sizes(0, True, 11, 0, b, torch.float32) for b in range(1, 11)]
    assert len(ops._SIZES) <= 3
    assert [ops._sizes(0, True, 11, 0, b, torch.float32) for b in range(1, 11)] == first


def test_bfloat16_gemms_go_through_float32_where_onednn_has_none(monkeypatch):
    """On CPUs without AVX-512 oneDNN has no bfloat16 inner product (it raises) and torch.mm in
    bfloat16 runs a plain loop (8x slower than float32): the projection and the backward's GEMMs widen
    to float32 and round the result once, and a bfloat16 layer trains by the 2x-torch rule all the
    same (checked against torch.nn in float32 and the float64 reference)."""
    monkeypatch.setattr(rnn_gemms, "_ONEDNN_BF16", False)
    monkeypatch.setattr(rnn_gemms, "_BF16_BY_FLOAT32", True)
    calls = []

    def spy(real):
        def gemm(a, b, *args, **kwargs):
            calls.append(b.dtype)
            return real(a, b, *args, **kwargs)
        return gemm
    monkeypatch.setattr(torch, "mm", spy(torch.mm))
    monkeypatch.setattr(torch, "addmm", spy(torch.addmm))
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy(torch.Tensor.__matmul__))
    a, b = randn((37, 19), seed=1).bfloat16(), randn((23, 19), seed=2).bfloat16()
    assert torch.equal(rnn_gemms._mm(a, b), (a.float() @ b.float().t()).bfloat16())
    x, w, bias = randn((40, 19), seed=3).bfloat16(), randn((28, 19), seed=4).bfloat16(), randn((28,), seed=5).bfloat16()
    got, extra = rnn_gemms._input_projection(x, w, bias)
    assert extra is None and got.dtype == torch.bfloat16
    assert torch.equal(got, torch.addmm(bias.float(), x.float(), w.float().t()).bfloat16())
    calls.clear()
    from pyseqkern import nn as pnn
    from helpers import TOLERANCES
    theirs = torch.nn.LSTM(19, 7)
    ours = pnn.LSTM(19, 7).bfloat16()
    ours.load_state_dict(theirs.state_dict())
    xs = randn((9, 5, 19), seed=6).bfloat16().requires_grad_()
    out, (h, c) = ours(xs)
    (out.float().sum() + h.float().sum()).backward()
    assert torch.bfloat16 not in calls, "a bfloat16 GEMM went to torch.mm"
    theirs64 = torch.nn.LSTM(19, 7).double()
    theirs64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x64 = xs.detach().double().requires_grad_()
    out64, (h64, _) = theirs64(x64)
    (out64.sum() + h64.sum()).backward()
    assert_close_to_ref(out, out64.detach(), "output")
    rtol, atol = TOLERANCES[torch.bfloat16]
    # (gradients sum many products, whose entries can cancel: the bound scales with the largest entry)
    for name, got, want in [("input", xs.grad, x64.grad)] + [
            (n, p.grad, q.grad) for (n, p), q in zip(ours.named_parameters(), theirs64.parameters())]:
        err = float((got.double() - want).abs().max())
        assert err <= atol + rtol * float(want.abs().max()), f"grad {name}: {err}"


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_amx_tiles_are_configured_again_after_torchs_own_tile_kernels(mode):
    """On the amx level a bfloat16 backward runs its recurrent product on the tile unit; torch's bfloat16
    GEMMs (oneDNN) configure and release the tiles on the same threads. The backward released none and
    kept its note of the configuration, so the next forward took the tiles for configured and died of
    SIGILL (first run on an AMX machine at stop 41: 11 tests crashed their workers). In a child process,
    so that a crash reads as one. Elsewhere the level is absent and the test says so."""
    if "amx" not in SUPPORTED:
        pytest.skip("no amx level here (no AMX tile unit, no OS tile permission, or not compiled in)")
    script = f"""
import torch, pyseqkern
from pyseqkern import nn as pnn
pyseqkern.set_cpu_isa("amx", all_threads=True)
torch.manual_seed(0)
for B, H in [(6, 11), (1, 32), (3, 16), (8, 64)]:  # (the crash needed the forward's tile rows to match)
    m = getattr(pnn, "{mode.upper()}")(H, H).to(torch.bfloat16)
    x = torch.randn(9, B, H, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3):
        m(x)[0].float().sum().backward()  # the recurrent gradient product on the tile unit
        a = torch.randn(96, 96, dtype=torch.bfloat16)
        (a @ a).sum().item()  # torch's own tile kernels on these threads
        with torch.no_grad():
            m(x)
print("DONE", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())
    assert done.returncode == 0 and "DONE" in done.stdout, (f"exit {done.returncode} (-4: SIGILL)", done.stderr[-2000:])
