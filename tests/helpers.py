"""Shared test helpers: oracle comparisons, input makers, device parametrization.

Tolerances are written once, here, per dtype. For long recurrences and attention use
assert_within_torch_error: our error against the float64 reference must be at most 2x the error of
the same-dtype PyTorch computation."""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

# (rtol, atol) against a float64 reference, per dtype of the tensor under test.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
# The relative rule's factor: err(ours, ref64) <= TORCH_ERROR_FACTOR * err(torch same dtype, ref64).
TORCH_ERROR_FACTOR = 2.0
# Below this many ulps of ||ref64|| an error is the rounding of a few operations, which no
# implementation controls: on tiny tensors torch's result is sometimes exact by luck (a one-step,
# one-unit GRU: torch 0.9 ulp, ours 3.9 ulp), and twice "exact" would demand luck.
TORCH_ERROR_FLOOR_ULPS = 4.0


# CPU levels whose bfloat16 kernels take bf16 pair sections (vdpbf16ps on avx512bf16, AMX tiles on amx).
BF16_DOT_LEVELS = ("avx512bf16", "amx")


def runnable_levels() -> list:
    """CPU kernel levels this CPU runs and this build has (amx needs a compiler with AMX intrinsics)."""
    import pyseqkern

    cpu = pyseqkern.backend_info()["cpu"]
    return [level for level in cpu["isa_supported"] if level in cpu["isa_compiled"]]


@functools.lru_cache(maxsize=None)
def cuda_usable() -> tuple[bool, str]:
    import pyseqkern

    info = pyseqkern.backend_info()["cuda"]
    return bool(info["usable"]), info["reason"] or ""


def devices() -> list:
    """Parametrize values for `device`: cpu always, cuda with the `cuda` marker (skips cleanly)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max relative error) of `actual` against `expected`, computed in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - e).abs()
    abs_err = diff.max().item()
    rel_err = (diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    return abs_err, rel_err


def assert_close_to_ref(actual: torch.Tensor, ref64: torch.Tensor, name: str = "output", dtype=None) -> None:
    """Elementwise |actual - ref| <= atol + rtol |ref| with the tolerances of `dtype` (default: actual's).
    NaN or Inf where the reference is finite always fails."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}"
    a, e = actual.detach().double().cpu(), ref64.detach().double().cpu()
    bad_nonfinite = ~torch.isfinite(a) & torch.isfinite(e)
    assert not bad_nonfinite.any(), f"{name}: {int(bad_nonfinite.sum())} non-finite values where the reference is finite"
    ok = (a - e).abs() <= atol + rtol * e.abs()
    abs_err, rel_err = errors(a, e)
    assert bool(ok.all()), (
        f"{name} ({dtype}): {int((~ok).sum())}/{ok.numel()} elements out of tolerance "
        f"(rtol={rtol}, atol={atol}); max abs err {abs_err:.3e}, max rel err {rel_err:.3e}"
    )


def norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 in float64: the error measure of the relative rule. A norm, not the
    largest element: on small tensors the largest element error is mostly chance, which of two
    same-precision computations of one sum happened to round worse at one place."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return torch.linalg.vector_norm(a - e).item() if a.numel() else 0.0


def assert_within_torch_error(ours: torch.Tensor, theirs: torch.Tensor, ref64: torch.Tensor, name: str = "output",
                              factor: float = TORCH_ERROR_FACTOR, ours_ref64: torch.Tensor = None) -> None:
    """The relative rule: ||ours - ref64|| <= factor * ||theirs - ref64||, where `theirs` is the same
    computation done by PyTorch in the same dtype as `ours`. The floor TORCH_ERROR_FLOOR_ULPS ulps of
    ||ref64|| keeps the rule meaningful when torch happens to be exact. `ours_ref64`: ours' own float64
    reference where the exact function has kinks each side may take differently within rounding (relu:
    tests/test_rnn_autocast.py, exact_on_our_relu_kinks); torch's error is measured against ref64."""
    ours_ref64 = ref64 if ours_ref64 is None else ours_ref64
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    bad = ~torch.isfinite(ours.detach().cpu()) & torch.isfinite(ours_ref64.detach().cpu())
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    ours_err, theirs_err = norm_error(ours, ours_ref64), norm_error(theirs, ref64)
    ref_norm = torch.linalg.vector_norm(ref64.detach().double().cpu()).item() if ref64.numel() else 0.0
    floor = TORCH_ERROR_FLOOR_ULPS * torch.finfo(ours.dtype).eps * ref_norm
    max_abs, _ = errors(ours, ref64)
    assert ours_err <= factor * max(theirs_err, floor), (
        f"{name} ({ours.dtype}): error norm vs float64 reference {ours_err:.3e} exceeds {factor}x torch's "
        f"{theirs_err:.3e} (floor {floor:.3e}); max abs err {max_abs:.3e}"
    )


def ready_for_backward(module: torch.nn.Module):
    """A context for running torch.nn's recurrent `module` (a baseline) forward then backward on any
    device. cuDNN refuses the backward of an eval-mode forward ("cudnn RNN backward can only be called
    in training mode"), so on CUDA an eval module without dropout is put in train mode (the same
    function: cuDNN stays the baseline), and one with dropout runs with cuDNN off (torch's own layers)."""
    import contextlib
    on_cuda = any(p.is_cuda for p in module.parameters())
    if not on_cuda or module.training:
        return contextlib.nullcontext()
    if getattr(module, "dropout", 0) == 0:
        module.train()
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=False)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal values (never zeros), made on the CPU in float64 then cast, so every device and
    dtype sees the same numbers."""
    g = make_generator(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale
    return x.to(dtype=dtype, device=device)


def strided(shape, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A non-contiguous view with the given shape and seeded values: every dimension is sliced with step
    2 out of a buffer twice as large, starting one element in (so the storage offset is non-zero too)."""
    shape = tuple(shape)
    big = randn([2 * s + 1 for s in shape] if shape else [2], dtype=dtype, device=device, seed=seed, scale=scale)
    if not shape:
        return big[1]
    view = big[tuple(slice(1, 1 + 2 * s, 2) for s in shape)]
    assert view.shape == shape
    return view


