"""The buffers the recurrent ops keep between calls, per thread: the CPU backward's temporaries, the
inference forward's, torch's input projection's, the training forwards' reserves and the cell
workspace. Allocated fresh every call, buffers this large came back from the OS as new pages (glibc maps
or trims allocations above its thresholds), and the page faults cost 10-20% of a call; kept, they cost
nothing after the first. pyseqkern.empty_cache() releases them (release())."""
from __future__ import annotations

import threading

import torch


def normal(make):
    """make()'s tensors made as normal tensors, also inside torch.inference_mode: a cache entry or a
    scratch buffer made there was an inference tensor, and a later call outside (a model evaluated under
    inference_mode, then trained) could not save it for backward, read its version or write it in
    place: "Inference tensors do not track version counter" (found by a lifecycle fuzzer, stop 25)."""
    if not torch.is_inference_mode_enabled():
        return make()
    with torch.inference_mode(False):
        return make()


class _Scratch:
    """The backward's temporaries (gate gradients, their transposes, h_prev^T, workspace: 30-40 MB for
    an LSTM layer at T=100, B=32, H=256), kept between training steps. Allocated fresh, they came back
    from the OS as new pages every step (glibc returns freed memory above its trim threshold), and the
    page faults cost 10-20 ms of a 45-65 ms LSTM training step. One per thread; buffers are handed
    out in order from the start of each call (begin()) and grow to the largest call seen.
    pyseqkern.empty_cache() releases them."""

    def __init__(self):
        self.buffers: list = []
        self.views: list = []  # per buffer: (shape, dtype, the view last handed out)
        self.next = 0

    def begin(self):
        self.next = 0
        return self

    def take(self, shape, dtype):
        i = self.next
        self.next += 1
        if i < len(self.views):
            # A training loop of cell steps asks each slot for the same shape every call: the view made
            # last time serves again (three view ops cost ~3 us, more than torch.empty of a small
            # buffer; a one-step backward takes seven). Callers only write through it.
            v = self.views[i]
            if v[0] == shape and v[1] is dtype:
                return v[2]
        else:
            self.buffers.append(None)
            self.views.append(None)
        return normal(lambda: self._view(i, shape, dtype))  # (its views are written in place later)

    def _view(self, i, shape, dtype):
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[i] = torch.empty(nbytes, dtype=torch.uint8)
        view = buf[:nbytes].view(dtype).view(shape)
        self.views[i] = (tuple(shape), dtype, view)
        return view


_SCRATCH = threading.local()
# The calling thread's buffers by name (release() drops them all).
_KEPT = ("s", "fwd", "proj", "reserves", "cell_ws")


def _kept(name, make):
    """The calling thread's `name` buffer, made by make() on first use."""
    s = getattr(_SCRATCH, name, None)
    if s is None:
        s = make()
        setattr(_SCRATCH, name, s)
    return s


def _scratch():
    return _kept("s", _Scratch).begin()


def _fwd_scratch():
    """The eager inference forward's own _Scratch (x_gates of the kernel's projection, workspace: 13 MB
    for an LSTM layer at T=100, B=32, H=256), apart from the backward's, whose buffers a backward may
    still hold while a forward runs. Fresh each call they came back as new pages: RNN (100,32,256)
    spent ~15% of its call in page faults."""
    return _kept("fwd", _Scratch).begin()


# torch's count of references to a storage, where this torch has it (2.x does); without it reserves are
# allocated fresh each call.
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
# Buffers a thread's reserve pool keeps (a 4-layer bidirectional LSTM training step holds 8 reserves at once).
_RESERVE_POOL_SIZE = 8
# Reserves smaller than this are allocated as usual: they come from malloc's heap without new pages (glibc
# maps a freed size afresh only until its threshold has risen past it), and the recorded steps of a cell
# training loop (one small reserve a step, all alive until the backward) would only scan a full pool.
_RESERVE_POOL_FROM = 1 << 20


class _ReservePool:
    """CPU training forwards' reserves (20 MB per LSTM layer call at T=100, B=32, H=256), which autograd
    keeps until the backward: each comes from a buffer of this thread's pool that nothing else holds
    (torch's count of references to its storage is back to the pool's own), else from a new one. Fresh
    each call they came back from the OS as new pages (glibc maps or trims allocations this large):
    3 alternating processes, training step (100,32,256) LSTM 86 -> 79 ms, GRU 64 -> 62 ms on a 2-vCPU
    Zen 3. The tensor handed out is a new one on the buffer's storage (never the buffer itself, which
    autograd would tie to the graph), of exactly the shape asked for; a buffer serves requests of half
    its size or more. Only reserves of _RESERVE_POOL_FROM bytes or more. pyseqkern.empty_cache()
    releases the pool."""

    def __init__(self):
        self.bufs: list = []  # (buffer, its storage's reference count when free), least recently used first

    @staticmethod
    def _refs(buf):
        return _STORAGE_USE_COUNT(buf.untyped_storage()._cdata)

    def take(self, shape, dtype):
        nbytes = shape[0] * shape[1] * dtype.itemsize
        if _STORAGE_USE_COUNT is None or nbytes < max(1, _RESERVE_POOL_FROM):
            return torch.empty(shape, dtype=dtype)
        free = None  # the least recently used free buffer, which a new one replaces when the pool is full
        for i, (buf, idle) in enumerate(self.bufs):
            if self._refs(buf) != idle:
                continue
            if nbytes <= buf.numel() <= 2 * nbytes:
                self.bufs.append(self.bufs.pop(i))
                return torch.empty(0, dtype=dtype).set_(buf.untyped_storage(), 0, shape)
            free = i if free is None else free
        if len(self.bufs) >= _RESERVE_POOL_SIZE:
            if free is None:
                return torch.empty(shape, dtype=dtype)
            del self.bufs[free]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.bufs.append((buf, self._refs(buf)))
        return torch.empty(0, dtype=dtype).set_(buf.untyped_storage(), 0, shape)


def _reserves():
    return _kept("reserves", _ReservePool)


def _proj_scratch():
    """The eager forward's own _Scratch for torch's input projection (x_gates; inference and training),
    which lives only until the kernel has read it. Fresh each call, the pages came back from the OS
    (above 32 MB glibc maps every allocation anew): in-process, time per call without / with it,
    inference (200,64,512) LSTM 1.15, GRU 1.10; training (100,32,256) LSTM 1.08, GRU 1.04, RNN 1.00."""
    return _kept("proj", _Scratch).begin()


def _cell_workspace(numel, dtype):
    """The kernel's workspace for a cell call, kept per thread (it lives only inside the call)."""
    ws = getattr(_SCRATCH, "cell_ws", None)
    if ws is None or ws.dtype != dtype or ws.numel() < numel:
        ws = _SCRATCH.cell_ws = normal(lambda: torch.empty(numel, dtype=dtype))
    return ws


def release():
    """Drops this thread's buffers (empty_cache)."""
    for name in _KEPT:
        setattr(_SCRATCH, name, None)
