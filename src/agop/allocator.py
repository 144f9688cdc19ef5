"""The C heap of a long run: keep freed memory for the next allocation (glibc only).

Every Deep RFM layer allocates the same large arrays again (K_NC, distances, kernel blocks,
AGOP chunks: hundreds of MB each). glibc's ``malloc`` serves any block above 32 MiB with a
fresh ``mmap`` and returns it to the kernel on ``free``, so each layer touches all of that
memory for the first time again: one page fault per 4 KiB page, the kernel zeroing each page.
Measured on the full-MNIST Nyström run (60,000 points, 4,000 centers, 20 layers, 2 cores): 60
million page faults and 180 s of system time with glibc's defaults (16 min 22 s, another job's
tests sharing the cores part of the time); with the
freed memory kept, 13 min 16 s, 17 s of system time, the same numbers, and a peak of 6.9 GB
instead of 4.9 GB. The peak grows because torch's aligned allocations do not always fit the
hole a block of their own size left: on the exact path (a few N × N blocks per layer) keeping
freed memory saved 13% of the time but raised the peak by 60% (8,000 points, 4.4 GB instead of
2.8 GB), which a memory plan does not foresee.

So :func:`agop.experiments.rfm.run_rfm` keeps freed memory (:func:`retained_memory`) for
Nyström runs on a CPU, and for exact runs where twice their planned peak fits in the free
memory (a depth-1 fit of 5,000 MNIST points: 305,000 page faults and 0.9 s of system time
fewer, 17% less CPU time), and releases it between layers (:func:`release_freed_memory`);
``AGOP_MALLOC=default`` in the environment turns it off. The library never changes the
process's allocator. Memory kept this way is free for the process to reuse:
:func:`reusable_bytes` reports it and :func:`agop.backend.free_memory` counts it as available,
so a later layer's memory plan sees what the first one saw.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Iterator

__all__ = ["release_freed_memory", "retain_freed_memory", "retained_memory", "reusable_bytes"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


class _Mallinfo2(ctypes.Structure):  # struct mallinfo2 (glibc ≥ 2.33), all size_t
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (other C libraries: None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings)


def retain_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory in the process (glibc).

    Sets ``M_MMAP_MAX`` 0 (no block gets its own ``mmap``; glibc still falls back to ``mmap``
    where the heap cannot grow), ``M_TRIM_THRESHOLD`` to 2 GiB (free memory at the top of the
    heap is returned to the kernel only above that) and ``M_TOP_PAD`` to 64 MiB. Returns True
    when the settings took effect; False on other C libraries or platforms, or when
    ``AGOP_MALLOC=default``.
    """
    if os.environ.get("AGOP_MALLOC", "").strip().lower() == "default":
        return False
    return _mallopt(((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, 64 << 20)))


@contextlib.contextmanager
def retained_memory() -> Iterator[bool]:
    """:func:`retain_freed_memory` inside the block (yields whether it took effect); after it,
    glibc's documented defaults again (``M_MMAP_MAX`` 65,536, ``M_TRIM_THRESHOLD`` and
    ``M_TOP_PAD`` 128 KiB, fixed rather than adaptive) and the kept memory released."""
    on = retain_freed_memory()
    try:
        yield on
    finally:
        if on:
            _mallopt(((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 << 10),
                      (_M_TOP_PAD, 128 << 10)))
            release_freed_memory()


def reusable_bytes() -> int:
    """Bytes the process has freed and kept in its heap (glibc ``mallinfo2().fordblks``; 0
    where that is not available): memory a new allocation reuses without asking the kernel."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    fn = libc.mallinfo2
    fn.argtypes = []
    fn.restype = _Mallinfo2
    return int(fn().fordblks)


def release_freed_memory() -> bool:
    """Return the memory the process has freed to the system now (glibc ``malloc_trim``).

    Kept memory is reused by allocations of the sizes freed, but an aligned allocation (torch's)
    of exactly a freed size does not always fit its hole, so a run that repeats the same large
    allocations can accumulate holes; a long run calls this between its steps (each Deep RFM
    layer), which bounds what is kept to one step's churn. True if anything was released.
    """
    libc = _glibc()
    if libc is None:
        return False
    fn = libc.malloc_trim
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn(0) == 1
