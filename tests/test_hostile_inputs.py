"""Hostile and absurd inputs found by a review of the serving round: the largest values of
the new flags, and what they did before they were bounded."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future

import pytest

from graphgrad.server import cli, logs
from graphgrad.server.batcher import Batcher, BatchingConfig

from .test_dynamic_batching import Recorder

MOST = {
    "--port": 65535,  # 70000 served on 70000 % 65536 = 4464
    "--metrics-port": 65535,  # an OverflowError traceback from bind()
    "--max-message-bytes": 2**31 - 1,  # gRPC's channel options are C ints: a traceback
    "--max-streams": 1_000_000,  # these four add up into gRPC's maximum_concurrent_rpcs,
    "--threads": 10_000,  # a C int: beyond it a traceback at the start
    "--max-concurrent-runs": 10_000,
    "--run-queue": 10_000,
    "--max-batch": 10_000,  # with batching on, --max-concurrent-runs defaults to it
    "--batch-window-us": 1_000_000,  # 10**17: an OverflowError in the batch's wait
    "--job-lease-s": 86_400,  # inf: the lease keeper's wait raised, no job was ever taken
    "--grace": 86_400,
    "--workers": 256,  # a typo must not start ten thousand processes
}
BATCHING = ["--batch-window-us", "500"]  # so that --max-batch sets the run slots


@pytest.mark.parametrize(("flag", "most"), MOST.items())
def test_a_numeric_flag_above_its_maximum_stops_the_start(flag, most):
    args = cli.parser().parse_args(["serve", *BATCHING, flag, str(most + 1)])
    with pytest.raises(SystemExit) as e:
        cli.config_from(args)
    above = f"graphgrad serve: {flag} must be at most {most}, got {most + 1}"
    assert str(e.value) in (above, f"{above}.0")  # a float flag prints its value so
    cli.config_from(cli.parser().parse_args(["serve", *BATCHING, flag, str(most)]))


def test_every_flag_at_its_maximum_still_fits_grpcs_bounds():
    argv = ["serve", *[a for flag, most in MOST.items() for a in (flag, str(most))]]
    config = cli.config_from(cli.parser().parse_args(argv))
    assert config.max_concurrent_rpcs < 2**31  # grpc.aio.server takes it as a C int
    assert config.max_concurrent_runs == MOST["--max-batch"]


# --- a batch window longer than a request's deadline ------------------------------------------


def run_in_thread(batcher: Batcher, key: str, member: str, deadline: float | None) -> Future:
    """batcher.run from a daemon thread (a batch that never leaves must not hold pytest)."""
    out: Future = Future()

    def one() -> None:
        try:
            alone = lambda: (member, "alone")  # noqa: E731
            args = () if deadline is None else (deadline,)
            out.set_result(batcher.run(key, member, alone, *args))
        except Exception as e:
            out.set_exception(e)

    threading.Thread(target=one, daemon=True).start()
    return out


def test_a_lone_request_leaves_its_window_before_its_deadline():
    # A 10-minute window and a request with a second to live: it used to wait the window.
    batcher = Batcher(BatchingConfig(window_us=600_000_000, max_batch=4), Recorder())
    lone = run_in_thread(batcher, "k", "m0", time.monotonic() + 1.0)
    assert lone.result(timeout=60) == ("m0", "alone")


def test_a_member_with_a_deadline_makes_its_batch_leave_early():
    rec = Recorder()
    batcher = Batcher(BatchingConfig(window_us=600_000_000, max_batch=4), rec)
    leader = run_in_thread(batcher, "k", "m0", None)
    while batcher.waiting() == 0:  # until m0's batch is open
        time.sleep(0.001)
    follower = run_in_thread(batcher, "k", "m1", time.monotonic() + 1.0)
    assert follower.result(timeout=60) == ("m1", 2)
    assert leader.result(timeout=60) == ("m0", 2)
    assert rec.batches == [["m0", "m1"]]


def test_a_window_past_the_platforms_longest_wait_still_answers_every_member():
    # 10**17 us: Event.wait raised OverflowError in the leader, its batch stayed open and
    # every later request with its key waited for it forever.
    batcher = Batcher(BatchingConfig(window_us=10**17, max_batch=2), Recorder())
    for _ in range(2):
        first = run_in_thread(batcher, "k", "a", None)
        second = run_in_thread(batcher, "k", "b", None)
        outs = sorted([first.result(timeout=60), second.result(timeout=60)])
        assert outs in ([("a", 2), ("b", 2)], [("a", "alone"), ("b", "alone")])
    assert batcher.waiting() == 0


# --- log injection through names -----------------------------------------------------------


@pytest.mark.parametrize("evil", ["a\rb", "a\x1b[2Jb", "a\u2028b", "a\x85b", "a\tb", "a\x00b"])
def test_a_log_field_never_carries_a_control_character(evil):
    # A job id comes from the client as it is (GetJob logs the id asked for): a carriage
    # return or a line separator forged a line, an escape sequence wrote to the terminal.
    record = logging.LogRecord("graphgrad.requests", logging.DEBUG, "", 0, "request", (), None)
    record.fields = {"method": "GetJob", "job": evil}
    line = logs.TextFormatter().format(record)
    assert line.isprintable(), repr(line)
    assert f"job={json.dumps(evil)}" in line  # quoted and escaped: still readable
