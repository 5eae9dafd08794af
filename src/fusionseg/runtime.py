"""Process-level switches for CPU speed: the fast paths (:func:`fast_paths`) and the allocator (:func:`tune_malloc`).

Fast paths
----------
Every fast path sits beside its plain reference, and one switch chooses between them for the whole process:
``FUSIONSEG_FAST=0`` in the environment (read on first use), or :func:`fast_paths` / :func:`fast_paths_as` in
code (tests comparing the two use these). On by default. The fast paths:

* ``encoders/efficientnet_lite.py`` ``conv_bn``: each BatchNorm folded into its convolution (the folded weights
  cached on the conv, keyed on the source tensors' versions), and on the CPU the conv and its ReLU6 run as one
  private oneDNN call (``torch.ops.mkldnn._convolution_pointwise``, checked once per process). Plain:
  ``relu6(bn(conv(x)))``. Same maps within float rounding (1e-5 relative).
* ``encoders/base.py`` ``InplaceQuickGELU``: CLIP's activation written into its sigmoid's buffer. Plain:
  ``x * sigmoid(1.702 x)``. Bitwise the same.
* ``tiling.labels_from_logits``: only the classes that can win at each cell are resampled
  (``labelmap.resample_argmax``). Plain: every class resampled in row bands. Same labels and scores.

Allocator
---------
Keep freed tensor memory in the heap instead of handing it back to the OS.

glibc's ``malloc`` serves every allocation above a threshold (adjusted on the fly, at most 32 MB) with a fresh
``mmap`` and unmaps it again on ``free``. A forward pass allocates and frees its large activations every time,
so each one is page-faulted in anew, 4 KB at a time and zeroed by the kernel. On the 2-core test machine,
EfficientNet-Lite0 on 16 images at 384 px took 1.09 million page faults and 2.7 s per forward, against 0 faults
and 1.0 s with the heap kept (results are the same bits; only where memory comes from changes).

:func:`tune_malloc` raises the mmap threshold to 256 MB and the trim threshold to 512 MB (``mallopt``), so such
buffers are reused from the heap. The price is memory kept after a peak: up to the trim threshold stays with
the process (peak RSS of segmenting a 4000x3000 photo rose from about 0.95 to 1.06 GB).

It is called once per process by the entry points only (the CLI, ``fusionseg serve``, training, the
benchmarks), never by library classes: a program that imports fusionseg keeps its allocator as it set it, and
may call :func:`tune_malloc` itself. It does nothing off Linux/glibc, when ``FUSIONSEG_MALLOC=0``, or when the user set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``GLIBC_TUNABLES`` (their choice wins). An allocator
preloaded in place of glibc's (jemalloc, tcmalloc) already avoids the problem and is left alone.
"""
from __future__ import annotations

import contextlib
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


_fast: bool | None = None


def fast_paths(enabled: bool | None = None) -> bool:
    """The fast-path switch (see the module text): with ``enabled``, set it for the whole process; -> whether
    the fast paths are on. Default: on, unless ``FUSIONSEG_FAST=0``."""
    global _fast
    if enabled is not None:
        _fast = bool(enabled)
    elif _fast is None:
        _fast = os.environ.get("FUSIONSEG_FAST", "1") != "0"
    return _fast


@contextlib.contextmanager
def fast_paths_as(enabled: bool):
    """``with fast_paths_as(False): ...`` runs the plain reference paths, then restores the switch."""
    before = fast_paths()
    fast_paths(enabled)
    try:
        yield
    finally:
        fast_paths(before)
