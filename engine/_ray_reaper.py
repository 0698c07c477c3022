"""A watchdog that makes the embedded Ray's processes die with the server that started it.

Ray kills the processes the driver starts (GCS, raylet, ...) when the driver dies, but not
those the raylet starts: its dashboard and runtime-env agents notice the raylet's death and
then wait a minute on the dead GCS, and a SIGKILL'd server has no chance to stop them. So
the server starts this script (stdlib only, run by path: no package imports) with the pids
of Ray's processes; it follows their descendants and, when the pipe on its stdin closes
(the server exited, however), kills whatever of them is left.

Usage: python -I -S _ray_reaper.py PID:STARTTIME ...
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys

# The set of Ray's processes is refreshed after 1 s, then less and less often: the agents
# start with Ray and never change (the raylet dies with them), and workers exit on their
# own when the raylet dies; each refresh scans /proc, one read per process.
FIRST_REFRESH_S, LAST_REFRESH_S = 1.0, 60.0


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process we can see, from /proc (none where
    there is no /proc: there the watchdog has nothing to follow and is not started)."""
    out: dict[int, tuple[int, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ")"
        out[int(entry)] = (int(fields[1]), fields[19])
    return out


def children(pid: int) -> set[int]:
    return {p for p, (parent, _) in processes().items() if parent == pid}


def tagged(pids: set[int]) -> list[str]:
    """`pids` as PID:STARTTIME arguments (a start time tells a reused pid apart)."""
    table = processes()
    return [f"{p}:{table[p][1]}" for p in sorted(pids) if p in table]


def follow(known: dict[int, str]) -> dict[int, str]:
    """The known processes still alive (same start time) and all their descendants."""
    table = processes()
    alive = {p: t for p, t in known.items() if p in table and table[p][1] == t}
    grew = True
    while grew:
        new = {p: t for p, (parent, t) in table.items() if parent in alive and p not in alive}
        alive.update(new)
        grew = bool(new)
    return alive


def main(args: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the server
    known = dict(a.split(":", 1) for a in args)
    tracked = follow({int(p): t for p, t in known.items()})  # before the raylet can die
    wait = FIRST_REFRESH_S
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], wait)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the server is gone
        tracked = follow(tracked)
        wait = min(2 * wait, LAST_REFRESH_S)
    for pid in follow(tracked):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
