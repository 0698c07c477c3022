"""`gg.connect()`: the in-process engine, or a graphgrad server when given an address."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from graphgrad._local import LocalClient
    from graphgrad._remote import RemoteClient


@overload
def connect(
    address: None = None,
    *,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
    calibration: str | Path | None = None,
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
    calibration: str | Path | None = None,
) -> LocalClient | RemoteClient:
    """Without an address: run in this process. With "host:port", or the
    "grpc://host:port" (plaintext) / "grpcs://host:port" (TLS) a server prints when it
    starts: talk to that graphgrad server.

    token: bearer token the server requires; tls: True (system roots) or a CA certificate
    (path or PEM bytes), implied by "grpcs://"; timeout: default deadline of each call, in
    seconds. The connection is made on the first call; if nothing answers there, the error
    names the address and says whether any server is listening on it.
    In process, ray_address / ray_num_cpus say which Ray `executor="ray"` uses (default: a
    local Ray started on first use); calibration: the calibration file its cost model uses
    (`graphgrad calibrate` writes one; default: the data directory's, as a server there
    would use: $GRAPHGRAD_DATA_DIR or ~/.local/share/graphgrad, else the defaults).
    """
    # Each kind is imported when first asked for: the remote one brings gRPC.
    if address is None:
        from graphgrad._local import LocalClient

        return LocalClient(
            ray_address=ray_address, ray_num_cpus=ray_num_cpus, calibration=calibration
        )
    from graphgrad._remote import RemoteClient

    if calibration is not None:
        raise ValueError(
            "gg.connect: calibration is for the in-process client; a server uses the one in "
            "its data directory (`graphgrad calibrate --data-dir ...`)"
        )

    target, secure = split_address(address)
    if secure and tls is False:
        tls = True
    return RemoteClient(target, token=token, tls=tls, timeout=timeout)


SCHEMES = {"grpc": False, "grpcs": True}


def split_address(address: str) -> tuple[str, bool]:
    """ "host:port", "grpc://host:port" or "grpcs://host:port" as (host:port, whether TLS)."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"gg.connect: address must be 'host:port', got {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        return address, False
    if scheme.lower() not in SCHEMES:
        raise ValueError(
            f"gg.connect: address {address!r} has scheme '{scheme}'; "
            "use 'host:port', 'grpc://host:port' or 'grpcs://host:port'"
        )
    target = rest.rstrip("/")
    if not target or "/" in target:
        raise ValueError(f"gg.connect: address {address!r} must be a scheme and host:port only")
    return target, SCHEMES[scheme.lower()]


def unavailable_message(address: str, details: str) -> str:
    """What a call that could not reach `address` says: whether anything listens there (a
    TCP connect, not a reading of gRPC's text), and gRPC's own words."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            pass
    except ValueError:
        return f"cannot reach {address} ({details})"
    except OSError as e:
        reason = e.strerror or type(e).__name__
        return (
            f"no server is running at {address} ({reason}): start one with "
            f"`graphgrad serve --port {port}`, or check the address ({details})"
        )
    return (
        f"a server is listening at {address} but did not answer the call ({details}): "
        "is it a graphgrad server, not shutting down, and is the TLS setting (grpcs://) right?"
    )
