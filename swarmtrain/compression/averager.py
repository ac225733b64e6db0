"""Gradient averagers for hivemind.Optimizer: a sparse one (GaussianK / top-k / random-k with error
feedback over a sparse butterfly all-reduce) and byte-counting wrappers of hivemind's dense ones.

Sparse round, for a group of n peers (senders = non-auxiliary peers, reducers = peers with a non-zero
share from ``load_balance_peers``; the flat gradient index space is cut into one contiguous span per
reducer, as hivemind's butterfly all-reduce does)::

    sender i:   g_i = accumulated gradient + residual_i
                S_i = select(g_i, rho)                       (O(d), GaussianK by default)
                for each reducer r: send encode(S_i ∩ span_r, g_i[...])  -> r      (O(k) bytes in total)
    reducer r:  avg_r = Σ_i w_i · part_i / Σ_i w_i           (w_i self-reported, validated, clamped)
                keep the ~rho·|span_r| largest entries of avg_r (exact top-k over the <= n·k support)
                B_r = encode(kept entries)  -> sent back to every sender, and decoded by r itself too
    sender i:   applied = ⊕_r decode(B_r)      (bit-identical on every peer: same bytes, same decoder)
                residual_i = g_i − (own sent values at the kept positions)

so every contributor gets back, in its residual, whatever of its own contribution did not make it into
the applied average, and Σ_i w_i·g_i = (Σ_i w_i)·applied + Σ_i w_i·residual_i (with equal weights:
n·applied + Σ residuals = Σ raw gradients). The reducer's re-encoding of the average (fp16 / 8-bit
rounding) is absorbed into the reducer's own residual so the identity stays exact up to float32
arithmetic. Nothing is written (neither averaged gradients nor residuals) unless the whole round
succeeds for this peer; a failed round leaves hivemind.Optimizer's local gradients and the residuals as
they were. Senders that stay silent past ``sender_timeout`` or send malformed / non-finite parts or
invalid weights are dropped by the reducer (the round completes for the others, all of whom still
decode identical bytes); a reducer that fails makes the round fail for its senders, exactly like a
failed round in hivemind.

Wire: one stream per (sender, reducer) pair through the averager's ``rpc_aggregate_part`` route; the
payload is chunked into AveragingData messages whose first one carries the payload length. Payloads are
encoded by ``wire.py`` (versioned: peers of another wire version are refused, and the matchmaking prefix
carries the wire version so such peers do not even meet).
"""
from __future__ import annotations

import asyncio
import math
import time
from functools import partial
from typing import AsyncIterator, Dict, List, Optional, Sequence, Set

import torch

from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import Float16Compression, NoCompression
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_logger
from hivemind.utils.asyncio import aiter_with_timeout, anext, enter_asynchronously

from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.robust import RobustPolicy, aggregate
from swarmtrain.compression.selection import SELECTORS, target_count
from swarmtrain.compression.spec import CompressionSpec, parse_compression_spec
from swarmtrain.compression.stats import CompressionStats
from swarmtrain.compression.wire import WIRE_VERSION, SparsePart, WireFormatError, decode_sparse, encode_sparse

logger = get_logger(__name__)

CHUNK_BYTES = 2**19  # same order as hivemind's part_size_bytes: keeps single p2p messages small
DEFAULT_MAX_SAMPLE_WEIGHT = 2.0**20  # a self-reported weight above this is clamped
SILENT_SENDER_GRACE = 3.0  # a reducer drops senders silent for this many sender_timeouts (see below)


class RejectedPart(AllreduceException):
    """The reducer left a sender's part out of the average (non-finite, outsized...)."""


def _share_of(peer_fractions: Sequence[float], index: int) -> float:
    total = float(sum(peer_fractions))
    return float(peer_fractions[index]) / total if total > 0 else 0.0


def _spans(total: int, peer_fractions: Sequence[float]) -> List[tuple]:
    """Contiguous [start, end) of the flat index space per peer, proportional to its fraction."""
    total_fraction = float(sum(peer_fractions))
    bounds, acc = [0], 0.0
    for fraction in peer_fractions:
        acc += fraction
        bounds.append(int(round(acc / total_fraction * total)) if total_fraction > 0 else 0)
    bounds[-1] = total
    return [(bounds[i], bounds[i + 1]) for i in range(len(peer_fractions))]


