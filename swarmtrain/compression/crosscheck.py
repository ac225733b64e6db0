"""The cross-check of a round over the group (the arithmetic is in ``verify.py``), and the averager mixin
that runs it for both the sparse round and hivemind's dense all-reduce.

Messages: two phases after the all-reduce, each member's message reaching every other member through
``rpc_check_round`` (a unary call carrying the caller's message of the phase). Every member pushes its
message to every member it can dial, as soon as it is ready: a message then reaches a dialable member
after one one-way trip, not a round trip (60 ms less per phase on home links). A dialable caller is
answered at once with nothing: the callee pushes its own message itself. A client-mode member cannot be dialled: its
calls are answered with every message of the phase the callee holds, once the callee's own is ready.
Two client-mode members cannot reach each other: their messages travel through the others
(relayed bytes, as sent). A relay could alter a message, so seeds are checked against their commitments,
copies from several relays must agree, and a message is checked against the unit of the reducer that
relayed it only when nobody else relayed it. In that last case (say two clients and one server) the
server could forge a client's measure of its part: that gives it no more than a colluding pair has
(verify.py: the measure must be plausible for the norm, and the norm pass the outlier rule).

The averager side (:class:`CheckedAveragerMixin`):

- before matchmaking (in ``_step``) it draws the round's secret seed and appends its commitment to the
  data hivemind gathers for the group; ``_aggregate_with_group`` strips it again, so hivemind and the
  averagers see the gather they expect;
- it refuses to group with peers on its ban list (as a leader: their join requests; as a follower: it
  never asks them to lead; and a group that contains one anyway fails before anything is sent);
- after a round whose check names a liar it bans it, and the stats name it (``lying_reducers``).
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import AsyncIterator, Dict, List, Optional, Sequence, Set, Tuple

import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer, get_logger

from swarmtrain import hivemind_compat
from swarmtrain.access.bans import BanList
from swarmtrain.compression.robust import RobustPolicy
from swarmtrain.compression.verify import (ABSENT, COUNTED, FLOAT32_EPS, SPARSE_PROJECTIONS, Measure, UnitEvidence,
                                           UnitKey, Verdict, commitment, float32, judge_unit, measure, new_seed,
                                           project_range, projection_vectors, quantization_bound, round_seed,
                                           small_group_outliers)

logger = get_logger(__name__)

CHECK_PROTOCOL_VERSION = 1  # in the matchmaking prefix
CHECK_TIMEOUT = 15.0  # seconds a member waits for a phase's messages (a dead member fails the round)
# ... plus this per entry the member checks: the others measure the same units (O(entries) each) before
# they can send phase 2. ~30x an idle core's cost (2.2e-7 s per entry for the ~6 vectors of a dense
# 7.4M-entry unit): a starved member of a big honest round must not fail it for time (a fixed 15 s did)
MEASURE_SECONDS_PER_ENTRY = 1e-6
POLL_PERIOD = 0.2  # a client-mode member asks again for messages it gets only through relays
MAX_MESSAGE_BYTES = 2**22


def unit_name(unit: UnitKey) -> str:
    """How a unit is named in the check's messages."""
    return f"{unit[0]}.{unit[1]}"


def _parse_unit(name: str) -> UnitKey:
    reducer, part = name.split(".")
    return int(reducer), int(part)


class _Inbox:
    """One phase's messages: first-hand from their author, or relayed (bytes as the author sent them)."""

    def __init__(self):
        self.first_hand: Dict[int, bytes] = {}
        self.relayed: Dict[int, Dict[int, bytes]] = {}  # author -> relay -> bytes
        self.changed = asyncio.Event()

    def put(self, author: int, payload: bytes, relay: Optional[int] = None) -> None:
        if relay is None:
            self.first_hand.setdefault(author, payload)
        else:
            self.relayed.setdefault(author, {}).setdefault(relay, payload)
        self.changed.set()

    def has(self, author: int) -> bool:
        return author in self.first_hand or author in self.relayed

    def message(self, author: int, not_via: Optional[int] = None) -> Optional[bytes]:
        """The author's message: first-hand, else relayed by others than ``not_via`` (all such relays must
        agree), else -- when ``not_via`` was the only one to relay it -- its copy."""
        if author in self.first_hand:
            return self.first_hand[author]
        relayed = self.relayed.get(author, {})
        copies = {payload for relay, payload in relayed.items() if relay != not_via}
        if not copies and not_via in relayed:
            copies = {relayed[not_via]}
        return copies.pop() if len(copies) == 1 else None

    def all_known(self) -> Dict[int, bytes]:
        known = {author: payloads[min(payloads)] for author, payloads in self.relayed.items()}
        known.update(self.first_hand)
        return known


