"""Hostile and absurd inputs found by a review of the serving round: the largest values of
the new flags, and what they did before they were bounded."""

from __future__ import annotations

import pytest

from graphgrad.server import cli

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
