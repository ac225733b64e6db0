"""Logging for the commands: one readable line per event for a volunteer, hivemind's tracebacks for
expected failures (a groupmate leaving mid-round) cut to one line, and no teardown noise at exit."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from typing import Optional

HIVEMIND_ROUND_LOGGERS = ("hivemind.averaging.averager", "hivemind.optim.optimizer", "hivemind.dht.dht")
NOISY_LIBRARIES = ("bitsandbytes", "transformers", "urllib3", "filelock", "datasets", "fsspec")
_settings = {"verbose": False}


class CurrentStderrHandler(logging.StreamHandler):
    """Writes each line to whatever ``sys.stderr`` is at that moment: while the live progress line
    is up, rich swaps it for a proxy that prints the line above the progress line instead of
    through it."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(verbose: bool) -> None:
    """Our format for every line. Cheap on purpose (no torch, hivemind or transformers import):
    it runs before any command, ``--help`` included. Commands that use hivemind call
    ``adopt_library_logs`` once they start."""
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    _settings["verbose"] = verbose
    logging.getLogger("asyncio").addFilter(DropHivemindOrphanedFutureNoise())
    _ignore_orphaned_step_controls()
    for name in HIVEMIND_ROUND_LOGGERS:  # logger objects outlive hivemind's set-up: the filter stays
        logging.getLogger(name).addFilter(OneLineForExpectedRoundFailures())
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers sets its level when first imported
    # hivemind steps a freshly loaded LR scheduler up to the swarm's epoch; torch warns about the order
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")


def adopt_library_logs(default_level: str = "WARNING") -> None:
    """hivemind writes its messages through its own handler, in its own format, straight to the
    terminal: a second format in the log and a line drawn through the live progress line. Send
    them through ours instead (they keep their logger names), at `default_level` ($HIVEMIND_LOGLEVEL
    wins; INFO with --verbose). Imports hivemind: call it when a command starts, not at set-up."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    logging.addLevelName(logging.WARNING, "WARNING")  # hivemind renames it WARN for everyone when imported
    level = logging.getLevelName("INFO" if _settings["verbose"] else os.environ.get("HIVEMIND_LOGLEVEL", default_level).upper())
    logging.getLogger("hivemind").setLevel(level if isinstance(level, int) else logging.WARNING)


class DropHivemindOrphanedFutureNoise(logging.Filter):
    """Two asyncio reports about hivemind's leftovers, where nothing went wrong for the peer:

    - hivemind's averager sets the result of a pre-scheduled round that the optimizer already
      cancelled (it does so when it finds itself alone); asyncio logs the InvalidStateError of that
      orphaned task with a traceback: dropped;
    - a round cut short (timed out, a groupmate gone) stops reading a groupmate's stream while
      hivemind's prefetching task (``_put_items``) holds that stream's connection error in a future
      nobody awaits; asyncio reports it with a traceback when the future is collected. The peer has
      already reported the round's failure in one line: this becomes a debug line (shown with -v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from swarmtrain.net.dht import raised_in

        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.args and isinstance(record.args, dict):
            exc = record.args.get("exception")
        message = record.getMessage()
        if "Task exception was never retrieved" in message and "CANCELLED" in repr(exc) + message:
            return False
        if "Future exception was never retrieved" in message \
                and isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)) and raised_in(exc, "_put_items"):
            return _as_debug_line(record, f"a groupmate's stream broke after its round ended: {exc!r}")
        return True


class OneLineForExpectedRoundFailures(logging.Filter):
    """In a volunteer swarm a round fails whenever a groupmate leaves or never shows up; hivemind
    logs each with a full traceback at ERROR (and each retry at WARNING). The peer reports the
    round's outcome itself, so these become debug lines without the traceback (shown with -v);
    unexpected errors keep theirs."""

    EXPECTED = ("AllreduceException", "MatchmakingException", "TimeoutError", "CancelledError", "BannedException",
                "RejectedPart")
    # a donor that left while we asked it for the state: the peer says how the download ended
    REPORTED_BY_THE_PEER = ("Failed to download state from",)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _request_from_an_exited_process(record, exc):
            # a DHT request sent by a process that exited before the DHT read it (an averager shut
            # down mid-matchmaking): nobody waits for its answer
            return _as_debug_line(record, "dropped a DHT request from a process that has already exited")
        if isinstance(exc, KeyboardInterrupt):
            # our own stop signal (StopRequested is a KeyboardInterrupt), raised while the main thread
            # was inside hivemind, which catches BaseException around a round's start and logs it: the
            # peer still stops, at its next check between steps, and says so itself
            return _as_debug_line(record, f"hivemind caught the stop signal ({exc!r}); the peer stops after this step")
        message = record.getMessage()
        if (exc is not None and type(exc).__name__ in self.EXPECTED) or message.endswith(", retrying") \
                or message.startswith(self.REPORTED_BY_THE_PEER):
            # the peer reports the round's outcome itself, in one sentence (its progress line, its
            # epoch log line, its status file): hivemind's own line would say it a second time
            return _as_debug_line(record)
        return True


def _as_debug_line(record: logging.LogRecord, message: Optional[str] = None) -> bool:
    """Turn ``record`` into a debug line without its traceback (and with ``message`` instead of its own,
    if given); whether it is still shown (with -v)."""
    if message is not None:
        record.msg, record.args = message, None
    record.exc_info, record.exc_text = None, None
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _request_from_an_exited_process(record: logging.LogRecord, exc: BaseException) -> bool:
    """hivemind's DHT process unpickling a request whose reply pipe belongs to a process that is gone
    (the error comes straight from ``rebuild_connection``, or as swarmtrain.net.dht's request pipe raises it)."""
    from swarmtrain.net.dht import raised_in

    if not record.name.startswith("hivemind.dht") or not isinstance(exc, (FileNotFoundError, ConnectionError)):
        return False
    return raised_in(exc, "rebuild_connection")


def _ignore_orphaned_step_controls() -> None:
    """A stop signal that lands while hivemind creates a StepControl leaves one without a trigger;
    its __del__ then asserts and Python prints the traceback as an 'Exception ignored'. Nothing is
    lost (the round it belonged to is abandoned anyway): drop exactly that one."""
    default_hook = sys.unraisablehook

    def hook(unraisable):
        origin = getattr(unraisable.object, "__qualname__", "")
        if origin == "StepControl.__del__" and isinstance(unraisable.exc_value, AssertionError):
            return
        default_hook(unraisable)

    sys.unraisablehook = hook


def quiet_interpreter_teardown() -> None:
    """Called once hivemind's processes are shut down. Its leftover MPFutures and asyncio tasks
    are finalised after their event loops closed and would print 'Event loop is closed' and
    'Task was destroyed' noise at exit; by then there is nothing left that such a message
    could be about."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None