def poisoned(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer filled with NaN, so unwritten elements show up in the comparison."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of `t`, flattened, as integers of the same width."""
    return t.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, name: str = "output") -> None:
    """Determinism: two runs on the same inputs give the same bits (NaN payloads included)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: runs differ in shape or dtype"
    assert torch.equal(bits(a), bits(b)), f"{name}: two runs on the same inputs are not bitwise equal"


def assert_matches(actual, ref64, name="output"):
    """float64: elementwise, helpers.assert_close_to_ref. float32: max|actual - ref64| <= atol + rtol *
    max|ref64| with the float32 (rtol, atol). Elementwise float32 bounds do not hold for recurrent
    gradients, which are long sums with cancellation: torch.nn's own float32 LSTM/GRU/RNN misses them
    against its float64 result in 15 of the 60 configurations of test_sequence_module_matches_torch
    (by up to 27x), while its normwise error stays under half the bound."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}"
    if actual.dtype == torch.float64:
        assert_close_to_ref(actual, ref64, name)
        return
    rtol, atol = TOLERANCES[actual.dtype]
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    abs_err, _ = errors(actual, ref64)
    bound = atol + rtol * (ref64.detach().abs().max().item() if ref64.numel() else 0.0)
    assert abs_err <= bound, f"{name} ({actual.dtype}): max abs err {abs_err:.3e} > {bound:.3e} (rtol={rtol} x max|ref| + atol={atol})"


def weighted_sum(tensors, seed=10):
    return sum((t * randn(t.shape, t.dtype, device=t.device, seed=seed + i)).sum() for i, t in enumerate(tensors))