class _SpanReducer:
    """Collects the sparse parts of one span from all senders, then produces the encoded average once."""

    def __init__(self, span_length: int, num_senders: int, density: float, value_format: str, max_weight: float,
                 policy: RobustPolicy = RobustPolicy()):
        self.span_length, self.num_senders = span_length, num_senders
        self.density, self.value_format, self.max_weight = density, value_format, max_weight
        self.policy = policy
        self.parts: Dict[int, tuple] = {}  # sender index -> (weight, SparsePart)
        self.banned: Set[int] = set()
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
        self._maybe_finish()

    def ban(self, sender_index: int):
        if sender_index not in self.parts and not self.result.done():
            self.banned.add(sender_index)
            self._maybe_finish()

    def _maybe_finish(self):
        if not self.result.done() and len(self.parts) + len(self.banned) >= self.num_senders:
            try:
                self.result.set_result(self._reduce())
            except Exception as e:
                self.result.set_exception(e)

    def _reduce(self) -> bytes:
        """Weighted average over the union of the received supports, re-sparsified, encoded.

        Works on the <= n·k support only (never allocates the dense span), so the reducer's cost is
        O(n·k·log(n·k)) and it stays cheap even when the span is large.
        """
        senders = [index for index, (weight, _) in self.parts.items() if weight > 0]
        if not senders:
            return encode_sparse(torch.zeros(0, dtype=torch.long), torch.zeros(0), self.span_length, self.value_format)
        support = torch.unique(torch.cat([self.parts[index][1].indices for index in senders]))  # sorted
        # each part as a vector over the union support: the checks and robust rules see exactly the
        # mass each sender contributed, and nothing dense is allocated
        vectors = []
        for index in senders:
            part = self.parts[index][1]
            vector = torch.zeros(len(support), dtype=torch.float32)
            vector[torch.searchsorted(support, part.indices)] = part.values
            vectors.append(vector)
        result = aggregate(vectors, [self.parts[index][0] for index in senders], self.policy)
        self.rejected = {senders[position]: reason for position, reason in result.rejected.items()}
        self.total_weight = result.total_weight
        if result.total_weight <= 0:
            return encode_sparse(torch.zeros(0, dtype=torch.long), torch.zeros(0), self.span_length, self.value_format)
        average = result.average
        keep = min(len(support), target_count(self.span_length, self.density))
        # exact top-k is affordable here: it runs over the <= n·k support, not over the span
        chosen = torch.sort(torch.topk(average.abs(), keep, sorted=False).indices).values
        kept, exact_values = support[chosen], average[chosen]
        encoded = encode_sparse(kept, exact_values, self.span_length, self.value_format)
        applied = decode_sparse(encoded, self.span_length)
        self.requantization_error = SparsePart(self.span_length, kept, applied.values - exact_values)
        return encoded


