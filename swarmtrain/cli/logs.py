"""Logging for the commands: one readable line per event for a volunteer, hivemind's tracebacks for
expected failures (a groupmate leaving mid-round) cut to one line, and no teardown noise at exit."""
from __future__ import annotations

import logging
import sys
import warnings

def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("asyncio").addFilter(DropHivemindCancelledStepNoise())
    _ignore_orphaned_step_controls()
    from hivemind.utils.logging import get_logger as get_hivemind_logger

    for name in ("hivemind.averaging.averager", "hivemind.optim.optimizer", "hivemind.dht.dht"):
        get_hivemind_logger(name).addFilter(OneLineForExpectedRoundFailures())
    for noisy in ("bitsandbytes", "transformers", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    # hivemind steps a freshly loaded LR scheduler up to the swarm's epoch; torch warns about the order
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
    if verbose:
        from hivemind.utils.logging import get_logger

        get_logger("hivemind").setLevel(logging.INFO)


class DropHivemindCancelledStepNoise(logging.Filter):
    """hivemind's averager sets the result of a pre-scheduled round that the optimizer already
    cancelled (it does so when it finds itself alone); asyncio then logs the InvalidStateError of
    that orphaned task with a traceback, although nothing went wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.args and isinstance(record.args, dict):
            exc = record.args.get("exception")
        message = record.getMessage()
        return not ("Task exception was never retrieved" in message and "CANCELLED" in repr(exc) + message)


class OneLineForExpectedRoundFailures(logging.Filter):
    """In a volunteer swarm a round fails whenever a groupmate leaves or never shows up; hivemind
    logs each with a full traceback at ERROR. Keep the line (as a warning), drop the traceback;
    unexpected errors keep theirs."""

    EXPECTED = ("AllreduceException", "MatchmakingException", "TimeoutError", "CancelledError", "BannedException",
                "RejectedPart")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _request_from_an_exited_process(record, exc):
            # a DHT request sent by a process that exited before the DHT read it (an averager shut
            # down mid-matchmaking): nobody waits for its answer
            record.msg, record.args, record.exc_info, record.exc_text = (
                "dropped a DHT request from a process that has already exited", None, None, None)
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        if exc is not None and type(exc).__name__ in self.EXPECTED:
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


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

