"""Swarm-level status from the peers' DHT records.

``SwarmAggregator`` is fed the records of each poll (``fetch_records``) and keeps what a single
snapshot cannot give: rates from counter deltas between polls, and swarm-wide counters that only
grow (a counter summed over the *alive* peers would drop whenever a peer leaves, which Prometheus
would read as a reset).
"""

from __future__ import annotations

import dataclasses
import json
import time as time_module
from collections import Counter
from dataclasses import dataclass, field
from statistics import fmean
from typing import Dict, List, Mapping, Optional

from swarmtrain.monitoring.records import PEER_ROLES, PeerRecord, fetch_records, short_owner

# Counters of a departed peer are remembered this long, so that a peer which comes back with the
# same key is not counted twice; after that the memory is freed.
_FORGET_AFTER_SECONDS = 3600.0


@dataclass
class PeerSummary:
    """One row of the per-peer table."""

    owner: str  # short form of the owner's public key: the authenticated identity
    peer_id: str  # self-reported libp2p id
    role: str
    step: int
    epoch: int
    loss: Optional[float]
    samples_per_second: float
    samples_accumulated: int
    bytes_sent: int
    bytes_received: int
    bytes_sent_per_second: float
    bytes_received_per_second: float
    rounds_ok: int
    rounds_failed: int
    last_round_seconds: Optional[float]
    compression_density: Optional[float]
    leakage_dcor: Optional[float]
    utilization: Optional[float]  # share of wall time computing (trainers)
    device: str
    client_mode: bool
    version: str
    age_seconds: float  # how old the peer's last record is

    @classmethod
    def from_record(cls, owner: str, record: PeerRecord, *, bytes_sent_per_second: float = 0.0,
                    bytes_received_per_second: float = 0.0, age_seconds: float = 0.0) -> "PeerSummary":
        return cls(
            owner=owner, peer_id=record.peer_id, role=record.role, step=record.step, epoch=record.epoch,
            loss=record.loss, samples_per_second=record.samples_per_second,
            samples_accumulated=record.samples_accumulated, bytes_sent=record.bytes_sent,
            bytes_received=record.bytes_received, bytes_sent_per_second=bytes_sent_per_second,
            bytes_received_per_second=bytes_received_per_second, rounds_ok=record.rounds_ok,
            rounds_failed=record.rounds_failed, last_round_seconds=record.last_round_seconds,
            compression_density=record.compression_density, leakage_dcor=record.leakage_dcor,
            utilization=record.utilization, device=record.device, client_mode=record.client_mode, version=record.version,
            age_seconds=age_seconds,
        )


@dataclass
class SwarmStatus:
    run_id: str
    time: float
    peers_alive: Dict[str, int]  # role -> count, every role present
    samples_per_second: float  # swarm throughput
    epoch: int  # the most advanced peer's epoch
    samples_accumulated: int  # toward the current epoch, by the peers in that epoch
    target_batch_size: Optional[int]
    epoch_progress: Optional[float]  # 0..1, None without a target batch size
    eta_seconds: Optional[float]  # to the next epoch at the current throughput
    mean_loss: Optional[float]
    rounds_ok_total: int  # swarm-wide, only grows while this aggregator lives
    rounds_failed_total: int
    round_success_ratio: Optional[float]  # 0..1 over the alive peers' rounds
    mean_round_seconds: Optional[float]
    mean_group_size: Optional[float]
    bytes_sent_total: int  # swarm-wide, only grows
    bytes_received_total: int
    bytes_sent_per_second: float
    bytes_received_per_second: float
    compression_density: Optional[float]  # mean over peers that compress
    leakage_dcor_max: Optional[float]  # worst (highest) leakage reported by any alive peer
    mean_utilization: Optional[float] = None  # mean share of wall time the alive trainers spent computing
    parts_rejected_total: int = 0  # swarm-wide, only grows: parts reducers left out of averages
    rejected_senders: Dict[str, int] = field(default_factory=dict)  # sender -> alive peers reporting it
    peers: List[PeerSummary] = field(default_factory=list)

    @property
    def peers_alive_total(self) -> int:
        return sum(self.peers_alive.values())

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["peers_alive_total"] = self.peers_alive_total
        return data

    def to_json(self, **dumps_kwargs) -> str:
        return json.dumps(self.to_dict(), **dumps_kwargs)

    @classmethod
    def empty(cls, run_id: str, target_batch_size: Optional[int] = None, now: Optional[float] = None):
        return SwarmAggregator(run_id, target_batch_size).update({}, now=now)


@dataclass
class _PeerCounters:
    record: PeerRecord
    bytes_sent_per_second: float = 0.0
    bytes_received_per_second: float = 0.0


def _counter_delta(current: int, previous: Optional[int]) -> int:
    if previous is None or current < previous:  # first sight, or the peer restarted from zero
        return current
    return current - previous


def _mean(values) -> Optional[float]:
    values = [value for value in values if value is not None]
    return fmean(values) if values else None