class SparseAllReduceRound:
    """One sparse all-reduce round in one group; also the servicer for that group's incoming parts."""

    def __init__(self, *, averager: "SparseGradientAverager", group_info: GroupInfo, peer_fractions, modes,
                 weight: float, density: float, sender_timeout: Optional[float], reducer_timeout: Optional[float]):
        self.averager = averager
        self.group_id, self.peer_ids = group_info.group_id, tuple(group_info.peer_ids)
        self.peer_id = averager.peer_id
        self.my_index = self.peer_ids.index(self.peer_id)
        self.modes = modes
        self.spans = _spans(averager.total_numel, peer_fractions)
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
        start, end = self.spans[self.my_index]
        self.reducer = None
        if end > start:
            self.reducer = _SpanReducer(end - start, len(self.sender_peer_ids), density,
                                        averager.value_format, averager.max_sample_weight, averager.robust_policy)
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
            self.reducer.ban(sender_index)
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

        stub = type(self.averager).get_stub(self.averager._p2p, reducer_peer, namespace=self.averager.prefix)
        stream = await stub.rpc_aggregate_part(outgoing())
        try:
            payload, _ = await self._receive_payload(stream, averaging_pb2.AVERAGED_PART, self.answer_timeout)
        except AllreduceException as e:
            raise AllreduceException(f"reducer {reducer_peer} refused our part or failed: {e}") from e
        return payload

    async def run(self, flat_gradient: torch.Tensor, residual: torch.Tensor):
        """Returns (applied, new_residual, sent_nonzeros, selection_seconds) or None for auxiliary peers."""
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

            payloads, positions = {}, torch.searchsorted(selected, torch.tensor([s for s, _ in self.spans]))
            for reducer_index in self.reducer_indices:
                start, end = self.spans[reducer_index]
                lo = int(positions[reducer_index])
                hi = int(torch.searchsorted(selected, torch.tensor(end)))
                span_indices = selected[lo:hi]
                payloads[reducer_index] = encode_sparse(span_indices - start, corrected[span_indices], end - start,
                                                        self.averager.value_format)

            self.own_part_ready.set()

            async def exchange(reducer_index: int) -> bytes:
                if reducer_index == self.my_index:
                    part = decode_sparse(payloads[reducer_index], self.reducer.span_length)
                    own_index = self.sender_peer_ids.index(self.peer_id)
                    self.reducer.add(own_index, self.weight, part)
                    encoded = await asyncio.shield(self.reducer.result)
                    if own_index in self.reducer.rejected:
                        raise RejectedPart(f"our own part: {self.reducer.rejected[own_index]}")
                    return encoded
                return await self._exchange_with_reducer(self.peer_ids[reducer_index], payloads[reducer_index])

            averaged_payloads = await asyncio.gather(*(exchange(r) for r in self.reducer_indices))

            # everything below uses decoded bytes only, so every peer computes bit-identical results
            applied = torch.zeros_like(corrected)
            new_residual = corrected.clone()
            sent_nonzeros = 0
            # a zero-weight contribution is not part of any average: all of it stays in the residual
            contributed = min(self.weight, self.averager.max_sample_weight) > 0
            for reducer_index, averaged_payload in zip(self.reducer_indices, averaged_payloads):
                start, end = self.spans[reducer_index]
                average = decode_sparse(averaged_payload, end - start)
                applied[start + average.indices] = average.values
                mine = decode_sparse(payloads[reducer_index], end - start)  # what the reducer saw from us
                sent_nonzeros += len(mine.indices)
                if not contributed:
                    continue
                kept = torch.isin(mine.indices, average.indices)
                new_residual.index_add_(0, start + mine.indices[kept], mine.values[kept], alpha=-1.0)
            if self.reducer is not None and self.reducer.requantization_error is not None:
                # keep Σw·applied + Σ w_i·residual_i exact: the rounding of the broadcast average goes
                # into the reducer's own residual, scaled from "average" units to "one peer" units
                error = self.reducer.requantization_error
                if self.weight > 0 and len(error.indices):
                    start = self.spans[self.my_index][0]
                    scale = self.reducer.total_weight / min(self.weight, self.averager.max_sample_weight)
                    new_residual.index_add_(0, start + error.indices, error.values, alpha=-scale)
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


