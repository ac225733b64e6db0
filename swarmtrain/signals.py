"""Signal handling for processes that own hivemind children (DHT, averagers, the p2p daemon), and
waits that a stop signal interrupts."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, NoReturn, Optional, TypeVar

T = TypeVar("T")


class StopRequested(KeyboardInterrupt):
    """Raised from the signal handler so that every loop unwinds through the same clean exit.

    A KeyboardInterrupt, because hivemind's retry loops re-raise those and swallow other errors."""


_stop_signals: list = []  # the names of the stop signals received, in order
_finishing: list = []  # what is being finished that a repeated stop signal must not cut short
EXIT_AT_ONCE_AFTER = 3  # the third stop signal ends the process on the spot


def stop_requested() -> bool:
    return bool(_stop_signals)


def stop_repeated() -> bool:
    """A second stop signal arrived: the user wants out now, so skip everything that does not keep
    state (a held-out evaluation, waiting for a clean hand-over to the swarm)."""
    return len(_stop_signals) >= 2


def raise_if_stop_requested() -> None:
    """For loops that call into code which may have caught the handler's exception (hivemind
    logs and carries on after most errors inside an averaging round)."""
    if _stop_signals:
        raise StopRequested(_stop_signals[0])


@contextmanager
def finishing(what: str):
    """A stop signal does not interrupt this block (writing a checkpoint): it is recorded, and takes
    effect once the block is done (stop_requested(), raise_if_stop_requested(), stop_repeated()).
    Only a third signal cuts the block short."""
    _finishing.append(what)
    try:
        yield
    finally:
        _finishing.pop()


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


def _say(text: str) -> None:
    # from a signal handler: a plain write, since the logging module's locks may be held right now
    try:
        os.write(sys.stderr.fileno(), (text + "\n").encode())
    except (OSError, ValueError):
        pass


def _on_stop_signal(signum, _frame) -> None:
    name = signal.Signals(signum).name
    _stop_signals.append(name)
    count = len(_stop_signals)
    if count >= EXIT_AT_ONCE_AFTER:
        _say(f"{name} received {count} times: exiting at once (helper processes end with this one)")
        os._exit(128 + signum)
    if _finishing:
        _say(f"{name}: finishing {_finishing[-1]} first, then leaving")
        return
    if count == 1:
        raise StopRequested(name)
    _say(f"{name} again: leaving without the rest of the clean-up (once more to exit at once)")
    raise StopRequested(name)


def raise_on_stop_signals() -> None:
    """SIGINT and SIGTERM stop the process in three steps, as a user pressing Ctrl+C expects:

    1. the first raises StopRequested: the process saves what must not be lost (a peer's
       checkpoint, first) and leaves cleanly;
    2. a second one cuts the clean-up short: StopRequested again, and ``stop_repeated()`` tells
       the rest of the clean-up to skip what does not keep state;
    3. a third exits on the spot (``os._exit``); the children die with the process
       (``children_die_with_this_process``).

    Inside a ``finishing`` block (writing a checkpoint) the first two are only recorded.

    SIGTERM matters as much as Ctrl+C: systemd and docker stop with it, and its default action
    would kill us without shutting down the children, leaving orphaned daemons behind."""
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    if not getattr(sys.excepthook, "quiet_after_stop", False):
        sys.excepthook = quiet_connection_errors_after_stop(sys.excepthook)


def quiet_connection_errors_after_stop(previous: Callable) -> Callable:
    """An excepthook for after a stop signal. A signal to the whole process group (systemd stopping
    the unit) ends our helper processes too, and a thread of ours that was talking to one of them
    reports the reset connection through sys.excepthook: multiprocessing's resource sharer, which
    hands tensors' file descriptors to children, printed a traceback into a clean exit in a test run.
    Expected then: one debug line. Any other error, or any error before a stop, goes to `previous`."""

    def excepthook(exc_type, exc, traceback) -> None:
        if stop_requested() and issubclass(exc_type, (ConnectionError, EOFError)):
            logging.getLogger("swarmtrain").debug(f"after a stop signal: {exc_type.__name__}: {exc}")
            return
        previous(exc_type, exc, traceback)

    excepthook.quiet_after_stop = True
    return excepthook


def exit_now(code: int = 0) -> NoReturn:
    """End the process on the spot, once what it printed is flushed: no interpreter teardown, which
    would wait on helper threads and processes that nobody shut down (a second stop signal, helpers
    already killed by a signal to the whole process group). The children end with this process
    (``children_die_with_this_process``)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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