class SwarmAggregator:
    """Turns successive polls of peer records into ``SwarmStatus`` snapshots.

    :param run_id: the run whose records are read
    :param target_batch_size: samples per swarm epoch (from the run config), for progress and ETA
    :param max_age: records whose own ``time`` is older than this are ignored (the peer is gone)
    """

    def __init__(self, run_id: str, target_batch_size: Optional[int] = None, max_age: float = 60.0):
        self.run_id = run_id
        self.target_batch_size = target_batch_size
        self.max_age = max_age
        self.latest: Optional[SwarmStatus] = None
        self._seen: Dict[str, _PeerCounters] = {}
        self._totals = dict(rounds_ok=0, rounds_failed=0, bytes_sent=0, bytes_received=0, parts_rejected=0)

    def poll(self, dht, now: Optional[float] = None) -> SwarmStatus:
        """Fetch the run's records from ``dht`` and update."""
        return self.update(fetch_records(dht, self.run_id, max_age=self.max_age, now=now), now=now)

    def update(self, records: Mapping[str, PeerRecord], now: Optional[float] = None) -> SwarmStatus:
        now = time_module.time() if now is None else now
        alive = {owner: record for owner, record in records.items() if now - record.time <= self.max_age}

        for owner, record in alive.items():
            self._account(owner, record)
        for owner in [owner for owner, seen in self._seen.items() if now - seen.record.time > _FORGET_AFTER_SECONDS]:
            del self._seen[owner]

        peers_alive = {role: 0 for role in PEER_ROLES}
        for record in alive.values():
            peers_alive[record.role] += 1

        epoch = max((record.epoch for record in alive.values()), default=0)
        samples_per_second = sum(record.samples_per_second for record in alive.values())
        samples_accumulated = sum(record.samples_accumulated for record in alive.values() if record.epoch == epoch)
        epoch_progress = eta_seconds = None
        if self.target_batch_size:
            epoch_progress = min(samples_accumulated / self.target_batch_size, 1.0)
            remaining = max(self.target_batch_size - samples_accumulated, 0)
            if remaining == 0:
                eta_seconds = 0.0
            elif samples_per_second > 0:
                eta_seconds = remaining / samples_per_second

        rounds_ok = sum(record.rounds_ok for record in alive.values())
        rounds_failed = sum(record.rounds_failed for record in alive.values())
        round_success_ratio = rounds_ok / (rounds_ok + rounds_failed) if rounds_ok + rounds_failed else None

        densities = [record.compression_density for record in alive.values()]
        leakages = [record.leakage_dcor for record in alive.values() if record.leakage_dcor is not None]

        rows = []
        for owner, record in sorted(alive.items(), key=lambda item: (item[1].role, item[1].peer_id)):
            counters = self._seen[owner]
            rows.append(
                PeerSummary.from_record(
                    short_owner(owner), record, bytes_sent_per_second=counters.bytes_sent_per_second,
                    bytes_received_per_second=counters.bytes_received_per_second,
                    age_seconds=max(now - record.time, 0.0),
                )
            )

        status = SwarmStatus(
            run_id=self.run_id,
            time=now,
            peers_alive=peers_alive,
            samples_per_second=float(samples_per_second),
            epoch=epoch,
            samples_accumulated=samples_accumulated,
            target_batch_size=self.target_batch_size,
            epoch_progress=epoch_progress,
            eta_seconds=eta_seconds,
            mean_loss=_mean(record.loss for record in alive.values()),
            rounds_ok_total=self._totals["rounds_ok"],
            rounds_failed_total=self._totals["rounds_failed"],
            round_success_ratio=round_success_ratio,
            mean_round_seconds=_mean(record.last_round_seconds for record in alive.values()),
            mean_group_size=_mean(record.last_round_group_size for record in alive.values()),
            bytes_sent_total=self._totals["bytes_sent"],
            bytes_received_total=self._totals["bytes_received"],
            bytes_sent_per_second=sum(row.bytes_sent_per_second for row in rows),
            bytes_received_per_second=sum(row.bytes_received_per_second for row in rows),
            compression_density=_mean(densities),
            leakage_dcor_max=max(leakages) if leakages else None,
            mean_utilization=_mean(record.utilization for record in alive.values()),
            parts_rejected_total=self._totals["parts_rejected"],
            rejected_senders=dict(Counter(peer for record in alive.values() for peer in record.rejected_peers)),
            peers=rows,
        )
        self.latest = status
        return status

    def _account(self, owner: str, record: PeerRecord) -> None:
        seen = self._seen.get(owner)
        if seen is not None and record.time <= seen.record.time:
            return  # the same (or an older) record as last poll: nothing new, keep the last rates
        previous = seen.record if seen is not None else None
        for name in self._totals:
            self._totals[name] += _counter_delta(getattr(record, name), getattr(previous, name, None))

        sent_rate = received_rate = 0.0
        if previous is not None:
            elapsed = record.time - previous.time
            if record.bytes_sent >= previous.bytes_sent and record.bytes_received >= previous.bytes_received:
                sent_rate = (record.bytes_sent - previous.bytes_sent) / elapsed
                received_rate = (record.bytes_received - previous.bytes_received) / elapsed
        self._seen[owner] = _PeerCounters(record, sent_rate, received_rate)

