"""Shared-memory buffers for a local client's forwards: tensors cross in a copy in and a copy out, not loopback TCP.

Rank 0 makes each buffer (a memfd, never a name in /dev/shm) for one client and answers with its pid, fd number and
a random token, which the buffer's first bytes also hold. The client maps it through /proc/<pid>/fd/<fd>: the kernel
allows that only to processes of the pool's own user and root (the ptrace access check), so no other user can read or
write it. Rank 0 closes that descriptor at the buffer's first use (Python's mmap keeps a duplicate of its own, behind
the same check). The token binds the buffer to its client in the messages: the pool reads and writes a buffer only for
the client it made it for. A client that cannot map it (another pid namespace, another user) sends frames as before.
The buffer's bytes are not covered by the messages' HMAC: only the pool's own user can reach them, and that user can
read the pool's memory and secret anyway.
"""
from __future__ import annotations

import mmap
import os
import secrets
import stat

MEMFD_NAME = "xdit-buffer"
TOKEN_BYTES = 32
DATA_OFFSET = 64  # the token, then the tensors' region (offsets in TensorSpec.at count from here)


class SharedBuffer:
    """A mapped buffer: `data` is the writable region the messages' `at` offsets refer to."""

    def __init__(self, mm: mmap.mmap, token: str, nbytes: int, fd: int | None = None, owner: str = ""):
        self.mm, self.token, self.nbytes, self.fd, self.owner = mm, token, nbytes, fd, owner
        self.data = memoryview(mm)[DATA_OFFSET:DATA_OFFSET + nbytes]

    @classmethod
    def create(cls, nbytes: int, owner: str) -> "SharedBuffer":
        """Rank 0's side: a new memfd of `nbytes` data bytes, its token written at its start."""
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, DATA_OFFSET + nbytes)
            mm = mmap.mmap(fd, DATA_OFFSET + nbytes)
        except BaseException:
            os.close(fd)
            raise
        token = secrets.token_hex(TOKEN_BYTES // 2)
        mm[:TOKEN_BYTES] = token.encode("ascii")
        return cls(mm, token, nbytes, fd, owner)

    def describe(self) -> dict:
        """What the client needs to map it (the reply to its open request)."""
        return {"pid": os.getpid(), "fd": self.fd, "token": self.token, "nbytes": self.nbytes}

    @classmethod
    def attach(cls, pid: int, fd: int, token: str, nbytes: int) -> "SharedBuffer":
        """The client's side: map rank 0's buffer; OSError or ValueError when it is not the buffer described (another
        pid namespace or user, a reused pid, a size or token that does not match)."""
        path = f"/proc/{int(pid)}/fd/{int(fd)}"
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME}"):
            raise ValueError(f"{path} is not a pool buffer")
        local = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            info = os.fstat(local)
            if not stat.S_ISREG(info.st_mode) or info.st_size != DATA_OFFSET + nbytes:
                raise ValueError(f"{path} has {info.st_size} bytes, not {DATA_OFFSET + nbytes}")
            mm = mmap.mmap(local, DATA_OFFSET + nbytes)
        finally:
            os.close(local)
        if not secrets.compare_digest(mm[:TOKEN_BYTES], token.encode("ascii")):
            mm.close()
            raise ValueError(f"{path} holds another buffer")
        return cls(mm, token, nbytes)

    def close_fd(self) -> None:
        """Rank 0 closes the descriptor it named once the client has mapped the buffer."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.close_fd()
        self.data.release()
        try:
            self.mm.close()
        except BufferError:  # a tensor still views it: the mapping goes when that tensor does
            pass
