"""Bind-address policy and the shared secret: loopback or ipc by default; anything else needs a secret."""
from __future__ import annotations

import ipaddress
import os

from .errors import PoolError

SECRET_ENV = "XDIT_POOL_SECRET"  # how the launcher hands the secret to workers (not on the command line)


def is_local_address(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", interface names, other host names
        return False


def check_bind_address(address: str, secret: bytes | None) -> None:
    if "://" not in address:
        raise PoolError(f"bad pool address {address!r}: expected tcp://HOST:PORT or ipc://PATH", "config")
    if not is_local_address(address) and not secret:
        raise PoolError(f"refusing to bind {address} without a shared secret: set --secret or {SECRET_ENV}",
                        "config")


def as_secret(secret: str | bytes | None) -> bytes | None:
    if secret is None or secret == "" or secret == b"":
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def secret_from_env() -> bytes | None:
    return as_secret(os.environ.get(SECRET_ENV))