@contextlib.contextmanager
def stack_dropout(masks=None):
    """The dropout between layers of pyseqkern's layer stack (nn/_stack.py), recorded or replayed, for an oracle
    where torch.nn on the CPU cannot draw our masks (a CUDA run's generator is another).

    Without `masks`: the real F.dropout runs, and the block's value, a list, gets each call's mask as F.dropout
    scales it (0 or 1/(1-p), float64, CPU). The mask is drawn again from the same generator state on a tensor
    of ones: dropout's random numbers depend on the tensor's shape and layout, not its values (on CUDA the
    fused kernel's vector width also follows the pointer's alignment: a misaligned input would draw another
    pattern than the fresh tensor of ones), so the kept pattern is checked against the real output wherever
    the input is not 0, and a mismatch fails loudly. Not yet run on a GPU. With `masks` (such a list): each call
    multiplies by the next mask instead, in float32 (float64 for float64 tensors) and rounds to the input's
    dtype, as torch's fused kernels do, and every mask must be used."""
    import torch.nn.functional as F
    import types
    from pyseqkern.nn import _stack
    record = masks is None
    recorded, replay = [], iter(masks or ())

    def dropout(x, p, training=True):
        if not record:
            m = next(replay)
            assert m.shape == x.shape, f"replayed mask {tuple(m.shape)} for a dropout input {tuple(x.shape)}"
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            return (x.to(acc) * m.to(device=x.device, dtype=acc)).to(x.dtype)
        on_cuda = x.device.type == "cuda"
        get = (lambda: torch.cuda.get_rng_state(x.device)) if on_cuda else torch.get_rng_state
        put = (lambda s: torch.cuda.set_rng_state(s, x.device)) if on_cuda else torch.set_rng_state
        before = get()
        out = F.dropout(x, p, training=training)
        after = get()
        put(before)
        scale = F.dropout(torch.ones_like(x), p, training=training)
        put(after)
        nonzero = x.detach() != 0
        assert torch.equal((scale == 0) & nonzero, (out.detach() == 0) & nonzero), \
            "dropout drew another mask for a tensor of ones: the recorded masks would not be the run's"
        recorded.append(((scale != 0).double() / (1 - p)).cpu())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_stack, "F", types.SimpleNamespace(dropout=dropout))
        yield recorded if record else None
    assert record or next(replay, None) is None, "fewer dropout calls than recorded masks"


def torch_layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, reset_after=True):
    """One layer and direction by torch.nn, with ops.rnn_layer's arguments and results: a stand-in for it in a
    baseline run through our layer stack (torch's same-dtype kernels, cuDNN on CUDA, between our recorded
    dropout masks). A one-layer bidirectional torch.nn module whose two directions both hold these weights
    gives the `reverse` half (torch's own reversal of each packed sequence within its length)."""
    assert reset_after, "torch.nn has no GRU with reset_after=False"
    import warnings
    from torch.nn.utils.rnn import PackedSequence
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(mode, torch.nn.RNN)
    kw = {"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}
    if w_hr is not None:
        kw["proj_size"] = w_hr.shape[0]
    hidden = w_hh.shape[0] // {"lstm": 4, "gru": 3}.get(mode, 1)
    module = cls(w_ih.shape[1], hidden, bias=b_ih is not None, bidirectional=True, device="meta", **kw)
    weights = {}
    for sfx in ("", "_reverse"):
        for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh),
                        ("weight_hr", w_hr)):
            if w is not None:
                weights[f"{name}_l0{sfx}"] = w
    hx = None
    if h0 is not None:  # (our stack passes both states or neither)
        both = lambda s: torch.stack([torch.zeros_like(s), s] if reverse else [s, torch.zeros_like(s)])  # noqa: E731
        hx = (both(h0), both(c0)) if mode == "lstm" else both(h0)
    hout = hidden if w_hr is None else w_hr.shape[0]
    inp = x if batch_sizes is None else PackedSequence(x, batch_sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ("weights are not part of single contiguous chunk of memory")
        out, state = torch.func.functional_call(module, weights, (inp, hx))
    y = out if batch_sizes is None else out.data
    y = y[..., hout:] if reverse else y[..., :hout]
    d = 1 if reverse else 0
    if mode == "lstm":
        return y, state[0][d], state[1][d]
    return y, state[d], None
