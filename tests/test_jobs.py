"""In-process training jobs through the SDK: results, mixed templates, cancel, progress, plot."""

from __future__ import annotations

import numpy as np
import pytest

import graphgrad as gg

from .test_training import train_alone


def mlp(width: int, samples: int = 32, dtype: str = "float64"):
    with gg.Graph():
        x = gg.input("x", shape=(samples, 4), dtype=dtype)
        t = gg.input("t", shape=(samples, 1), dtype=dtype)
        W1 = gg.input("W1", shape=(width, 4), dtype=dtype)
        b1 = gg.input("b1", shape=(width,), dtype=dtype)
        W2 = gg.input("W2", shape=(1, width), dtype=dtype)
        b2 = gg.input("b2", shape=(1,), dtype=dtype)
        y = gg.tanh(x @ gg.transpose(W1) + b1) @ gg.transpose(W2) + b2
        loss = gg.mul(0.5 / samples, gg.sum((y - t) ** 2), name="loss")
    return loss


def init(n: int, width: int, seed: int, dtype: str = "float64"):
    rng = np.random.default_rng(seed)
    return {
        "W1": (rng.standard_normal((n, width, 4)) * 0.5).astype(dtype),
        "b1": np.zeros((n, width), dtype),
        "W2": (rng.standard_normal((n, 1, width)) * 0.5).astype(dtype),
        "b2": np.zeros((n, 1), dtype),
    }


def own_data(n: int, samples: int = 32, seed: int = 9, dtype: str = "float64"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, samples, 4)).astype(dtype)
    return {"x": x, "t": np.sin(x.sum(-1, keepdims=True))}


def test_a_job_trains_every_network_as_if_alone():
    loss = mlp(16)
    params, data = init(12, 16, 0), own_data(12)
    job = gg.connect().train(
        loss, params, data, gg.optim.SGD(lr=0.1, momentum=0.5), steps=30, executor="local"
    )
    job.wait(progress=False)
    assert job.status == "done" and job.history.shape == (12, 30)
    graph = loss.graph.freeze()
    for j in (0, 5, 11):
        p, hist = train_alone(
            graph,
            {k: v[j] for k, v in params.items()},
            {k: v[j] for k, v in data.items()},
            gg.optim.SGD(lr=0.1, momentum=0.5),
            30,
            None,
            0,
            j,
        )
        np.testing.assert_allclose(job.history[j], hist, rtol=1e-10)
        np.testing.assert_allclose(job.params["W1"][j], p["W1"], rtol=1e-9, atol=1e-12)


def test_mixed_widths_and_identical_templates_train_together():
    narrow, wide = mlp(8), mlp(16)
    same_as_narrow = narrow  # a second batch of the narrow networks: stacked with the first
    specs = [(narrow, init(3, 8, 1)), (wide, init(4, 16, 2)), (same_as_narrow, init(2, 8, 3))]
    data = own_data(1)
    shared = {"x": data["x"][0], "t": data["t"][0]}
    job = gg.connect().train(
        [s[0] for s in specs], [s[1] for s in specs], shared, gg.optim.Adam(lr=0.01), steps=10
    )
    job.wait(progress=False)
    assert len(job.chunks) == 2  # the two narrow entries share one stack
    params = job.params
    assert [p["W1"].shape for p in params] == [(3, 8, 4), (4, 16, 4), (2, 8, 4)]
    assert job.history.shape == (9, 10)
    alone = gg.connect().train(narrow, specs[2][1], shared, gg.optim.Adam(lr=0.01), steps=10)
    alone.wait(progress=False)
    np.testing.assert_allclose(params[2]["W1"], alone.params["W1"], rtol=1e-12)


def test_cancel_stops_a_job():
    job = gg.connect().train(mlp(8), init(4, 8, 0), own_data(4), steps=1_000_000)
    job.cancel()
    job.wait(progress=False, timeout=120)
    assert job.status == "cancelled" and job.progress.steps_done < 1_000_000


def test_minibatches_with_a_progress_bar_and_a_plot(capsys):
    import matplotlib

    matplotlib.use("Agg")
    loss = mlp(8, samples=8)  # the template sees one minibatch of 8
    job = gg.connect().train(
        loss, init(6, 8, 0), own_data(6, samples=64), steps=40, batch_size=8, seed=4
    )
    job.wait(progress=True)
    assert "40/40" in capsys.readouterr().err
    assert np.nanmedian(job.history[:, -5:]) < np.nanmedian(job.history[:, :5])
    ax = job.plot()
    assert len(ax.lines) == 1 and ax.get_ylabel() == "loss"
    assert len(job.plot(networks=[0, 3]).lines) == 2
    assert "6 networks" in repr(job)


def test_bad_training_input_is_reported():
    client = gg.connect()
    float32 = r"param 'W1' must be \[N, 8, 4\] float64.*got \[2, 8, 4\] float32"
    with pytest.raises(gg.RequestError, match=float32):
        client.train(mlp(8), init(2, 8, 0, "float32"), own_data(2))
    with pytest.raises(gg.RequestError, match="data 'x' must be"):
        client.train(mlp(8), init(2, 8, 0), {"x": np.zeros((2, 3, 3, 4)), "t": np.zeros((32, 1))})
    with pytest.raises(gg.RequestError, match="holds one minibatch"):
        client.train(mlp(8), init(2, 8, 0), own_data(2), batch_size=8)


def test_segments_grow_to_about_half_a_second():
    from graphgrad.engine.training_run import SEGMENT_SECONDS, next_segment

    # 25 steps in 50 ms: 250 steps fill SEGMENT_SECONDS, but growth is capped at 8x.
    assert SEGMENT_SECONDS == 0.5
    assert next_segment(25, 0.05, 25) == 200
    assert next_segment(25, 0.1, 25) == 125
    assert next_segment(10, 2.0, 10) == 2  # too long: shrink
    assert next_segment(3, 60.0, 3) == 1  # never below one step
    assert next_segment(0, 0.0, 7) == 7  # nothing ran: keep the length
