"""Phase messages: what a process is doing during work that may take long (loading a corpus, probing
memory for the batch size, evaluating, downloading the state), so that nobody stares at a silent
terminal for minutes.

    with phase("loading the corpus", logger):
        corpus = load_corpus(...)

A phase that ends within ANNOUNCE_AFTER seconds prints nothing. A longer one prints
"loading the corpus…" once it has taken that long, "still loading the corpus (1m 30s so far)" every
REPEAT_EVERY seconds after that, and "loading the corpus: done in 2m 05s" at its end. The lines come
from a timer thread, so a phase stuck inside one long call (a C extension, a download) still speaks.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from swarmtrain.units import format_duration

ANNOUNCE_AFTER = 3.0  # seconds: a phase this long is announced
REPEAT_EVERY = 30.0  # seconds between "still ..." lines


class Phase:
    """A phase of work being timed and announced (see the module docstring).

    :param what: what is being done, as a gerund phrase ("loading the corpus")
    :param logger: where the lines go
    :param announce_after: seconds before the first line
    :param repeat_every: seconds between the following lines
    """

    def __init__(self, what: str, logger: logging.Logger, announce_after: float = ANNOUNCE_AFTER,
                 repeat_every: float = REPEAT_EVERY):
        self.what, self.logger = what, logger
        self.announce_after, self.repeat_every = announce_after, repeat_every
        self.started = time.monotonic()
        self.announced = False
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def start(self) -> "Phase":
        self._thread = threading.Thread(target=self._speak, name=f"phase: {self.what}", daemon=True)
        self._thread.start()
        return self

    def _speak(self) -> None:
        if self._done.wait(self.announce_after):
            return
        self.announced = True
        self.logger.info(f"{self.what}…")
        while not self._done.wait(self.repeat_every):
            self.logger.info(f"still {self.what} ({format_duration(self.seconds)} so far)")

    def finish(self, outcome: str = "done") -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.announced:
            self.logger.info(f"{self.what}: {outcome} in {format_duration(self.seconds)}")


@contextmanager
def phase(what: str, logger: logging.Logger, **timing) -> Iterator[Phase]:
    """Announce `what` if it takes long (see Phase); ends with "done", or "stopped" on an exception."""
    current = Phase(what, logger, **timing).start()
    try:
        yield current
    except BaseException:
        current.finish("stopped")
        raise
    current.finish()
