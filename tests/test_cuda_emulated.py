"""The CUDA recurrent kernels (cuda/rnn_*.cu), run on the CPU: tests/cuda_emu builds the unchanged device code
as host code with a fiber-based emulation of blocks, warps, shared memory and grid barriers (README.md
there), and its driver checks every output against a float64 reference of rnn.h, with NaN-poisoned buffers
and guard zones. No GPU needed: this is what checks the kernels' logic (phases, barriers, double buffers,
k tiles, plan and demotion) on machines without one. Each group below is one driver run; the groups run two
at a time while the tests wait on them."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count

import pytest

from cuda_emu.build import CUDA_DIR, SANITIZER_FLAGS, EditError, build, prepare_sources

# ---- the case matrix ---------------------------------------------------------------------------------
# One case = one line of driver input (driver.cpp's parse_case). Devices (emu_rt.cpp): 0 large, 1 small
# (16 KB), 2 tiny (6 KB), 3 no cooperative launch, 4 two SMs, 5 and 6 refuse cooperative launches.
VARIANTS = {"lstm": "mode=lstm", "lstm_proj": "mode=lstm", "gru_reset_after": "mode=gru ra=1",
            "gru_reset_before": "mode=gru ra=0", "rnn_tanh": "mode=tanh", "rnn_relu": "mode=relu"}
PATHS = ("persistent", "step")
_seeds = count(1)


def case(variant: str, H: int, B: int, T: int, packed: bool = False, P: int = 5, **kw) -> str:
    """A case line (lstm_proj: projection size P, at most H - 1); the optional inputs (h0, c0, b_hn, dy,
    dh_n, dc_n) vary with the seed."""
    s = next(_seeds)
    words = [VARIANTS[variant], f"H={H}", f"B={B}", f"T={T}", f"seed={s}"]
    if variant == "lstm_proj" and H > 1:
        words.append(f"P={min(P, H - 1)}")
    if packed:  # non-increasing lengths, the longest T
        words.append("len=" + ",".join(str(max(1, T - (b * T) // B)) for b in range(B)))
    flags = {"h0": s % 3 != 1, "c0": s % 4 != 1, "bhn": s % 2 == 0, "dy": s % 5 != 2, "dhn": s % 3 != 2,
             "dcn": s % 7 != 3}
    words += [f"{k}={int(v)}" for k, v in flags.items()]
    words += [f"{k}={v}" for k, v in kw.items()]
    return " ".join(words)


def variant_cases(v: str) -> list[str]:
    """Odd sizes, packed and padded (time- and batch-major, padded leading dimensions), forward and reverse,
    both paths, float32."""
    return [line for p in PATHS for line in (
        case(v, 1, 1, 1, path=p, dev=0),
        case(v, 7, 9, 4, packed=True, rev=1, path=p, dev=0),
        case(v, 17, 1, 3, bm=1, xld=3, path=p, dev=1),
        case(v, 40, 5, 5, packed=True, rev=1, xld=1, path=p, dev=4),
        case(v, 113, 7, 3, rev=int(p == "step"), path=p, dev=4),
    )]


def dtype_cases(dtype: str) -> list[str]:
    return [line for p in PATHS for line in (
        case("lstm_proj", 33, 9, 3, packed=True, rev=1, dtype=dtype, path=p, dev=0),
        case("gru_reset_before", 20, 7, 2, bm=1, dtype=dtype, path=p, dev=4),
        case("gru_reset_after", 9, 1, 3, xld=2, dtype=dtype, path=p, dev=1),
        case("rnn_relu", 7, 9, 2, packed=True, dtype=dtype, path=p, dev=0),
    )]


# Devices small enough that the k columns go in tiles (checked by COVERAGE below).
SMALL_DEVICE_CASES = [
    case("lstm", 40, 3, 2, dtype="f64", path="step", dev=2),
    case("gru_reset_after", 113, 5, 2, packed=True, path="step", dev=2),
    case("gru_reset_before", 40, 2, 2, rev=1, dtype="f64", path="step", dev=2),
    case("rnn_tanh", 113, 3, 2, dtype="f64", path="step", dev=2),
    case("lstm_proj", 200, 2, 2, dtype="f64", path="step", dev=1),
    case("lstm", 113, 3, 2, rev=1, dtype="f64", path="persistent", dev=4),
    case("rnn_tanh", 231, 2, 2, dtype="f64", path="persistent", dev=4),
]

# Batches of several kNB-row tiles, whose products the forward's gate phase holds together for one
# epilogue (plan.etiles): groups of up to 8 tiles and a last partial one (B=70: 9 tiles), packed batches
# whose active rows shrink across groups, and a device too small to hold more than one tile's sums.
BATCH_TILE_CASES = [
    case("lstm", 9, 70, 3, path="persistent", dev=0),
    case("gru_reset_after", 7, 70, 3, packed=True, rev=1, path="step", dev=0),
    case("gru_reset_before", 5, 33, 2, bm=1, path="persistent", dev=4),
    case("lstm_proj", 6, 20, 2, P=4, path="step", dev=4),
    case("rnn_relu", 40, 20, 2, packed=True, path="step", dev=2),
    case("rnn_tanh", 5, 17, 2, dtype="f16", path="persistent", dev=0),
]

# One block at a time runs ahead to its next grid barrier: a missing barrier or double buffer shows.
# Persistent grids of 2 to 8 blocks, and a per-step run.
SKEW_CASES = [line for v in VARIANTS for line in (
    case(v, 33, 9, 4, packed=True, P=30, path="persistent", dev=4, sched="skew"),
    case(v, 60, 9, 3, packed=True, rev=1, P=30, path="persistent", dev=0, sched="skew"),
    case(v, 60, 9, 3, bm=1, P=30, path="persistent", dev=0, sched="skew"),
    case(v, 12, 7, 3, rev=1, path="step", dev=1, sched="skew"),
)]

# Cooperative launches refused after the plan chose persistent (5: too large, 6: not supported): Auto
# demotes to the per-step path, Persistent raises; 3 has no cooperative launch at all.
DEMOTION_CASES = [
    case("lstm", 40, 5, 3, path="auto", dev=5, expect="step"),
    case("gru_reset_after", 17, 2, 3, packed=True, path="auto", dev=6, expect="step"),
    case("lstm_proj", 24, 3, 2, path="auto", dev=3, expect="step"),
    case("rnn_relu", 9, 2, 2, path="persistent", dev=5, expect="throw"),
    case("lstm", 200, 2, 1, path="persistent", dev=1, expect="throw"),  # weights do not fit on chip
    case("gru_reset_before", 33, 4, 2, path="auto", dev=0, expect="persistent"),
    # Inside a CUDA graph capture: a refusal that invalidates it raises (the next capture runs per step,
    # nothing refused); one that leaves it active demotes in place; none, and capture changes nothing.
    case("lstm_proj", 21, 3, 2, path="auto", dev=5, capture="breaks", expect="step"),
    case("gru_reset_before", 19, 2, 3, packed=True, path="auto", dev=6, capture="keeps", expect="step"),
    case("rnn_tanh", 30, 4, 2, path="auto", dev=0, capture="breaks", expect="persistent"),
]

GROUPS = {
    **{f"variant-{v}": variant_cases(v) for v in VARIANTS},
    **{f"dtype-{d}": dtype_cases(d) for d in ("f64", "f16", "bf16")},
    "small-devices": SMALL_DEVICE_CASES,
    "batch-tiles": BATCH_TILE_CASES,
    "skewed-schedule": SKEW_CASES,
    "cooperative-refused": DEMOTION_CASES,
}


@dataclass
class Result:
    passed: bool
    line: str
    calls: dict  # "fwd"/"bwd" -> {"path", "blocks", "ktile", "kmax", "etiles", "coop", "plain", "refused"}
    text: str


STATS_RE = re.compile(r"(fwd|bwd)=(\w+) blocks=(\d+) ktile=(\d+)/(\d+) etiles=(\d+) coop=(\d+) plain=(\d+) "
                      r"refused=(\d+)")


def tiled(r: Result, call: str, path: str) -> bool:
    c = r.calls.get(call)
    return c is not None and c["path"] == path and 0 < c["ktile"] < c["kmax"]


def refused_then_step(r: Result) -> bool:
    return all(r.calls.get(k, {}).get("refused", 0) > 0 and r.calls[k]["path"] == "step" for k in ("fwd", "bwd"))


# What a group must have exercised besides passing: guards against a matrix that drifts into testing less
# (a plan change that stops tiling, a demotion that no longer happens).
COVERAGE = {
    "small-devices": [
        (lambda r: tiled(r, "fwd", "step"), "a per-step forward with k tiles"),
        (lambda r: tiled(r, "bwd", "step"), "a per-step backward with k tiles"),
        (lambda r: tiled(r, "fwd", "persistent"), "a persistent forward with k tiles"),
        (lambda r: tiled(r, "bwd", "persistent"), "a persistent backward with k tiles"),
    ],
    "batch-tiles": [
        (lambda r: r.calls.get("fwd", {}).get("etiles") == 8 and "B=70" in r.line, "8 tiles a group, then more"),
        (lambda r: r.calls.get("fwd", {}).get("path") == "persistent" and r.calls["fwd"]["etiles"] > 1,
         "a persistent forward holding several tiles"),
        (lambda r: r.calls.get("fwd", {}).get("path") == "step" and r.calls["fwd"]["etiles"] > 1,
         "a per-step forward holding several tiles"),
        (lambda r: r.calls.get("fwd", {}).get("etiles") == 1 and "B=20" in r.line and "dev=2" in r.line,
         "one tile at a time where the sums of more do not fit"),
    ],
    "skewed-schedule": [
        (lambda r: r.calls.get("bwd", {}).get("path") == "persistent" and r.calls["bwd"]["blocks"] > 1,
         "a persistent run of several blocks"),
    ],
    "cooperative-refused": [
        (lambda r: refused_then_step(r) and "dev=5" in r.line, "a refused (too large) launch demoted to step"),
        (lambda r: refused_then_step(r) and "dev=6" in r.line, "a refused (not supported) launch demoted"),
        (lambda r: "threw as expected" in r.text and "refused" in r.text, "Persistent raising on refusal"),
        (lambda r: "capture=breaks" in r.line and r.text.count("threw inside the capture as expected") == 2
         and all(r.calls[k]["path"] == "step" and r.calls[k]["refused"] == 0 for k in ("fwd", "bwd")),
         "a capture a refused launch broke: an error, then the per-step path in the next capture"),
        (lambda r: refused_then_step(r) and "capture=keeps" in r.line, "a refusal a capture survives, demoted"),
    ],
}


SANITIZER_REPORT_RE = re.compile(r"^.*(ERROR: AddressSanitizer|runtime error:)", re.M)


def run_group(driver, lines: list[str], timeout: int = 300, env=None) -> list[Result]:
    try:
        proc = subprocess.run([str(driver)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:  # a kernel spinning on a flag never yields to the emulator
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the emulator driver ran past {timeout} s; its output so far:\n{out[-4000:]}", pytrace=False)
    results, cur = [], None
    for out in proc.stdout.splitlines():
        m = re.match(r"(PASS|FAIL) (.*)", out)
        if m:
            line = m.group(2).split(" :: ")[0]
            calls = {c[0]: {"path": c[1], **dict(zip(("blocks", "ktile", "kmax", "etiles", "coop", "plain", "refused"),
                                                     map(int, c[2:])))} for c in STATS_RE.findall(out)}
            cur = Result(m.group(1) == "PASS", line, calls, out)
            results.append(cur)
        elif cur is not None and out.startswith(" "):
            cur.text += "\n" + out
    if len(results) != len(lines) or proc.returncode not in (0, 1):
        done = len(results)
        pending = lines[done] if done < len(lines) else "?"
        report = SANITIZER_REPORT_RE.search(proc.stderr)  # from its first line: the frame that did it
        err = proc.stderr[report.start():][:6000] if report else proc.stderr[-4000:]
        pytest.fail(f"the emulator driver stopped (exit status {proc.returncode}) after {done} of {len(lines)} "
                    f"cases, while running:\n  {pending}\nstderr:\n{err}", pytrace=False)
    return results


# ---- fixtures --------------------------------------------------------------------------------------------
class GroupRuns:
    """The driver runs of a test's groups, two at a time: all of those this session selected, started at
    once in test order; under pytest-xdist, whose workers each collect every test but run a share, a group
    starts only when its test asks for it (else every worker ran every group)."""

    def __init__(self, request, test_name: str, driver, timeout: int = 300, env=None):
        self.driver, self.timeout, self.env = driver, timeout, env
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures = {}
        if "PYTEST_XDIST_WORKER" not in os.environ:
            for item in request.session.items:
                if item.module.__name__ == __name__ and item.originalname == test_name:
                    self.start(item.callspec.params["group"])

    def start(self, group: str):
        """The group's run, started now if it was not yet."""
        if group not in self.futures:
            self.futures[group] = self.pool.submit(run_group, self.driver, GROUPS[group], self.timeout, self.env)
        return self.futures[group]

    __getitem__ = start

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def require_gpp() -> None:
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CUDA kernel emulator is built with it")


