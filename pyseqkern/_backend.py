"""Loads the compiled core, applies the environment switches and reports which backend runs.

Environment variables read at import:
  PYSEQKERN_CPU_ISA    force a CPU kernel level at or below the best one this CPU runs
                       (baseline, avx2, avx512, avx512bf16, amx); anything else raises ValueError at import.
  PYSEQKERN_REFERENCE  "1" routes every op to its pure-PyTorch reference (slow; for debugging).
  PYSEQKERN_THREADS    "own" runs CPU kernels on pyseqkern's own workers instead of torch's OpenMP
                       team, "openmp" (or unset) on torch's; any other value raises ValueError at import.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from ._version import __version__

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only on a broken install or from the source tree
    _here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(_here, os.pardir, "CMakeLists.txt")):
        raise ImportError(
            f"pyseqkern: this is the source tree ({_here}), which has no compiled pyseqkern._C. Python "
            "found it first because the current directory is on sys.path (python -m / -c): run from "
            "another directory, use the console scripts (pyseqkern-bench, pytest), or install with "
            f"`pip install -e .` ({exc})"
        ) from exc
    raise ImportError(
        "pyseqkern: the compiled module pyseqkern._C failed to load; reinstall with "
        f"`pip install --force-reinstall pyseqkern` ({exc})"
    ) from exc

ISA_ENV = "PYSEQKERN_CPU_ISA"
REFERENCE_ENV = "PYSEQKERN_REFERENCE"
ISA_LEVELS = ("baseline", "avx2", "avx512", "avx512bf16", "amx")


class _IsaLevel(threading.local):
    """This thread's CPU kernel level, as the core keeps it (per thread: csrc/isa.cpp): a level changed
    by another thread in the middle of a call had its buffers sized at one level and its kernels run at
    another, and its cache entries keyed at one level and packed at another. The class attribute is the
    process default, which threads that set no level of their own follow."""
    name = _C.cpu_isa_report()["active"]


_ISA = _IsaLevel()


def set_cpu_isa(level: str, *, all_threads: bool = False) -> None:
    """Makes the calling thread's CPU kernels dispatch to `level` (one of ISA_LEVELS, not above what the
    CPU runs); other threads keep theirs. all_threads=True sets the process default instead, which
    threads that never set a level follow: set it before other threads run pyseqkern calls (the
    environment variable PYSEQKERN_CPU_ISA does so at import)."""
    if not isinstance(level, str):
        raise TypeError(f"pyseqkern.set_cpu_isa: 'level' must be a str, got {type(level).__name__}")
    name = level.strip().lower()
    _C.set_cpu_isa(name, all_threads)
    if all_threads:
        _IsaLevel.name = name
    else:
        _ISA.name = name


@contextlib.contextmanager
def thread_isa(level: str):
    """The calling thread's kernels at `level` inside the block, then as before (its own level, or the
    process default where it had none). A training forward's packed weights and reserve are laid out
    for its level's vector width: its backward runs at that level (ops/rnn_autograd._kernel_grads)."""
    own = _ISA.__dict__.get("name")
    set_cpu_isa(level)
    try:
        yield
    finally:
        if own is None:
            follow_default_isa()
        else:
            set_cpu_isa(own)


def at_isa(op: str, isa):
    """The calling thread at CPU level `isa` for the block (an op's `isa`; None: its own level). A graph
    compiled at one level and run at another asserted its pack's size (stop 58): the recurrent ops take
    the level a graph was traced at (compiled_isa) and run there."""
    if isa is None or isa == _ISA.name:
        return contextlib.nullcontext()
    if not isinstance(isa, str) or isa not in ISA_LEVELS:
        raise ValueError(f"pyseqkern::{op}: 'isa' must be None or one of {', '.join(ISA_LEVELS)}, got {isa!r}")
    return thread_isa(isa)


def compiled_isa():
    """The level a call traced by torch.compile names for its ops (`isa`): the tracing thread's (each
    graph Dynamo makes, a recompile too, holds the level of the call that traced it), or None outside a
    trace (the ops then run at the thread's level, as always)."""
    return active_isa() if torch.compiler.is_compiling() else None


def follow_default_isa() -> None:
    """The calling thread drops a level of its own and follows the process default again."""
    if "name" in _ISA.__dict__:
        _C.cpu_isa_follow_default()
        del _ISA.name


def _constant_in_traces(fn):
    """fn, which Dynamo calls while tracing and takes the result of as a constant. Traced as code, a
    threading.local's attribute is read as the class's (Dynamo's guards look in no thread's dict): a
    thread at its own level was traced at the process default's."""
    mark = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return fn if mark is None else mark(fn)


