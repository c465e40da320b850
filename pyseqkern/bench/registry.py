"""What a benchmark case is, and the registry op families add theirs to.

A case builds its inputs lazily (setup), so listing and filtering the suite costs nothing. setup()
returns a Prepared: the torch side and our side doing the same work, and a check that both agree
(raising AssertionError when they do not) run once before any timing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Prepared:
    torch_fn: Callable[[], object]
    ours_fn: Callable[[], object]
    check: Optional[Callable[[], None]] = None
    # Work done per call by each side, in the unit's base quantity (FLOPs or bytes); None for per-call
    # overhead cases, whose rate column is empty.
    work: Optional[float] = None
    # Why torch cannot run the case on this machine (torch_fn is then None and only ours is timed; the
    # check compares against another torch computation): e.g. torch.nn's bfloat16 LSTM raises on CPUs
    # without AVX-512. The table shows the reason instead of a ratio.
    torch_missing: Optional[str] = None


@dataclass
class Case:
    family: str          # op family: "machine", "handoff", "lstm", ...
    name: str            # what a reader needs to recognize the case
    device: str          # "cpu" or "cuda"
    setup: Callable[["Ceilings"], Prepared]
    unit: str = "GFLOP/s"  # "GFLOP/s", "GB/s" or "" (overhead only)
    peak: Optional[str] = None  # which measured ceiling "% of peak" refers to: "flops", "bf16_flops", "bandwidth"
    target: Optional[float] = None  # speedup (torch ms / ours ms) the issue asks for, if any
    # A share of the measured peak (%) that meets the target as well, where the issue offers one (LSTM
    # inference at B >= 32: torch is near the peak there, so ">= 1.1x, or >= 85% of peak").
    peak_target: Optional[float] = None
    budget_ms: Optional[float] = None  # an absolute limit on our time per call, if the issue sets one
    min_sample_ms: Optional[float] = None  # longer samples for cases sensitive to the start of a block
    note: str = ""
    quick: bool = True   # part of the quick suite (the full suite runs everything)


@dataclass
class Ceilings:
    """The machine's measured ceilings per device: float32 and bfloat16 FLOP/s, memory bandwidth (bytes/s)."""
    values: dict = field(default_factory=dict)  # (device, "flops"|"bf16_flops"|"bandwidth") -> float

    def get(self, device: str, kind: str) -> Optional[float]:
        return self.values.get((device, kind))

    def raise_to(self, device: str, kind: str, value: float) -> None:
        key = (device, kind)
        self.values[key] = max(self.values.get(key, 0.0), value)


_CASES: list[Case] = []


def register(case: Case) -> Case:
    _CASES.append(case)
    return case


def all_cases() -> list[Case]:
    from . import cases  # noqa: F401  (imports register every family)

    return list(_CASES)