class RoundCheck:
    """The cross-check of one round in one group, from this member's side (see the module docstring).

    The round records what it sent, received and reduced (``record_*``), then calls :meth:`run`, which
    exchanges both phases, judges every unit and returns the Verdict. Runs in the averager's process.

    :param averager: the averager (its p2p, class and prefix, for calls to the group)
    :param group_id: the group's ID
    :param peer_ids: the group, in hivemind's order
    :param clients: whether each member is in client mode (cannot be dialled)
    :param commitments: each member's seed commitment, from the gather (None: it sent none)
    :param seed: this member's secret seed
    :param policy: the run's robust policy (every reducer applies the same)
    :param max_weight: the run's clamp of self-reported weights
    :param timeout: seconds to wait for a phase's messages (:meth:`run` adds MEASURE_SECONDS_PER_ENTRY per
      entry it checks)
    """

    def __init__(self, *, averager, group_id: bytes, peer_ids: Sequence[PeerID], clients: Sequence[bool],
                 commitments: Sequence[Optional[bytes]], seed: bytes, policy: RobustPolicy, max_weight: float,
                 timeout: float = CHECK_TIMEOUT):
        self.averager, self.group_id, self.peer_ids = averager, group_id, tuple(peer_ids)
        self.me = self.peer_ids.index(averager.peer_id)
        self.clients, self.commitments, self.seed = tuple(clients), tuple(commitments), seed
        self.policy, self.max_weight, self.timeout = policy, float(max_weight), timeout
        self.weight: Optional[float] = None  # what this member sent as a sender (None: it sent nothing)
        # unit -> (global indices or None for a dense unit, values as the reducer decodes them)
        self.sent: Dict[UnitKey, tuple] = {}
        # unit -> (global indices or None for a dense unit, values as we apply them, rounding bound)
        self.received: Dict[UnitKey, tuple] = {}
        self.outputs: Dict[UnitKey, Measure] = {}  # unit -> our measure of the answer we received
        # dense units: unit -> (the delta the reducer sent back, its wire format), our part being in sent
        self.dense_answers: Dict[UnitKey, tuple] = {}
        self.reduced: Dict[UnitKey, tuple] = {}  # unit -> (support, {member: (indices, values, norm)}, statuses, coefficients)
        self.dense_ranges: Dict[UnitKey, Tuple[int, int]] = {}  # dense units: [start, end) of the flat vector
        self.projections = SPARSE_PROJECTIONS  # directions per unit (the dense runner sets its own)
        self.part_valid = lambda: True  # whether our own part was finite (asked only when a reducer says not)
        self.inboxes = (_Inbox(), _Inbox())
        self.own_messages: List[Optional[bytes]] = [None, None]
        self.own_ready = (asyncio.Event(), asyncio.Event())
        self.bytes_sent = self.bytes_received = 0
        self.seconds = 0.0
        # where the check's time went: reveal (phase 1: waiting for every member to hold its answers, and
        # the exchange), measure (our projections), exchange (phase 2), judge (benchmarks/poison.py reads it)
        self.phase_seconds: Dict[str, float] = {}
        self._calls_in_flight: Set[asyncio.Future] = set()  # pushes whose empty answers we do not wait for

    # -------------------------------------------------------------- what the round records
    def add_dense_unit(self, unit: UnitKey, start: int, end: int) -> None:
        """A dense unit covers [start, end) of the flat vector; its parts and answers are checked whole."""
        self.dense_ranges[unit] = (start, end)

    def record_sent(self, unit: UnitKey, indices: Optional[torch.Tensor], values: torch.Tensor) -> None:
        """Our part of ``unit`` as its reducer decodes it (sorted global ``indices``; None: a dense unit)."""
        self.sent[unit] = (indices, values)

    def record_received(self, unit: UnitKey, indices: Optional[torch.Tensor], values: torch.Tensor,
                        bound: float) -> None:
        """A sparse reducer's answer for ``unit`` as we will apply it, and the bound of its wire rounding."""
        self.received[unit] = (indices, values, float(bound))

    def record_dense_answer(self, unit: UnitKey, delta: torch.Tensor, value_format: str) -> None:
        """A dense reducer's answer: the delta to add to our part (record_sent) of the unit, as decoded
        from ``value_format`` (fp32 / fp16). Only a reference is kept: measuring happens in _measure_all."""
        self.dense_answers[unit] = (delta, value_format)

    def record_reduced(self, unit: UnitKey, support: Optional[torch.Tensor], parts: Dict[int, tuple],
                       statuses: Dict[int, Tuple[str, float]], coefficients: Optional[Dict[int, float]]) -> None:
        """What this member, as the unit's reducer, did: the support it answered on (None: dense), every
        counted part as (global indices or None, values, the norm it judged), each sender's status and
        the weight it received, and CenteredClip's coefficients (None for mean and clip)."""
        self.reduced[unit] = (support, parts, statuses, coefficients)

    # -------------------------------------------------------------- the phases
    def checked_entries(self) -> int:
        """The entries of the units this member checks (dense ranges, sparse answers and reduced supports)."""
        dense = sum(end - start for start, end in self.dense_ranges.values())
        sparse = sum(len(values) for unit, (_, values, _) in self.received.items() if unit not in self.dense_ranges)
        sparse += sum(len(support) for support, *_ in self.reduced.values() if support is not None)
        return dense + sparse

    async def run(self) -> Verdict:
        started = time.perf_counter()
        # from now on (our phases, and the groupmates' calls we serve) wait in proportion to the round's size
        self.timeout += MEASURE_SECONDS_PER_ENTRY * self.checked_entries()
        try:
            return await self._run()
        finally:
            self.seconds = time.perf_counter() - started

    async def _run(self) -> Verdict:
        reports = {unit_name(unit): {str(member): [status, weight] for member, (status, weight) in statuses.items()}
                   for unit, (_, _, statuses, _) in self.reduced.items()}
        coefficients = {unit_name(unit): {str(member): alpha for member, alpha in (coefs or {}).items()}
                        for unit, (_, _, _, coefs) in self.reduced.items() if coefs}
        first = dict(seed=self.seed, weight=self.weight, reports=reports, coefficients=coefficients)
        mark = time.perf_counter()
        await self._exchange(0, MSGPackSerializer.dumps(first))
        mark = self._lap("reveal", mark)
        seeds = self._revealed_seeds()
        if seeds is None:
            verdict = Verdict(unverifiable=["the group's seeds are incomplete or do not match their commitments"])
            await self._exchange(1, MSGPackSerializer.dumps(dict(digest=b"", claims={}, views={})))
            return verdict
        key = round_seed(self.group_id, seeds)
        claims, views = await asyncio.get_event_loop().run_in_executor(None, self._measure_all, key)
        mark = self._lap("measure", mark)
        second = dict(digest=key[:8], claims=claims, views=views)
        await self._exchange(1, MSGPackSerializer.dumps(second))
        mark = self._lap("exchange", mark)
        verdict = self._judge(key)
        self._lap("judge", mark)
        return verdict

    def _lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.phase_seconds[name] = now - since
        return now

    def _revealed_seeds(self) -> Optional[List[bytes]]:
        seeds = []
        for author in range(len(self.peer_ids)):
            payload = self.inboxes[0].message(author) if author != self.me else self.own_messages[0]
            try:
                seed = MSGPackSerializer.loads(payload)["seed"]
            except Exception:
                return None
            if not isinstance(seed, bytes) or self.commitments[author] is None or commitment(seed) != self.commitments[author]:
                return None
            seeds.append(seed)
        return seeds

    async def _exchange(self, phase: int, payload: bytes) -> None:
        self.own_messages[phase] = payload
        self.own_ready[phase].set()
        inbox, deadline = self.inboxes[phase], time.monotonic() + self.timeout
        targets = [j for j in range(len(self.peer_ids)) if j != self.me and not self.clients[j]]
        calls = [asyncio.ensure_future(self._call(j, phase, payload, deadline)) for j in targets]
        if self.clients[self.me]:
            await asyncio.gather(*calls)  # the answers carry what we get
        else:
            # the others push theirs: once every message is in, the phase is over, while our calls'
            # (empty) answers are still on their way back, one one-way trip later
            self._calls_in_flight.update(calls)
            for call in calls:
                call.add_done_callback(self._calls_in_flight.discard)
        others = [j for j in range(len(self.peer_ids)) if j != self.me]
        while not all(inbox.has(j) for j in others):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return  # judged as unverifiable where a missing message matters
            inbox.changed.clear()
            if self.clients[self.me] and targets:
                # messages of other client-mode members only come through the others: ask again
                await asyncio.sleep(min(POLL_PERIOD, remaining))
                await asyncio.gather(*(self._call(j, phase, payload, deadline) for j in targets))
            else:
                try:
                    await asyncio.wait_for(inbox.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    return

    async def _call(self, member: int, phase: int, payload: bytes, deadline: float) -> None:
        request = averaging_pb2.AveragingData(group_id=self.group_id, weight=float(phase),
                                              tensor_part=runtime_pb2.Tensor(buffer=payload))
        self.bytes_sent += request.ByteSize()
        try:
            stub = type(self.averager).get_stub(hivemind_compat.averager_p2p(self.averager), self.peer_ids[member],
                                                namespace=self.averager.prefix)
            reply = await asyncio.wait_for(stub.rpc_check_round(request), max(0.1, deadline - time.monotonic()))
            self.bytes_received += reply.ByteSize()
            if reply.code != averaging_pb2.AVERAGED_PART:
                return
            self._store_bundle(phase, member, reply.tensor_part.buffer)
        except Exception as error:
            logger.debug(f"round check: no answer from {self.peer_ids[member]} in phase {phase + 1}: {error!r}")

    def _store_bundle(self, phase: int, sender: int, bundle: bytes) -> None:
        messages = MSGPackSerializer.loads(bundle)
        if not isinstance(messages, dict):
            return
        for name, payload in messages.items():
            author = int(name) if isinstance(name, str) and name.isdigit() else -1
            if 0 <= author < len(self.peer_ids) and author != self.me \
                    and isinstance(payload, bytes) and len(payload) <= MAX_MESSAGE_BYTES:
                self.inboxes[phase].put(author, payload, relay=None if author == sender else sender)

    async def serve(self, caller: PeerID, phase: int, payload: bytes) -> Optional[bytes]:
        """A groupmate's call: keep its message. A dialable caller gets an empty answer at once (we push
        ours to it ourselves); a client-mode caller gets every message of the phase we hold, ours
        included, once ours is ready (within the timeout). None when the caller is not in the group."""
        if caller not in self.peer_ids or phase not in (0, 1) or len(payload) > MAX_MESSAGE_BYTES:
            return None
        author = self.peer_ids.index(caller)
        self.bytes_received += len(payload)
        self.inboxes[phase].put(author, payload)
        if not self.clients[author]:
            return MSGPackSerializer.dumps({})
        try:
            await asyncio.wait_for(self.own_ready[phase].wait(), self.timeout)
        except asyncio.TimeoutError:
            return None
        known = {self.me: self.own_messages[phase]}
        known.update(self.inboxes[phase].all_known())  # it cannot reach the other clients: relay what we hold
        bundle = MSGPackSerializer.dumps({str(index): message for index, message in known.items() if index != author})
        self.bytes_sent += len(bundle)
        return bundle

    # -------------------------------------------------------------- measuring
    def _measure_all(self, key: bytes) -> Tuple[dict, dict]:
        """Our claims (parts we sent, on the support each reducer answered us) and views (parts we
        reduced, on the support we answered), and our measures of the answers, under the round's z.
        Runs in an executor thread: O(d) work never blocks the averager's event loop."""
        claims, views = {}, {}
        blocks: Dict[int, object] = {}  # blocks of z shared by consecutive dense units (project_range's cache)
        for unit in sorted(set(self.sent) | set(self.received) | set(self.dense_answers) | set(self.reduced)):
            if unit in self.dense_ranges:
                self._measure_dense(unit, key, claims, views, blocks)
            else:
                self._measure_sparse(unit, key, claims, views)
        return claims, views

    def _measure_dense(self, unit: UnitKey, key: bytes, claims: dict, views: dict, blocks: dict) -> None:
        """A dense unit: every vector on the same range, measured against each block of z in one pass."""
        name, (start, end) = unit_name(unit), self.dense_ranges[unit]
        rows, labels = [], []
        if unit in self.sent:
            rows.append(self.sent[unit][1])
            labels.append("sent")
        if unit in self.dense_answers:
            rows.append(self.dense_answers[unit][0])
            labels.append("delta")
        parts = self.reduced[unit][1] if unit in self.reduced else {}
        for member, (_, values, _) in parts.items():
            rows.append(values)
            labels.append(member)
        if not rows:
            return
        projected, norms = project_range(key, start, end, rows, self.projections, blocks)
        projections, norms = projected.tolist(), norms.tolist()  # one row of projections per vector
        measured = {label: (norm, tuple(float32(p) for p in row)) for label, norm, row in zip(labels, norms, projections)}
        count = end - start
        if "sent" in measured:
            norm, projected = measured["sent"]
            claims[name] = Measure(float32(norm), projected, count).to_wire()
        if "delta" in measured and "sent" in measured:
            # the answer we apply is (our part as the reducer decoded it) + (the delta it sent back)
            (sent_norm, sent_projected), (delta_norm, delta_projected) = measured["sent"], measured["delta"]
            answer = tuple(float32(a + b) for a, b in zip(sent_projected, delta_projected))
            self.outputs[unit] = Measure(float32(sent_norm + delta_norm), answer, count)
            value_format = self.dense_answers[unit][1]
            bound = 2.0 * FLOAT32_EPS * (sent_norm + delta_norm)
            if value_format != "fp32":
                bound += quantization_bound(self.dense_answers[unit][0], value_format, norm=delta_norm)
            self.received[unit] = (None, None, bound)
        if parts:
            # a part's norm as the reducer judged it (a zero-weight part, not judged: as measured here)
            views[name] = {str(member): Measure(float32(parts[member][2] if parts[member][2] >= 0 else measured[member][0]),
                                                measured[member][1], count).to_wire()
                           for member in parts}

    def _measure_sparse(self, unit: UnitKey, key: bytes, claims: dict, views: dict) -> None:
        name = unit_name(unit)
        support = self.received[unit][0] if unit in self.received else None
        z = None if support is None else projection_vectors(key, support, self.projections)
        if unit in self.sent:
            indices, values = self.sent[unit]
            norm = float(values.double().norm())
            # without the reducer's answer we do not know its support: our norm still counts
            claim = Measure(norm, (), 0) if z is None else _restricted_measure(indices, values, support, z, norm)
            claims[name] = claim.to_wire()
        if unit in self.received:
            self.outputs[unit] = measure(self.received[unit][1], z)
        if unit in self.reduced and self.reduced[unit][0] is not None:
            answered, parts = self.reduced[unit][0], self.reduced[unit][1]
            # our own span: the support we answered is the one we received (z costs the most of a measure)
            same = z is not None and torch.equal(support, answered)  # False for different lengths too
            answered_z = z if same else projection_vectors(key, answered, self.projections)
            views[name] = {str(member): _restricted_measure(indices, values, answered, answered_z, norm).to_wire()
                           for member, (indices, values, norm) in parts.items()}

    # -------------------------------------------------------------- judging
    def _judge(self, key: bytes) -> Verdict:
        verdict, evidences = Verdict(), []
        units = set(self.outputs) | set(self.reduced)
        first = {author: self._decode(0, author, None) for author in range(len(self.peer_ids))}
        for reducer, part in sorted(units):
            unit = (reducer, part)
            report = first.get(reducer)
            second_reducer = self._decode(1, reducer, None)
            if report is None or second_reducer is None or second_reducer.get("digest") != key[:8]:
                verdict.unverifiable.append(f"no usable report from reducer #{reducer}")
                continue
            try:
                evidence = self._evidence(unit, key, report, second_reducer)
            except (KeyError, TypeError, ValueError) as error:
                verdict.liars[reducer] = f"sent a malformed report ({error!r})"
                continue
            evidences.append(evidence)
            verdict.merge(judge_unit(evidence, self.me, self.policy, self.max_weight, self.part_valid))
        for sender, reason in small_group_outliers(evidences, self.me, self.policy).items():
            verdict.outliers.setdefault(sender, reason)
        # a dispute over a unit we reduced: we know our view is what we received, so the sender lied
        for reducer, sender, reason in list(verdict.disputes):
            if reducer == self.me:
                verdict.disputes.remove((reducer, sender, reason))
                verdict.liars.setdefault(sender, "misreported the part it sent us")
        verdict.liars.pop(self.me, None)
        return verdict

    def _decode(self, phase: int, author: int, not_via: Optional[int]) -> Optional[dict]:
        payload = self.own_messages[phase] if author == self.me else self.inboxes[phase].message(author, not_via)
        if payload is None:
            return None
        try:
            data = MSGPackSerializer.loads(payload)
        except Exception:
            return None
        return data if isinstance(data, dict) else None

    def _evidence(self, unit: UnitKey, key: bytes, report: dict, second_reducer: dict) -> UnitEvidence:
        reducer, name = unit[0], unit_name(unit)
        statuses = {int(member): (str(status), float(weight))
                    for member, (status, weight) in report["reports"].get(name, {}).items()}
        if any(not math.isfinite(weight) for _, weight in statuses.values()):
            raise ValueError("non-finite weight in the report")
        if self.me not in statuses and unit in self.sent:
            statuses[self.me] = (ABSENT, 0.0)  # we sent it a part it does not mention
        raw_coefficients = report.get("coefficients", {}).get(name)
        coefficients = None if raw_coefficients is None else {int(m): float(a) for m, a in raw_coefficients.items()}
        views = {int(member): Measure.from_wire(data) for member, data in second_reducer["views"].get(name, {}).items()}
        claims: Dict[int, Optional[Measure]] = {}
        weights: Dict[int, float] = {}
        for sender in statuses:
            first = self._decode(0, sender, not_via=reducer)
            second = self._decode(1, sender, not_via=reducer)
            if first is not None and isinstance(first.get("weight"), (int, float)):
                weights[sender] = float(first["weight"])
            claim = None
            if second is not None and second.get("digest") == key[:8] and name in second.get("claims", {}):
                claim = Measure.from_wire(second["claims"][name])
            claims[sender] = claim
        output, bound = None, 0.0
        if unit in self.outputs:
            output, bound = self.outputs[unit], self.received[unit][2]
        return UnitEvidence(reducer, statuses, coefficients, views, claims, weights, output, bound)


def _restricted_measure(indices: Optional[torch.Tensor], values: torch.Tensor, support: torch.Tensor,
                        z: torch.Tensor, norm: float) -> Measure:
    """The Measure of a part (``values`` at sorted global ``indices``; None: the whole dense ``support``)
    on a sorted ``support``: entries of the part outside the support do not count, support entries the
    part lacks are 0."""
    if indices is None:
        restricted = values
    else:
        restricted = torch.zeros(len(support), dtype=torch.float32)
        if len(support) and len(indices):
            positions = torch.searchsorted(support, indices).clamp_max(len(support) - 1)
            hit = support[positions] == indices
            restricted[positions[hit]] = values[hit].float()
    return measure(restricted, z, norm)


# ------------------------------------------------------------------------------------------------
# the averager side
# ------------------------------------------------------------------------------------------------


class CheckedAveragerMixin:
    """Cross-checks every round of a hivemind averager and keeps banned peers out of its groups (see the
    module docstring). Mixed in before the hivemind class by the averagers of compression/averager.py.

    :param ban_list: the peers to refuse (access/bans.py); a local-only list when None
    :param check_timeout: seconds a member waits for a phase of the check (at least the allreduce_timeout)
    :param round_checks: False: rounds are not cross-checked (benchmarks measure the cost of the check
      against this; every member of a group must agree: the matchmaking prefix differs)
    :param args, kwargs: the averager's own
    """

    _rpc_handlers = None  # our class adds rpc_check_round: collect handlers for it, not a parent's list
    round_checks = True  # False: gather and bans as usual, but rounds are not cross-checked

    def __init__(self, *args, ban_list: Optional[BanList] = None, check_timeout: float = CHECK_TIMEOUT,
                 round_checks: Optional[bool] = None, **kwargs):
        if round_checks is not None:
            self.round_checks = bool(round_checks)
        if self.round_checks and "prefix" in kwargs:
            # peers without (or with another version of) the check never meet ours in matchmaking
            kwargs["prefix"] = f"{kwargs['prefix']}_checked{CHECK_PROTOCOL_VERSION}"
        self.ban_list = ban_list if ban_list is not None else BanList()
        # a phase waits for every member's projections, which take seconds to compute for a large model
        # on a busy CPU: never less patient than the all-reduce itself (a fixed 15 s failed honest rounds
        # of ALBERT-base under load)
        self.check_timeout = max(float(check_timeout), float(kwargs.get("allreduce_timeout") or 0.0))
        self._check_seeds: Dict[bytes, tuple] = {}  # averager process: commitment -> (seed, step) per step
        self._checks: Dict[bytes, asyncio.Future] = {}  # averager process: group id -> RoundCheck
        self._leaders_filtered = False
        self._background_checks: Set[asyncio.Future] = set()  # averager process: checks of rounds we failed
        super().__init__(*args, **kwargs)

    # -------------------------------------------------------------- matchmaking
    async def _step(self, *, step, future_for_init):
        self._filter_banned_leaders()
        self.ban_list.refresh_in_background()
        self._commit_new_seed(step)
        return await super()._step(step=step, future_for_init=future_for_init)

    def _commit_new_seed(self, step) -> None:
        """A fresh secret seed for the step's next group, its commitment appended to what it gathers (a
        seed revealed in a failed attempt must not be used again: the next group would know it)."""
        seed = new_seed()
        key = commitment(seed)
        self._check_seeds[key] = (seed, step)
        while len(self._check_seeds) > 16:  # steps that never formed a group
            self._check_seeds.pop(next(iter(self._check_seeds)))
        bandwidth, mode, user_data = self.serializer.loads(step.data_for_gather)[:3]
        hivemind_compat.set_data_for_gather(step, self.serializer.dumps([bandwidth, mode, user_data, key]))

    def _filter_banned_leaders(self) -> None:
        """As a follower, never ask a banned peer to lead our group."""
        if self._leaders_filtered:
            return
        key_manager = hivemind_compat.group_key_manager(self)
        if key_manager is None:
            return
        original, ban_list = key_manager.get_averagers, self.ban_list

        async def get_averagers(*args, **kwargs):
            return [(peer, expiration) for peer, expiration in await original(*args, **kwargs)
                    if not ban_list.is_banned(peer)]

        key_manager.get_averagers = get_averagers
        self._leaders_filtered = True

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self.ban_list.is_banned(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    # -------------------------------------------------------------- the round
    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        gathered = [self.serializer.loads(raw) for raw in group_info.gathered]
        banned = [peer for peer in group_info.peer_ids if self.ban_list.is_banned(peer)]
        if banned:
            raise AllreduceException(f"refusing to average with banned peer(s) {', '.join(map(str, banned))}")
        stripped = GroupInfo(group_info.group_id, group_info.peer_ids,
                             tuple(self.serializer.dumps(list(data[:3])) for data in gathered))
        if not self.round_checks:
            return await super()._aggregate_with_group(stripped, min_vector_size, **kwargs)
        commitments = [data[3] if len(data) > 3 and isinstance(data[3], bytes) else None for data in gathered]
        mine = commitments[group_info.peer_ids.index(self.peer_id)]
        seed, step = self._check_seeds.pop(mine, (None, None)) if mine is not None else (None, None)
        if seed is None:
            raise AllreduceException("no round-check seed for this group (the gather lost our commitment)")
        from hivemind.averaging.allreduce import AveragingMode

        clients = [AveragingMode(data[1]) == AveragingMode.CLIENT for data in gathered]
        check = RoundCheck(averager=self, group_id=group_info.group_id, peer_ids=group_info.peer_ids, clients=clients,
                           commitments=commitments, seed=seed, policy=self.robust_policy,
                           max_weight=self.max_sample_weight, timeout=self.check_timeout)
        future = self._checks.setdefault(group_info.group_id, asyncio.get_event_loop().create_future())
        if not future.done():
            future.set_result(check)
        try:
            return await super()._aggregate_with_group(stripped, min_vector_size, round_check=check, **kwargs)
        finally:
            self._commit_new_seed(step)  # hivemind may retry the step in another group
            asyncio.get_event_loop().call_later(2 * check.timeout, self._checks.pop, group_info.group_id, None)

    async def rpc_check_round(self, request: averaging_pb2.AveragingData,
                              context: P2PContext) -> averaging_pb2.AveragingData:
        future = self._checks.setdefault(request.group_id, asyncio.get_event_loop().create_future())
        try:
            check = await asyncio.wait_for(asyncio.shield(future), self.check_timeout)
            bundle = await check.serve(context.remote_id, int(request.weight), request.tensor_part.buffer)
        except asyncio.TimeoutError:
            if not future.done():
                self._checks.pop(request.group_id, None)  # a group we never joined
            bundle = None
        if bundle is None:
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        return averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=runtime_pb2.Tensor(buffer=bundle))

    async def finish_check(self, check: RoundCheck, round_failed: bool) -> None:
        """Run the check of a round, then name and ban liars; raises when the round must not be applied.
        Slower members can still fetch our messages afterwards: the check stays registered for
        2 x check_timeout.

        When our own part of the round failed, the round is lost for us whatever the check finds, yet
        the others still need our seed and measures: the check then runs on in the background and the
        step returns at once, free to retry in a new group. Waiting for it held every member of a round
        with an absent member (one hivemind's matchmaking counted in, but that had given up on the
        group) for two phase timeouts: the whole 30 s averaging timeout of the tiny run, under load."""
        if round_failed:
            background = asyncio.ensure_future(self._run_check(check))
            self._background_checks.add(background)  # (a task nobody references may be collected)
            background.add_done_callback(self._background_checks.discard)
            return
        self._act_on_verdict(check, await self._run_check(check))

    async def _run_check(self, check: RoundCheck) -> Verdict:
        verdict = await check.run()
        self.stats.record_check(bytes_sent=check.bytes_sent, bytes_received=check.bytes_received,
                                seconds=check.seconds)
        return verdict

    def _act_on_verdict(self, check: RoundCheck, verdict: Verdict) -> None:
        if verdict.ok:
            return
        for member, reason in verdict.liars.items():
            peer = check.peer_ids[member]
            self.stats.record_liar(peer)
            self.ban_list.ban(peer, reason)
        for member, reason in verdict.outliers.items():
            logger.warning(f"refusing the round: sender {check.peer_ids[member]}'s part is an outlier ({reason})")
            self.stats.record_rejection(check.peer_ids[member])
        names = {index: str(peer) for index, peer in enumerate(check.peer_ids)}
        description = verdict.describe()
        for index, name in names.items():
            description = description.replace(f"#{index}", name)
        raise AllreduceException(f"the round's check failed: {description}")
