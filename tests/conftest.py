import pytest

import pyseqkern
from helpers import cuda_usable, runnable_levels


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None:
        usable, reason = cuda_usable()
        if not usable:
            pytest.skip(f"needs a usable CUDA device: {reason}")


@pytest.fixture(params=pyseqkern.ISA_LEVELS)
def isa(request):
    """Runs the test once per CPU kernel level this CPU supports and this build has, restoring the best
    level after."""
    info = pyseqkern.backend_info()["cpu"]
    if request.param not in runnable_levels():
        pytest.skip(f"this CPU does not run {request.param}, or the build lacks it")
    pyseqkern.set_cpu_isa(request.param)
    yield request.param
    pyseqkern.set_cpu_isa(info["isa_best"])
