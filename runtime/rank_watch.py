"""Rank 0's watch over the other ranks of its host: a pidfd per rank, readable once that rank has ended.

A rank that dies is then named at once (with how it ended: an exit code or a signal, read from its zombie's
/proc/PID/stat before torchrun reaps it), rather than only by a broken connection or the silence after torchrun
stops rank 0. A rank that is stopped (SIGSTOP, a debugger) is named from its /proc state. Ranks of other hosts are
not watched: their death shows as a broken connection in the next collective. Linux only; elsewhere (no pidfd) the
watch is empty."""
from __future__ import annotations

import os
import signal
import socket


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...] (field 3 onwards); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def how_it_ended(pid: int) -> str:
    """'was killed by signal 9 (SIGKILL)', 'exited with code 1', or why that is not known."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 50 or fields[0] not in ("Z", "X"):
        return "ended (its exit status was already collected)"
    status = int(fields[49])  # exit_code (field 52): a waitpid status
    if status & 0x7F:
        sig = status & 0x7F
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"was killed by signal {sig} ({name})"
    return f"exited with code {(status >> 8) & 0xFF}"


def run_state(pid: int) -> str:
    """'running' (running, sleeping or waiting on I/O), 'stopped' (SIGSTOP, a debugger), or 'gone'."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X", "x"):
        return "gone"
    return "stopped" if fields[0] in ("T", "t") else "running"


class RankWatch:
    """pidfds of the ranks in `rows` (startup outcomes: rank, pid, host) that run on this host, besides this one."""

    def __init__(self, rows: list[dict]):
        host, me = socket.gethostname()[:200], os.getpid()
        self.ranks: dict[int, tuple[int, int | None]] = {}  # rank -> (pid, pidfd)
        for r in rows:
            if r.get("host") != host or r.get("pid") in (None, me):
                continue
            try:
                fd = os.pidfd_open(r["pid"])
            except (AttributeError, OSError):  # no pidfd here, or already gone
                fd = None
            self.ranks[r["rank"]] = (r["pid"], fd)

    def fds(self) -> list[int]:
        return [fd for _, fd in self.ranks.values() if fd is not None]

    def dead(self) -> str | None:
        """'rank 1 (pid 123) was killed by signal 9 (SIGKILL)' for every watched rank that has ended, or None."""
        lines = [f"rank {rank} (pid {pid}) {how_it_ended(pid)}" for rank, (pid, _) in sorted(self.ranks.items())
                 if run_state(pid) == "gone"]
        return "; ".join(lines) or None

    def stopped(self) -> str | None:
        """'rank 1 (pid 123) is stopped (SIGSTOP or a debugger)' for every watched rank that is, or None."""
        lines = [f"rank {rank} (pid {pid}) is stopped (SIGSTOP or a debugger)"
                 for rank, (pid, _) in sorted(self.ranks.items()) if run_state(pid) == "stopped"]
        return "; ".join(lines) or None

    def states(self) -> dict[int, str]:
        return {rank: run_state(pid) for rank, (pid, _) in self.ranks.items()}

    def close(self) -> None:
        for _, fd in self.ranks.values():
            if fd is not None:
                os.close(fd)
        self.ranks = {}


class RankDied(Exception):
    """A watched rank ended while rank 0 was idle."""


class Terminated(BaseException):
    """Rank 0 got SIGTERM (torchrun stops the group after another rank ended, or the pool is stopped). A
    BaseException, so that no handler of ordinary errors on the way swallows it."""
