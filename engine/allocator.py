"""glibc's malloc thresholds, set once per process (no-ops where libc has no mallopt)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def set_malloc_thresholds(
    mmap_bytes: int, trim_bytes: int | None = None, arenas: int | None = None
) -> None:
    """Allocations of `mmap_bytes` or more get their own mmap (returned to the system when
    freed). Setting it also stops glibc from raising the threshold after each large free,
    which otherwise keeps every later array of that size on a heap that never shrinks.
    `trim_bytes`: how much free memory a heap keeps at its top rather than return it (and
    fault it back in when next used). `arenas`: at most this many heaps, where each thread
    that allocates could otherwise get its own (each keeping up to `trim_bytes`)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
        if trim_bytes is not None:
            libc.mallopt(M_TRIM_THRESHOLD, trim_bytes)
        if arenas is not None:
            libc.mallopt(M_ARENA_MAX, arenas)
