"""Hostile and absurd inputs found by a review of the serving round: the largest values of
the new flags, and what they did before they were bounded."""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import NO_PROGRESS, calibration
from graphgrad.engine.stacking import PAD_BYTES, stack_size
from graphgrad.server import cli, logs, metrics
from graphgrad.server.store import JobStore
from graphgrad.v1 import jobs_pb2

from .server_proc import running_server
from .test_dynamic_batching import Recorder, batcher_of, run_all
from .test_job_manager import manager, one_weight_job, wait_for

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
    "--batch-idle-us": 1_000_000,  # the same wait
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


def test_an_idle_time_without_batching_stops_the_start():
    args = cli.parser().parse_args(["serve", "--batch-idle-us", "1000"])
    with pytest.raises(SystemExit, match="--batch-idle-us closes dynamic batches, but batching"):
        cli.config_from(args)
    args = cli.parser().parse_args(["serve", *BATCHING, "--batch-idle-us", "1000"])
    assert cli.config_from(args).batching.idle_us == 1000


def test_every_flag_at_its_maximum_still_fits_grpcs_bounds():
    argv = ["serve", *[a for flag, most in MOST.items() for a in (flag, str(most))]]
    config = cli.config_from(cli.parser().parse_args(argv))
    assert config.max_concurrent_rpcs < 2**31  # grpc.aio.server takes it as a C int
    assert config.max_concurrent_runs == MOST["--max-batch"]


# --- a batch window longer than a request's deadline ------------------------------------------


def test_a_lone_request_leaves_its_window_before_its_deadline():
    # A 10-minute window and a request with a second to live: it used to wait the window.
    rec = Recorder()
    batcher = batcher_of(rec, 600_000_000, 4)
    out = run_all(batcher, rec, [("k", "m0")], deadlines={0: time.monotonic() + 1.0})
    assert out == [("m0", "alone")]


def test_a_member_with_a_deadline_makes_its_batch_leave_early():
    rec = Recorder()
    batcher = batcher_of(rec, 600_000_000, 4)
    items = [("k", "m0"), ("k", "m1")]  # m0 opens the batch, m1 has a second to live
    out = run_all(batcher, rec, items, deadlines={1: time.monotonic() + 1.0})
    assert out == [("m0", 2), ("m1", 2)]
    assert rec.batches == [["m0", "m1"]]


def test_a_window_past_the_platforms_longest_wait_still_answers_every_member():
    # 10**17 us: Event.wait raised OverflowError in the leader of the threaded batcher, its
    # batch stayed open and every later request with its key waited for it forever.
    rec = Recorder()
    batcher = batcher_of(rec, 10**17, 2)
    for _ in range(2):
        assert run_all(batcher, rec, [("k", "a"), ("k", "b")]) == [("a", 2), ("b", 2)]
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


# --- a corrupt job row with a lease --------------------------------------------------------


def test_a_job_row_with_a_corrupt_lease_or_progress_fails_nothing_else(tmp_path):
    # A lease_expires that is not a number made ListJobs and GetJob INTERNAL for every job,
    # and a corrupt progress column made each heartbeat's claim raise after taking the lease.
    store = JobStore(tmp_path / "jobs.sqlite3")
    spec = one_weight_job(2, 5)
    for job_id in ("lease", "progress", "fine"):
        store.insert(job_id, spec, NO_PROGRESS)
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(
            "UPDATE jobs SET status = 'running', lease_owner = 'ghost:1', "
            "lease_expires = 'garbage' WHERE id = 'lease'"
        )
        db.execute("UPDATE jobs SET steps_done = 'x', created = 'y' WHERE id = 'progress'")
    m = manager(tmp_path, lease_seconds=30.0)
    assert sorted(v.id for v in m.list()) == ["fine", "lease", "progress"]
    m.resume_all()  # each one is taken and run from its spec, none is lost
    for job_id in ("fine", "lease", "progress"):
        wait_for(m, job_id, ("done",))
    np.testing.assert_allclose(
        m.job("lease").view().progress.loss_median,
        m.job("fine").view().progress.loss_median,
    )
    m.close()


def test_a_job_lease_too_short_to_outlive_a_heartbeats_delay_stops_the_start():
    # --job-lease-s 0.1 (the old least): with --workers 2 on 2 busy cores, live workers lost
    # their leases to each other (two takeovers of running jobs in 1.5 s, work done twice).
    args = cli.parser().parse_args(["serve", "--job-lease-s", "0.5"])
    with pytest.raises(SystemExit) as e:
        cli.config_from(args)
    assert str(e.value) == "graphgrad serve: --job-lease-s must be at least 1.0, got 0.5"
    one = cli.config_from(cli.parser().parse_args(["serve", "--job-lease-s", "1"]))
    assert one.job_lease_seconds == 1.0


