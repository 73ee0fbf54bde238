"""Errors a pool client raises; one-line messages, like the engine's."""
from __future__ import annotations

from comfyui_xdit.errors import XDiTError


class PoolError(XDiTError):
    """The pool answered with an error, or could not be reached. `kind` is the error reply's kind."""

    def __init__(self, message: str, kind: str = "error", rank: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.rank = rank


class JobCancelled(PoolError):
    """The job was cancelled (by `PoolClient.cancel`, or by a shutdown)."""


class PoolDied(PoolError):
    """The pool's processes exited while a request was outstanding."""


class PoolRestarted(PoolDied):
    """The pool at the address is another instance than the one the request went to: the request was lost."""


class PoolTimeout(PoolError):
    """No reply within the timeout."""


class PoolStartError(PoolError):
    """The pool did not come up; the message holds the tail of its log."""


def raise_for_error(header) -> None:
    """Turn an error reply (messages.Error) into the matching exception."""
    kind, rank, message = header.kind, header.rank, header.message or "unknown error"
    if rank is not None:
        message = f"{message} (rank {rank})"
    cls = JobCancelled if kind == "cancelled" else PoolError
    raise cls(message, kind, rank)
