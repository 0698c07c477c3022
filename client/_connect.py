"""`gg.connect()`: the in-process engine, or a graphgrad server when given an address."""

from __future__ import annotations

from ._local import LocalClient


def connect(address: str | None = None) -> LocalClient:
    """Without an address: run in this process. With "host:port": talk to a graphgrad server."""
    if address is None:
        return LocalClient()
    raise NotImplementedError("remote connections arrive with the gRPC service")