def test_batching_with_fewer_run_slots_than_its_largest_batch_stops_the_start():
    # A Run waits for its batch holding a run slot: with --max-concurrent-runs 1, four
    # concurrent Runs never formed a batch and each took a whole window (0.2, 0.4, 0.6, 0.8 s
    # with a 0.2 s window in the thread batcher; 0.22 s each in the loop batcher, the others
    # waiting for the slot the first held through its window).
    argv = ["serve", "--batch-window-us", "200000", "--max-batch", "4"]
    with pytest.raises(SystemExit) as e:
        cli.config_from(cli.parser().parse_args([*argv, "--max-concurrent-runs", "1"]))
    assert str(e.value).startswith(
        "graphgrad serve: --max-batch 4 is more than --max-concurrent-runs 1:"
    )
    enough = cli.config_from(cli.parser().parse_args([*argv, "--max-concurrent-runs", "4"]))
    assert enough.max_concurrent_runs == 4
    off = cli.config_from(cli.parser().parse_args(["serve", "--max-concurrent-runs", "1"]))
    assert off.max_concurrent_runs == 1  # batching off: no batch to hold


# --- padded stacks and the memory bound ----------------------------------------------------


def test_a_stack_is_padded_only_where_the_padding_is_small_beside_the_memory_bound():
    # Stacks were padded to the next power of two whatever a row costs: 33 requests of
    # --max-request-bytes each ran as 64 rows, 1.94x the memory their run slots admitted.
    assert stack_size(33, 64, row_bytes=1000) == 64  # small rows: few compiled sizes
    assert stack_size(33, 64, row_bytes=2**20) == 33  # 31 MiB of padding: none
    assert stack_size(5, 8, row_bytes=PAD_BYTES // 3) == 8
    assert stack_size(5, 8, row_bytes=PAD_BYTES // 3 + 1) == 5


# --- metrics: the environment is no way to turn /metrics off -------------------------------


def test_a_server_asked_for_metrics_serves_them_whatever_its_environment_holds(tmp_path):
    # The variable workers inherit from their supervisor, set in a server's environment (a
    # shell or a harness started from a server with metrics): --metrics-port was ignored in
    # silence, or a directory that is not there failed the start with a misleading error.
    for stray in (tmp_path, tmp_path / "not-there"):
        env = {metrics.METRICS_DIR_ENV: str(stray), metrics.METRICS_PORT_ENV: "1"}
        with running_server("--metrics-port", "0", env=env) as server:
            match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.banner)
            assert match is not None, server.banner
            gg.connect(server.address).server_info()
            text = urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/metrics").read()
            assert b'graphgrad_requests_total{code="OK",method="GetServerInfo"} 1.0' in text


def test_a_log_line_stays_short_whatever_the_ids_a_client_sends():
    # A GetJob with a 5 MB id, or a Run with a 5 MB fingerprint, wrote a 5 MB line each.
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.TextFormatter())
    level = logs.REQUESTS.level
    logs.REQUESTS.addHandler(handler)
    logs.REQUESTS.setLevel(logging.DEBUG)
    try:
        request = jobs_pb2.GetJobRequest(id="a" * 5_000_000)
        logs.log_request("GetJob", "NOT_FOUND", 0.001, 5_000_010, 0, request, None, "x" * 10**6)
    finally:
        logs.REQUESTS.removeHandler(handler)
        logs.REQUESTS.setLevel(level)
    line = out.getvalue().strip()
    assert len(line) < 2000, len(line)
    assert "method=GetJob" in line and 'job="aaaa' in line and "5000000 chars" in line


def test_a_lease_that_ends_further_away_than_any_lease_lasts_is_taken_over(tmp_path):
    # A lease written while the clock was years ahead (then stepped back), or a corrupt one:
    # no process renews a lease further than the longest --job-lease-s, yet the job was
    # held by its ghost forever, shown as running there, and a cancel only asked the ghost.
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.insert("ahead", one_weight_job(2, 5), NO_PROGRESS)
    decade = time.time() + 10 * 365 * 86_400
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(
            "UPDATE jobs SET status = 'running', lease_owner = 'ghost:1', lease_expires = ?",
            (decade,),
        )
    m = manager(tmp_path, lease_seconds=30.0)
    assert m.job("ahead").view().worker == ""  # nobody holds it
    m.resume_all()
    wait_for(m, "ahead", ("done",))
    m.close()


# --- calibration in process ----------------------------------------------------------------


def test_a_calibration_path_that_is_no_small_file_is_refused_without_reading_it_all(tmp_path):
    # gg.connect(calibration="/dev/zero") read forever, holding every byte; a file is a few
    # hundred bytes, so anything past MAX_FILE_BYTES is refused after reading that much.
    big = tmp_path / "big.json"
    good = json.loads(calibration.DEFAULT.to_json())
    big.write_text(json.dumps(good) + " " * calibration.MAX_FILE_BYTES)
    with pytest.raises(calibration.CalibrationError, match=r"big.json: larger than 1048576 bytes"):
        gg.connect(calibration=big)
    with pytest.raises(calibration.CalibrationError, match=r"/dev/zero: larger than"):
        gg.connect(calibration="/dev/zero")
    small = tmp_path / "small.json"
    small.write_text(json.dumps(good))
    assert gg.connect(calibration=small).session.dispatcher is not None


def test_a_worker_flag_naming_no_pipe_stops_the_start_in_one_line(tmp_path):
    # The hidden --worker-of (a supervisor's pipe to its worker) given by hand with a file
    # descriptor that is not open: a traceback from os.set_inheritable.
    argv = ["--port", "0", "--no-ray", "--data-dir", str(tmp_path), "--worker-of", "99"]
    done = subprocess.run(
        [sys.executable, "-m", "graphgrad.server", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        "graphgrad serve: --worker-of 99: not a pipe from a supervisor (Bad file descriptor)"
    )
