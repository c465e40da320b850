"""Ops registered with torch.library under the `pyseqkern` namespace (torch.ops.pyseqkern.*).

Each module here: validation with clear errors, output allocation with torch.empty, the handoff to
_C, a fake impl for torch.compile, autograd. See README "Adding a new op"."""
from . import probe

__all__ = ["probe"]
