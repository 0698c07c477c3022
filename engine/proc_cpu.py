"""CPU time of this process's descendants, from Linux's /proc (empty elsewhere): what Ray's
daemons started by this process (raylet, GCS, agents) spend, for the calibration."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
WORKER_PREFIX = "ray::"  # Ray names its worker processes so (setproctitle)


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(name, parent, CPU seconds) of a process, or None once it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = (PROC / str(pid) / "stat").read_text()
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS
    return None


def daemons(root: int | None = None) -> list[int]:
    """Descendants of `root` (this process) that are not Ray workers."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for entry in PROC.iterdir():
            if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
                names[int(entry.name)] = st[0]
                children.setdefault(st[1], []).append(int(entry.name))
    out, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, ())
        if not names[pid].startswith(WORKER_PREFIX):
            out.append(pid)
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """Their CPU time so far (user and system; a process gone counts 0)."""
    return sum(st[2] for pid in pids if (st := _stat(pid)) is not None)
