"""Tests never touch the user's files: a server a test starts keeps its data in a temporary
directory even when the test names none."""

from __future__ import annotations

from pathlib import Path

from .server_proc import running_server


def test_a_test_server_without_data_dir_leaves_home_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with running_server(env={"HOME": str(home)}) as server:
        assert server.proc.poll() is None
    assert list(home.iterdir()) == [], "the server wrote into the (fake) home directory"