@pytest.fixture(scope="session")
def emu_driver(tmp_path_factory):
    require_gpp()
    return build(tmp_path_factory.mktemp("cuda_emu"), jobs=2)


@pytest.fixture(scope="session")
def emu_group_results(request, emu_driver):
    runs = GroupRuns(request, "test_emulated_kernels", emu_driver)
    yield runs
    runs.close()


# Every group runs again with the driver built under AddressSanitizer and UndefinedBehaviorSanitizer: an index
# off by one in a kernel then stops the run at the read or write that makes it (the driver poisons its guard
# zones), and signed overflow or a misaligned access in the index arithmetic does too. ~4 minutes on two
# cores with the build; the odd sizes and padded leading dimensions of the variant groups are where such
# slips hide.
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}


@pytest.fixture(scope="session")
def emu_sanitized_results(request, tmp_path_factory):
    require_gpp()
    probe = tmp_path_factory.mktemp("sanitizer_probe")
    (probe / "main.cpp").write_text("int main() { return 0; }\n")
    if subprocess.run(["g++", "-fsanitize=address,undefined", str(probe / "main.cpp"), "-o", str(probe / "main")],
                      capture_output=True).returncode != 0:
        pytest.skip("g++ cannot link -fsanitize=address,undefined here (no libasan/libubsan)")
    driver = build(tmp_path_factory.mktemp("cuda_emu_sanitized"), jobs=2, extra=SANITIZER_FLAGS)
    runs = GroupRuns(request, "test_emulated_kernels_sanitized", driver, 600, {**os.environ, **SANITIZER_ENV})
    yield runs
    runs.close()


