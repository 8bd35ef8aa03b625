"""Host memory: keep freed blocks in the process instead of handing them back to the kernel.

glibc's malloc serves a large block (above a threshold of 128 KiB that grows up to 32 MiB) by a
fresh ``mmap`` and trims the top of its heap when more than twice that threshold is free, so
the tensors a training or sampling step allocates and frees (activations, a chunk of logits,
their gradients) come back as new pages every step and each 4 KiB page is zero-filled by a
page fault on first touch: 15-279 thousand faults per training step at the bench sizes on a
2-core CPU (bench/RESULTS.md, issue #16.3). :func:`keep_freed_memory` turns both off (``M_MMAP_MAX =
0``, ``M_TRIM_THRESHOLD`` = 2 GiB), as ``torch.backends.xeon.run_cpu`` does by preloading
jemalloc: the process keeps its peak footprint (what a caching allocator such as PyTorch's CUDA
one does too) and a steady step faults no page. The ``hdlm`` command line calls it for every
command; ``HDLM_MALLOC=system`` leaves glibc's defaults. No torch import here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept (the largest value mallopt takes)
_applied = False


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory (no mmap per large block, no heap trimming).

    Returns whether it is in effect: False off Linux/glibc, with ``HDLM_MALLOC=system``, or when
    mallopt refuses. Idempotent; process-wide (call it at a program's start, not from a library).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("HDLM_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # musl and others have no such symbol: leave them alone
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def in_effect() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process."""
    return _applied
