"""The record of every averaging round a peer took part in (or skipped): the progress display, the peer's
status file, its DHT record, the demo summary and the tests read it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional

NO_OTHER_PEERS = "no other peers"  # a RoundRecord's note when the peer stepped alone: no round was attempted


@dataclass
class RoundRecord:
    epoch: int
    group_size: int  # 0 when the round failed or was skipped
    ok: bool
    seconds: float
    note: str = ""
    group: str = ""  # the members' short id (same members, same id): tools compare a round's members


def group_id(peer_ids) -> str:
    return hashlib.sha256(b"".join(sorted(peer.to_bytes() for peer in peer_ids))).hexdigest()[:12]


@dataclass
class LocalRoundRecord(RoundRecord):
    """A local-mode averaging round (RoundRecord's fields plus what the schedule decided)."""

    next_epoch: int = 0  # the next averaging point the group agreed on
    round_index: int = 0  # the swarm's count of rounds after this one: the same for every member
    period: int = 0
    in_step: bool = True  # our averaged model matched the group's (False: we re-synchronise)
    members_in_step: int = 0
    divergence: Optional[float] = None  # sketched variance of the deltas / squared norm of their mean
    kappa: Optional[float] = None  # adaptive: divergence level v / (lr²)^s of this round
    exponent: Optional[float] = None  # adaptive: the fitted s
    correction: Optional[float] = None  # adaptive: the factor the measurement applied to the planned period
    anchor_sum: Optional[float] = None  # float64 sum of the new averaged model (compare peers)
    anchor_digest: str = ""  # SHA-256 prefix of its bytes (bit-identical peers share it)
    finished_at: float = 0.0  # unix time
    weight: float = 0.0  # samples this peer contributed


# what a volunteer reads when a round fails: (exception name, words in its message or "", sentence)
_ROUND_FAILURES = (
    ("MatchmakingException", "all-reduce", "a group member left or stopped answering during the all-reduce"),
    ("MatchmakingException", "", "no averaging group formed in time"),
    ("BannedException", "", "a group member was left out of the round"),
    ("AllreduceException", "could not find a group", "no averaging group formed in time"),
    ("AllreduceException", "non-finite", "a group member's average was not finite"),
    ("AllreduceException", "", "a group member left or stopped answering during the all-reduce"),
    ("TimeoutError", "", "the round timed out"),
    ("CancelledError", "", "the round was cancelled"),
)


def describe_round_failure(error: BaseException) -> str:
    """One readable sentence for a failed averaging round (the progress line, the status file, the
    log), instead of the exception's repr (``MatchmakingException('Unable to run sparse all-reduce:
    StopAsyncIteration()')``)."""
    name, text = type(error).__name__, str(error).lower()
    for exception_name, words, sentence in _ROUND_FAILURES:
        if name == exception_name and words in text:
            return sentence
    first_line = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"unexpected error ({name}{': ' + first_line if first_line else ''})"


def reason_to_resync(unseen: List[RoundRecord], diverged: bool, failed_rounds_count: bool = True) -> Optional[str]:
    """Why a peer must take the swarm's state after the rounds recorded since it last looked; None: it need not.

    Every unseen round counts, not only the newest: with overlapping rounds two can land between looks
    (at a planned end, the last two), and a failed one followed by a good one still left the peer apart
    -- the parameter fingerprints show that only two rounds later, which a run that is ending never holds.

    :param unseen: the round records since the last look, oldest first
    :param diverged: the newest round's fingerprint check found our parameters apart from the group's
    :param failed_rounds_count: a failed round leaves the peer apart (mode local decides this per round)
    """
    failed = [record for record in unseen if not record.ok and record.note != NO_OTHER_PEERS]
    if failed and failed_rounds_count:
        return f"its averaging round of epoch {failed[-1].epoch} failed ({failed[-1].note})"
    if unseen and unseen[-1].ok and diverged:
        return "its parameters differ from the rest of its group"
    return None
