"""The CPU threads every kernel shares, on both backends (torch's OpenMP team and our own workers):
barriers, thread counts above the core count, fork safety."""
import os

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from pyseqkern import _C
from pyseqkern.reference.probe import triad as triad_ref
from helpers import assert_close_to_ref, randn


@pytest.fixture(params=["openmp", "own"])
def backend(request):
    _C.set_own_threads(request.param == "own")
    if request.param == "openmp" and not _C.thread_backend().startswith("openmp"):
        pytest.skip("torch's OpenMP runtime is not loaded in this process")
    yield request.param
    _C.set_own_threads(False)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_barrier_holds_every_thread(backend, threads):
    assert _C.barrier_selftest(threads, 2000)


def test_backend_is_reported():
    import pyseqkern

    pool = pyseqkern.backend_info()["cpu"]["thread_pool"]
    assert pool == _C.thread_backend() and (pool == "own" or pool.startswith("openmp ("))


def test_thread_counts_change_between_calls(backend):
    n = 200_003
    a, b = randn((n,), seed=1), randn((n,), seed=2)
    ref = triad_ref(a.double(), b.double(), 0.5)
    for threads in [4, 1, 7, 2, 3]:
        out = torch.full((n,), float("nan"))
        _C.triad(to_dlpack(out), to_dlpack(a), to_dlpack(b), 0.5, threads, 0)
        assert_close_to_ref(out, ref)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_works_in_a_forked_child():
    n = 200_003
    a, b = randn((n,), seed=3), randn((n,), seed=4)
    ref = triad_ref(a.double(), b.double(), 2.0)
    out = torch.empty(n)
    _C.triad(to_dlpack(out), to_dlpack(a), to_dlpack(b), 2.0, 2, 0)  # parent's workers exist now
    pid = os.fork()
    if pid == 0:  # child: must not hang or crash using workers that did not survive the fork
        code = 1
        try:
            # As DataLoader workers do: torch's own OpenMP regions are not fork-safe (libgomp), ours must be.
            torch.set_num_threads(1)
            child_out = torch.full((n,), float("nan"))
            _C.triad(to_dlpack(child_out), to_dlpack(a), to_dlpack(b), 2.0, 2, 0)
            ok = _C.barrier_selftest(2, 100)
            code = 0 if ok and torch.allclose(child_out.double(), ref) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
