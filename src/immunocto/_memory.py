"""Keep freed memory for reuse instead of handing it back to the system after every tile.

Per-tile work allocates many large arrays (a 19-channel IF tile is ~50 MB; distance transforms,
label maps, float copies). glibc serves allocations above its mmap threshold (at most 32 MiB
by default) with fresh pages from the kernel and returns them on free, so each tile pays the
page faults again: on the 2-core VMs we measure on, touching fresh memory costs ~8 ms per MB
(46 MB: 0.37 s the first time, 0.008 s when reused). Raising the mmap and trim thresholds makes
freed blocks stay in the heap for the next tile: quantification 14.4 s -> 11.5 s on a 4096²
slide, one process (``benchmarks/scale.py``). The resident memory then stays near its peak
instead of falling between tiles; the peak itself does not grow (the same blocks are reused).

``IMMUNOCTO_MALLOC=system`` leaves glibc's defaults; elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the reusable heap.
MMAP_THRESHOLD = 256 * 2**20
#: Free memory at the top of the heap kept before trimming it back.
TRIM_THRESHOLD = 512 * 2**20

_done = False


def reuse_freed_memory() -> bool:
    """Set the thresholds once per process (idempotent); ``True`` when they were set."""
    global _done
    if _done:
        return True
    if os.environ.get("IMMUNOCTO_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    ok = bool(mallopt(_M_TOP_PAD, 64 * 2**20)) and ok
    _done = ok
    return ok
