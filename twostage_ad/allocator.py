"""Keep freed large blocks in the process heap (glibc ``mallopt``), so that big tensors are not
page-faulted in afresh on every batch.

Why: glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. Every activation tensor of a scoring batch
is such an allocation, so the kernel zero-fills it one 4 KiB page fault at a time, batch after
batch: at 128 px, stage-1 scoring spent more than half its time in those faults (profiled as
``aten::copy_`` and ``upsample_bilinear2d``). With the thresholds raised, freed blocks are reused.
Measured on 2 CPU cores at 128 px (``benchmarks/speed.py --allocator system|tuned``, same
commit; docs/experiments.md, allocator): stage-1 scoring 94 -> 201 images/s, stage 2 186 -> 342,
stage-1 training 39 -> 50. PyTorch's CPU performance guide gives the same advice in the form of
jemalloc/tcmalloc; this needs no preloaded library.

Cost: memory a process has freed stays with it for reuse (resident memory keeps its peak instead
of shrinking between batches) and cannot be undone. The setting is process-wide, like
``torch.set_num_threads``; the pipeline applies it when ``run.tune_malloc`` is true (the
default; set it false in notebooks and long-lived services that must give memory back).
"""

from __future__ import annotations

import ctypes
import logging
import platform

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # the documented maximum (HEAP_MAX_SIZE / 2 on 64-bit)


def tune_malloc(*, mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1, top_pad: int = 1 << 28) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; return whether it took effect.

    Args:
        mmap_threshold: allocations up to this many bytes come from the heap, not a fresh mmap.
        trim_threshold: free heap top kept before memory is returned to the system.
        top_pad: extra bytes the heap grows by, so growth is not one system call per batch.

    Returns False, doing nothing, where the C library is not glibc (macOS, Windows, musl). Older
    glibc versions refuse an mmap threshold above 32 MiB (``mallopt(3)``); then 32 MiB is used, and
    when even that is refused nothing else is changed (the trim and top-pad settings would switch
    off glibc's self-adjusting threshold and leave the process worse off).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold), ("top_pad", top_pad)):
        if not (isinstance(value, int) and 0 < value < 1 << 31):
            raise ValueError(f"{name} must be an int in [1, 2**31), got {value!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        if not mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _GLIBC_MMAP_THRESHOLD_MAX)):
            log.warning("glibc refused the mmap threshold; allocator left as it was")
            return False
        log.info("glibc refused an mmap threshold of %d bytes; using %d", mmap_threshold, _GLIBC_MMAP_THRESHOLD_MAX)
    applied = [mallopt(_M_TRIM_THRESHOLD, trim_threshold), mallopt(_M_TOP_PAD, top_pad)]
    if not all(applied):
        log.warning("glibc refused part of the allocator tuning (mallopt returned %s)", applied)
        return False
    return True
