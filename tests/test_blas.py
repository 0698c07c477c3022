"""The server gives numpy's BLAS its share of the cores for each run at once (server/blas.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.server.blas import (
    BLAS_THREADS,
    SHARED_BY_WORKERS,
    limit_blas_threads,
    run_share,
    threads_per_run,
)
from graphgrad.server.supervisor import worker_env

from .server_proc import running_server

# A fresh interpreter: the limit is process-wide, and this test process's BLAS stays as it is.
SET_AND_READ = """
import sys
from threadpoolctl import threadpool_info
from graphgrad.server.blas import limit_blas_threads
set_to = limit_blas_threads(int(sys.argv[1]))
print(set_to, [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"])
"""


def no_blas_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in BLAS_THREADS}


def test_each_run_gets_its_share_of_the_cores():
    assert run_share(2, 2) == 1
    assert run_share(16, 4) == 4
    assert run_share(2, 64) == 1  # never none
    assert run_share(8, 0) == 8


def test_the_limit_applies_to_numpys_blas():
    slots = os.cpu_count() or 1  # the server's default: one run per CPU
    out = subprocess.run(
        [sys.executable, "-c", SET_AND_READ, str(slots)],
        env=no_blas_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split(maxsplit=1)
    assert out[0] == "1"
    if out[1].strip() == "[]":  # e.g. Accelerate: no BLAS pool threadpoolctl can limit
        pytest.skip("threadpoolctl sees no BLAS thread pool in this numpy")
    assert out[1].strip() == "[1]"


def test_blas_threads_the_operator_set_are_kept():
    assert limit_blas_threads(1, {"OPENBLAS_NUM_THREADS": "3"}) is None


def test_a_worker_splits_its_share_of_the_cores_between_its_runs():
    # --workers 2 on 16 cores, 4 runs at once in each: 2 threads a run, not the worker's 8
    # (8 a run, 4 runs, 2 workers: 64 threads on 16 cores, spinning after each matmul).
    env = worker_env(2, {"PATH": "/bin"})
    assert env[SHARED_BY_WORKERS] == "2" and env["PATH"] == "/bin"
    assert {env[name] for name in BLAS_THREADS} == {str(max(1, (os.cpu_count() or 1) // 2))}
    assert threads_per_run(4, 16, {**env, "OPENBLAS_NUM_THREADS": "8"}) == 2
    assert threads_per_run(4, 16, {}) == 4  # one process: its runs split the cores
    assert threads_per_run(64, 16, env) == 1  # never none
    # the operator's BLAS threads stand, for the supervisor's workers too
    operator = {"OMP_NUM_THREADS": "3"}
    assert worker_env(2, operator) == operator
    assert threads_per_run(4, 16, worker_env(2, operator)) is None


def test_the_server_runs_with_its_share_and_says_so():
    with gg.Graph():
        x = gg.input("x", shape=(32, 32))
        w = gg.input("w", shape=(32, 32))
        loss = gg.sum(gg.tanh(x @ w))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((32, 32)), "w": rng.standard_normal((32, 32)) / 8}
    with running_server() as server, gg.connect(server.address) as client:
        res = client.run(loss, feeds, wrt=["w"])
        log = server.log()
    expected = (1 - np.tanh(feeds["x"] @ feeds["w"]) ** 2).T @ feeds["x"]
    np.testing.assert_allclose(res.grads["w"], expected.T, rtol=1e-12)
    given = [k for k in BLAS_THREADS if k in os.environ]
    if given:  # the operator's (or the CI's) choice stands
        assert f"BLAS threads as {given[0]} sets them" in log
    else:
        assert f"BLAS threads: 1 per run ({os.cpu_count() or 1} runs at once)" in log
