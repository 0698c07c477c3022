"""The default `graphgrad serve` starts its own local Ray (nothing to start by hand)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest

import graphgrad as gg

from .server_proc import running_server
from .test_seed import network_feeds, two_layer_network


def test_default_server_starts_an_embedded_ray_and_runs_on_it():
    _, L = two_layer_network()
    f = network_feeds()
    with (
        running_server("--ray-num-cpus", "1", ray=True) as server,
        gg.connect(server.address) as client,
    ):
        assert client.run(L, f, wrt=["a"]).stats.executor == "local"
        for _ in range(900):  # bounded wait (3 minutes) for Ray to start
            if client.server_info().ray_resources:
                break
            time.sleep(0.2)
        info = client.server_info()
        assert info.ray_resources["CPU"] == 1, f"Ray never came up; server log:\n{server.log()}"
        assert info.ray_address.startswith("127.0.0.1:")
        res = client.run(L, f, wrt=["W", "a"], executor="ray")
        assert res.stats.executor == "ray"
        local = gg.connect().run(L, f, wrt=["W", "a"], executor="local")
        assert np.array_equal(res.grads["W"], local.grads["W"])


def wait_for_ray(client: gg.RemoteClient, server) -> None:
    for _ in range(900):  # bounded wait (3 minutes) for Ray to start
        if client.server_info().ray_resources:
            return
        time.sleep(0.2)
    raise AssertionError(f"Ray never came up; server log:\n{server.log()}")


@pytest.mark.slow
def test_sigkill_of_the_server_leaves_no_ray_process_behind():
    with (
        running_server("--ray-num-cpus", "1", ray=True) as server,
        gg.connect(server.address) as client,
    ):
        wait_for_ray(client, server)
        _, L = two_layer_network()
        client.run(L, network_feeds(), wrt=["W"], executor="ray")  # workers started too
        ray_procs = psutil.Process(server.proc.pid).children(recursive=True)
        what = {p.pid: " ".join(p.cmdline())[:100] for p in ray_procs}
        assert len(ray_procs) >= 2, what  # at least the GCS and the raylet
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        for _ in range(300):  # bounded wait (30 s), not a timing assertion
            alive = [p for p in ray_procs if running(p)]
            if not alive:
                break
            time.sleep(0.1)
        for p in alive:
            p.kill()  # never leave them running, even when the test fails
        assert not alive, "left behind:\n" + "\n".join(what[p.pid] for p in alive)


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's zombie waits on an init that may never reap it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
