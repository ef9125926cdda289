"""Process-wide settings that make CPU training faster.

glibc's ``malloc`` serves every large block (above 128 KiB to 32 MiB, adapting) with a fresh ``mmap`` and gives
it back with ``munmap`` when freed. PyTorch's CPU allocator does not cache, so each large tensor of every step
(a batch of frames, the sampling grid of the crop, the first convolutions' activations) is new memory, and the
kernel zero-fills it page by page on first touch. On the 2-core dev box that page-faulting took more time
than the arithmetic: a batch of 32 USCL pairs at 224 px took 178 ms to make, 73 ms with the heap kept
(docs/benchmarks.md, "Freed memory kept by the allocator").

`keep_freed_memory` tells glibc to serve every block from the heap and to keep freed memory for reuse, which
is what PyTorch's CUDA allocator does on the GPU. The process's resident memory then stays at its peak
instead of shrinking between steps; the peak itself is unchanged. The ``sonocl`` command line calls it;
library users opt in by calling it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_KEEP_BYTES = 1 << 30
"""Free memory at the top of the heap kept before any is given back to the system."""
_TOP_PAD_BYTES = 256 << 20
"""Extra heap requested whenever the heap grows, so that a growing workload asks the kernel less often."""


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and other C libraries have no mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES), (_M_TOP_PAD, _TOP_PAD_BYTES),
    ))
