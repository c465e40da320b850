"""Shared test helpers: oracle comparisons, input makers, device parametrization.

Tolerances are written once, here, per dtype. For long recurrences and attention use
assert_within_torch_error: our error against the float64 reference must be at most 2x the error of
the same-dtype PyTorch computation."""
from __future__ import annotations

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
    bound = atol + rtol * ref64.detach().abs().max().item()
    assert abs_err <= bound, f"{name} ({actual.dtype}): max abs err {abs_err:.3e} > {bound:.3e} (rtol={rtol} x max|ref| + atol={atol})"


def weighted_sum(tensors, seed=10):
    return sum((t * randn(t.shape, t.dtype, device=t.device, seed=seed + i)).sum() for i, t in enumerate(tensors))
