"""What observing the server costs a remote gradient: the seed's network (bench/
remote_latency.py's), run by fingerprint against three servers started side by side:
metrics off (the reference), `--metrics-port 0`, and metrics on with a log line per request
(`--log-level debug`, written to /dev/null). Medians are sampled in interleaved blocks.

    python bench/observability.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import graphgrad_server, interleaved_medians, us
from remote_latency import network

import graphgrad as gg

SERVERS = {
    "metrics off (reference)": (),
    "--metrics-port 0": ("--metrics-port", "0"),
    "metrics + request log lines": ("--metrics-port", "0", "--log-level", "debug"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    loss, feeds = network()
    wrt = ["W", "b", "V", "a"]
    with ExitStack() as stack:
        calls = {}
        for name, flags in SERVERS.items():
            address = stack.enter_context(
                graphgrad_server("--no-ray", *flags, stderr=subprocess.DEVNULL)
            )
            client = stack.enter_context(gg.connect(address))
            calls[name] = lambda client=client: client.run(loss, feeds, wrt=wrt)
        medians = interleaved_medians(calls, args.calls)
    reference = medians["metrics off (reference)"]
    print(f"remote gradient of the seed's network, median of {args.calls} calls each")
    for name, seconds in medians.items():
        print(f"  {name:30s} {us(seconds)}  {seconds / reference:5.3f} x")


if __name__ == "__main__":
    main()