class SparseGradientAverager(GradientAverager):
    """hivemind GradientAverager whose all-reduce is the sparse, error-feedback round described above.

    :param spec: a sparse CompressionSpec (topk / randomk / gaussiank, optional +8bit values)
    :param density_schedule: overrides ``spec.density`` with a warm-up schedule, indexed by the number of
      averaging rounds this peer has completed (in hivemind.Optimizer's sync mode: one round per epoch);
      call :meth:`set_schedule_epoch` from the training process to index it by the global epoch instead.
    :param max_sample_weight: self-reported weights (samples accumulated) are clamped to this value.
    :param stats: a CompressionStats to write measurements to (one is created otherwise); see ``stats``.
    :param robust_policy: checks and aggregation rule for the parts this peer reduces (``robust.py``).
    """

    def __init__(self, parameters, *, dht, prefix: str, spec: CompressionSpec,
                 density_schedule: Optional[DensitySchedule] = None,
                 max_sample_weight: float = DEFAULT_MAX_SAMPLE_WEIGHT, stats: Optional[CompressionStats] = None,
                 robust_policy: RobustPolicy = RobustPolicy(), **kwargs):
        if not spec.is_sparse:
            raise ValueError(f"SparseGradientAverager needs a sparse spec, got {spec}")
        self.spec = spec
        self.density_schedule = density_schedule or DensitySchedule(spec.density)
        self.selector = SELECTORS[spec.method]
        self.value_format = "8bit" if spec.eight_bit_values else "fp16"
        if spec.eight_bit_values:
            # import and warm up before the averager process forks: a first import/call inside a round
            # takes seconds, long enough for the reducers to drop this peer as silent
            decode_sparse(encode_sparse(torch.arange(4), torch.ones(4), 4, "8bit"))
        self.max_sample_weight = float(max_sample_weight)
        self.robust_policy = robust_policy
        parameters = tuple(parameters)
        self.total_numel = sum(param.numel() for param in parameters)
        # created before super().__init__ forks the averager process, and shared, so that the child's
        # updates are seen by the training process (and survive between rounds)
        self.residual = torch.zeros(self.total_numel, dtype=torch.float32).share_memory_()
        self._schedule_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.stats = stats if stats is not None else CompressionStats()
        # the wire version in the matchmaking key: peers speaking another version never form a group
        super().__init__(parameters, dht=dht, prefix=f"{prefix}_sparsewire{WIRE_VERSION}", **kwargs)

    def set_schedule_epoch(self, epoch: int):
        self._schedule_epoch.fill_(int(epoch))

    def current_density(self) -> float:
        return self.density_schedule(int(self._schedule_epoch))

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        started = time.perf_counter()
        round_, reduce_share = None, None
        try:
            bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered))
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_gathered_bytes)))
            modes = tuple(map(AveragingMode, mode_ids))
            download_bandwidths = [bw if mode != AveragingMode.CLIENT else 0.0 for bw, mode in zip(bandwidths, modes)]
            peer_fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_numel, download_bandwidths, min_vector_size
            )
            reduce_share = _share_of(peer_fractions, group_info.peer_ids.index(self.peer_id))
            weight = kwargs.get("weight")
            weight = 1.0 if weight is None else float(weight)
            round_ = SparseAllReduceRound(
                averager=self, group_info=group_info, peer_fractions=peer_fractions, modes=modes, weight=weight,
                density=self.current_density(), sender_timeout=kwargs.get("sender_timeout"),
                reducer_timeout=kwargs.get("reducer_timeout"),
            )
            self._running_groups[group_info.group_id].set_result(round_)

            async with enter_asynchronously(self.get_tensors()) as averaged_grads:
                flat_gradient = torch.cat([grad.detach().reshape(-1).float().cpu() for grad in averaged_grads])
                result = await round_.run(flat_gradient, self.residual)
                if result is not None:
                    applied, new_residual, sent_nonzeros, selection_seconds = result
                    # commit point: only a fully successful round touches gradients and residuals
                    offset = 0
                    for grad in averaged_grads:
                        grad.copy_(applied[offset : offset + grad.numel()].view_as(grad))
                        offset += grad.numel()
                    self.residual.copy_(new_residual)
            self._schedule_epoch.add_(1)
            if result is not None:
                self.stats.record_round(
                    ok=True, bytes_sent=round_.bytes_sent, bytes_received=round_.bytes_received,
                    seconds=time.perf_counter() - started, group_size=len(group_info.peer_ids),
                    density=sent_nonzeros / max(1, self.total_numel),
                    applied_density=int(torch.count_nonzero(applied)) / max(1, self.total_numel),
                    selection_seconds=selection_seconds, reduce_share=reduce_share,
                )
            else:
                self.stats.record_round(ok=True, bytes_sent=round_.bytes_sent, bytes_received=round_.bytes_received,
                                        seconds=time.perf_counter() - started, group_size=len(group_info.peer_ids),
                                        reduce_share=reduce_share)
            return user_gathered
        except BaseException as e:
            self.stats.record_round(
                ok=False, bytes_sent=round_.bytes_sent if round_ else 0,
                bytes_received=round_.bytes_received if round_ else 0,
                seconds=time.perf_counter() - started, group_size=len(group_info.peer_ids), reduce_share=reduce_share,
            )
            if isinstance(e, Exception):
                logger.warning(f"sparse all-reduce failed: {e!r}")
            raise MatchmakingException(f"Unable to run sparse all-reduce: {e!r}")


