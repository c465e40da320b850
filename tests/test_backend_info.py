"""backend_info() tells the truth; PYSEQKERN_CPU_ISA forces levels and rejects bad values."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import pyseqkern
from pyseqkern._backend import arch_runs_on


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYSEQKERN_")}
    full_env.update(env)
    # From a neutral directory: `python -c` puts the current directory first on sys.path, and the
    # repository root holds the source package, without _C.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120,
                          cwd=tempfile.gettempdir())


def test_keys_and_values():
    info = pyseqkern.backend_info()
    assert info["version"] == pyseqkern.__version__
    assert info["torch"] == torch.__version__
    cpu = info["cpu"]
    assert cpu["isa_active"] in pyseqkern.ISA_LEVELS
    assert cpu["isa_best"] in cpu["isa_supported"] and cpu["isa_best"] in cpu["isa_compiled"]
    assert "baseline" in cpu["isa_supported"] and "baseline" in cpu["isa_compiled"]
    assert cpu["threads"] == torch.get_num_threads()
    assert cpu["vector_bits"] in (128, 256, 512)
    assert isinstance(cpu["vendor"], str) and cpu["fp32_gemm"] in ("onednn", "mkl")
    assert isinstance(cpu["l3_streams_fast"], bool)  # (its rule: test_l3_streams_by_env)
    assert isinstance(cpu["l2_outpaces_l3"], bool) and cpu["l3_streams_fast"] >= cpu["l2_outpaces_l3"]
    assert isinstance(cpu["family"], int) and cpu["family"] >= 0
    cuda = info["cuda"]
    assert set(cuda) >= {"compiled", "archs", "usable", "device", "reason"}
    assert cuda["usable"] == (cuda["reason"] is None)
    if not torch.cuda.is_available():
        assert not cuda["usable"] and cuda["reason"]
    if cuda["compiled"]:
        assert cuda["archs"] and cuda["toolkit"]
    fallback = info["reference_fallback"]
    assert fallback["forced_by_env"] is False and isinstance(fallback["active_for"], dict)
    # Fresh process: nothing has fallen back yet (other tests in this one may have made ops fall back).
    proc = run_python("import json, pyseqkern; print(json.dumps(pyseqkern.backend_info()['reference_fallback']))")
    assert json.loads(proc.stdout) == {"forced_by_env": False, "active_for": {}}


def test_cpu_flags_agree_with_proc_cpuinfo():
    if not os.path.exists("/proc/cpuinfo") or sys.platform != "linux":
        pytest.skip("needs /proc/cpuinfo")
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    supported = pyseqkern.backend_info()["cpu"]["isa_supported"]
    assert ("avx2" in supported) == ({"avx2", "fma", "f16c"} <= flags)
    assert ("avx512" in supported) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2"} <= flags)
    assert ("avx512bf16" in supported) == ("avx512" in supported and "avx512_bf16" in flags)
    # amx also needs the OS's permission for the tile data, which cpuinfo's flags do not show.
    if "amx" in supported:
        assert "avx512bf16" in supported and {"amx_tile", "amx_bf16"} <= flags


def test_threads_follow_torch():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert pyseqkern.backend_info()["cpu"]["threads"] == 1
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("level", pyseqkern.ISA_LEVELS)
def test_forcing_each_level_by_env(level):
    cpu = pyseqkern.backend_info()["cpu"]
    proc = run_python("import json, pyseqkern; print(json.dumps(pyseqkern.backend_info()['cpu']))",
                      PYSEQKERN_CPU_ISA=level.upper())
    if level in cpu["isa_supported"] and level in cpu["isa_compiled"]:
        assert proc.returncode == 0, proc.stderr
        cpu = json.loads(proc.stdout)
        assert cpu["isa_active"] == level and cpu["isa_forced_by_env"] == level
    elif level not in cpu["isa_compiled"]:  # amx, built by a compiler without AMX intrinsics
        assert proc.returncode != 0 and "is not compiled into this build" in proc.stderr
    else:
        assert proc.returncode != 0 and "above what this CPU supports" in proc.stderr


def test_unknown_level_is_a_clear_error():
    proc = run_python("import pyseqkern", PYSEQKERN_CPU_ISA="sse9")
    assert proc.returncode != 0
    assert "PYSEQKERN_CPU_ISA='sse9'" in proc.stderr and "baseline, avx2, avx512, avx512bf16, amx" in proc.stderr


@pytest.mark.parametrize("value, expect", [("mkl", "mkl"), ("onednn", "onednn"), (" OneDNN ", "onednn"), ("", None),
                                           ("auto", None)])
def test_fp32_gemm_by_env(value, expect):
    """PYSEQKERN_FP32_GEMM forces the library of the recurrent layers' float32 GEMMs; auto (or unset)
    takes MKL where torch has it on Intel CPUs and on CPUs without AVX-512, oneDNN's linear elsewhere."""
    proc = run_python("import json, pyseqkern; print(json.dumps(pyseqkern.backend_info()['cpu']))",
                      PYSEQKERN_FP32_GEMM=value)
    assert proc.returncode == 0, proc.stderr
    cpu = json.loads(proc.stdout)
    mkl_full_speed = cpu["vendor"] == "GenuineIntel" or "avx512" not in cpu["isa_supported"]
    auto = "mkl" if mkl_full_speed and torch.backends.mkl.is_available() else "onednn"
    assert cpu["fp32_gemm"] == (expect or auto)


