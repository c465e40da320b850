"""torch.autocast for the recurrent ops (rnn_layer, rnn_cell) and the modules built on them.

Inside an autocast region a layer or a cell step is one op of autocast's lower-precision list, as
torch's own fused RNNs are (cuDNN's on CUDA, oneDNN's LSTM on the CPU): its floating inputs, states
and parameters (float64 excepted, as autocast leaves it) are cast to the region's dtype for the
tensor's device, the kernels run in that dtype (bfloat16 or float16 storage, float32 math), and the
outputs come in it. Inside the op autocast is off, so its own torch GEMMs keep the dtypes they were
written for, and so is it in the backward: a backward called inside a region had the weight-gradient
GEMMs of a float32 layer silently cast to bfloat16 (1.7e-3 relative error against torch.nn's).

torch.nn's CPU layers are not uniform here: its LSTM and RNN return the region's dtype, but its GRU,
its cells and its packed LSTM are compositions of GEMMs that autocast casts one by one, and return
float32 (the math having been done in bfloat16 all the same). Ours return the region's dtype
everywhere. See docs/DESIGN.md, "Autocast".

In inference the parameters' casts are cached like the packed weights (same keys and rules:
ops/param_cache.py), so the packed weights, input panels and folded biases made from a cast are
cached too; a fresh cast every call would repack every call. Recorded casts (training) are made each
call, in the graph, as autocast's own are.
"""
from __future__ import annotations

import contextlib

import torch

from .param_cache import anchored, cached

any_enabled = torch._C._is_any_autocast_enabled  # (~60 ns; Dynamo traces it)
_functorch_active = torch._C._are_functorch_transforms_active
_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_CAST_CACHE: dict = anchored({})


def target(x: torch.Tensor):
    """The dtype autocast gives an op whose input is x, or None where no region covers x's device."""
    if not any_enabled():
        return None
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def effective(dtype: torch.dtype, to) -> torch.dtype:
    """What the region makes of a tensor of this dtype (to: target(), None outside a region)."""
    return to if to is not None and dtype in _ELIGIBLE else dtype


def off(device_type: str):
    """Autocast disabled inside (torch._C._DisableAutocast costs 1 us where torch.autocast(enabled=False)
    costs 6; Dynamo traces only the latter)."""
    if torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    if not any_enabled():
        return contextlib.nullcontext()
    return torch._C._DisableAutocast()


def _kept(t, to, device_type: str) -> bool:
    """Autocast leaves t as it is: None, already the region's dtype, not floating or float64, or on
    another device (for the op's own checks to judge)."""
    return t is None or t.dtype == to or t.dtype not in _ELIGIBLE or t.device.type != device_type


def cast(t, to, device_type: str):
    """t in the region's dtype, where autocast would cast it."""
    return t if _kept(t, to, device_type) else t.to(to)


def cast_args(to, device_type: str, data, params):
    """An op's tensors in the region's dtype: `data` (inputs, states) by cast(), `params` by
    cast_params(). Returns the two tuples."""
    return tuple(cast(t, to, device_type) for t in data), cast_params(params, to, device_type)


def cast_params(params, to, device_type: str):
    """cast() of a layer's parameters (a tuple, None where absent, params[0] present): cached together,
    one lookup per call, where no gradient is recorded for any of them (inference)."""
    if all(_kept(t, to, device_type) for t in params):
        return params
    if torch.compiler.is_compiling() or _functorch_active() or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in params)):
        return tuple(cast(t, to, device_type) for t in params)  # (transforms' wrappers have no storage)

    def make():  # (made as normal tensors by cached: the cache keys on the casts' versions)
        return tuple(None if t is None else cast(t.detach(), to, device_type) for t in params)
    return cached(_CAST_CACHE, params[0],
                  lambda: (to, *((None,) if t is None else (t.data_ptr(), t._version, t.stride(), t.dtype)
                                 for t in params)),
                  make, *params)
