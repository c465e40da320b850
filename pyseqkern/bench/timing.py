"""Timing: warm-up, then alternating blocks of samples of the two sides, median per side.

CPU samples use perf_counter around a batch of calls long enough to dwarf the timer's resolution;
CUDA samples use events on the current stream around the same batches. The sides alternate in a few
blocks rather than sample by sample: alternating blocks spread slow drifts of a shared machine over both
sides, while within a block each side runs as it would in a loop of its own. (Sample-by-sample
alternation on a 2-core machine measures mostly how torch's OpenMP threads, still spinning after
torch's call, steal the core our worker needs, and vice versa.)"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    samples_ms: list[float]


def _sample(fn: Callable[[], object], inner: int, cuda: bool) -> float:
    """Milliseconds per call over one batch of `inner` calls."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def _calls_per_sample(fn: Callable[[], object], cuda: bool, min_sample_ms: float) -> int:
    one = max(_sample(fn, 1, cuda), 1e-6)
    return max(1, min(100_000, int(min_sample_ms / one) + 1))


def compare(torch_fn: Callable[[], object], ours_fn: Callable[[], object], cuda: bool, warmup: int = 3,
            repeats: int = 15, min_sample_ms: float = 2.0) -> tuple[Timing, Timing]:
    """Times both functions (same work) and returns (torch, ours)."""
    for _ in range(warmup):
        torch_fn()
        ours_fn()
    if cuda:
        torch.cuda.synchronize()
    inner_t = _calls_per_sample(torch_fn, cuda, min_sample_ms)
    inner_o = _calls_per_sample(ours_fn, cuda, min_sample_ms)
    st, so = [], []
    blocks = 3 if repeats >= 6 else 1
    for b in range(blocks):
        count = repeats // blocks + (1 if b < repeats % blocks else 0)
        st.extend(_sample(torch_fn, inner_t, cuda) for _ in range(count))
        so.extend(_sample(ours_fn, inner_o, cuda) for _ in range(count))
    return Timing(statistics.median(st), st), Timing(statistics.median(so), so)


def time_one(fn: Callable[[], object], cuda: bool, warmup: int = 2, repeats: int = 7,
             min_sample_ms: float = 2.0) -> Timing:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    inner = _calls_per_sample(fn, cuda, min_sample_ms)
    s = [_sample(fn, inner, cuda) for _ in range(repeats)]
    return Timing(statistics.median(s), s)