@_constant_in_traces
def active_isa() -> str:
    """The calling thread's CPU kernel level (kept here as the core keeps it: only set_cpu_isa changes
    it); part of cache keys. A graph compiled by torch.compile holds the tracing thread's (ops/rnn.py, `isa`)."""
    return _ISA.name


def _apply_isa_env() -> str | None:
    value = os.environ.get(ISA_ENV)
    if value is None or value.strip() == "":
        return None
    try:
        set_cpu_isa(value, all_threads=True)
    except ValueError as exc:
        raise ValueError(f"{ISA_ENV}={value!r}: {exc}") from None
    return value.strip().lower()


_FORCED_ISA = _apply_isa_env()
THREADS_ENV = "PYSEQKERN_THREADS"


def _apply_threads_env() -> None:
    """The core reads the exact string "own" at load; here any case and spacing, and anything else is
    refused: "OWN", "1" or "2" left the kernels on torch's team without a word (a concurrency fuzzer,
    stop 27)."""
    value = os.environ.get(THREADS_ENV)
    name = "" if value is None else value.strip().lower()
    if name not in ("", "own", "openmp"):
        raise ValueError(f"{THREADS_ENV}={value!r}: expected 'own' (pyseqkern's own worker threads) or 'openmp' "
                         "(torch's OpenMP team, the default)")
    if name == "own":
        _C.set_own_threads(True)


_apply_threads_env()


def _env_choice(env: str, choices: tuple) -> str:
    """The variable's value, any case and spacing, "auto" where unset or empty; anything not in
    `choices` (which hold "auto") raises, naming the variable and the choices."""
    value = os.environ.get(env, "")
    name = value.strip().lower() or "auto"
    if name not in choices:
        raise ValueError(f"{env}={value!r}: expected one of {list(choices)}")
    return name


L3_STREAMS_ENV = "PYSEQKERN_L3_STREAMS"


def _apply_l3_streams_env() -> None:
    """PYSEQKERN_L3_STREAMS=auto|fast|half|slow: which cache rules the recurrent layers follow (isa.h,
    cpu_l3_streams_fast and cpu_l2_outpaces_l3; docs/DESIGN.md "Caches by vendor"). fast: those of AMD
    before family 1Ah (Zen 3, Zen 4) and Hygon (the L3 streams near the L2's rate); half: Zen 5's (the L3
    fast, at half the L2's rate); slow: the slow-L3 ones; auto: by vendor and family. Forcing them lets
    a CPU nobody measured be measured every way. Read once at import: the rules are read then."""
    name = _env_choice(L3_STREAMS_ENV, ("auto", "fast", "half", "slow"))
    fast, outpaces = {"auto": (-1, -1), "fast": (1, 0), "half": (1, 1), "slow": (0, -1)}[name]
    _C.set_cpu_l3_streams_fast(fast)
    _C.set_cpu_l2_outpaces_l3(outpaces)


_apply_l3_streams_env()

FP32_GEMM_ENV = "PYSEQKERN_FP32_GEMM"


def _pick_fp32_gemm() -> str:
    """Which of torch's GEMMs the recurrent layers call for float32 (ops/rnn_gemms.py): "mkl" (mm, taking
    transposed views) where torch has MKL and the CPU is Intel's or has no AVX-512, "onednn" (its
    internal linear) elsewhere: on AMD cores with AVX-512 MKL's sgemm takes its AVX2 path, ~40% of
    peak; without AVX-512 both run AVX2 code and MKL's was faster (DESIGN.md, "Which torch GEMM")."""
    name = _env_choice(FP32_GEMM_ENV, ("auto", "mkl", "onednn"))
    if name != "auto":
        return name
    isa = _C.cpu_isa_report()
    mkl_full_speed = isa["vendor"] == "GenuineIntel" or "avx512" not in isa["supported"]
    return "mkl" if mkl_full_speed and torch.backends.mkl.is_available() else "onednn"


FP32_GEMM = _pick_fp32_gemm()  # read at call time (tests set it)
_REFERENCE_FORCED = os.environ.get(REFERENCE_ENV, "").strip() in ("1", "true", "yes", "on")
_FALLBACKS: dict[str, str] = {}
_CUDA_COMPILED = bool(_C.build_info()["cuda_compiled"])  # asked once: every CUDA op call reads it
# CUDA RNN kernel paths: "requested" (PYSEQKERN_CUDA_RNN_PATH) and what "forward"/"backward" last ran
# ("persistent" or "step"); kept up to date by ops/rnn_cuda.py.
CUDA_RNN_PATHS: dict[str, str] = {}


