"""Process-level tuning for CPU speed: keep freed tensor memory in the heap instead of handing it back to the OS.

glibc's ``malloc`` serves every allocation above a threshold (adjusted on the fly, at most 32 MB) with a fresh
``mmap`` and unmaps it again on ``free``. A forward pass allocates and frees its large activations every time,
so each one is page-faulted in anew, 4 KB at a time and zeroed by the kernel. On the 2-core test machine,
EfficientNet-Lite0 on 16 images at 384 px took 1.09 million page faults and 2.7 s per forward, against 0 faults
and 1.0 s with the heap kept (results are the same bits; only where memory comes from changes).

:func:`tune_malloc` raises the mmap threshold to 256 MB and the trim threshold to 512 MB (``mallopt``), so such
buffers are reused from the heap. The price is memory kept after a peak: up to the trim threshold stays with
the process (peak RSS of segmenting a 4000x3000 photo rose from about 0.95 to 1.06 GB).

It runs once per process, from the CLI, :class:`~fusionseg.segmenter.Segmenter` on the CPU and training. It
does nothing off Linux/glibc, when ``FUSIONSEG_MALLOC=0``, or when the user set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``GLIBC_TUNABLES`` (their choice wins). An allocator
preloaded in place of glibc's (jemalloc, tcmalloc) already avoids the problem and is left alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 256 * 2**20
TRIM_THRESHOLD = 512 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_state: bool | None = None


def tune_malloc() -> bool:
    """Keep large freed buffers in the heap (see the module text); -> whether the settings are in force.
    Idempotent and cheap: only the first call does anything."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if not sys.platform.startswith("linux") or os.environ.get("FUSIONSEG_MALLOC", "1") == "0":
        return False
    if any(k in os.environ for k in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only (musl has a mallopt that does nothing)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _state = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _state
