"""Per-call overhead: what crossing into _C costs, next to the cost of one small torch op.

Target (foundation issue): a _C call with 6 CPU tensors under 5 microseconds."""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from ... import _backend
from ..._handoff import stream_of
from ...ops.probe import triad
from ..registry import Case, Prepared, register

_C = _backend._C


def _handoff6(device: str):
    def setup(ceilings):
        ts = [torch.randn(3, 4, device=device) for _ in range(6)]
        out = torch.empty(3, 4, device=device)
        a, b, c, d, e, f = ts

        def ours():
            _C.handoff_noop(to_dlpack(a), to_dlpack(b), to_dlpack(c), to_dlpack(d), to_dlpack(e), to_dlpack(f))

        return Prepared(lambda: torch.add(a, b, out=out), ours)

    return setup


def _triad_small(device: str):
    def setup(ceilings):
        a, b = torch.randn(8, device=device), torch.randn(8, device=device)

        def check():
            torch.testing.assert_close(triad(a, b, 0.5), torch.add(a, b, alpha=0.5))

        return Prepared(lambda: torch.add(a, b, alpha=0.5), lambda: triad(a, b, 0.5), check)

    return setup


def _launch(device: str):
    def setup(ceilings):
        a = torch.randn(8, device=device)
        out = torch.empty(8, device=device)
        index = a.get_device()

        def ours():
            _C.noop_cuda(index, stream_of(a))

        return Prepared(lambda: torch.add(a, a, out=out), ours)

    return setup


register(Case("handoff", "_C call with 6 tensors (vs one torch.add on 3x4)", "cpu", _handoff6("cpu"), unit="",
              budget_ms=0.005))
register(Case("handoff", "triad op, 8 elements, full op path (vs torch.add)", "cpu", _triad_small("cpu"), unit=""))
register(Case("handoff", "_C call with 6 tensors (vs one torch.add on 3x4)", "cuda", _handoff6("cuda"), unit=""))
register(Case("handoff", "empty kernel launch via _C (vs torch.add on 8)", "cuda", _launch("cuda"), unit=""))
register(Case("handoff", "triad op, 8 elements, full op path (vs torch.add)", "cuda", _triad_small("cuda"), unit=""))
