"""Hostile reducers for tests and benchmarks/poison.py: patches of the real reducers (dense and sparse)
installed in a peer's process before its averager forks. Everything else (wire, matchmaking, the
round check) is the real peer's, so what is exercised is what honest peers do with such answers.

Attacks (``install(attack)``; ``attack`` is a string, or a callable returning the current one, e.g.
read from shared memory, so that a benchmark can change it between rounds; "" is honest):
    scale:K        the reducer answers K x the average of its span (K = -1: sign flip; 1.01: slow poison)
    drop-invalid   the reducer leaves one sender's part out and reports it unusable (non-finite): others
                   cannot tell, and an average without it is no poison; the sender knows better
    drop-weight    the reducer leaves one sender's part out and reports having received weight 0 from it
                   (the sender's word against the reducer's)
    drop-hidden    the reducer leaves one sender's part out of its answer but reports it counted (the
                   answer is then not the average it reports)
    collude:K      scale:K, and the reducer reports a false measure of its accomplice's part that makes
                   the answer add up; the accomplice (``install_accomplice``) claims the same measure
"""
from __future__ import annotations

import time
from typing import Callable, Optional

_state = dict(current=lambda: "", channel=None, installed=False)


def _attack():
    kind, _, value = (_state["current"]() or "").partition(":")
    return kind, float(value) if value else None


def install(attack, channel=None) -> None:
    """Make this process's reducers lie (call before the averager is created). ``channel``: a shared
    ``multiprocessing.Array('c', ...)`` through which a colluding reducer tells its accomplice what to claim."""
    _state["current"] = attack if callable(attack) else (lambda: attack)
    _state["channel"] = channel
    if not _state["installed"]:
        _install_scale()
        _install_drop()
        _install_collusion()
        _state["installed"] = True


def _install_scale() -> None:
    from swarmtrain.compression import averager, sparse_round
    from swarmtrain.compression.wire import decode_sparse, encode_sparse

    def factor() -> Optional[float]:
        kind, value = _attack()
        return value if kind in ("scale", "collude") else None

    honest_accumulate = averager.RobustTensorPartReducer.accumulate_part

    async def scaled_accumulate(self, *args, **kwargs):
        average = await honest_accumulate(self, *args, **kwargs)
        return average if factor() is None else factor() * average

    averager.RobustTensorPartReducer.accumulate_part = scaled_accumulate
    honest_reduce = sparse_round.reduce_span

    def scaled_reduce(parts, span_length, density, value_format, *args, **kwargs):
        reduction = honest_reduce(parts, span_length, density, value_format, *args, **kwargs)
        if factor() is not None:
            answer = decode_sparse(reduction.encoded, span_length)
            reduction.encoded = encode_sparse(answer.indices, answer.values * factor(), span_length, value_format)
        return reduction

    sparse_round.reduce_span = scaled_reduce


def _victim(senders, own):
    others = [index for index in senders if index != own]
    return others[0] if others else None


# the liar's own position among the parts of the aggregate() call that follows (the reducers below set it)
_OWN_POSITION = [None]


def _install_drop() -> None:
    """Average without the first remote sender (by index); say so in one of three ways (see above)."""
    from swarmtrain.compression import averager, sparse_reduce, sparse_round

    honest_finished = averager.RobustTensorPartReducer.check_current_part_finished

    def dropping_finished(self):
        kind, _ = _attack()
        if kind in ("drop-invalid", "drop-weight") and self.current_part_accumulated_from == self.num_current_senders:
            dropped = _victim(sorted(self.pending), self.local_sender_index)
            if dropped is not None:
                part, _, received = self.pending[dropped]
                self.pending[dropped] = (part, 0.0, 0.0 if kind == "drop-weight" else received)
        senders = sorted(self.pending)  # the order the reducer hands the parts to aggregate()
        _OWN_POSITION[0] = senders.index(self.local_sender_index) if self.local_sender_index in senders else None
        return honest_finished(self)

    averager.RobustTensorPartReducer.check_current_part_finished = dropping_finished
    honest_maybe_finish = sparse_round.SpanReducer._maybe_finish

    def dropping_maybe_finish(self):
        kind, _ = _attack()
        if kind in ("drop-invalid", "drop-weight") and not self.result.done() \
                and len(self.parts) + len(self.banned) >= self.num_senders:
            dropped = _victim(sorted(self.parts), getattr(self, "own_index", None))
            if dropped is not None:
                self.parts[dropped] = (0.0, self.parts[dropped][1])
                if kind == "drop-weight":
                    self.weights_received[dropped] = 0.0
        own = getattr(self, "own_index", None)
        senders = [index for index, (weight, _) in self.parts.items() if weight > 0]  # as reduce_span orders them
        _OWN_POSITION[0] = senders.index(own) if own in senders else None
        return honest_maybe_finish(self)

    sparse_round.SpanReducer._maybe_finish = dropping_maybe_finish
    honest_round_init = sparse_round.SparseAllReduceRound.__init__

    def round_init(self, *args, **kwargs):  # the span reducer does not know its own sender index: tell it
        honest_round_init(self, *args, **kwargs)
        if self.reducer is not None and self.is_sender:
            self.reducer.own_index = self.sender_peer_ids.index(self.peer_id)

    sparse_round.SparseAllReduceRound.__init__ = round_init

    for module in (averager, sparse_reduce):
        module.aggregate = _hiding(module.aggregate)


