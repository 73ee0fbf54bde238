"""Bind-address policy and the shared secret: loopback or ipc by default; anything else needs a secret."""
from __future__ import annotations

import ipaddress
import math
import os
import threading
import time

from .errors import PoolError
from .protocol import AuthError

SECRET_ENV = "XDIT_POOL_SECRET"  # how the launcher hands the secret to workers (not on the command line)
ADMIN_ENV = "XDIT_POOL_ADMIN_SECRET"  # cancels any client's job and shuts the pool down


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


def check_rendezvous(endpoint: str, secret: bytes | None) -> tuple[str, int]:
    """(host, port) of a torchrun rendezvous endpoint HOST:PORT; one off loopback needs the shared secret, as a
    public bind does (torch's rendezvous store itself is unauthenticated: keep it on a trusted network)."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PoolError(f"bad rendezvous endpoint {endpoint!r}: expected HOST:PORT", "config")
    if not is_local_address(f"tcp://{host}:{port}") and not secret:
        raise PoolError(f"refusing a rendezvous at {endpoint} off loopback without a shared secret: set --secret or "
                        f"{SECRET_ENV}", "config")
    return host, int(port)


def as_secret(secret: str | bytes | None) -> bytes | None:
    if secret is None or secret == "" or secret == b"":
        return None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def secret_from_env() -> bytes | None:
    return as_secret(os.environ.get(SECRET_ENV))


class ReplayGuard:
    """Refuses signed requests that are stale or seen before: each carries its signing time and a one-time nonce,
    accepted once within `window_s` seconds of the pool's clock (either way, for clock skew between hosts).
    Thread-safe: the pool's two sockets share one guard."""

    def __init__(self, window_s: float = 120.0):
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._next_prune = 0.0
        self._lock = threading.Lock()

    def check(self, ts: float | None, nonce: str | None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if ts is None or nonce is None:
            raise AuthError("signed message without a timestamp and nonce")
        if not math.isfinite(ts) or abs(now - ts) > self.window_s:
            raise AuthError(f"message signed {now - ts:.0f} s from the pool's clock (window {self.window_s:.0f} s): "
                            "stale, replayed, or the clocks differ")
        with self._lock:
            if nonce in self._seen:
                raise AuthError("replayed message (nonce seen before)")
            if now >= self._next_prune:
                self._seen = {n: t for n, t in self._seen.items() if now - t <= self.window_s}
                self._next_prune = now + 1.0
            self._seen[nonce] = ts


def read_secret(value: str | None = None, path: str | None = None) -> bytes | None:
    """The shared secret from a file (first line), else `value`, else XDIT_POOL_SECRET."""
    if path:
        try:
            with open(path, "rb") as f:
                text = f.read().splitlines()[0].strip() if os.path.getsize(path) else b""
        except (OSError, IndexError) as e:
            raise PoolError(f"cannot read the secret file {path}: {e}", "config") from None
        if not text:
            raise PoolError(f"the secret file {path} is empty", "config")
        return text
    return as_secret(value) if value else secret_from_env()
