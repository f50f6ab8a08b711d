"""Process memory: how large tensors are allocated, and handing idle weight pages back.

Both exist for the CPU memory target (peak RSS flat in file length and under 1.5 GiB).

Allocator. A separation allocates and frees tensors of 1-30 MB per layer. glibc's malloc raises
its mmap threshold to the largest block freed so far, so after the first pass those tensors come
from the heap, where freed blocks are kept and fragment: about 250 MB more peak RSS than the live
tensors need, measured on a 9.6 s window. A fixed 1 MB threshold keeps every large tensor in its
own mapping, returned when freed; transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``)
make re-mapping cheap, so the time per pass did not change (33.4-33.8 s for a 1-minute stereo
file either way). Both must be set before torch allocates, so the command-line entry points call
:func:`tune_allocator` first; the Python API leaves the host process's allocator alone.

Pages. The text encoder (RoBERTa, ~500 MB in float32) is needed once per new query, the
separator for every window. When the weights are memory-mapped from the checkpoint or converted
folder, their pages are clean file pages: ``madvise(MADV_PAGEOUT)`` drops them from the resident
set and the next new query faults them back in from the page cache or the disk (0.1-0.4 s).
Anonymous memory (a checkpoint read without mmap) only leaves through swap, so there the call
changes nothing; it never changes a value either way, unlike MADV_DONTNEED.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Iterable

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20
MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL, which is ignored


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def tune_allocator() -> None:
    """Fixed 1 MB mmap threshold (glibc) and huge pages for large torch tensors; call before
    importing torch. Settings the user gave in the environment win."""
    if not sys.platform.startswith("linux"):
        return
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = _libc().mallopt  # absent on musl: nothing to tune there
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def page_out(tensors: Iterable) -> int:
    """Advise the kernel to reclaim the whole pages under these CPU tensors; returns bytes advised."""
    if not sys.platform.startswith("linux"):
        return 0
    storages = [t.untyped_storage() for t in tensors if t.device.type == "cpu"]
    spans = sorted((st.data_ptr(), st.data_ptr() + st.nbytes()) for st in storages if st.nbytes() > 0)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    try:
        madvise = _libc().madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    page = os.sysconf("SC_PAGE_SIZE")
    advised = 0
    for start, end in merged:
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the span only
        if last > first and madvise(first, last - first, MADV_PAGEOUT) == 0:
            advised += last - first
    return advised


def peak_rss_mib() -> float | None:
    """This process's peak resident set (Linux VmHWM), MiB; None where /proc is not there. What the
    memory budget bounds (get_status reports it)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
