"""Swarm-level status from the peers' DHT records.

``SwarmAggregator`` is fed the records of each poll (``fetch_records``) and keeps what a single
snapshot cannot give: rates from counter deltas between polls, and swarm-wide counters that only
grow (a counter summed over the *alive* peers would drop whenever a peer leaves, which Prometheus
would read as a reset).

Records are signed, but keys are free: one node can publish a thousand records, each under a fresh
key, saying anything the schema allows. What counts, therefore:

- a record is *alive* when its ``time`` is fresh by the reader's clock (not older than ``max_age``, not
  ahead by more than MAX_CLOCK_SKEW);
- with ``observed`` (the peer IDs the coordinator's own node is connected to, which libp2p
  authenticates), only records whose peer ID is observed count, and at most one per peer ID (the
  per-source cap): a node with a thousand keys still has one peer ID. When two records claim one peer
  ID, the one whose signing key *is* that peer's identity key wins, then the one seen first;
- the swarm's epoch is the one a majority of alive records reach (``quorum_epoch``), not the largest claim;
- counters only grow by what a peer could plausibly have done since its previous record;
- a sender is named in ``rejected_senders`` only when at least MIN_REJECTION_REPORTERS distinct alive
  reducers report it. A reducer's report is self-reported like everything else: one liar naming an honest
  peer must not get it named (a poisoner sends bad parts to every reducer of its group, so real
  poisoning is reported by several). Groups of two lose that naming; the rejected parts are still counted.
  Peers caught lying by a round's check (``lying_peers``) are named by the same rule: the honest members of a
  liar's group each catch it.
"""

from __future__ import annotations

import dataclasses
import json
import time as time_module
from dataclasses import dataclass, field
from statistics import fmean
from typing import Dict, List, Mapping, Optional, Set

from swarmtrain.monitoring.records import PEER_ROLES, PeerRecord, fetch_records, short_owner
from swarmtrain.net.claims import plausible_time, quorum_epoch
from swarmtrain.net.identity import peer_id_of

# Counters of a departed peer are remembered this long, so that a peer which comes back with the
# same key is not counted twice; after that the memory is freed.
_FORGET_AFTER_SECONDS = 3600.0
MAX_TRACKED_OWNERS = 4096  # keys whose counters are remembered, at most (the least recently seen go first)
MIN_REJECTION_REPORTERS = 2  # distinct reducers that must report a sender before it is named
# how fast a peer's counters can plausibly grow; a jump beyond this is not added to the swarm's totals
MAX_BYTES_PER_SECOND = 10e9
MAX_ROUNDS_PER_SECOND = 100.0
_MAX_RATES = dict(rounds_ok=MAX_ROUNDS_PER_SECOND, rounds_failed=MAX_ROUNDS_PER_SECOND, bytes_sent=MAX_BYTES_PER_SECOND,
                  bytes_received=MAX_BYTES_PER_SECOND, parts_rejected=1e6)


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
    epoch: int  # the epoch a majority of the alive peers reach
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
    # sender -> alive peers reporting it (only senders with at least MIN_REJECTION_REPORTERS)
    rejected_senders: Dict[str, int] = field(default_factory=dict)
    # peer caught lying in a round's check -> alive peers reporting it (likewise, MIN_REJECTION_REPORTERS)
    lying_peers: Dict[str, int] = field(default_factory=dict)
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


def _counter_delta(current: int, previous: Optional[int], elapsed: Optional[float], max_rate: float) -> int:
    if previous is None or current < previous:  # first sight, or the peer restarted from zero
        return current
    if elapsed is not None and current - previous > max_rate * max(elapsed, 1.0):
        return 0  # more than the peer could have done since its last record: not added to the swarm's total
    return current - previous


