import pytest

import pyseqkern
import pyseqkern._handoff
from helpers import cuda_usable, runnable_levels


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None:
        usable, reason = cuda_usable()
        if not usable:
            pytest.skip(f"needs a usable CUDA device: {reason}")


@pytest.fixture(params=pyseqkern.ISA_LEVELS)
def isa(request):
    """Runs the test once per CPU kernel level this CPU supports and this build has, restoring the
    thread's level after (the process default where it had none: PYSEQKERN_CPU_ISA's, which resetting to
    the best level had undone for every later test)."""
    if request.param not in runnable_levels():
        pytest.skip(f"this CPU does not run {request.param}, or the build lacks it")
    with pyseqkern._backend.thread_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def cpu_level_follows_the_default():
    """Tests that set a level and put back the best one (set_cpu_isa(best)) left it the thread's own, which
    undid PYSEQKERN_CPU_ISA for every later test: after each test the thread follows the default again."""
    yield
    pyseqkern._backend.follow_default_isa()


@pytest.fixture(autouse=True, scope="session")
def kernel_teams_follow_torchs_thread_count():
    """Kernel teams are capped at the CPUs the process may use (_handoff.CPUS); the tests that set 3 or
    more threads mean to run teams of that size (the kernels must give the same bits for any), so the
    suite lifts the cap. test_kernel_teams_are_capped_at_the_cpus checks the cap itself."""
    real = pyseqkern._handoff.CPUS
    pyseqkern._handoff.CPUS = 1 << 16
    yield real
    pyseqkern._handoff.CPUS = real
