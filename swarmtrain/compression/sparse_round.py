"""One sparse all-reduce round over the network (the arithmetic is in ``sparse_reduce``).

Nothing is written (neither averaged gradients nor residuals) unless the whole round succeeds for this
peer; a failed round leaves hivemind.Optimizer's local gradients and the residuals as they were.
Senders that stay silent past ``sender_timeout`` or send malformed / non-finite parts or invalid
weights are dropped by the reducer (the round completes for the others, all of whom still decode
identical bytes); a reducer that fails makes the round fail for its senders, exactly like a failed
round in hivemind.

Wire: one stream per (sender, reducer) pair through the averager's ``rpc_aggregate_part`` route; the
payload is chunked into AveragingData messages whose first one carries the payload length. Payloads are
encoded by ``wire.py`` (versioned: peers of another wire version are refused, and the matchmaking prefix
carries the wire version so such peers do not even meet).
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import AsyncIterator, Dict, List, Optional, Set

import torch
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_logger
from hivemind.utils.asyncio import aiter_with_timeout, anext

from swarmtrain.compression.robust import RobustPolicy
from swarmtrain.compression.verify import ABSENT, COUNTED, INVALID, quantization_bound
from swarmtrain.compression.sparse_reduce import (absorb_requantization, apply_averages, reduce_span, sender_payloads,
                                                  spans)
from swarmtrain.compression.wire import SparsePart, WireFormatError, decode_sparse
from swarmtrain.hivemind_compat import averager_p2p

logger = get_logger(__name__)

CHUNK_BYTES = 2**19  # same order as hivemind's part_size_bytes: keeps single p2p messages small
SILENT_SENDER_GRACE = 3.0  # a reducer drops senders silent for this many sender_timeouts (see below)


class RejectedPart(AllreduceException):
    """The reducer left a sender's part out of the average (non-finite, outsized...)."""


class SpanReducer:
    """Collects the sparse parts of one span from all senders, then reduces them once
    (:func:`~swarmtrain.compression.sparse_reduce.reduce_span`).

    :param span_length: entries in this reducer's span
    :param num_senders: senders expected (the reduction waits for each to send or be banned)
    :param density: the round's density: the average is re-sparsified to about density x span_length entries
    :param value_format: how values travel (fp16, 8bit, 2bit, fp32; see wire.py)
    :param max_weight: a self-reported weight above this is clamped
    :param policy: checks and aggregation rule (robust.py)
    :param average_format: how the average travels back (default: value_format)
    """

    def __init__(self, span_length: int, num_senders: int, density: float, value_format: str, max_weight: float,
                 policy: RobustPolicy = RobustPolicy(), average_format: Optional[str] = None):
        self.span_length, self.num_senders = span_length, num_senders
        self.density, self.value_format, self.max_weight = density, value_format, max_weight
        self.policy, self.average_format = policy, average_format
        self.parts: Dict[int, tuple] = {}  # sender index -> (weight, SparsePart)
        self.weights_received: Dict[int, float] = {}  # sender index -> its self-reported weight, unclamped
        self.banned: Set[int] = set()
        self.ban_reasons: Dict[int, str] = {}  # banned sender -> why, when it sent something unusable
        self.reduction = None  # the SpanReduction, once done
        self.rejected: Dict[int, str] = {}  # sender index -> why its part was left out of the average
        self.result: asyncio.Future = asyncio.get_event_loop().create_future()
        self.requantization_error: Optional[SparsePart] = None  # (applied - exact average) at kept entries
        self.total_weight = 0.0

    def add(self, sender_index: int, weight: float, part: SparsePart):
        if self.result.done():
            raise AllreduceException("span already reduced (sender too late or banned)")
        if sender_index in self.banned or sender_index in self.parts:
            raise AllreduceException(f"sender {sender_index} is banned or sent twice")
        if not math.isfinite(weight) or weight < 0:
            raise AllreduceException(f"invalid weight {weight}")
        if part.numel != self.span_length:
            raise WireFormatError(f"part length {part.numel} != span length {self.span_length}")
        self.parts[sender_index] = (min(weight, self.max_weight), part)
        self.weights_received[sender_index] = float(weight)
        self._maybe_finish()

    def ban(self, sender_index: int, reason: Optional[str] = None):
        """Leave a sender out: silent (no reason) or with something unusable (``reason``)."""
        if sender_index not in self.parts and not self.result.done():
            self.banned.add(sender_index)
            if reason is not None:
                self.ban_reasons[sender_index] = reason
            self._maybe_finish()

    def statuses(self) -> Dict[int, tuple]:
        """For the round's check: sender index -> (status, weight received) (verify.py's statuses)."""
        reduction, statuses = self.reduction, {}
        for index in range(self.num_senders):
            if index in self.parts:
                weight = self.weights_received[index]
                judged = reduction is not None and (index in reduction.norms or
                                                    (weight == 0 and index not in reduction.rejected))
                reason = reduction.rejected.get(index, "") if reduction is not None else "not reduced"
                statuses[index] = (COUNTED, weight) if judged else (f"{INVALID}: {reason}", weight)
            elif index in self.ban_reasons:
                statuses[index] = (f"{INVALID}: {self.ban_reasons[index]}", 0.0)
            else:
                statuses[index] = (ABSENT, 0.0)
        return statuses

    def _maybe_finish(self):
        if not self.result.done() and len(self.parts) + len(self.banned) >= self.num_senders:
            try:
                reduction = reduce_span(self.parts, self.span_length, self.density, self.value_format, self.policy,
                                        self.average_format)
                self.reduction = reduction
                self.rejected, self.total_weight = reduction.rejected, reduction.total_weight
                self.requantization_error = reduction.requantization_error
                self.result.set_result(reduction.encoded)
            except Exception as e:
                self.result.set_exception(e)


