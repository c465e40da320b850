"""Where a step of the persistent CUDA forward spends its time: each case timed whole and with one part of the
kernel left out (PYSEQKERN_CUDA_RNN_SKIP, cuda/rnn_common.cuh SkipBits: outputs wrong, timing only), the
part's cost being the difference. No profiler places time inside one kernel on the lent GPUs
(.library/device/METHOD.md), so this is how the next change gets chosen. Run by bench/gpu_suite.sh.

    python3 bench/gpu_phases.py [--device cuda] [--repeats 15]

Prints one table: per case, us per step whole and the us each part saves when left out, plus the floor
(everything left out: the launch, the input projection GEMM, the loop itself).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

import pyseqkern
import pyseqkern.nn as pnn

SKIP_ENV = "PYSEQKERN_CUDA_RNN_SKIP"
PARTS = [("staging", 1), ("product", 2), ("epilogue", 4), ("barrier", 8)]
CASES = [  # (module, T, B, H, dtype)
    ("LSTM", 100, 1, 512, torch.float32),
    ("LSTM", 100, 16, 512, torch.float32),
    ("LSTM", 100, 64, 512, torch.float32),
    ("LSTM", 100, 16, 512, torch.float16),
    ("GRU", 100, 16, 512, torch.float32),
    ("LSTM", 100, 64, 1024, torch.float32),
]


def time_call(fn, device: str, repeats: int) -> float:
    """Median milliseconds of one call (CUDA events on the current stream; perf_counter on the CPU)."""
    import time
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def run_case(kind, T, B, H, dtype, device, repeats):
    torch.manual_seed(0)
    module = getattr(pnn, kind)(H, H).to(device=device, dtype=dtype).eval()
    x = torch.randn(T, B, H, device=device, dtype=dtype)

    def fn():
        with torch.no_grad():
            return module(x)

    times = {}
    warnings.filterwarnings("ignore", message=f"{SKIP_ENV}=")  # (wrong outputs are the point here)
    for name, mask in [("whole", 0)] + PARTS + [("floor", sum(m for _, m in PARTS))]:
        os.environ[SKIP_ENV] = str(mask)
        try:
            times[name] = time_call(fn, device, repeats) * 1e3 / T  # us per step
        finally:
            os.environ.pop(SKIP_ENV, None)
    path = pyseqkern.backend_info().get("cuda", {}).get("rnn_paths", {}).get("forward", "-")
    return times, path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_phases: no CUDA device", file=sys.stderr)
        return 1
    cols = ["whole"] + [n for n, _ in PARTS] + ["floor"]
    print("us per step (T=100); a part's column: what leaving it out saves")
    print(f"{'case':<30} {'path':<10} " + " ".join(f"{c:>9}" for c in cols))
    for kind, T, B, H, dtype in CASES:
        times, path = run_case(kind, T, B, H, dtype, args.device, args.repeats)
        whole = times["whole"]
        row = [whole] + [whole - times[n] for n, _ in PARTS] + [times["floor"]]
        label = f"{kind} B={B} H={H} {str(dtype).split('.')[-1]}"
        print(f"{label:<30} {path:<10} " + " ".join(f"{v:9.2f}" for v in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
