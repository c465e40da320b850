"""Values made from parameters (packed weights, input panels, folded biases, casts, cell plans), cached
per parameter and served while the parameter is unchanged.

Contract of an entry: a cache is a dict registered with `anchored`, keyed by id(anchor) (one of the
tensors the value is made from), holding (key, value, pinned, sample). `key` is the caller's description
of every source (storage address, version counter, strides, dtype, ISA level...); `pinned` keeps each
source's memory alive at the address the key names (pinned()); `sample` is a sample of the sources' CPU
memory (fingerprint()). An entry is served (hit()) only where all three still hold, and dropped when
its anchor dies (one weakref finalizer per anchor drops its entries from every registered cache).

Why each part: the version counter misses writes through `.data` (p.data.copy_(...), a soft target
update, gradcheck's perturbations): the sample sees whole-tensor writes. A freed storage's address is
often handed to the next tensor at version 0 (`module.bfloat16(); module.float()`): the pin forbids it.
Nothing is cached or served where no counter can be trusted: while a module is managed by one of
torch.distributed's composable APIs (sharded()), for CPU tensors in shared memory (another process
writes them), or while torch swaps module parameters on conversion (swap_tensors refuses a tensor with
a weakref). Inference tensors have no version counter: key functions raise NO_VERSION and the value is
made afresh, unstored.
"""
from __future__ import annotations

import threading
import weakref

import torch

from .. import _backend
from .rnn_scratch import normal

_C = _backend._C

# Every registered cache (anchored()), and per anchor's id the one finalizer that drops its entries from
# all of them when it dies.
ANCHORED: list = []
_WATCHED: dict = {}
LOCK = threading.RLock()  # (reentrant: a finalizer may run _drop inside a locked section)
MISS = object()
# Reading an inference tensor's version counter raises this (torch.inference_mode: a module built there,
# a weight_norm weight or a float16 module's float32 casts computed there): such calls are served uncached.
NO_VERSION = RuntimeError


def anchored(cache: dict) -> dict:
    """Registers a cache of entries anchored on parameters (dropped with them, cleared by clear())."""
    ANCHORED.append(cache)
    return cache


def holds_entries() -> bool:
    """Whether any registered cache holds an entry (ops/rnn_versions.py notes versions only then)."""
    return any(ANCHORED)


_swap_on_conversion = torch.__future__.get_swap_module_params_on_conversion
# Nothing is cached, and no entry served, while a module is managed by one of torch.distributed's
# composable APIs (FSDP2's fully_shard, replicate): FSDP2 gathers each forward's weights into the same
# Parameter, often at the same address, with its version counter preserved on purpose, so evaluation
# between FSDP2 training steps ran stale weights in 2-4 of 10 passes (outputs off by up to 2.6e-2;
# found by an interop sweep, stop 18). Training calls never use the caches. (Not the whole of
# torch.distributed: uncached, an LSTMCell step at B=1 took 8.9x the time, an LSTM at B=1 1.7x, and
# DDP writes parameters through autograd and the optimizer, which bump the counters.) The registry is
# private to torch: if it moves, any initialized process group turns the caches off instead.
try:
    from torch.distributed import _composable_state as _composable
    _composable._module_state_mapping.data  # noqa: B018  (still there?)

    def sharded() -> bool:  # (the WeakKeyDictionary's own dict: 40 ns against len()'s 115, on every call)
        return bool(_composable._module_state_mapping.data)
except (ImportError, AttributeError):
    sharded = torch.distributed.is_initialized if torch.distributed.is_available() else (lambda: False)


def pinned(*sources):
    """What a cache entry keeps besides its result: (alias, address) of each tensor its key names by
    data_ptr, so that memory cannot be freed and handed to a new tensor at the same address while the
    entry lives. Without them `module.bfloat16(); module.float()` (torch's _apply assigns `param.data`:
    same Parameter, version 0 again) often got the old address back, and inference ran the weights
    packed before. The address is checked on every hit (hit()): share_memory_() moves a storage's memory,
    alias and all, and frees the old address."""
    return tuple((t.detach(), t.data_ptr()) for t in sources if t is not None)


