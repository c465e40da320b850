"""The STREAM triad as an op: out = a + alpha * b.

It exists to measure memory bandwidth and to exercise the whole path every op takes (validation,
torch.library registration, fake impl, autograd, DLPack handoff, stream, CPU/CUDA kernels). Dtypes:
float32, float64. Any layout in; contiguous out."""
from __future__ import annotations

import torch

from .. import _backend
from .._handoff import capsule, num_threads, stream_of
from ..reference import probe as reference
from ._library import LIB

_C = _backend._C
_DTYPES = (torch.float32, torch.float64)

LIB.define("triad(Tensor a, Tensor b, float alpha) -> Tensor")


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pyseqkern.triad: '{name}' must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"pyseqkern.triad: '{name}' must be float32 or float64, got {t.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(f"pyseqkern.triad: 'b' has dtype {b.dtype} but 'a' has {a.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"pyseqkern.triad: 'b' has shape {tuple(b.shape)} but 'a' has {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"pyseqkern.triad: 'b' is on {b.device} but 'a' is on {a.device}")


def _triad_kernel(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    if _backend.use_reference("triad", a.device):
        return reference.triad(a, b, alpha).contiguous()
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    _C.triad(capsule(out), capsule(a), capsule(b), float(alpha), num_threads(), stream_of(out))
    return out


LIB.impl("triad", _triad_kernel, "CPU")
LIB.impl("triad", _triad_kernel, "CUDA")


@torch.library.register_fake("pyseqkern::triad")
def _triad_fake(a, b, alpha):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _triad_setup(ctx, inputs, output):
    ctx.alpha = inputs[2]


def _triad_backward(ctx, grad):
    return grad, grad * ctx.alpha, None


torch.library.register_autograd("pyseqkern::triad", _triad_backward, setup_context=_triad_setup)


def triad(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """a + alpha * b through pyseqkern's kernels (float32/float64, CPU or CUDA)."""
    _check(a, b)
    return torch.ops.pyseqkern.triad(a, b, float(alpha))
