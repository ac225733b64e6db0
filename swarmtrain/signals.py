"""Signal handling for processes that own hivemind children (DHT, averagers, the p2p daemon), and
waits that a stop signal interrupts."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


class StopRequested(KeyboardInterrupt):
    """Raised from the signal handler so that every loop unwinds through the same clean exit.

    A KeyboardInterrupt, because hivemind's retry loops re-raise those and swallow other errors."""


_stop_signal: list = []  # the name of the signal received, once one was


def stop_requested() -> bool:
    return bool(_stop_signal)


def raise_if_stop_requested() -> None:
    """For loops that call into code which may have caught the handler's exception (hivemind
    logs and carries on after most errors inside an averaging round)."""
    if _stop_signal:
        raise StopRequested(_stop_signal[0])


def poll(check: Callable[[], Optional[T]], *, timeout: float, interval: float) -> Optional[T]:
    """Call `check` every `interval` seconds until it returns something other than None, and return
    that; None once `timeout` seconds have passed. A stop request (Ctrl+C, SIGTERM) ends the wait with
    StopRequested, even when `check` runs code that swallows the signal handler's exception."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        raise_if_stop_requested()
        time.sleep(min(interval, remaining))


@contextmanager
def children_ignore_interrupts():
    """Fork hivemind's child processes inside this block.

    A terminal's Ctrl+C goes to the whole process group; if the children saw it they would die
    mid-round with tracebacks while the parent is still saving. They inherit "ignore" for SIGINT
    and the default SIGTERM (which hivemind itself uses to stop them) rather than our stop handler,
    and the parent shuts them down explicitly."""
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def raise_on_stop_signals() -> None:
    """SIGINT and SIGTERM raise StopRequested once; repeats are ignored while we clean up.

    SIGTERM matters as much as Ctrl+C: systemd and docker stop with it, and its default action
    would kill us without shutting down the children, leaving orphaned daemons behind."""
    def handler(signum, _frame):
        if _stop_signal:
            return
        _stop_signal.append(signal.Signals(signum).name)
        raise StopRequested(_stop_signal[0])

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def children_die_with_this_process() -> None:
    """Ask Linux to SIGKILL every process forked from here (hivemind's DHT and averagers) when the
    process that forked it dies, even by SIGKILL or the OOM killer: otherwise they live on as
    orphans that keep the port, the CPU and a stale place in the swarm. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1

    def in_child() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    os.register_at_fork(after_in_child=in_child)
