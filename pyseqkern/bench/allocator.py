"""malloc held in the state a long-running job reaches, so that no case's time is page faults.

glibc's malloc (torch's on Linux) serves every block over its mmap threshold with a fresh mmap and gives
freed heap tops over its trim threshold back to the kernel; both thresholds start low (128 KB) and rise
as large blocks are freed (the mmap one up to 32 MB). A tensor allocated on every call then costs one page
fault per 4 KB touched, on every call. Measured on a 2-core Xeon: torch.nn's LSTM, trained under bfloat16
autocast at (100, 32, 256), faulted 7,000 pages a call (oneDNN's workspace is over 32 MB): 25 ms a call
as glibc starts, 16 ms with the thresholds held; its float32 training 47 ms against 40. Which of the two a
case saw depended on the cases before it in the process. Users who tune CPU PyTorch replace malloc
(jemalloc, tcmalloc), which keeps freed memory for reuse; holding both thresholds high gives both sides
that state in every case, so a ratio is the kernels' and never torch's page faults.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_MMAP_LIMITS = (1 << 30, 32 << 20)  # the first glibc accepts (older ones cap mallopt's at 32 MB)
_TRIM = (1 << 31) - 1  # mallopt takes an int


def _malloc_replaced(libc: ctypes.CDLL) -> bool:
    """Whether the process's malloc is another than this libc's: jemalloc or tcmalloc preloaded, or a
    sanitizer's. mallopt then tunes an allocator nothing calls, and the report must not say "held"."""
    try:
        used = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value  # the global lookup's malloc
        own = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    return used != own


def hold_steady() -> str:
    """Holds glibc's thresholds (a no-op elsewhere); returns what was done, for the report."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return "as the platform gives it (not glibc)"
    if _malloc_replaced(libc):
        return "as the process gives it (malloc replaced, not glibc's: jemalloc, tcmalloc or a sanitizer)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu.restype = ctypes.c_char_p
    mmap = next((v for v in _MMAP_LIMITS if mallopt(_M_MMAP_THRESHOLD, v) == 1), None)
    if mmap is None or mallopt(_M_TRIM_THRESHOLD, _TRIM) != 1:
        return f"glibc {gnu().decode()}, thresholds as glibc sets them (mallopt refused)"
    return f"glibc {gnu().decode()}, held: blocks under {mmap >> 20} MB from the heap, freed memory kept"
