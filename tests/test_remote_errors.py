"""A remote call raises the same exception class as the in-process one, with the same node,
field, input and limit, rebuilt from the status details (and it is still a RemoteError)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine.errors import ExecutionError, LimitError

from .server_proc import running_server


@pytest.fixture(scope="module")
def remote() -> Iterator[gg.RemoteClient]:
    with running_server() as server, gg.connect(server.address) as client:
        yield client


def _raised(call: Callable[[], Any]) -> BaseException:
    with pytest.raises(gg.GraphError) as info:
        call()
    return info.value


def _same_error(run: Callable[[Any], Any], remote: gg.RemoteClient) -> BaseException:
    local_error, remote_error = _raised(lambda: run(gg.connect())), _raised(lambda: run(remote))
    assert type(local_error) in type(remote_error).__mro__, (local_error, remote_error)
    assert isinstance(remote_error, gg.RemoteError)
    for attr in ("node", "field", "input_name", "limit"):
        assert getattr(remote_error, attr, None) == getattr(local_error, attr, None), attr
    assert str(local_error) in str(remote_error)
    return remote_error


def test_a_bad_feed_is_a_feed_error_naming_the_input(remote):
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.sum(x * x)
    error = _same_error(lambda c: c.run(y, {"x": np.ones(4)}), remote)
    assert isinstance(error, gg.FeedError) and error.input_name == "x"
    assert error.code.name == "INVALID_ARGUMENT"


def test_a_gradient_of_an_integer_input_is_a_request_error_naming_the_field(remote):
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        k = gg.input("k", shape=(), dtype="int64")
        y = gg.sum(gg.take(x, k))
    feeds = {"x": np.ones(3), "k": np.array(1)}
    error = _same_error(lambda c: c.run(y, feeds, wrt=["k"]), remote)
    assert isinstance(error, gg.RequestError) and error.field == "wrt"


def test_an_op_failing_on_its_values_is_an_execution_error_naming_the_node(remote):
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        k = gg.input("k", shape=(), dtype="int64")
        y = gg.take(x, k, name="picked")
    error = _same_error(lambda c: c.run(y, {"x": np.ones(3), "k": np.array(7)}), remote)
    assert isinstance(error, ExecutionError) and error.node == "picked"


def test_a_request_over_a_limit_is_a_limit_error_naming_the_limit():
    with gg.Graph():
        x = gg.input("x", shape=(1000,))
        y = gg.sum(x * x)
    with running_server("--max-request-bytes", "4096") as server, gg.connect(server.address) as c:
        error = _raised(lambda: c.run(y, {"x": np.ones(1000)}))
    assert isinstance(error, LimitError) and isinstance(error, gg.RemoteError)
    assert error.limit and error.code.name == "RESOURCE_EXHAUSTED"
