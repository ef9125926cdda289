"""Process-wide settings: the devices commands run on, and what makes CPU training faster.

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

Importing torch and torchvision creates about 350,000 objects that live as long as the process. Python's cyclic
garbage collector runs several full collections while they load (0.4 s on the dev box) and scans them all again
in every later full collection and in the one at exit (0.5 s). `import_frozen` imports a command's modules with
the collector paused, collects once, and freezes what is left (`gc.freeze`): the collector then ignores those
objects for the rest of the process, and the loader workers forked later share their pages instead of copying
them (the use CPython's documentation gives). The ``sonocl`` process calls it for the command it runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, _KEEP_BYTES),
            (_M_TOP_PAD, _TOP_PAD_BYTES),
        )
    )


def import_frozen(name: str) -> ModuleType:
    """Import the module ``name`` with the garbage collector paused, then collect once and freeze every object left
    (see the module docstring). For a process's own command: objects alive now that later become cyclic garbage
    are never collected, which a long-lived caller (a notebook, a test session) would not want."""
    gc.disable()
    try:
        module = importlib.import_module(name)
    finally:
        gc.enable()
    gc.collect()
    gc.freeze()
    return module


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` (this rank's GPU under torchrun) or ``cuda:N``.

    The one place every command turns its ``--device`` into a device; a device this machine lacks is a
    `ConfigError` naming the option and the fix."""
    import torch

    from sonocl.errors import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: torch sees no CUDA device on this machine; use --device auto or cpu")
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")
