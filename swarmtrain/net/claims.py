"""What peers say about themselves in the DHT, read with suspicion.

A record in the DHT is signed by its owner's key, but keys are free: anyone who reaches the DHT can
publish as many schema-valid records as it likes, saying anything a schema allows. So what a record
claims is bounded where it is read, and nothing a single record claims decides for the swarm:

- a record's ``time`` must lie within ``MAX_CLOCK_SKEW`` of the reader's clock (a time ahead would
  keep a dead record "fresh" for ever) and not be older than the reader's ``max_age``;
- the swarm's epoch is the highest epoch a strict majority of the records reach
  (:func:`quorum_epoch`), not the highest any one record claims.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

MAX_CLOCK_SKEW = 30.0  # seconds a peer's clock may run ahead of ours before its records are refused


def plausible_time(claimed: float, max_age: float, now: Optional[float] = None) -> bool:
    """Whether a record made at ``claimed`` (the peer's clock) is fresh by ours: not older than
    ``max_age`` and not further ahead than MAX_CLOCK_SKEW."""
    now = time.time() if now is None else now
    return now - max_age <= claimed <= now + MAX_CLOCK_SKEW


def quorum_epoch(epochs: Iterable[int]) -> Optional[int]:
    """The highest epoch E that more than half of ``epochs`` reach (are at E or beyond); None for none.

    One record claiming epoch 10**6 among two at 5 gives 5; a swarm where one peer has just moved to
    the next epoch and the others have not gives the others' epoch (followers of that one move are
    the caller's business: see swarmtrain.averaging.progress)."""
    ordered = sorted(epochs, reverse=True)
    if not ordered:
        return None
    # the (n // 2 + 1)-th highest value is reached by n // 2 + 1 > n / 2 of the records
    return ordered[len(ordered) // 2]
