"""Reading a server's Prometheus endpoint (`graphgrad serve --metrics-port`) in tests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

WAIT = 30.0  # seconds: a bound on a scrape or a wait, never a measurement
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> Samples:
    """Every sample the endpoint on 127.0.0.1:`port` serves, over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        return parse(response.read().decode())


def series(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    """The samples of one series, by their label values (in label-name order)."""
    return {
        tuple(v for _, v in labels): value for (n, labels), value in samples.items() if n == name
    }


def delta(before: Samples, after: Samples, name: str) -> dict[tuple[str, ...], float]:
    """What a counter gained between two scrapes, where it gained anything."""
    old = series(before, name)
    return {k: v - old.get(k, 0.0) for k, v in series(after, name).items() if v != old.get(k, 0.0)}


def wait_for(check: Callable[[], Any], what: str) -> Any:
    """Until `check()` is truthy (gauges are sampled once a second); the timeout bounds it."""
    give_up = time.monotonic() + WAIT
    while not (seen := check()):
        if time.monotonic() > give_up:
            raise AssertionError(f"never saw {what}")
        time.sleep(0.1)
    return seen
