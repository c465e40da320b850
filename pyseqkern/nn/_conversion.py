"""Mixin for the drop-in modules: torch's parameter swaps find no weak reference of ours on them."""
from __future__ import annotations

# Looked up at call time (attribute access), as the other nn files do.
from ..ops import param_cache as _param_cache

_swap_on_conversion = _param_cache._swap_on_conversion


class SwapsParameters:
    """With torch.__future__.set_swap_module_params_on_conversion(True), `.to()`, `.double()`, `.cuda()`
    and load_state_dict swap each parameter with torch.utils.swap_tensors, which refuses a tensor that
    has a weak reference: the inference caches hold one per parameter they are keyed on (the finalizer
    that drops the entry when the parameter dies), so after one inference call `.double()` raised
    "Couldn't swap". The entries of this module's parameters are dropped first (ops.param_cache.forget), as
    torch.nn.RNNBase._apply drops its own `_flat_weight_refs`. Without the flag torch assigns `.data`
    and nothing is dropped (a model moved `.to(device)` every step keeps its packed weights)."""

    def _apply(self, fn, recurse=True):
        if _swap_on_conversion():
            _param_cache.forget(self._parameters.values())
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        if _swap_on_conversion():
            _param_cache.forget(self._parameters.values())
        return super()._load_from_state_dict(*args, **kwargs)
