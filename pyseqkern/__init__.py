"""pyseqkern: fast sequence-model kernels for PyTorch.

`backend_info()` says which kernels run here; `pyseqkern.ops` holds the ops; `python -m
pyseqkern.bench` measures them against torch."""
from ._backend import ISA_LEVELS, backend_info, set_cpu_isa
from ._version import __version__
from . import nn, ops
from .convert import convert
from .ops.rnn import empty_cache

__all__ = ["__version__", "backend_info", "set_cpu_isa", "ISA_LEVELS", "ops", "nn", "convert", "empty_cache"]
