"""The process's own memory on the host: glibc's allocator settings, handing freed memory back, resident size.

A denoiser call on the CPU allocates and frees the same activations every call. By default glibc hands many
freed blocks back to the system, so the next call page-faults them in afresh (and the kernel zeroes them): on
a 2-core virtual machine that was thousands of faults per call of the bundled pixel model, twice as many on the
int8 backend (whose layers make more temporaries) as in FP32. :func:`keep_freed_memory` keeps them for the next
call instead, as the allocators PyTorch's CPU tuning guide recommends (jemalloc, tcmalloc) do; the README's
"Integer execution" section measures what that is worth. Nothing here imports torch.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters (``malloc.h``)."""
MMAP_THRESHOLD_MAX = 32 * 2**20
"""The largest threshold glibc accepts on 64-bit systems: blocks up to it come from the reusable heap."""
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap kept before glibc hands it back on its own (the largest ``int``)."""
OPT_OUT = "TACDIFF_KEEP_FREED_MEMORY"
"""Set to 0 (or false, no, off) and :func:`keep_freed_memory` leaves the allocator as it is."""
_kept = False  # whether keep_freed_memory has set the allocator in this process


@cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not Linux with glibc (macOS, musl): the allocator's own policy stays
        return None


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB on its heap for reuse, and hand the heap's free top back to
    the system only beyond 2 GiB (or on :func:`trim_heap`), so that repeated model calls stop page-faulting their
    activations in afresh. The process's peak resident memory stays what it was; memory freed after the peak is
    kept for the next call rather than returned. The ``tacdiff`` command line sets this for every command, and
    :func:`tacdiff.backends.use_backend` on the CPU; ``TACDIFF_KEEP_FREED_MEMORY=0`` opts out. Returns whether the
    settings are in effect (False off glibc, or when opted out before any call kept them)."""
    global _kept
    if os.environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return _kept
    libc = _glibc()
    if libc is not None:  # setting either threshold also stops glibc from moving both with the sizes it sees freed
        _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) & bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                             TRIM_THRESHOLD))
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has set glibc's allocator in this process."""
    return _kept


def trim_heap() -> None:
    """Hand the heap's free memory back to the system now (glibc ``malloc_trim``; nothing elsewhere), so that
    memory allocated next shows up in the resident size."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """The process's resident memory in bytes (``/proc/self/statm``; 0 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
