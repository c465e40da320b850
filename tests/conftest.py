import pytest

from helpers import cuda_usable


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None:
        usable, reason = cuda_usable()
        if not usable:
            pytest.skip(f"needs a usable CUDA device: {reason}")
