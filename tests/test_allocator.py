"""The in-process client tunes its process's malloc as the Ray workers are (opt-out by env).

Seen from glibc itself: after `gg.connect()`, a fresh 4 MiB array is allocated on the heap
(mallinfo2's mmapped bytes do not grow); with GRAPHGRAD_TUNE_MALLOC=0 glibc's defaults
stand and it gets an mmap of its own. Each case in a fresh interpreter: the setting is
process-wide."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util
import numpy as np
import graphgrad as gg

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
gg.connect()
before = libc.mallinfo2().hblkhd
a = np.ones(1 << 19)  # 4 MiB: above glibc's default mmap threshold (128 KiB)
print(libc.mallinfo2().hblkhd - before)
"""


def _glibc_has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return bool(name) and hasattr(ctypes.CDLL(name), "mallinfo2")


pytestmark = pytest.mark.skipif(not _glibc_has_mallinfo2(), reason="needs glibc's mallinfo2")


def mmapped_by_a_fresh_array(env: dict[str, str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(done.stdout.strip().splitlines()[-1])


def test_the_in_process_client_keeps_large_arrays_on_the_heap() -> None:
    assert mmapped_by_a_fresh_array({"GRAPHGRAD_TUNE_MALLOC": ""}) == 0


def test_opting_out_keeps_glibcs_defaults() -> None:
    assert mmapped_by_a_fresh_array({"GRAPHGRAD_TUNE_MALLOC": "0"}) >= 4 << 20
