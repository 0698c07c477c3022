"""bench/server_kinds.py runs: its sync server, graphgrad's servicer behind grpc.server, answers
the SDK's prepared gradient calls (a servicer change once broke it, unseen: bench/ is not
type-checked), as do the two aio kinds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_every_server_kind_answers_the_gradient_calls():
    done = subprocess.run(
        [sys.executable, str(BENCH / "server_kinds.py"), "--calls", "5", "--seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for kind in ("sync", "aio+pool", "aio"):
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"{kind} "))
        assert re.search(r"graphgrad +[\d.]+ us \([\d.]+ x floor\)", line), line
        assert float(re.search(r"graphgrad +(\d+)/s", line).group(1)) > 0, line
