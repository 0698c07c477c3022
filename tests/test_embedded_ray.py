"""The default `graphgrad serve` starts its own local Ray (nothing to start by hand)."""

from __future__ import annotations

import time

import numpy as np

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