class SparseAllReduceRound:
    """One sparse all-reduce round in one group; also the servicer for that group's incoming parts.

    :param averager: the SparseGradientAverager running the round (its p2p, prefix, codec settings, stats)
    :param group_info: the group hivemind's matchmaking formed
    :param peer_fractions: each member's share of the reduction (hivemind's load balancing)
    :param modes: each member's AveragingMode (a client sends but reduces nothing; an auxiliary peer only reduces)
    :param weight: this peer's weight (samples accumulated; 0 = tag along without contributing)
    :param density: the round's density
    :param sender_timeout: a reducer drops senders silent for SILENT_SENDER_GRACE x this long
    :param reducer_timeout: a sender waits this long (plus the grace) for a reducer's answer
    :param round_check: the group's cross-check of this round (crosscheck.RoundCheck), or None
    """

    def __init__(self, *, averager, group_info: GroupInfo, peer_fractions, modes,
                 weight: float, density: float, sender_timeout: Optional[float], reducer_timeout: Optional[float],
                 round_check=None):
        self.averager = averager
        self.group_id, self.peer_ids = group_info.group_id, tuple(group_info.peer_ids)
        self.peer_id = averager.peer_id
        self.my_index = self.peer_ids.index(self.peer_id)
        self.modes = modes
        self.spans = spans(averager.total_numel, peer_fractions)
        self.reducer_indices = [i for i, (start, end) in enumerate(self.spans) if end > start]
        self.sender_peer_ids = [pid for pid, mode in zip(self.peer_ids, modes) if mode != AveragingMode.AUX]
        self.is_sender = modes[self.my_index] != AveragingMode.AUX
        self.weight = float(weight)
        self.density = density
        self.sender_timeout, self.reducer_timeout = sender_timeout, reducer_timeout
        self.silent_sender_grace = None if sender_timeout is None else SILENT_SENDER_GRACE * sender_timeout
        # a sender waits for a reducer's answer as long as that reducer may wait for a silent peer, plus
        # hivemind's reducer_timeout for the answer itself
        self.answer_timeout = None
        if reducer_timeout is not None:
            self.answer_timeout = reducer_timeout + (self.silent_sender_grace or 0.0)
        self.bytes_sent = self.bytes_received = 0
        self.check = round_check
        if round_check is not None:
            round_check.weight = self.weight if self.is_sender else None
        start, end = self.spans[self.my_index]
        self.reducer = None
        if end > start:
            self.reducer = SpanReducer(end - start, len(self.sender_peer_ids), density,
                                        averager.value_format, averager.max_sample_weight, averager.robust_policy,
                                        average_format=averager.average_format)
        self.senders_started: Set[PeerID] = {self.peer_id} if self.is_sender else set()
        # remote senders still waiting for this peer's averaged span; the round stays open until they
        # got it, or a peer that finished first could shut down before its answers left
        self.own_part_ready = asyncio.Event()
        self.answers_pending: Set[PeerID] = set()
        self.all_answered = asyncio.Event()
        if self.reducer is not None:
            self.answers_pending = {pid for pid in self.sender_peer_ids if pid != self.peer_id}
        if not self.answers_pending:
            self.all_answered.set()

    # ---------------------------------------------------------------- reducer side (incoming RPC)
    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext):
        sender = context.remote_id
        if self.reducer is None or sender not in self.sender_peer_ids:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        sender_index = self.sender_peer_ids.index(sender)
        self.senders_started.add(sender)
        try:
            payload, weight = await self._receive_payload(
                stream, averaging_pb2.PART_FOR_AVERAGING, self.sender_timeout
            )
            part = decode_sparse(payload, expected_numel=self.reducer.span_length)
            self.reducer.add(sender_index, weight, part)  # raises on invalid weight / late / duplicate
            encoded_average = await asyncio.shield(self.reducer.result)
            if sender_index in self.reducer.rejected:
                raise RejectedPart(self.reducer.rejected[sender_index])
        except Exception as e:
            # a bad part or a late sender: drop this sender from the span's average, tell it so
            logger.warning(f"dropping sender {sender} from sparse all-reduce: {e!r}")
            self.averager.stats.record_rejection(sender)
            silent = isinstance(e, (asyncio.TimeoutError, StopAsyncIteration))
            self.reducer.ban(sender_index, None if silent else repr(e)[:100])
            self.answers_pending.discard(sender)
            if not self.answers_pending:
                self.all_answered.set()
            yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
            return
        try:
            for message in self._payload_messages(encoded_average, averaging_pb2.AVERAGED_PART):
                self.bytes_sent += message.ByteSize()
                yield message
        finally:
            # the generator resumes after the stream took the last message: the answer is on its way
            self.answers_pending.discard(sender)
            if not self.answers_pending:
                self.all_answered.set()

    async def _receive_payload(self, stream, expected_code, timeout: Optional[float]) -> tuple:
        """Read a chunked payload and the stream to its very end.

        Stopping as soon as the announced bytes are in would close our side while the peer may still be
        writing its end-of-stream marker; under load that surfaced as BrokenPipeError on the peer and a
        failed round, so both sides always consume the other's stream completely (as hivemind does).
        """
        first = await asyncio.wait_for(anext(stream), timeout)
        self.bytes_received += first.ByteSize()
        if first.code != expected_code or first.group_id != self.group_id or len(first.tensor_part.size) != 1:
            raise AllreduceException(f"unexpected message {averaging_pb2.MessageCode.Name(first.code)} or group")
        expected_length = first.tensor_part.size[0]
        chunks, received = [first.tensor_part.buffer], len(first.tensor_part.buffer)
        async for message in aiter_with_timeout(stream, timeout):
            self.bytes_received += message.ByteSize()
            chunks.append(message.tensor_part.buffer)
            received += len(message.tensor_part.buffer)
            if received > expected_length:
                break
        if received != expected_length:
            raise WireFormatError(f"payload has {received} bytes, announced {expected_length}")
        return b"".join(chunks), first.weight

    def _payload_messages(self, payload: bytes, code) -> List[averaging_pb2.AveragingData]:
        messages = []
        for offset in range(0, max(1, len(payload)), CHUNK_BYTES):
            tensor = runtime_pb2.Tensor(buffer=payload[offset : offset + CHUNK_BYTES])
            if offset == 0:
                tensor.size.append(len(payload))
            messages.append(averaging_pb2.AveragingData(code=code, group_id=self.group_id, weight=self.weight,
                                                        tensor_part=tensor))
        return messages

    async def _ban_silent_senders(self):
        """Like hivemind: senders that did not even start within sender_timeout are dropped.

        The clock starts once this peer has finished its own selection and encoding: senders can only
        connect after theirs, and a fixed clock from the start of the round would ban every peer whose
        gradient is merely large. The grace is SILENT_SENDER_GRACE x sender_timeout: with hivemind.Optimizer
        sender_timeout defaults to matchmaking_time (~2 s), and a loaded 2-core machine made honest peers
        miss a 1x grace; a dropped honest peer retries in another group and its parameters diverge."""
        if self.sender_timeout is None or self.reducer is None:
            return
        await self.own_part_ready.wait()
        await asyncio.sleep(self.silent_sender_grace)
        for index, peer_id in enumerate(self.sender_peer_ids):
            if peer_id not in self.senders_started:
                self.reducer.ban(index)
                self.answers_pending.discard(peer_id)
        if not self.answers_pending:
            self.all_answered.set()

    async def _wait_answers_delivered(self):
        try:
            await asyncio.wait_for(self.all_answered.wait(), self.reducer_timeout or 5.0)
        except asyncio.TimeoutError:
            logger.debug("some senders did not collect their averaged span in time")

    # ---------------------------------------------------------------- sender side
    async def _exchange_with_reducer(self, reducer_peer: PeerID, payload: bytes) -> bytes:
        messages = self._payload_messages(payload, averaging_pb2.PART_FOR_AVERAGING)

        async def outgoing():
            for message in messages:
                self.bytes_sent += message.ByteSize()
                yield message

        stub = type(self.averager).get_stub(averager_p2p(self.averager), reducer_peer, namespace=self.averager.prefix)
        stream = await stub.rpc_aggregate_part(outgoing())
        try:
            payload, _ = await self._receive_payload(stream, averaging_pb2.AVERAGED_PART, self.answer_timeout)
        except AllreduceException as e:
            raise AllreduceException(f"reducer {reducer_peer} refused our part or failed: {e}") from e
        return payload

    async def run(self, flat_gradient: torch.Tensor, residual: torch.Tensor):
        """Returns (applied, new_residual, sent_nonzeros, selection_seconds) or None for auxiliary peers.

        With a round check, the result is returned only once the group's check passed (raises otherwise);
        the check runs even when our own part of the round failed: the others need our seed and measures."""
        outcome, error = None, None
        try:
            outcome = await self._reduce(flat_gradient, residual)
        except Exception as failure:
            error = failure
        if self.check is not None:
            self._record_reduction()
            try:
                await self.averager.finish_check(self.check, round_failed=error is not None)
            finally:
                self.bytes_sent += self.check.bytes_sent
                self.bytes_received += self.check.bytes_received
        if error is not None:
            raise error
        return outcome

    def _record_reduction(self) -> None:
        """Tell the check what we did as a reducer (in group indices)."""
        reduction = self.reducer.reduction if self.reducer is not None else None
        if reduction is None:
            return
        start = self.spans[self.my_index][0]
        member = [self.peer_ids.index(peer) for peer in self.sender_peer_ids]
        parts = {}
        for index, (_, part) in self.reducer.parts.items():
            if index in reduction.norms or index not in reduction.rejected:
                norm = reduction.norms.get(index, float(part.values.double().norm()))
                parts[member[index]] = (start + part.indices, part.values, norm)
        statuses = {member[index]: status for index, status in self.reducer.statuses().items()}
        coefficients = None
        if self.averager.robust_policy.aggregation == "centered_clip" and len(reduction.coefficients) > 1:
            coefficients = {member[index]: alpha for index, alpha in reduction.coefficients.items()}
        self.check.record_reduced((self.my_index, 0), start + reduction.kept_indices, parts, statuses, coefficients)

    async def _reduce(self, flat_gradient: torch.Tensor, residual: torch.Tensor):
        silent_sender_task = asyncio.create_task(self._ban_silent_senders())
        try:
            if not self.is_sender:
                self.own_part_ready.set()
                if self.reducer is not None:
                    await self.reducer.result
                    await self._wait_answers_delivered()
                return None
            loop = asyncio.get_event_loop()
            corrected = flat_gradient + residual
            started = time.perf_counter()
            selected = await loop.run_in_executor(None, self.averager.selector, corrected, self.density)
            selection_seconds = time.perf_counter() - started
            selected = torch.sort(selected).values

            payloads = sender_payloads(corrected, selected, self.spans, self.reducer_indices, self.averager.value_format)
            self.own_part_ready.set()
            if self.check is not None:
                self.check.part_valid = lambda: bool(torch.isfinite(corrected).all())
                for reducer_index in self.reducer_indices:
                    start, end = self.spans[reducer_index]
                    mine = decode_sparse(payloads[reducer_index], end - start)
                    self.check.record_sent((reducer_index, 0), start + mine.indices, mine.values)

            async def exchange(reducer_index: int) -> bytes:
                if reducer_index == self.my_index:
                    part = decode_sparse(payloads[reducer_index], self.reducer.span_length)
                    own_index = self.sender_peer_ids.index(self.peer_id)
                    self.reducer.add(own_index, self.weight, part)
                    encoded = await asyncio.shield(self.reducer.result)
                    if own_index in self.reducer.rejected:
                        raise RejectedPart(f"our own part: {self.reducer.rejected[own_index]}")
                else:
                    encoded = await self._exchange_with_reducer(self.peer_ids[reducer_index], payloads[reducer_index])
                if self.check is not None:  # as soon as it is in: a failure elsewhere must not lose it
                    start, end = self.spans[reducer_index]
                    answer = decode_sparse(encoded, end - start)
                    self.check.record_received((reducer_index, 0), start + answer.indices, answer.values,
                                               quantization_bound(answer.values, self.averager.average_format))
                return encoded

            # every exchange settles before we go on: the round's check needs each answer we got
            answers = await asyncio.gather(*(exchange(r) for r in self.reducer_indices), return_exceptions=True)
            failures = [answer for answer in answers if isinstance(answer, BaseException)]
            if failures:
                raise failures[0]
            averaged_payloads = list(answers)

            own_weight = min(self.weight, self.averager.max_sample_weight)
            applied, new_residual, sent_nonzeros = apply_averages(
                corrected, self.spans, self.reducer_indices, payloads, averaged_payloads, contributed=own_weight > 0)
            if self.reducer is not None:
                absorb_requantization(new_residual, self.reducer.requantization_error, self.spans[self.my_index][0],
                                      self.reducer.total_weight, own_weight)
            await self._wait_answers_delivered()
            return applied, new_residual, sent_nonzeros, selection_seconds
        except Exception:
            # our own round failed, but the others may still be waiting for our span: keep serving it
            # (bounded by reducer_timeout) instead of vanishing and making their round time out too
            if self.reducer is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self.reducer.result), self.answer_timeout or 5.0)
                except BaseException:
                    pass
                await self._wait_answers_delivered()
            raise
        finally:
            silent_sender_task.cancel()
