"""bench/throughput.py runs, and what it measures is right: its client processes get
graphgrad's gradients (checked against the in-process run and the formulas by hand) from a
real `graphgrad serve`, and the echo's exact bytes; rows this graphgrad lacks flags for say
"not available" instead of failing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def tp():
    """The bench as a module by its own name: its spawned client processes import it so.
    sys.path is given back as it was (the bench scripts add their folder too: left there, its
    onnx.py would shadow the onnx package for later tests)."""
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        import throughput

        yield throughput
    finally:
        sys.path[:] = saved


def test_quick_run_measures_every_available_row_with_right_answers(tp):
    args = tp.parser().parse_args(
        ["--workers", "1", "--concurrency", "3", "--seconds", "0.2", "--rounds", "1"]
    )
    args.client_processes = 2  # 3 in flight: threads 2 and 1
    lines: list[str] = []
    rows = tp.run_bench(args, lines.append)  # checks every graphgrad answer and echo

    assert {(r.workload, r.concurrency) for r in rows} == {("seednet", 3), ("small", 3)}
    for r in rows:
        assert r.server in ("echo", "batching off", "batching on")
        if r.unavailable:
            assert r.server == "batching on" and r.unavailable.startswith("not available")
            continue
        assert r.errors == {}
        assert r.runs[0].calls > 0 and r.rps > 0
        assert len(r.runs[0].latencies) == r.runs[0].calls
    assert len(lines) == len(rows)
    assert len(tp.target_lines(rows)) == 2  # one per workload, workers 1


def test_response_check_catches_a_wrong_gradient(tp):
    import numpy as np

    import graphgrad as gg
    from graphgrad import wire
    from graphgrad.v1 import service_pb2

    w = tp.workloads()[1]
    res = gg.connect().run(w.loss, w.feeds, wrt=list(tp.WRT))
    msg = service_pb2.RunResponse()
    wire.encode_tensors({w.loss.name: res.value}, msg.values)
    wire.encode_tensors(res.grads, msg.grads)
    tp.check_response(w, msg.SerializeToString())

    grads = dict(res.grads)
    grads["b"] = grads["b"] * (1 + 4 * np.finfo(np.float64).eps)  # a few ulps off: batched only
    wrong = service_pb2.RunResponse()
    wire.encode_tensors({w.loss.name: res.value}, wrong.values)
    wire.encode_tensors(grads, wrong.grads)
    with pytest.raises(AssertionError):
        tp.check_response(w, wrong.SerializeToString())
    tp.check_response(w, wrong.SerializeToString(), ulps=64)
    grads["b"] = grads["b"] + 1e-3
    wire.encode_tensors(grads, wrong.grads)
    with pytest.raises(AssertionError):
        tp.check_response(w, wrong.SerializeToString(), ulps=64)


def test_rows_without_the_flags_say_not_available(tp):
    old = "  --workers WORKERS     threads serving requests (default 16)\n  --grace GRACE  x\n"
    assert tp.serve_args(1, False, old, 500, 64) == ["--no-ray", "--run-queue", "256"]
    assert "not available" in tp.serve_args(2, False, old, 500, 64)
    assert "not available" in tp.serve_args(1, True, old, 500, 64)
    new = (
        "  --workers WORKERS     server processes sharing the port (default 1)\n"
        "  --batch-window-us BATCH_WINDOW_US\n                        how long ...\n"
    )
    assert tp.serve_args(2, True, new, 500, 64) == [
        "--no-ray", "--run-queue", "256", "--workers", "2",
        "--batch-window-us", "500", "--max-batch", "64",
    ]  # fmt: skip
    assert "not available" in tp.serve_args(1, True, new, 5000, 64, idle_us=1000)
    newer = new + "  --batch-idle-us BATCH_IDLE_US\n                        a batch also ...\n"
    assert tp.serve_args(1, True, newer, 5000, 64, idle_us=1000)[-6:] == [
        "--batch-window-us", "5000", "--max-batch", "64", "--batch-idle-us", "1000",
    ]  # fmt: skip


def test_run_path_drives_the_servers_run_handler_to_right_answers(tp):
    """bench/run_path.py times the server's own Run handler (batching off, and on as under
    load: each request alone at once on the loop) with the bench's small-network bytes; the
    answers it gets are the right gradients."""
    import asyncio

    import run_path

    small = next(w for w in tp.workloads() if w.name == "small")
    for batching in (False, True):
        handler, raw, servicer = run_path.run_handler(batching, "small")
        assert raw == small.run
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(run_path.loop_calls(handler, raw, 30)) > 0
            if batching:
                run_path.as_under_load(servicer)
            context = run_path.FakeContext()
            out = loop.run_until_complete(handler(raw, context))
            context.done()
        finally:
            loop.close()
        tp.check_response(small, out)