def _key_is_identity(owner: str, peer_id: str) -> bool:
    """Whether the record's signing key (its ``[owner:...]`` subkey) is the libp2p identity of ``peer_id``."""
    try:
        key = owner[len("[owner:"):-1].encode() if owner.startswith("[owner:") else owner.encode()
        return str(peer_id_of(key)) == peer_id
    except Exception:
        return False


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
        self._first_seen: Dict[str, List[float]] = {}  # owner -> [first, last] time its records were candidates
        self._totals = dict(rounds_ok=0, rounds_failed=0, bytes_sent=0, bytes_received=0, parts_rejected=0)

    def poll(self, dht, now: Optional[float] = None, observed: Optional[Set[str]] = None) -> SwarmStatus:
        """Fetch the run's records from ``dht`` and update (``observed``: see ``update``)."""
        records = fetch_records(dht, self.run_id, max_age=self.max_age, now=now, peer_ids=observed)
        return self.update(records, now=now, observed=observed)

    def update(self, records: Mapping[str, PeerRecord], now: Optional[float] = None,
               observed: Optional[Set[str]] = None) -> SwarmStatus:
        """A new status from this poll's records.

        :param records: owner subkey -> record, as ``fetch_records`` returns them
        :param now: the time of the poll (default: now)
        :param observed: the peer IDs (str) this node sees connected; when given, only their records
          count, one per peer ID
        """
        now = time_module.time() if now is None else now
        alive = self._alive(records, now, observed)
        for owner, record in alive.items():
            self._account(owner, record)
        self._forget(now)

        peers_alive = {role: 0 for role in PEER_ROLES}
        for record in alive.values():
            peers_alive[record.role] += 1
        epoch = quorum_epoch(record.epoch for record in alive.values()) or 0
        samples_per_second = sum(record.samples_per_second for record in alive.values())
        samples_accumulated = sum(record.samples_accumulated for record in alive.values() if record.epoch == epoch)
        epoch_progress, eta_seconds = self._progress(samples_accumulated, samples_per_second)
        rounds_ok = sum(record.rounds_ok for record in alive.values())
        rounds_failed = sum(record.rounds_failed for record in alive.values())
        leakages = [record.leakage_dcor for record in alive.values() if record.leakage_dcor is not None]
        rows = self._rows(alive, now)
        status = SwarmStatus(
            run_id=self.run_id, time=now, peers_alive=peers_alive, samples_per_second=float(samples_per_second),
            epoch=epoch, samples_accumulated=samples_accumulated, target_batch_size=self.target_batch_size,
            epoch_progress=epoch_progress, eta_seconds=eta_seconds,
            mean_loss=_mean(record.loss for record in alive.values()),
            rounds_ok_total=self._totals["rounds_ok"], rounds_failed_total=self._totals["rounds_failed"],
            round_success_ratio=rounds_ok / (rounds_ok + rounds_failed) if rounds_ok + rounds_failed else None,
            mean_round_seconds=_mean(record.last_round_seconds for record in alive.values()),
            mean_group_size=_mean(record.last_round_group_size for record in alive.values()),
            bytes_sent_total=self._totals["bytes_sent"], bytes_received_total=self._totals["bytes_received"],
            bytes_sent_per_second=sum(row.bytes_sent_per_second for row in rows),
            bytes_received_per_second=sum(row.bytes_received_per_second for row in rows),
            compression_density=_mean(record.compression_density for record in alive.values()),
            leakage_dcor_max=max(leakages) if leakages else None,
            mean_utilization=_mean(record.utilization for record in alive.values()),
            parts_rejected_total=self._totals["parts_rejected"],
            rejected_senders=_confirmed_reports(alive.values(), "rejected_peers"),
            lying_peers=_confirmed_reports(alive.values(), "lying_peers"),
            peers=rows,
        )
        self.latest = status
        return status

    def _alive(self, records: Mapping[str, PeerRecord], now: float,
               observed: Optional[Set[str]]) -> Dict[str, PeerRecord]:
        """The records that count: fresh, and with ``observed``, of an observed peer ID, one per peer ID."""
        fresh = {owner: record for owner, record in records.items() if plausible_time(record.time, self.max_age, now)
                 and (observed is None or record.peer_id in observed)}
        for owner in fresh:
            self._first_seen.setdefault(owner, [now, now])[1] = now
        if observed is None:
            return fresh
        by_source: Dict[str, List[str]] = {}
        for owner, record in fresh.items():
            by_source.setdefault(record.peer_id, []).append(owner)
        alive = {}
        for peer_id, owners in by_source.items():
            if len(owners) > 1:  # several keys claim one peer: its own identity key first, then the earliest
                owners.sort(key=lambda owner: (not _key_is_identity(owner, peer_id), self._first_seen[owner][0], owner))
            alive[owners[0]] = fresh[owners[0]]
        return alive

    def _progress(self, samples_accumulated: int, samples_per_second: float):
        if not self.target_batch_size:
            return None, None
        epoch_progress = min(samples_accumulated / self.target_batch_size, 1.0)
        remaining = max(self.target_batch_size - samples_accumulated, 0)
        if remaining == 0:
            return epoch_progress, 0.0
        return epoch_progress, remaining / samples_per_second if samples_per_second > 0 else None

    def _rows(self, alive: Mapping[str, PeerRecord], now: float) -> List[PeerSummary]:
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
        return rows

    def _forget(self, now: float) -> None:
        for owner in [owner for owner, seen in self._seen.items() if now - seen.record.time > _FORGET_AFTER_SECONDS]:
            del self._seen[owner]
        for owner in [owner for owner, (_, last) in self._first_seen.items() if now - last > self.max_age]:
            del self._first_seen[owner]
        # a flood of keys (only possible without `observed`, or with many keys claiming observed peers):
        # keep the most recently seen
        if len(self._seen) > MAX_TRACKED_OWNERS:
            for owner in sorted(self._seen, key=lambda owner: self._seen[owner].record.time)[:-MAX_TRACKED_OWNERS]:
                del self._seen[owner]
        if len(self._first_seen) > MAX_TRACKED_OWNERS:
            for owner in sorted(self._first_seen, key=lambda owner: self._first_seen[owner][1])[:-MAX_TRACKED_OWNERS]:
                del self._first_seen[owner]

    def _account(self, owner: str, record: PeerRecord) -> None:
        seen = self._seen.get(owner)
        if seen is not None and record.time <= seen.record.time:
            return  # the same (or an older) record as last poll: nothing new, keep the last rates
        previous = seen.record if seen is not None else None
        elapsed = record.time - previous.time if previous is not None else None
        for name in self._totals:
            self._totals[name] += _counter_delta(getattr(record, name), getattr(previous, name, None), elapsed,
                                                 _MAX_RATES[name])

        sent_rate = received_rate = 0.0
        if previous is not None:
            if record.bytes_sent >= previous.bytes_sent and record.bytes_received >= previous.bytes_received:
                sent_rate = min((record.bytes_sent - previous.bytes_sent) / elapsed, MAX_BYTES_PER_SECOND)
                received_rate = min((record.bytes_received - previous.bytes_received) / elapsed, MAX_BYTES_PER_SECOND)
        self._seen[owner] = _PeerCounters(record, sent_rate, received_rate)


def _confirmed_reports(records, field_name: str) -> Dict[str, int]:
    """peer -> how many distinct alive reporters name it in their record's ``field_name`` (``rejected_peers``:
    senders of rejected parts; ``lying_peers``: peers caught lying by a round's check), for peers named by
    MIN_REJECTION_REPORTERS or more (a reporter naming itself does not count)."""
    reporters: Dict[str, Set[str]] = {}
    for record in records:
        for sender in set(getattr(record, field_name)):
            if sender != record.peer_id:
                reporters.setdefault(sender, set()).add(record.peer_id)
    return {sender: len(names) for sender, names in reporters.items() if len(names) >= MIN_REJECTION_REPORTERS}