def test_unknown_fp32_gemm_is_a_clear_error():
    proc = run_python("import pyseqkern", PYSEQKERN_FP32_GEMM="cublas")
    assert proc.returncode != 0
    assert "PYSEQKERN_FP32_GEMM='cublas'" in proc.stderr and "['auto', 'mkl', 'onednn']" in proc.stderr


@pytest.mark.parametrize("value, expect", [("own", "own"), ("OWN", "own"), (" own ", "own"), ("openmp", "openmp"),
                                           ("", "openmp"), ("2", None), ("bogus", None)])
def test_threads_env(value, expect):
    """PYSEQKERN_THREADS: own workers for "own" in any case or spacing; the OpenMP team for "openmp" or
    nothing; anything else a clear error at import ("OWN" and "2" once left torch's team in place
    silently; found by a concurrency fuzzer, stop 27). (openmp: torch's libgomp, where this torch has it.)"""
    proc = run_python("import pyseqkern; print(pyseqkern.backend_info()['cpu']['thread_pool'])",
                      PYSEQKERN_THREADS=value)
    if expect is None:
        assert proc.returncode != 0
        assert f"PYSEQKERN_THREADS={value!r}" in proc.stderr and "expected 'own'" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    pool = proc.stdout.strip()
    assert pool == "own" if expect == "own" else pool != "own"


def test_set_cpu_isa_at_run_time():
    best = pyseqkern.backend_info()["cpu"]["isa_best"]
    try:
        pyseqkern.set_cpu_isa("baseline")
        assert pyseqkern.backend_info()["cpu"]["isa_active"] == "baseline"
        assert pyseqkern.backend_info()["cpu"]["vector_bits"] == 128
        with pytest.raises(ValueError, match="unknown CPU ISA level"):
            pyseqkern.set_cpu_isa("avx1024")
        with pytest.raises(TypeError, match="'level' must be a str"):
            pyseqkern.set_cpu_isa(2)
    finally:
        pyseqkern.set_cpu_isa(best)


def test_the_cpu_isa_level_is_per_thread():
    """set_cpu_isa sets the calling thread's level; other threads keep theirs, and threads that set none
    follow the process default (all_threads=True, or PYSEQKERN_CPU_ISA at import)."""
    from concurrent.futures import ThreadPoolExecutor

    best = pyseqkern.backend_info()["cpu"]["isa_best"]
    default = pyseqkern._backend._IsaLevel.name  # (best, or the level PYSEQKERN_CPU_ISA set)
    seen = lambda: (pyseqkern.backend_info()["cpu"]["isa_active"], pyseqkern._backend.active_isa())
    with ThreadPoolExecutor(1) as pool:
        try:
            pyseqkern.set_cpu_isa("baseline")
            assert seen() == ("baseline", "baseline")
            assert pool.submit(seen).result() == (default, default)
            pyseqkern.set_cpu_isa("baseline", all_threads=True)
            assert pool.submit(seen).result() == ("baseline", "baseline")
            pool.submit(pyseqkern.set_cpu_isa, best).result()  # the worker's own level now
            pyseqkern.set_cpu_isa(best, all_threads=True)
            assert seen() == ("baseline", "baseline")  # the main thread's own level stands
            assert pool.submit(seen).result() == (best, best)
        finally:
            pyseqkern.set_cpu_isa(default, all_threads=True)
            pyseqkern.set_cpu_isa(default)


def test_reference_env_is_reported_and_used():
    proc = run_python(
        "import json, torch, pyseqkern\n"
        "y = pyseqkern.ops.probe.triad(torch.ones(3), torch.ones(3), 2.0)\n"
        "print(json.dumps([pyseqkern.backend_info()['reference_fallback'], y.tolist()]))",
        PYSEQKERN_REFERENCE="1")
    assert proc.returncode == 0, proc.stderr
    fallback, y = json.loads(proc.stdout)
    assert fallback["forced_by_env"] is True and y == [3.0, 3.0, 3.0]


