"""Interrupts and ComfyUI's exit without ComfyUI (stand-ins): a node's pool job is cancelled on the pool whatever the
interrupt derives from (newer ComfyUI's InterruptProcessingException is a BaseException, 0.3.64's an Exception), and
the exit handler interrupts a running job, waits for it to end, then stops the pool, within seconds. The real
ComfyUI's Ctrl-C and SIGTERM: tests/test_comfyui_install.py."""
from __future__ import annotations

import importlib
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest


def _progress(ext):
    return importlib.import_module(ext.__name__ + ".nodes.progress")


class Interrupt(BaseException):
    """As newer ComfyUI's InterruptProcessingException: not an Exception."""


class FakeClient:
    """A pool client whose job runs until it is cancelled."""

    def __init__(self):
        self.cancelled: list[str] = []
        self.ended = threading.Event()
        self.closed = False

    def new_request_id(self):
        return "job-1"

    def sample_with_info(self, key, fields, tensors, parallel, on_progress, preview, request_id, **kw):
        on_progress(SimpleNamespace(step=1, total=1000, preview=None))
        if not self.ended.wait(20):
            raise AssertionError("the job was never cancelled")
        raise RuntimeError("the pool cancelled the job")

    def cancel(self, rid, timeout=None):
        self.cancelled.append(rid)
        self.ended.set()
        return "running"

    def close(self):
        self.closed = True


@pytest.mark.parametrize("base", [Exception, BaseException], ids=["Exception", "BaseException"])
def test_any_interrupt_cancels_the_pool_job_and_propagates(ext, base):
    progress = _progress(ext)
    interrupt = type("InterruptProcessingException", (base,), {})
    client = FakeClient()
    polls = []

    def check():
        polls.append(1)
        if len(polls) > 2:
            raise interrupt()

    t0 = time.monotonic()
    with pytest.raises(interrupt):
        progress.run_job(client, "k", {}, {}, {}, check_interrupt=check)
    assert client.cancelled == ["job-1"] and time.monotonic() - t0 < 5
    assert progress.running_jobs() == 0


class FakePool:
    def __init__(self, nproc=1, address=None, secret=None, *, device="cpu", env=None, die_with_parent=False):
        self.stop_timeout = "never stopped"
        self.client_ = FakeClient()

    @classmethod
    def attach(cls, address, secret=None):
        return cls(address=address)

    def start(self):
        pass

    def is_alive(self):
        return True

    def stop(self, timeout=None):
        self.stop_timeout = timeout

    def client(self):
        return self.client_


def test_exit_interrupts_the_running_job_then_stops_the_pool(ext, monkeypatch):
    """As after Ctrl-C: ComfyUI's worker thread (a daemon) still waits in the node while Python runs the exit
    handler. The handler sets ComfyUI's interrupt flag (a BaseException here), the node cancels its pool job and
    ends interrupted, then the pool is stopped with the exit's short timeout; Ctrl-C is ignored meanwhile."""
    pool_mod, progress = ext.nodes.pool, _progress(ext)
    mm = sys.modules["comfy.model_management"]
    flag = threading.Event()
    monkeypatch.setattr(mm, "interrupt_current_processing", lambda value=True: flag.set(), raising=False)
    manager = pool_mod.PoolManager(FakePool, FakePool.attach)
    monkeypatch.setattr(pool_mod, "MANAGER", manager)
    client = manager.client_for(pool_mod.ParallelSettings(device="cpu", ulysses=2))
    pool = manager._pool
    outcome = []

    def comfy_worker():
        def check():
            if flag.is_set():
                raise Interrupt()

        try:
            progress.run_job(client, "k", {}, {}, {}, check_interrupt=check)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    worker = threading.Thread(target=comfy_worker, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while not progress.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.01)
    handler = signal.getsignal(signal.SIGINT)
    seen = []
    monkeypatch.setattr(pool_mod.MANAGER, "stop", lambda timeout=None, _stop=manager.stop: (
        seen.append(signal.getsignal(signal.SIGINT)), _stop(timeout=timeout)))
    t0 = time.monotonic()
    pool_mod._at_exit()
    took = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while manager.key is not None and time.monotonic() < deadline:  # the stop runs on a thread of its own
        time.sleep(0.01)
    worker.join(5)
    assert outcome and isinstance(outcome[0], Interrupt), outcome
    assert client.cancelled == ["job-1"]  # cancelled on the pool by the node, before the pool was stopped
    assert pool.stop_timeout == pool_mod.EXIT_STOP_TIMEOUT and manager.key is None
    assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is handler
    assert took < pool_mod.EXIT_JOB_WAIT, took
    # Python's exit joins non-daemon threads before the exit handlers run: the job's waiting thread must be a daemon
    jobs = [t for t in threading.enumerate() if t.name == "xdit-job"]
    assert jobs and all(t.daemon for t in jobs)


def test_exit_without_a_pool_does_nothing(ext, monkeypatch):
    pool_mod = ext.nodes.pool
    monkeypatch.setattr(pool_mod, "MANAGER", pool_mod.PoolManager(FakePool, FakePool.attach))
    handler = signal.getsignal(signal.SIGINT)
    pool_mod._at_exit()
    assert signal.getsignal(signal.SIGINT) is handler


def test_exit_does_not_wait_for_the_pool_processes_to_end(ext, monkeypatch):
    """The stop's wait for torchrun's exit (seconds) overlaps Python's finalization of ComfyUI."""
    pool_mod = ext.nodes.pool
    released = threading.Event()

    class SlowPool(FakePool):
        def stop(self, timeout=None):
            released.wait(10)

    manager = pool_mod.PoolManager(SlowPool, SlowPool.attach)
    monkeypatch.setattr(pool_mod, "MANAGER", manager)
    manager.client_for(pool_mod.ParallelSettings(device="cpu", ulysses=2))
    t0 = time.monotonic()
    pool_mod._at_exit()
    took = time.monotonic() - t0
    released.set()
    assert pool_mod.EXIT_STOP_JOIN <= took < pool_mod.EXIT_STOP_JOIN + 1.0, took
