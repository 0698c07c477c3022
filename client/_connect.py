"""`gg.connect()`: the in-process engine, or a graphgrad server when given an address."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from graphgrad._local import LocalClient
    from graphgrad._remote import RemoteClient


@overload
def connect(
    address: None = None, *, ray_address: str | None = None, ray_num_cpus: int | None = None
) -> LocalClient: ...
@overload
def connect(
    address: str,
    *,
    token: str | None = None,
    tls: bool | str | bytes | Path = False,
    timeout: float | None = None,
) -> RemoteClient: ...


def connect(
    address: str | None = None,
    *,
    token: str | None = None,
    tls: bool | str | bytes | Path = False,
    timeout: float | None = None,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
) -> LocalClient | RemoteClient:
    """Without an address: run in this process. With "host:port": talk to a graphgrad server.

    token: bearer token the server requires; tls: True (system roots) or a CA certificate
    (path or PEM bytes); timeout: default deadline of each call, in seconds.
    In process, ray_address / ray_num_cpus say which Ray `executor="ray"` uses (default: a
    local Ray started on first use).
    """
    # Each kind is imported when first asked for: the remote one brings gRPC.
    if address is None:
        from graphgrad._local import LocalClient

        return LocalClient(ray_address=ray_address, ray_num_cpus=ray_num_cpus)
    from graphgrad._remote import RemoteClient

    return RemoteClient(address, token=token, tls=tls, timeout=timeout)
