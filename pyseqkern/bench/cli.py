"""Command line of the benchmark suite (see README "Benchmarks")."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .. import __version__, backend_info
from . import allocator, timing
from .registry import Case, Ceilings, all_cases
from .report import Result, format_tables, write_json


def _parse(argv):
    p = argparse.ArgumentParser(prog="pyseqkern-bench",
                                description="pyseqkern against torch, same process, same cases.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false",
                      help="the quick suite (default; 2-4 minutes on 2 cores)")
    size.add_argument("--full", dest="full", action="store_true", help="every case")
    p.set_defaults(full=False)
    p.add_argument("--op", action="append", default=[], help="op families to run (repeat or comma-separate); "
                   "default all. Use --list to see them.")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="where to run (default: cpu, plus cuda when usable)")
    p.add_argument("--json", metavar="FILE", help="write every result (with raw samples) as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG of speedups and share of peak")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per side (default 15 quick, 30 full)")
    p.add_argument("--malloc", choices=["steady", "as-is"], default="steady",
                   help="steady (default): hold glibc's malloc thresholds so that neither side's large tensors "
                   "page-fault on every call (bench/allocator.py); as-is: leave them as glibc starts")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def _select(args) -> tuple[list[Case], list[str]]:
    info = backend_info()
    cuda_ok = bool(info["cuda"]["usable"])
    notes = []
    devices = {"cpu", "cuda"} if args.device == "all" else {args.device}
    if "cuda" in devices and not cuda_ok:
        if args.device == "cuda":
            raise SystemExit(f"--device cuda: CUDA is not usable here: {info['cuda']['reason']}")
        devices.discard("cuda")
        notes.append(f"CUDA cases skipped: {info['cuda']['reason']}")
    families = {f.strip() for spec in args.op for f in spec.split(",") if f.strip()}
    cases = all_cases()
    known = {c.family for c in cases}
    unknown = families - known
    if unknown:
        raise SystemExit(f"--op: unknown families {sorted(unknown)}; known: {sorted(known)}")
    chosen = [c for c in cases
              if c.device in devices and (args.full or c.quick) and (not families or c.family in families)]
    return chosen, notes


def _run_case(case: Case, ceilings: Ceilings, repeats: int, full: bool) -> Result:
    r = Result(case.family, case.name, case.device, case.unit, target=case.target, peak_target=case.peak_target,
               budget_ms=case.budget_ms, note=case.note)
    try:
        prep = case.setup(ceilings)
        if prep.check is not None:
            prep.check()
        sample_ms = case.min_sample_ms or (10.0 if full else 5.0)
        if prep.torch_missing:
            t, o = None, timing.time_one(prep.ours_fn, cuda=case.device == "cuda", repeats=repeats,
                                         min_sample_ms=sample_ms)
        else:
            t, o = timing.compare(prep.torch_fn, prep.ours_fn, cuda=case.device == "cuda", repeats=repeats,
                                  min_sample_ms=sample_ms)
    except Exception as exc:  # a failing case is reported, never hidden, and never stops the suite
        r.error = f"{type(exc).__name__}: {exc}"
        return r
    r.ours_ms, r.ours_samples_ms = o.median_ms, o.samples_ms
    if t is not None:
        r.torch_ms, r.torch_samples_ms = t.median_ms, t.samples_ms
    else:
        r.torch_missing = prep.torch_missing
    if prep.work is not None and case.unit:
        scale = 1e-9  # GFLOP/s and GB/s alike
        r.rate = prep.work / (o.median_ms * 1e-3) * scale
        r.torch_rate = prep.work / (t.median_ms * 1e-3) * scale if t is not None else None
        if case.family == "machine" and case.peak:
            ceilings.raise_to(case.device, case.peak, max(r.rate, r.torch_rate or 0.0) / scale)
    return r


def _shares_of_peak(cases: list[Case], results: list[Result], ceilings: Ceilings) -> None:
    """% of peak for every rate, against the final ceilings (the best rate either side reached)."""
    for case, r in zip(cases, results):
        ceiling = ceilings.get(case.device, case.peak) if case.peak else None
        if ceiling and r.rate is not None:
            r.pct_peak = 100.0 * r.rate * 1e9 / ceiling


def main(argv=None) -> int:
    args = _parse(argv)
    cases, notes = _select(args)
    if args.list:
        for c in cases:
            print(f"{c.family:10s} {c.device:5s} {c.name}{'' if c.quick else '  [full]'}")
        return 0
    repeats = args.repeats or (30 if args.full else 15)
    # Ceilings first: machine cases run before every other family, whatever the listing order.
    cases.sort(key=lambda c: c.family != "machine")
    needs_ceiling = {(c.device, c.peak) for c in cases if c.peak and c.family != "machine"}
    have = {(c.device, c.peak) for c in cases if c.family == "machine"}
    if needs_ceiling - have:
        extra = [c for c in all_cases()
                 if c.family == "machine" and c.quick and (c.device, c.peak) in needs_ceiling - have]
        cases = extra + cases
    info = backend_info()
    malloc = allocator.hold_steady() if args.malloc == "steady" else "as glibc starts (--malloc as-is)"
    print(f"pyseqkern {__version__} bench: {len(cases)} cases, {'full' if args.full else 'quick'} suite, "
          f"CPU {info['cpu']['isa_active']} x {info['cpu']['threads']} threads"
          + (f", CUDA {info['cuda']['device']}" if info["cuda"]["usable"] else ""), file=sys.stderr)
    print(f"malloc: {malloc}", file=sys.stderr)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    ceilings = Ceilings()
    results = []
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.family} / {case.device}: {case.name} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = _run_case(case, ceilings, repeats, args.full)
        results.append(r)
        if r.error:
            print(f" ERROR {r.error}", file=sys.stderr)
        else:
            done = f"{r.speedup:.2f}x" if r.speedup else f"{r.ours_ms:.3f} ms, torch not run: {r.torch_missing}"
            print(f" {done} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if case.device == "cuda":
            torch.cuda.empty_cache()
    # The ceilings again, at the end: these shared machines change speed for tens of seconds at a time
    # (an FMA probe read 117 GFLOP/s at the start of one run and 224 a minute later), and a ceiling
    # measured in a slow phase put later cases at 140% of "peak". Each ceiling is the best of both.
    machine = [c for c in cases if c.family == "machine" and c.peak]
    if machine and len(machine) < len(cases):
        before = dict(ceilings.values)
        for case in machine:
            _run_case(case, ceilings, repeats, args.full)
        for key, value in ceilings.values.items():
            print(f"ceiling {key[0]} {key[1]}: {before.get(key, 0) * 1e-9:.1f} at the start, best "
                  f"{value * 1e-9:.1f} after measuring again at the end", file=sys.stderr)
    _shares_of_peak(cases, results, ceilings)
    print(f"done in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    print(format_tables(results))
    meta = {"version": __version__, "suite": "full" if args.full else "quick", "backend": info, "malloc": malloc,
            "argv": list(sys.argv[1:] if argv is None else argv)}
    if args.json:
        write_json(args.json, results, ceilings.values, meta)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from .plot import write_plot

        write_plot(args.plot, results, f"pyseqkern {__version__} vs torch {torch.__version__} "
                   f"({info['cpu']['isa_active']}, {info['cpu']['threads']} threads"
                   + (f", {info['cuda']['device']}" if info['cuda']['usable'] else "") + ")")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