class RobustTensorPartReducer(TensorPartReducer):
    """hivemind's part reducer, but a part is averaged only once every sender's copy of it is in, through
    :func:`robust.aggregate`: non-finite and outsized parts are rejected (their sender is banned from
    the rest of the round, as hivemind bans a silent one) instead of poisoning everyone's average."""

    def __init__(self, part_shapes, num_senders: int, policy: RobustPolicy, max_weight: float,
                 on_rejected=lambda sender_index, reason: None, local_sender_index: Optional[int] = None):
        self.policy, self.max_weight, self.on_rejected = policy, max_weight, on_rejected
        # this peer's own part, when rejected, is simply left out: failing here would also stop this
        # peer from serving its span to the others, and with dense averaging nothing is owed to it
        self.local_sender_index = local_sender_index
        self.pending: Dict[int, tuple] = {}  # sender index -> (part, weight) for the current part
        self.rejected: Dict[int, str] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self.pending = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            weight = weight if not math.isfinite(weight) else min(weight, self.max_weight)
            self.pending[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        average = await current_part_future
        if sender_index in self.rejected and sender_index != self.local_sender_index:
            raise RejectedPart(self.rejected[sender_index])
        return average

    def on_sender_failed(self, sender_index: int):
        if sender_index in self.rejected and sender_index != self.local_sender_index:
            return  # already out of the round since the part it was rejected for
        super().on_sender_failed(sender_index)

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        senders = sorted(self.pending)
        parts = [self.pending[index][0] for index in senders]
        shape = self.part_shapes[self.current_part_index]
        # a part of the wrong shape is rejected, not broadcast into the accumulator
        parts = [part if part.shape == shape else part.reshape(-1)[:0] for part in parts]
        result = aggregate(parts, [self.pending[index][1] for index in senders], self.policy) if parts else None
        for position, reason in (result.rejected.items() if result else ()):
            sender_index = senders[position]
            if sender_index not in self.rejected:
                self.rejected[sender_index] = reason
                if sender_index != self.local_sender_index:
                    # out of the rest of the round: later parts complete without waiting for it
                    self.sender_failed_after[sender_index] = self.current_part_index + 1
                self.on_rejected(sender_index, reason)
        if result is None or result.total_weight <= 0:
            average = torch.zeros(shape)
        else:
            average = result.average.reshape(shape)
        self.current_part_future.set_result(average)
        self.reset_accumulators()


class _ByteCountingAllReduceRunner(AllReduceRunner):
    """hivemind's own butterfly all-reduce, counting the serialized size of every message it exchanges,
    with the robust part reducer in place of hivemind's trusting one."""

    def __init__(self, *args, robust_policy: RobustPolicy = RobustPolicy(), stats: Optional[CompressionStats] = None,
                 max_sample_weight: float = DEFAULT_MAX_SAMPLE_WEIGHT, **kwargs):
        super().__init__(*args, **kwargs)
        shapes = self.tensor_part_reducer.part_shapes
        self.tensor_part_reducer.finished.set()  # retire hivemind's unused reducer without its "0% received" warning

        def on_rejected(sender_index: int, reason: str):
            sender = self.sender_peer_ids[sender_index]
            logger.warning(f"dropping sender {sender} from the all-reduce: {reason}")
            if stats is not None:
                stats.record_rejection(sender)

        local_index = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        self.tensor_part_reducer = RobustTensorPartReducer(shapes, len(self.sender_peer_ids), robust_policy,
                                                           max_sample_weight, on_rejected, local_index)
        self.bytes_sent = self.bytes_received = 0
        # set once the round's stats are recorded: later messages (answers to slower groupmates) are
        # then reported straight to the stats instead of being lost
        self.late_stats: Optional[CompressionStats] = None

    def _count(self, direction: str, size: int):
        setattr(self, direction, getattr(self, direction) + size)
        if self.late_stats is not None:
            self.late_stats.add_late_bytes(**{direction.replace("bytes_", ""): size})

    async def _counted(self, stream, direction: str):
        async for message in stream:
            self._count(direction, message.ByteSize())
            yield message

    def _get_peer_stub(self, peer: PeerID):
        runner, real_stub = self, super()._get_peer_stub(peer)

        class _CountingStub:
            async def rpc_aggregate_part(self, inputs):
                stream = await real_stub.rpc_aggregate_part(runner._counted(inputs, "bytes_sent"))
                return runner._counted(stream, "bytes_received")

        return _CountingStub()

    async def rpc_aggregate_part(self, stream, context):
        async for message in super().rpc_aggregate_part(self._counted(stream, "bytes_received"), context):
            self._count("bytes_sent", message.ByteSize())
            yield message


class ByteCountingMixin:
    """Gives a hivemind averager (GradientAverager, PowerSGDGradientAverager, ...) a ``stats`` object with
    the bytes its all-reduce rounds put on the wire. Mix in before the hivemind class."""

    def __init__(self, *args, stats: Optional[CompressionStats] = None, robust_policy: RobustPolicy = RobustPolicy(),
                 max_sample_weight: float = DEFAULT_MAX_SAMPLE_WEIGHT, **kwargs):
        self.stats = stats if stats is not None else CompressionStats()
        self.robust_policy, self.max_sample_weight = robust_policy, float(max_sample_weight)
        self._round_runners = []  # lives in the averager process only: the runners of the current round
        self._reduce_share = None  # (averager process too) this peer's share of the current round's reduction
        super().__init__(*args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id: Optional[bytes] = None,
                                      **kwargs):
        # same steps as hivemind's DecentralizedAverager._run_allreduce_inplace_, with a counting runner
        group_id = group_info.group_id if group_id is None else group_id
        runner = _ByteCountingAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, robust_policy=self.robust_policy, stats=self.stats,
            max_sample_weight=self.max_sample_weight, **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        self._round_runners.append(runner)
        my_index = group_info.peer_ids.index(self.peer_id)
        if kwargs.get("peer_fractions") is not None:
            self._reduce_share = _share_of(kwargs["peer_fractions"], my_index)
        if runner.modes[my_index] != AveragingMode.AUX:
            index = 0
            async for update in runner:
                if not bool(torch.isfinite(update).all()):
                    # a reducer that answers with garbage: this round must not touch our gradients
                    raise AllreduceException("a reducer sent back a non-finite average")
                tensors[index].add_(update, alpha=self._averaging_alpha)
                index += 1
            if runner.tensor_part_container.failed_size:
                # hivemind would keep our own values for a failed reducer's span and call the round a
                # success: peers would then apply different gradients there and drift apart
                raise AllreduceException(f"a reducer failed: {runner.tensor_part_container.failed_size} "
                                         f"entries were not averaged")
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        started, self._round_runners, self._reduce_share = time.perf_counter(), [], None
        ok = False
        try:
            result = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            ok = True
            return result
        finally:
            runners, self._round_runners = self._round_runners, []
            self.stats.record_round(
                ok=ok, bytes_sent=sum(r.bytes_sent for r in runners),
                bytes_received=sum(r.bytes_received for r in runners),
                seconds=time.perf_counter() - started, group_size=len(group_info.peer_ids),
                reduce_share=self._reduce_share,
            )
            for runner in runners:
                runner.late_stats = self.stats


class CountingGradientAverager(ByteCountingMixin, GradientAverager):
    """hivemind's dense GradientAverager (any hivemind codec via ``compression=``) with byte stats."""


class CountingPowerSGDGradientAverager(ByteCountingMixin, PowerSGDGradientAverager):
    """hivemind's PowerSGD averager with byte stats (used as a baseline in the benchmark)."""


def make_grad_averager_factory(spec, density_schedule: Optional[DensitySchedule] = None, access=None,
                               **averager_kwargs):
    """A ``grad_averager_factory`` for ``hivemind.Optimizer`` implementing a compression spec.

    ``spec`` is a CompressionSpec or its text form. Dense specs map to hivemind's GradientAverager with
    NoCompression / Float16Compression; sparse ones to :class:`SparseGradientAverager`. Extra keyword
    arguments (e.g. ``max_sample_weight``, ``stats``, or hivemind averager options such as
    ``request_timeout`` that hivemind.Optimizer does not forward) are passed to the averager. Either way
    the averager exposes ``.stats`` (:class:`CompressionStats`). On a token-gated run (``access``, by
    default this process's active ``swarmtrain.access.LocalAccess``) the averager refuses averaging RPCs
    from peers without a valid access token.
    """
    from swarmtrain.access import with_access_guard

    if isinstance(spec, str):
        spec = parse_compression_spec(spec)
    if spec.is_sparse:
        return partial(with_access_guard(SparseGradientAverager, access), spec=spec, density_schedule=density_schedule,
                       **averager_kwargs)
    if density_schedule is not None:
        raise ValueError("a density schedule only applies to sparse compression specs")
    codec = Float16Compression() if spec.method == "fp16" else NoCompression()
    averager_class = with_access_guard(CountingGradientAverager, access)

    def dense_factory(*args, **kwargs):
        kwargs["compression"] = codec  # Optimizer passes its grad_compression; the spec decides
        return averager_class(*args, **{**kwargs, **averager_kwargs})

    return dense_factory