def use_reference(op: str, device: torch.device, cuda_kernels: bool = True) -> bool:
    """True when `op` must run its reference on `device`: forced by the environment, or no kernel
    exists for that device (the build has no CUDA, or the op has no CUDA kernel yet: `cuda_kernels`);
    then once per op a warning says why."""
    if _REFERENCE_FORCED:
        return True
    if device.type == "cpu":
        return False
    if device.type == "cuda":
        if cuda_kernels and _CUDA_COMPILED:
            return False
        reason = ("pyseqkern was built without CUDA kernels" if cuda_kernels else f"{op} has no CUDA kernel yet") + \
            "; running the PyTorch reference on CUDA"
    else:
        reason = f"pyseqkern has no kernels for {device.type} tensors; running the PyTorch reference"
    if op not in _FALLBACKS:
        _FALLBACKS[op] = reason
        warnings.warn(f"pyseqkern.{op}: {reason} (slow)", RuntimeWarning, stacklevel=3)
    return True


def _parse_archs(archs: str) -> list[str]:
    return [a.strip() for a in archs.split(",") if a.strip()]


def arch_runs_on(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for `archs` (CMake spelling: 90, 90a, 80-real, 80-virtual) runs on a device
    of `capability`: machine code needs the same major and a minor no newer than the device's
    ('a' variants run only on their exact version); PTX is compiled by the driver for any newer one."""
    dev = capability[0] * 10 + capability[1]
    for spec in archs:
        name, _, kind = spec.partition("-")
        specific = name.endswith("a") or name.endswith("f")
        try:
            num = int(name.rstrip("af"))
        except ValueError:
            continue
        sass = kind in ("", "real")
        ptx = kind in ("", "virtual") and not specific
        if sass and (num == dev if specific else (num // 10 == dev // 10 and num <= dev)):
            return True
        if ptx and num <= dev:
            return True
    return False


def _cuda_info(build: dict) -> dict:
    info = {
        "compiled": bool(build["cuda_compiled"]),
        "archs": _parse_archs(build["cuda_archs"]),
        "toolkit": build["cuda_toolkit"] or None,
        "usable": False,
        "device": None,
        "reason": None,
    }
    if not info["compiled"]:
        info["reason"] = "built without CUDA (no nvcc at build time, or PYSEQKERN_CPU_ONLY was set)"
        return info
    report = _C.cuda_report()
    info["runtime_version"] = report.get("runtime_version")
    info["driver_version"] = report.get("driver_version")
    info["devices"] = [dict(d) for d in report["devices"]]
    if not torch.cuda.is_available():
        info["reason"] = f"torch {torch.__version__} reports no usable CUDA device"
        return info
    if report["device_count"] == 0:
        info["reason"] = f"the CUDA runtime in pyseqkern finds no device ({report['error'] or 'no error given'})"
        return info
    index = torch.cuda.current_device()
    device = report["devices"][index] if index < len(report["devices"]) else None
    if device is None:
        info["reason"] = f"torch's current device {index} is not visible to pyseqkern's CUDA runtime"
        return info
    cap = tuple(device["capability"])
    info["device"] = f"{device['name']} (sm_{cap[0]}{cap[1]})"
    if not arch_runs_on(info["archs"], cap):
        info["reason"] = (
            f"compiled for {info['archs']} which cannot run on sm_{cap[0]}{cap[1]}; "
            "rebuild with PYSEQKERN_CUDA_ARCHS including it"
        )
        return info
    info["usable"] = True
    return info


def backend_info() -> dict:
    """What is compiled, what the machine supports and what runs: the truth, in one dict."""
    build = _C.build_info()
    isa = _C.cpu_isa_report()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpu": {
            "isa_active": isa["active"],
            "isa_best": isa["best"],
            "isa_supported": list(isa["supported"]),
            "isa_compiled": list(build["cpu_isa_compiled"]),
            "isa_forced_by_env": _FORCED_ISA,
            "vector_bits": isa["vector_bits"],
            "threads": torch.get_num_threads(),
            "thread_pool": _C.thread_backend(),
            "vendor": isa["vendor"],
            "family": int(isa["family"]),
            "l3_streams_fast": bool(isa["l3_streams_fast"]),
            "l2_outpaces_l3": bool(isa["l2_outpaces_l3"]),
            "fp32_gemm": FP32_GEMM,
        },
        "cuda": dict(_cuda_info(build), rnn_paths=dict(CUDA_RNN_PATHS)),
        "reference_fallback": {
            "forced_by_env": _REFERENCE_FORCED,
            "active_for": dict(_FALLBACKS),
        },
        "compiler": build["compiler"],
    }