def _hiding(honest_aggregate):
    def aggregate(parts, weights, policy):
        result = honest_aggregate(parts, weights, policy)
        kind, _ = _attack()
        dropped = _victim(sorted(result.coefficients), _OWN_POSITION[0])
        if kind == "drop-hidden" and dropped is not None and result.coefficients[dropped] < 1.0:
            # the average of the others, reported as if the dropped part were in it
            kept = {index: alpha for index, alpha in result.coefficients.items() if index != dropped}
            total = sum(kept.values())
            result.average = sum(alpha / total * parts[index].float() for index, alpha in kept.items()).reshape(
                result.average.shape)
        return result

    return aggregate


# ------------------------------------------------------------------------------------------------
# collusion: the reducer hides its answer's error in the measure of its accomplice's part
# ------------------------------------------------------------------------------------------------


def _read(channel) -> dict:
    from hivemind.utils import MSGPackSerializer

    raw = bytes(channel.raw).rstrip(b"\0")
    try:
        return MSGPackSerializer.loads(raw) if raw else {}
    except Exception:
        return {}


def _write(channel, data: dict) -> None:
    from hivemind.utils import MSGPackSerializer

    payload = MSGPackSerializer.dumps(data)
    with channel.get_lock():
        channel.raw = payload + b"\0" * (len(channel) - len(payload))


def _install_collusion() -> None:
    from swarmtrain.compression import crosscheck
    from swarmtrain.compression.robust import plan
    from swarmtrain.compression.verify import COUNTED, Measure

    honest_measure_all = crosscheck.RoundCheck._measure_all

    def forging_measure_all(self, key):
        claims, views = honest_measure_all(self, key)
        kind, factor = _attack()
        channel = _state["channel"]
        if kind != "collude" or channel is None:
            return claims, views
        accomplice = _read(channel).get("accomplice")
        members = [str(peer) for peer in self.peer_ids]
        if accomplice not in members:
            return claims, views
        accomplice = members.index(accomplice)
        forged = {}
        for unit, (_, _, statuses, _) in self.reduced.items():
            name = crosscheck.unit_name(unit)
            measures = {int(m): Measure.from_wire(data) for m, data in views.get(name, {}).items()}
            if accomplice not in measures:
                continue
            counted = [m for m, (status, w) in statuses.items() if status == COUNTED and w > 0 and m in measures]
            decided = plan({m: measures[m].norm for m in counted}, {m: statuses[m][1] for m in counted}, self.policy)
            alpha = (decided.coefficients or {}).get(accomplice)
            if not alpha:
                continue
            count = len(measures[accomplice].projections)
            expected = [sum(a * measures[m].projections[k] for m, a in decided.coefficients.items())
                        for k in range(count)]
            true = measures[accomplice]
            lie = Measure(true.norm, tuple(p + (factor - 1.0) * e / alpha for p, e in zip(true.projections, expected)),
                          true.count)
            views[name][str(accomplice)] = forged[name] = lie.to_wire()
        if forged:
            _write(channel, dict(accomplice=members[accomplice], group=self.group_id, forged=forged))
        return claims, views

    crosscheck.RoundCheck._measure_all = forging_measure_all


def install_accomplice(peer_id: str, channel, active: Callable[[], bool] = lambda: True) -> None:
    """This process claims whatever its colluding reducer tells it to (through ``channel``), while
    ``active()``; it announces its peer ID there first."""
    from swarmtrain.compression import crosscheck

    _write(channel, dict(accomplice=str(peer_id)))
    honest_measure_all = crosscheck.RoundCheck._measure_all

    def obeying_measure_all(self, key):
        claims, views = honest_measure_all(self, key)
        deadline = time.monotonic() + 3.0
        while active() and time.monotonic() < deadline:
            told = _read(channel)
            if told.get("group") == self.group_id:
                for name, measure in told.get("forged", {}).items():
                    if name in claims:
                        claims[name] = measure
                break
            time.sleep(0.02)
        return claims, views

    crosscheck.RoundCheck._measure_all = obeying_measure_all