# ---- tests -----------------------------------------------------------------------------------------------
def check_group(group: str, results: list[Result]) -> None:
    failed = [r.text for r in results if not r.passed]
    if failed:
        pytest.fail(f"{len(failed)} of {len(results)} emulated cases failed:\n" + "\n".join(failed), pytrace=False)
    missing = [what for pred, what in COVERAGE.get(group, []) if not any(pred(r) for r in results)]
    if missing:
        pytest.fail(f"the group no longer exercises: {missing}\n" + "\n".join(r.text for r in results), pytrace=False)


@pytest.mark.parametrize("group", list(GROUPS))
def test_emulated_kernels(group, emu_group_results):
    check_group(group, emu_group_results[group].result())


@pytest.mark.parametrize("group", list(GROUPS))
def test_emulated_kernels_sanitized(group, emu_sanitized_results):
    check_group(group, emu_sanitized_results[group].result())


def test_emulator_edits_fail_loudly(tmp_path):
    """A kernel change that the build's mechanical edits no longer match stops the build, naming the file."""
    src = tmp_path / "cuda"
    shutil.copytree(CUDA_DIR, src)
    fwd = src / "rnn_fwd.cu"
    fwd.write_text(fwd.read_text().replace("extern __shared__ __align__(16) unsigned char smem[];",
                                           "extern __shared__ float4 smem[];"))
    with pytest.raises(EditError, match=r"rnn_fwd\.cu.*'__shared__' left"):
        prepare_sources(src, tmp_path / "out")
    fwd.write_text(fwd.read_text().replace("extern __shared__ float4 smem[];", "float4* smem = nullptr;"))
    with pytest.raises(EditError, match=r"rnn_fwd\.cu: the 'smem' edit matched 0 time"):
        prepare_sources(src, tmp_path / "out")
