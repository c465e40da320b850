"""The benchmark CLI end to end on its cheapest family: progress, tables, JSON, PNG, filters, errors."""
import json
import os
import subprocess
import sys
import tempfile

import pytest


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyseqkern.bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir())


def test_handoff_family_writes_tables_json_and_png(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    proc = bench("--op", "handoff", "--device", "cpu", "--repeats", "3", "--json", str(js), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "[1/" in proc.stderr and "done in" in proc.stderr  # progress
    assert "== handoff ==" in proc.stdout
    assert "case | torch ms | pyseqkern ms | speedup | GFLOP/s or GB/s | % of peak" in proc.stdout.replace("  ", "")
    doc = json.loads(js.read_text())
    rows = doc["results"]
    assert rows and all(r["family"] == "handoff" and r["device"] == "cpu" for r in rows)
    assert all(r["torch_ms"] > 0 and r["ours_ms"] > 0 and len(r["ours_samples_ms"]) == 3 for r in rows)
    assert all("pct_needed" in r and "peak_target" in r for r in rows)
    assert doc["meta"]["backend"]["cpu"]["isa_active"]
    assert doc["meta"]["malloc"] and f"malloc: {doc['meta']['malloc']}" in proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_list_and_unknown_family():
    proc = bench("--list", "--full")
    assert proc.returncode == 0 and "machine" in proc.stdout and "handoff" in proc.stdout
    proc = bench("--op", "nosuchop")
    assert proc.returncode != 0 and "unknown families ['nosuchop']" in proc.stderr


def test_cuda_request_without_cuda_is_a_clear_error():
    import pyseqkern

    if pyseqkern.backend_info()["cuda"]["usable"]:
        pytest.skip("CUDA is usable here")
    proc = bench("--device", "cuda")
    assert proc.returncode != 0 and "CUDA is not usable here" in proc.stderr


def test_ceilings_are_measured_again_at_the_end(tmp_path):
    """A ceiling measured while the machine ran slow made later cases read 140% of "peak": the machine
    cases run again after the last case, and each ceiling is the best of both measurements."""
    js = tmp_path / "b.json"
    proc = bench("--op", "rnn_cell", "--device", "cpu", "--repeats", "3", "--json", str(js))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("[1/") == 1  # the second measurement adds no rows
    assert "ceiling cpu flops:" in proc.stderr and "after measuring again at the end" in proc.stderr
    doc = json.loads(js.read_text())
    first = next(r for r in doc["results"] if r["family"] == "machine")
    ceiling = next(c["value"] for c in doc["ceilings"] if c["kind"] == "flops")
    assert ceiling * 1e-9 >= max(first["rate"], first["torch_rate"]) * (1 - 1e-12)
    assert abs(first["pct_peak"] - 100 * first["rate"] * 1e9 / ceiling) < 1e-6
    assert all(r["family"] in ("machine", "rnn_cell") for r in doc["results"])


def test_a_case_torch_cannot_run_reports_ours_and_why(monkeypatch):
    """torch.nn's bfloat16 LSTM and linear layers raise on CPUs without AVX-512 ("could not create a
    primitive descriptor"): such a case times ours alone, checked against another torch computation,
    and the table says why there is no ratio (was: an ERROR row and no figure at all)."""
    from pyseqkern.bench import cli
    from pyseqkern.bench.cases import rnn as rnn_cases
    from pyseqkern.bench.registry import Case, Ceilings
    from pyseqkern.bench.report import format_tables

    import torch
    real = rnn_cases._modules

    def modules(*args, **kwargs):
        theirs, ours = real(*args, **kwargs)
        forward = theirs.forward

        def no_bf16(x, *rest):  # as torch.nn on a Zen 3: bfloat16 raises, float32 runs
            if x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu"):
                raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive")
            return forward(x, *rest)
        monkeypatch.setattr(theirs, "forward", no_bf16)
        return theirs, ours

    monkeypatch.setattr(rnn_cases, "_modules", modules)
    for setup in (rnn_cases._inference("LSTM", "cpu", 5, 3, 16, dtype=torch.bfloat16),
                  rnn_cases._training("LSTM", "cpu", 5, 3, 16, autocast=torch.bfloat16)):
        case = Case("lstm", "bf16", "cpu", setup, target=1.0)
        r = cli._run_case(case, Ceilings(), repeats=3, full=False)
        assert r.error is None and r.ours_ms > 0 and r.torch_ms is None and r.speedup is None
        assert r.torch_missing and "no AVX-512" in r.torch_missing and r.rate > 0 and r.torch_rate is None
        table = format_tables([r])
        assert "torch not run: torch.nn's bfloat16 path" in table and "MISS" not in table
    # any other failure of torch's side stays the case's error
    monkeypatch.setattr(rnn_cases, "_torch_missing", lambda fn: fn())
    r = cli._run_case(Case("lstm", "bf16", "cpu", rnn_cases._inference("LSTM", "cpu", 5, 3, 16, dtype=torch.bfloat16)),
                      Ceilings(), repeats=3, full=False)
    assert r.error and "primitive descriptor" in r.error


def test_a_missed_target_says_what_share_of_peak_it_needs():
    """The issue asks for arithmetic where a target is out of reach: a MISS row says which share of the
    measured peak our rate would need at torch's rate of the same run (over 100%: out of reach for any
    kernel against that torch). LSTM at B >= 32 is met by 1.1x or by 85% of the peak."""
    from pyseqkern.bench.cases import rnn as rnn_cases
    from pyseqkern.bench.registry import all_cases
    from pyseqkern.bench.report import Result, format_tables

    # torch at 80% of peak and us at 84% (1.05x): 1.5x needs 120%; met by neither rule without one of 85%
    r = Result("lstm", "inference", "cpu", "GFLOP/s", torch_ms=1.05, ours_ms=1.0, pct_peak=84.0, target=1.5)
    assert r.target_met is False and abs(r.pct_needed - 120.0) < 1e-9
    assert "1.5x needs 120% of peak" in format_tables([r]) and "MISS >= 1.5x)" in format_tables([r])
    r = Result("lstm", "inference", "cpu", "GFLOP/s", torch_ms=1.05, ours_ms=1.0, pct_peak=84.0, target=1.1,
               peak_target=85.0)
    assert r.target_met is False and "MISS >= 1.1x or 85% of peak" in format_tables([r])
    r.pct_peak = 85.0
    assert r.target_met is True and "ok >= 1.1x or 85% of peak" in format_tables([r])
    assert "needs" not in format_tables([r])
    r.pct_peak, r.ours_ms = 50.0, 0.9  # 1.17x: met by the speedup alone
    assert r.target_met is True and r.pct_needed < 50.0
    # a miss of the time budget alone says nothing of the peak
    r = Result("lstm", "inference", "cpu", "GFLOP/s", torch_ms=2.0, ours_ms=1.0, pct_peak=40.0, target=1.5,
               budget_ms=0.5)
    assert r.target_met is False and r.speedup_met is True and "needs" not in format_tables([r])
    # a met target, or a case without a peak, says nothing of it
    r = Result("lstm", "inference", "cpu", "GFLOP/s", torch_ms=2.0, ours_ms=1.0, target=1.5)
    assert r.target_met is True and r.pct_needed is None and "needs" not in format_tables([r])

    # which cases carry the alternative: LSTM inference at B >= 32 only
    by_peak = {c.name for c in all_cases() if c.family == "lstm" and c.peak_target == 85.0}
    assert by_peak == {"inference T=100 B=32 H=256", "inference T=200 B=64 H=512"}
    assert not [c for c in all_cases() if c.family != "lstm" and c.peak_target is not None]
    assert rnn_cases._inference_peak_target("GRU", 64) is None


_FAULTS = """
import resource, sys, torch
from pyseqkern.bench import allocator
said = allocator.hold_steady() if sys.argv[1] == "steady" else "as-is"
def faults_of_one_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(48 << 20, dtype=torch.uint8).fill_(1)  # 48 MB, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# Held, the block walks up the heap for its first 9 or 13 calls (measured, glibc 2.36: torch's 64-byte
# posix_memalign leaves slack a small block may take, so the next one does not fit where the last was)
# and then alternates between two places already touched; 40 calls reach that state with room to spare.
for _ in range(40):
    faults_of_one_tensor()
print(said, "|", sum(faults_of_one_tensor() for _ in range(5)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_malloc_held_steady_reuses_freed_memory():
    """A 48 MB tensor made again and again: glibc as it starts maps it afresh each time and faults every
    page of it (12,288 of 4 KB); held steady it comes from the memory the last one freed."""
    runs = {}
    for mode in ("steady", "as-is"):
        proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120,
                              cwd=tempfile.gettempdir())  # (-c puts the directory first on sys.path)
        assert proc.returncode == 0, proc.stderr
        said, faults = proc.stdout.rsplit("|", 1)
        runs[mode] = (said.strip(), int(faults))
    if not runs["steady"][0].startswith("glibc"):
        pytest.skip(f"not glibc: {runs['steady'][0]}")
    assert "held" in runs["steady"][0], runs
    assert runs["steady"][1] < 1000 and runs["as-is"][1] > 5 * 12288 * 0.9, runs


_REPORT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
print(allocator.hold_steady())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_a_replaced_malloc_is_reported_not_held():
    """Where the process's malloc is not glibc's (jemalloc or tcmalloc preloaded, or a sanitizer's), mallopt
    tunes an allocator nothing calls: the report says so instead of "held". gcc's AddressSanitizer runtime
    stands in for them (it replaces malloc when preloaded)."""
    from pyseqkern.bench import allocator

    try:
        lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        lib = ""
    if not os.path.isabs(lib) or not os.path.exists(lib):
        pytest.skip("no malloc to preload here (gcc's libasan.so)")
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0")
    said = {}
    for name, child_env in (("replaced", env), ("glibc", {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})):
        proc = subprocess.run([sys.executable, "-c", _REPORT, allocator.__file__], capture_output=True, text=True,
                              timeout=120, env=child_env, cwd=tempfile.gettempdir())
        assert proc.returncode == 0, proc.stderr
        said[name] = proc.stdout.strip()
    assert "malloc replaced" in said["replaced"] and "held" not in said["replaced"], said
    assert "malloc replaced" not in said["glibc"], said


def test_malloc_as_is_is_reported(tmp_path):
    js = tmp_path / "b.json"
    proc = bench("--op", "handoff", "--device", "cpu", "--repeats", "1", "--malloc", "as-is", "--json", str(js))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(js.read_text())["meta"]["malloc"] == "as glibc starts (--malloc as-is)"
