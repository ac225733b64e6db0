"""Per-peer compression/averaging measurements, shared between the averager's child process and the
process that owns the averager.

The averager runs its rounds in a forked child process, so plain attributes written there are invisible
to the training process. The numbers therefore live in one float64 tensor in shared memory (created
before the fork); the child writes it under a multiprocessing lock and any process reads it with
:meth:`CompressionStats.snapshot`, which returns an :class:`AveragingTraffic`, e.g.::

    stats = optimizer.grad_averager.stats          # or averager.stats
    stats.snapshot().bytes_sent_total

Fields (bytes are protobuf-serialized sizes of the averaging messages this peer actually sent or
received, i.e. what went into the p2p stream before libp2p framing; the peer's own share, which never
touches the network, is not counted):
    rounds_ok, rounds_failed           counters of averaging rounds
    bytes_sent_total, bytes_received_total
    last_bytes_sent, last_bytes_received   of the last round (successful or not)
    last_density                       non-zeros this peer sent / its gradient size (sparse only)
    last_applied_density               non-zeros of the applied average / gradient size (sparse only)
    last_selection_seconds             time of the sparsifier on this peer (sparse only)
    last_round_seconds                 wall time of the last all-reduce attempt
    last_group_size                    peers in the last group
    last_reduce_share                  the share of the gradient this peer reduced (averaged for the group)
                                       in the last round: load balancing gives a slow uplink or a client
                                       a small one (0 for a client)
    last_round_ok                      1.0 if the last round succeeded else 0.0
    parts_rejected_total               parts this peer, as a reducer, left out of an average (non-finite,
                                       outsized, malformed: see robust.py), and parts from others that
                                       made this peer refuse a round's result; ``recent_rejections()``
                                       names the senders
    liars_named_total                  groupmates this peer caught lying in a round's check (a reducer
                                       whose answer is not the average it received, a party misreporting
                                       a part: see verify.py); ``recent_liars()`` names them
    check_bytes_total                  bytes of the rounds' checks (sent + received, included in the
                                       bytes above), last_check_bytes / last_check_seconds of the last one
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple

import torch



@dataclass(frozen=True)
class AveragingTraffic:
    """What a peer's averager measured, read at one moment (the fields are described above)."""

    rounds_ok: float = 0.0
    rounds_failed: float = 0.0
    bytes_sent_total: float = 0.0
    bytes_received_total: float = 0.0
    last_bytes_sent: float = 0.0
    last_bytes_received: float = 0.0
    last_density: float = 0.0
    last_applied_density: float = 0.0
    last_selection_seconds: float = 0.0
    last_round_seconds: float = 0.0
    last_group_size: float = 0.0
    last_reduce_share: float = 0.0
    last_round_ok: float = 0.0
    parts_rejected_total: float = 0.0
    liars_named_total: float = 0.0
    check_bytes_total: float = 0.0
    last_check_bytes: float = 0.0
    last_check_seconds: float = 0.0
    rejected_peers: Tuple[str, ...] = field(default=())  # the senders of the latest rejected parts
    lying_peers: Tuple[str, ...] = field(default=())  # the latest groupmates caught lying in a check
    control_bytes_total: float = 0.0  # local mode: the round records gathered beside the averaged delta

    def to_dict(self) -> dict:
        """The numbers, for a status file (the rejected senders and liars are in the peer's record instead)."""
        data = asdict(self)
        del data["rejected_peers"], data["lying_peers"]
        return data


# what the shared tensor holds: every number of AveragingTraffic that the averager's process writes
STAT_FIELDS = tuple(item.name for item in fields(AveragingTraffic)
                    if item.name not in ("rejected_peers", "lying_peers", "control_bytes_total"))
REJECTION_SLOTS, PEER_ID_BYTES = 8, 64
_INDEX = {name: position for position, name in enumerate(STAT_FIELDS)}


