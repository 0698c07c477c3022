"""glibc's malloc thresholds, set once per process (no-ops where libc has no mallopt)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Tuned for speed (Ray workers; the in-process client unless opted out): numpy's temporaries
# up to glibc's largest mmap threshold stay on the heap, and the heap is not trimmed until
# this much is free at its top. With glibc's defaults a program's large values are given
# back after each run and page-faulted in again by the next (bench/simulate.py's chain of
# 4,096-vectors ran about 1.6x slower in CPU time).
TUNED_MMAP_BYTES = 32 << 20
TUNED_TRIM_BYTES = 128 << 20
# Set to 0 to keep glibc's defaults in a process that uses the in-process client.
OPT_OUT_ENV = "GRAPHGRAD_TUNE_MALLOC"


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


def tune_for_speed() -> None:
    """The tuned thresholds, always: for processes graphgrad owns (Ray workers)."""
    set_malloc_thresholds(TUNED_MMAP_BYTES, TUNED_TRIM_BYTES)


def tune_unless_opted_out() -> bool:
    """The tuned thresholds in a user's process (the in-process client), unless
    $GRAPHGRAD_TUNE_MALLOC is 0: the setting is process-wide, so it can be declined.
    Returns whether they were set."""
    if os.environ.get(OPT_OUT_ENV, "").strip() == "0":
        return False
    tune_for_speed()
    return True
