"""How much of its wall time a peer spends computing rather than waiting for the swarm."""
from __future__ import annotations

import time
from typing import Callable, Optional


class UtilizationMeter:
    """The share of wall time, since training began, spent computing: forward, backward, gradient
    clipping and the optimizer steps that stay local (accumulating a gradient, an inner step). The
    rest is waiting: epoch transitions (an averaging round, or waiting for the one in flight),
    state downloads, publishing progress. A peer whose rounds overlap its computation
    (``averaging.overlap``) approaches 1; one that waits for every round is at
    compute / (compute + round time) per epoch.

    :param clock: seconds, monotonic (tests pass a fake one)
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.started: Optional[float] = None
        self.computing_seconds = 0.0

    def start(self) -> None:
        """Training begins: the wall clock starts (set-up and waiting for peers are not counted)."""
        if self.started is None:
            self.started = self.clock()

    def add_computing(self, seconds: float) -> None:
        self.computing_seconds += max(0.0, seconds)

    @property
    def wall_seconds(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started

    def share(self) -> Optional[float]:
        """Computing / wall time, in [0, 1]; None before training began."""
        wall = self.wall_seconds
        if wall <= 0:
            return None
        return min(1.0, self.computing_seconds / wall)