class CompressionStats:
    """Shared-memory counters; create before the averager process forks (the averager does this)."""

    def __init__(self):
        self._values = torch.zeros(len(STAT_FIELDS), dtype=torch.float64).share_memory_()
        # the last few rejected senders' / caught liars' peer IDs (base58, zero-padded), newest last
        self._rejected = torch.zeros(REJECTION_SLOTS, PEER_ID_BYTES, dtype=torch.uint8).share_memory_()
        self._liars = torch.zeros(REJECTION_SLOTS, PEER_ID_BYTES, dtype=torch.uint8).share_memory_()
        self._lock = mp.Lock()

    def snapshot(self) -> AveragingTraffic:
        with self._lock:
            values = self._values.tolist()
        return AveragingTraffic(**dict(zip(STAT_FIELDS, values)), rejected_peers=tuple(self.recent_rejections()),
                                lying_peers=tuple(self.recent_liars()))

    def record_round(self, *, ok: bool, bytes_sent: int, bytes_received: int, seconds: float, group_size: int,
                     density: Optional[float] = None, applied_density: Optional[float] = None,
                     selection_seconds: Optional[float] = None, reduce_share: Optional[float] = None):
        with self._lock:
            values = self._values
            values[_INDEX["rounds_ok" if ok else "rounds_failed"]] += 1
            values[_INDEX["bytes_sent_total"]] += bytes_sent
            values[_INDEX["bytes_received_total"]] += bytes_received
            values[_INDEX["last_bytes_sent"]] = bytes_sent
            values[_INDEX["last_bytes_received"]] = bytes_received
            values[_INDEX["last_round_seconds"]] = seconds
            values[_INDEX["last_group_size"]] = group_size
            values[_INDEX["last_round_ok"]] = float(ok)
            for name, value in (("last_density", density), ("last_applied_density", applied_density),
                                ("last_selection_seconds", selection_seconds),
                                ("last_reduce_share", reduce_share)):
                if value is not None:
                    values[_INDEX[name]] = value

    def add_late_bytes(self, *, sent: int = 0, received: int = 0):
        """Bytes of a round that was already recorded (hivemind's reducer keeps answering its groupmates
        after its own results are in); they are added to the totals and to the last round."""
        with self._lock:
            values = self._values
            values[_INDEX["bytes_sent_total"]] += sent
            values[_INDEX["bytes_received_total"]] += received
            values[_INDEX["last_bytes_sent"]] += sent
            values[_INDEX["last_bytes_received"]] += received

    def record_rejection(self, peer_id) -> None:
        with self._lock:
            self._values[_INDEX["parts_rejected_total"]] += 1
            _push(self._rejected, peer_id)

    def record_liar(self, peer_id) -> None:
        with self._lock:
            self._values[_INDEX["liars_named_total"]] += 1
            _push(self._liars, peer_id)

    def record_check(self, *, bytes_sent: int, bytes_received: int, seconds: float) -> None:
        """A round's check (its bytes are also counted in the round's, by the averager)."""
        with self._lock:
            values = self._values
            values[_INDEX["check_bytes_total"]] += bytes_sent + bytes_received
            values[_INDEX["last_check_bytes"]] = bytes_sent + bytes_received
            values[_INDEX["last_check_seconds"]] = seconds

    def recent_rejections(self) -> List[str]:
        """Peer IDs of the senders whose parts were rejected lately (oldest first, repeats kept)."""
        return self._read(self._rejected)

    def recent_liars(self) -> List[str]:
        """Peer IDs of the groupmates caught lying lately (oldest first, repeats kept)."""
        return self._read(self._liars)

    def _read(self, slots: torch.Tensor) -> List[str]:
        with self._lock:
            rows = slots.tolist()
        return [bytes(row).rstrip(b"\0").decode() for row in rows if any(row)]


def _push(slots: torch.Tensor, peer_id) -> None:
    """Append a peer ID to a ring of slots (caller holds the lock)."""
    encoded = str(peer_id).encode()[:PEER_ID_BYTES]
    slots[:-1] = slots[1:].clone()
    slots[-1].zero_()
    slots[-1, : len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