def fingerprint(*sources):
    """A sample of the CPU memory of the tensors an entry is made from (csrc/fingerprint.h), or None where
    none is on the CPU. The version counter misses writes through `.data`: inference after
    `target.p.data.copy_(tau * p.data + (1 - tau) * target.p.data)` (a soft target update) ran the
    weights packed before it. A hit (hit(), rnn_thin.cell_plan) compares the sample: 64 words per tensor,
    ~0.1 us for an LSTM's four parameters. A matrix whose rows are contiguous goes as rows (sampled on its
    diagonal: whole columns seen, not only contiguous slices), anything else as the flat extent of its
    memory. CUDA memory is not sampled (a read would cost a sync)."""
    spans = []
    for t in sources:
        if t is not None and t.is_cpu and t.numel():
            size = t.element_size()
            if t.dim() == 2 and t.shape[0] > 1 and t.stride(1) == 1 and t.shape[1] * size >= 8:
                spans.append((t.data_ptr(), t.shape[0], t.stride(0) * size, t.shape[1] * size))
            else:
                extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
                spans.append((t.data_ptr(), 1, 0, extent * size))
    return _C.Fingerprint(spans) if spans else None


def hit(entry, key):
    """entry's value if its key is key, its pinned memory still where the key says and still holding
    the sampled values (fingerprint()), else MISS."""
    if entry is None or entry[0] != key:
        return MISS
    for alias, address in entry[2]:
        if alias.data_ptr() != address:
            return MISS
    if entry[3] is not None and not entry[3].matches():
        return MISS
    return entry[1]


def put(cache, anchor, key, make, *sources):
    """Stores make() for anchor (its entry goes when anchor dies) and returns it. key None: not stored.
    The sample of the sources' memory is taken before make() reads them: taken after, a `.data` write
    made while make() ran (another thread publishing weights as the module served) was in the sample
    but not in the value, and every later call matched the sample and served the stale value (found by
    a concurrency fuzzer, stop 27: 11 of 100 trials). Entries go in and out under LOCK: a
    clear() or forget() in another thread between the check for a finalizer and the store left
    entries no finalizer would drop, and two first calls at once two finalizers on one parameter.
    Nothing is stored while torch swaps module parameters on conversion (torch.__future__'s opt-in
    swap_module_params_on_conversion): torch.utils.swap_tensors refuses a tensor with a weakref, and
    the entry's finalizer is one, so `.double()` after one inference call failed. Nor for CPU tensors
    in shared memory (share_memory_(), Hogwild training): another process writes them in place, and no
    version counter here sees it. (CUDA tensors report is_shared() always; they are cached.)"""
    if (key is None or _swap_on_conversion() or sharded()
            or any(t is not None and t.is_cpu and t.is_shared() for t in sources)):
        return make()
    sample = fingerprint(*sources)
    value = make()
    with LOCK:
        if id(anchor) not in _WATCHED:
            _WATCHED[id(anchor)] = weakref.finalize(anchor, _drop, id(anchor))
        cache[id(anchor)] = (key, value, pinned(*sources), sample)
    return value


def cached(cache, anchor, key_of, make, *sources):
    """The cached value for anchor where key_of() still describes it, else make()'s, stored (put(); made
    as normal tensors: rnn_scratch.normal). key_of raising NO_VERSION (an inference tensor) means: made
    afresh, not stored."""
    if sharded():
        return make()
    try:
        key = key_of()
    except NO_VERSION:
        key = None
    got = hit(cache.get(id(anchor)), key)
    return got if got is not MISS else put(cache, anchor, key, lambda: normal(make), *sources)


def _drop(anchor_id):
    with LOCK:
        _WATCHED.pop(anchor_id, None)
        for cache in ANCHORED:
            cache.pop(anchor_id, None)


def forget(tensors) -> None:
    """Drops the cache entries anchored on these tensors and detaches their finalizers (weak references):
    torch.utils.swap_tensors refuses a tensor with one. The modules call it before torch swaps their
    parameters (swap_module_params_on_conversion); the next inference call packs afresh."""
    with LOCK:
        for t in tensors:
            finalizer = _WATCHED.get(id(t))
            if finalizer is not None and finalizer.peek() is not None and finalizer.peek()[0] is t:
                finalizer.detach()
                _drop(id(t))


def clear() -> None:
    """Every entry of every registered cache, with its finalizer (ops.rnn.empty_cache)."""
    with LOCK:
        forget([f.peek()[0] for f in list(_WATCHED.values()) if f.peek() is not None])
        for cache in ANCHORED:  # (and any entry whose finalizer is gone)
            cache.clear()
