"""Conditioning kept on the pool between forward calls: tensors by content hash, least recently used dropped
first once the bytes exceed a bound. Every rank holds its own copy; they stay identical because every rank sees
every operation in the same order."""
from __future__ import annotations

import collections
import hashlib

import torch

from comfyui_xdit.errors import XDiTError

UPLOAD_PREFIX = "c:"  # a forward's tensor frame named c:<hash> uploads that conditioning
DEFAULT_MAX_BYTES = 1 << 30


class CondMissing(XDiTError):
    """A forward names a conditioning hash the pool does not hold (evicted, or the pool restarted): upload it."""


def content_hash(t: torch.Tensor) -> str:
    """32 hex digits over dtype, shape and bytes: the same on the client and on every rank."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


class CondCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0
        self._on_device: tuple[torch.device | None, dict[str, torch.Tensor]] = (None, {})  # see on_device

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, digest: str) -> bool:
        return digest in self._items

    def put(self, digest: str, t: torch.Tensor) -> None:
        """Store an uploaded tensor after checking that it is what its name says."""
        if content_hash(t) != digest:
            raise XDiTError(f"uploaded conditioning {digest} does not match its content hash")
        if digest in self._items:
            self._items.move_to_end(digest)
            return
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            raise XDiTError(f"a conditioning tensor of {size} bytes exceeds the pool's cache of {self.max_bytes}")
        self._items[digest] = t
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def get(self, digest: str) -> torch.Tensor:
        t = self._items.get(digest)
        if t is None:
            raise CondMissing(f"conditioning {digest} is not on the pool")
        self._items.move_to_end(digest)
        return t

    def on_device(self, digests: dict[str, str], device: torch.device) -> dict[str, torch.Tensor]:
        """{role: its tensor on `device`} for one forward's {role: digest}. The device copies of the last call's
        digests are kept (a sampling run's calls name the same ones), so a GPU rank copies a run's conditioning to
        the device once, not on every call; those of digests the call no longer names are dropped. The cache's
        bytes count its host copies only: the device copies are one call's conditioning."""
        held = self._on_device[1] if self._on_device[0] == device else {}
        out = {role: held[d] if d in held else self.get(d).to(device) for role, d in digests.items()}
        self._on_device = (device, {d: out[role] for role, d in digests.items()})
        return out

    def take_uploads(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store the c:<hash> frames of a message; returns its other tensors."""
        rest = {}
        for name, t in tensors.items():
            if name.startswith(UPLOAD_PREFIX):
                self.put(name[len(UPLOAD_PREFIX):], t)
            else:
                rest[name] = t
        return rest
