"""Every Python block in README.md runs, in order, in one namespace (as a reader pasting them
into one session would), against a real server: the README's address 127.0.0.1:50051 is
replaced by the test server's. A block preceded by `<!-- readme: skip, <reason> -->` is not
run; the reason is required."""

from __future__ import annotations

import re
from pathlib import Path

from .server_proc import running_server

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_ADDRESS = "127.0.0.1:50051"
BLOCK = re.compile(
    r"(?:<!--\s*readme:\s*skip,\s*(?P<reason>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)


def python_blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason) of each ```python block."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("reason"))
        for m in BLOCK.finditer(text)
    ]


def test_the_readme_has_python_blocks_and_every_skip_gives_a_reason():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert all(reason is None or reason.strip() for _, _, reason in blocks)


def test_every_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "readme"}
    with running_server() as server:
        for line, code, reason in python_blocks():
            if reason is not None:
                continue
            # padded so that a traceback points at the README's own lines
            source = "\n" * (line - 1) + code.replace(DEFAULT_ADDRESS, server.address)
            try:
                exec(compile(source, str(README), "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"README.md's block at line {line} fails: {e!r}") from e
        namespace["client"].close()  # type: ignore[attr-defined]
