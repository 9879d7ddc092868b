"""The C allocator in worker processes: memory a training step frees is kept for the next step.

torch takes a CPU tensor's memory from the C library's ``malloc``. glibc serves blocks above its
mmap threshold (128 KiB, rising as such blocks are freed, to at most 32 MiB) with a fresh
mapping, and unmaps them when freed; it also returns the heap's free top to the kernel above
its trim threshold. A fine-tune step makes and frees tensors that large every step (MiniLM's
embedding gradient alone is 47 MB, bert-base's 94 MB), so each step paid the kernel to map,
zero and unmap them again. ``bench/allocator.py`` measures it: on the AVX2 EPYC, a 250-step
fine-tune on SST-2 sentences took about 3.1 million page faults and 10 s of system time.

:func:`keep_freed_memory` raises both thresholds once per worker process, so that freed blocks
stay in the process for the next step; :func:`return_freed_memory`, after each job, hands what
is free back, so that an idle worker does not hold a finished job's peak. Other C libraries
(musl, macOS) keep their own behaviour; ``TUNEQ_KEEP_FREED_MEMORY=false`` keeps glibc's.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from functools import cache

from tuneq.schemas.settings import load_settings

log = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap: any activation or gradient of a bert-base-sized model
# in the batches tuneq trains on; larger ones are still mapped afresh.
MMAP_THRESHOLD = 256 << 20
# The heap's free top kept between steps before glibc returns it to the kernel by itself.
TRIM_THRESHOLD = 1 << 30


@cache
def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None under another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to :data:`MMAP_THRESHOLD` in this process (glibc, unless
    ``TUNEQ_KEEP_FREED_MEMORY`` is off); returns whether it does now."""
    libc = glibc()
    if libc is None or not load_settings().keep_freed_memory:
        return False
    kept = bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not kept:
        log.warning("glibc refused the allocator thresholds; freed memory goes back as before")
    return kept


def return_freed_memory() -> None:
    """Give the memory this process holds free back to the kernel (glibc's ``malloc_trim``)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