def test_info_module_prints_readably_and_as_json():
    proc = subprocess.run([sys.executable, "-m", "pyseqkern.info"], capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr
    assert "ISA active" in proc.stdout and "CUDA" in proc.stdout and "Reference fallback" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pyseqkern.info", "--json"], capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())
    assert json.loads(proc.stdout)["version"] == pyseqkern.__version__


def test_info_names_the_cache_rules_and_the_family():
    """python -m pyseqkern.info names which cache rules the recurrent layers follow (the report's two flags)
    and the cpuid family in the form AMD documents it (1Ah), none where cpuid gave none."""
    from pyseqkern import info
    rules = [info._cache_rules({"l3_streams_fast": fast, "l2_outpaces_l3": outpaces})
             for fast, outpaces in ((False, False), (True, False), (True, True))]
    assert rules[0].startswith("slow-L3") and rules[1].startswith("AMD's") and rules[2].startswith("Zen 5's")
    report = pyseqkern.backend_info()
    for family, shown in ((0x1A, "(family 1Ah)"), (0, None)):
        text = info.format_info(dict(report, cpu=dict(report["cpu"], family=family)))
        assert (shown in text) if shown else ("family" not in text)


@pytest.mark.parametrize("archs, cap, runs", [
    (["80", "90"], (9, 0), True),
    (["80"], (9, 0), True),          # compute_80 PTX is JIT-compiled for sm_90
    (["80-real"], (9, 0), False),    # machine code only, other major
    (["80-real"], (8, 6), True),     # same major, older minor
    (["86-real"], (8, 0), False),    # machine code newer than the device
    (["90a"], (9, 0), True),
    (["90a"], (10, 0), False),       # arch-specific code runs on its exact version only
    (["90-virtual"], (8, 0), False),
    ([], (9, 0), False),
])
def test_arch_compatibility(archs, cap, runs):
    assert arch_runs_on(archs, cap) is runs


@pytest.mark.cuda
def test_cuda_report_names_the_device():
    info = pyseqkern.backend_info()["cuda"]
    assert info["usable"] and torch.cuda.get_device_name() in info["device"]


@pytest.mark.parametrize("value, fast, outpaces", [("fast", True, False), (" Half", True, True),
                                                   (" Slow ", False, False), ("", None, None), ("auto", None, None)])
def test_l3_streams_by_env(value, fast, outpaces):
    """PYSEQKERN_L3_STREAMS forces the cache rules (fast: Zen 3 and Zen 4's, half: Zen 5's, slow: the
    slow-L3 ones) or leaves them to the vendor and family; the recurrent layers' rules follow it, and a
    layer whose panels the forced rules treat otherwise (LSTM H=256 at 8 rows: 2 MB of panels by rows or
    by units, each step or before the steps) still gives torch.nn's results."""
    code = """
import json, torch, pyseqkern
from pyseqkern.ops import rnn_paths
torch.manual_seed(0)
ref = torch.nn.LSTM(256, 256)
ours = pyseqkern.convert(torch.nn.LSTM(256, 256)); ours.load_state_dict(ref.state_dict())
x = torch.randn(9, 8, 256)
with torch.no_grad():
    err = (ours(x)[0] - ref(x)[0]).abs().max().item()
print(json.dumps([pyseqkern.backend_info()["cpu"], rnn_paths._EACH_STEP_L2S, rnn_paths._RIDE_L3_SHARE,
                  rnn_paths._L2_OUTPACES_L3, err]))
"""
    proc = run_python(code, PYSEQKERN_L3_STREAMS=value)
    assert proc.returncode == 0, proc.stderr
    cpu, each_step_l2s, ride_share, paths_outpace, err = json.loads(proc.stdout)
    if fast is None:
        fast = cpu["vendor"] in ("AuthenticAMD", "HygonGenuine")
        outpaces = cpu["vendor"] == "AuthenticAMD" and cpu["family"] >= 0x1A
    assert cpu["l3_streams_fast"] == fast and cpu["l2_outpaces_l3"] == paths_outpace == outpaces
    assert (each_step_l2s, ride_share) == ((2, 0.5) if fast else (0.5, 0.0))
    assert err < 1e-5


def test_unknown_l3_streams_is_a_clear_error():
    proc = run_python("import pyseqkern", PYSEQKERN_L3_STREAMS="quick")
    assert proc.returncode != 0
    assert "PYSEQKERN_L3_STREAMS='quick'" in proc.stderr and "['auto', 'fast', 'half', 'slow']" in proc.stderr
