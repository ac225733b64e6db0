"""Gradient averagers for hivemind.Optimizer: a sparse one (GaussianK / top-k / random-k with error
feedback over the sparse all-reduce of ``sparse_round``) and byte-counting wrappers of hivemind's
dense ones, whose reducers check every part they receive (``robust``). Every round of either is
cross-checked by its group before anything is applied, and banned peers are kept out of the groups
(``crosscheck``, ``verify``).
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Dict, Optional

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import Float16Compression, NoCompression, deserialize_torch_tensor
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.p2p import PeerID
from hivemind.utils import get_logger
from hivemind.utils.asyncio import enter_asynchronously

from swarmtrain import hivemind_compat
from swarmtrain.compression.crosscheck import CheckedAveragerMixin
from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.robust import RobustPolicy, aggregate
from swarmtrain.compression.selection import selector_for
from swarmtrain.compression.sparse_reduce import share_of
from swarmtrain.compression.sparse_round import RejectedPart, SparseAllReduceRound
from swarmtrain.compression.spec import CompressionSpec
from swarmtrain.compression.stats import CompressionStats
from swarmtrain.compression.verify import ABSENT, COUNTED, DENSE_PROJECTIONS, INVALID
from swarmtrain.compression.wire import SPARSE_WIRE_VERSION, decode_sparse, encode_sparse

logger = get_logger(__name__)

DEFAULT_MAX_SAMPLE_WEIGHT = 2.0**20  # a self-reported weight above this is clamped


class SparseAllReduceAverager(hivemind_compat.CleanShutdownMixin, GradientAverager):
    """hivemind GradientAverager whose all-reduce is the sparse, error-feedback round of sparse_round.py
    (use :class:`SparseGradientAverager`, which also cross-checks its rounds).

    :param parameters, dht, kwargs: hivemind GradientAverager's
    :param prefix: the matchmaking prefix; the sparse wire version is appended, so that peers speaking
      another version never meet

    :param spec: a sparse CompressionSpec (topk / randomk / gaussiank, optional chunk, +8bit or +2bit values)
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
        self.selector = selector_for(spec)
        self.value_format, self.average_format = spec.value_format, spec.average_format
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
        super().__init__(parameters, dht=dht, prefix=f"{prefix}_sparsewire{SPARSE_WIRE_VERSION}", **kwargs)

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
            reduce_share = share_of(peer_fractions, group_info.peer_ids.index(self.peer_id))
            weight = kwargs.get("weight")
            weight = 1.0 if weight is None else float(weight)
            round_ = SparseAllReduceRound(
                averager=self, group_info=group_info, peer_fractions=peer_fractions, modes=modes, weight=weight,
                density=self.current_density(), sender_timeout=kwargs.get("sender_timeout"),
                reducer_timeout=kwargs.get("reducer_timeout"), round_check=kwargs.get("round_check"),
            )
            hivemind_compat.running_group_future(self, group_info.group_id).set_result(round_)

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


class SparseGradientAverager(CheckedAveragerMixin, SparseAllReduceAverager):
    """The sparse averager (:class:`SparseAllReduceAverager`) whose rounds the group cross-checks before
    anything is applied, and which keeps banned peers out of its groups (crosscheck.py).

    :param args, kwargs: SparseAllReduceAverager's, and the round check's (``ban_list``, ``check_timeout``)
    """


class RobustTensorPartReducer(TensorPartReducer):
    """hivemind's part reducer, but a part is averaged only once every sender's copy of it is in, through
    :func:`robust.aggregate`: non-finite and outsized parts are rejected (their sender is banned from
    the rest of the round, as hivemind bans a silent one) instead of poisoning everyone's average.

    :param part_shapes: the shapes of the parts, as hivemind's reducer takes them
    :param num_senders: senders in the group
    :param policy: checks and aggregation rule (robust.py)
    :param max_weight: a self-reported weight above this is clamped
    :param on_rejected: called with (sender index, reason) for each rejected sender
    :param local_sender_index: this peer's own index among the senders (its rejected part is left out
      without failing its round; its part is the outlier rule's reference in small groups), or None
    :param on_reduced: called with (part index, {sender index: (part, weight received)}, Aggregate) once
      a part is reduced (the round check records it)
    """

    def __init__(self, part_shapes, num_senders: int, policy: RobustPolicy, max_weight: float,
                 on_rejected=lambda sender_index, reason: None, local_sender_index: Optional[int] = None,
                 on_reduced=None):
        self.policy, self.max_weight, self.on_rejected = policy, max_weight, on_rejected
        self.on_reduced = on_reduced
        # this peer's own part, when rejected, is simply left out: failing here would also stop this
        # peer from serving its span to the others, and with dense averaging nothing is owed to it
        self.local_sender_index = local_sender_index
        self.pending: Dict[int, tuple] = {}  # sender index -> (part, clamped weight, weight received)
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
            clamped = weight if not math.isfinite(weight) else min(weight, self.max_weight)
            self.pending[sender_index] = (tensor_part, clamped, float(weight))
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
        result = aggregate(parts, [self.pending[index][1] for index in senders], self.policy) \
            if parts else None
        if self.on_reduced is not None and result is not None:
            self.on_reduced(self.current_part_index, {index: (self.pending[index][0], self.pending[index][2])
                                                      for index in senders}, senders, result)
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
    with the robust part reducer in place of hivemind's trusting one, and recording for the round check
    (when given one) the parts it sends, the answers it gets and the parts it reduces."""

    def __init__(self, *args, robust_policy: RobustPolicy = RobustPolicy(), stats: Optional[CompressionStats] = None,
                 max_sample_weight: float = DEFAULT_MAX_SAMPLE_WEIGHT, round_check=None, **kwargs):
        super().__init__(*args, **kwargs)
        shapes = self.tensor_part_reducer.part_shapes
        self.tensor_part_reducer.finished.set()  # retire hivemind's unused reducer without its "0% received" warning

        def on_rejected(sender_index: int, reason: str):
            sender = self.sender_peer_ids[sender_index]
            logger.warning(f"dropping sender {sender} from the all-reduce: {reason}")
            if stats is not None:
                stats.record_rejection(sender)

        local_index = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        self.check = round_check
        self.tensor_part_reducer = RobustTensorPartReducer(
            shapes, len(self.sender_peer_ids), robust_policy, max_sample_weight, on_rejected, local_index,
            on_reduced=self._record_reduction if round_check is not None else None)
        self.bytes_sent = self.bytes_received = 0
        # set once the round's stats are recorded: later messages (answers to slower groupmates) are
        # then reported straight to the stats instead of being lost
        self.late_stats: Optional[CompressionStats] = None
        if round_check is not None:
            self._prepare_check(round_check)

    def _prepare_check(self, check) -> None:
        """Units are hivemind's parts (contiguous, reducer after reducer); record what we send."""
        codec, my_index = self.tensor_part_container.compression, self.ordered_peer_ids.index(self.peer_id)
        is_sender = self.peer_id in self.sender_peer_ids
        check.weight = float(self.weight) if is_sender else None
        check.projections = DENSE_PROJECTIONS
        self._sent_parts: Dict[tuple, torch.Tensor] = {}
        offset = 0
        for reducer, parts in enumerate(hivemind_compat.input_parts(self.tensor_part_container)):
            for part_index, (part, info) in enumerate(parts):
                unit = (reducer, part_index)
                check.add_dense_unit(unit, offset, offset + part.numel())
                offset += part.numel()
                if not is_sender:
                    continue
                decoded = part  # our own span is reduced from the raw part; the others decode the codec's
                if reducer != my_index and not isinstance(codec, NoCompression):
                    decoded = deserialize_torch_tensor(codec.compress(part, info))
                decoded = decoded.reshape(-1).float()
                check.record_sent(unit, None, decoded)
                self._sent_parts[unit] = decoded
        if is_sender:
            sent = self._sent_parts
            check.part_valid = lambda: all(bool(torch.isfinite(part).all()) for part in sent.values())
            container, record = self.tensor_part_container, self._record_answer
            register = container.register_processed_part

            def register_and_record(peer_index: int, part_index: int, part: torch.Tensor):
                record(peer_index, part_index, part)
                return register(peer_index, part_index, part)

            container.register_processed_part = register_and_record

    def _record_answer(self, peer_index: int, part_index: int, delta: torch.Tensor) -> None:
        """In the event loop: keep a reference only (the check measures in an executor thread)."""
        if (peer_index, part_index) not in self._sent_parts:
            return
        codec, own = self.tensor_part_container.compression, peer_index == self.ordered_peer_ids.index(self.peer_id)
        value_format = "fp32" if own or isinstance(codec, NoCompression) else (
            "fp16" if isinstance(codec, Float16Compression) else "unknown")
        self.check.record_dense_answer((peer_index, part_index), delta, value_format)

    def _record_reduction(self, part_index: int, pending: dict, senders: list, result) -> None:
        member = [self.ordered_peer_ids.index(peer) for peer in self.sender_peer_ids]
        statuses, parts = {}, {}
        for position, index in enumerate(senders):
            tensor, weight = pending[index]
            if position in result.norms or (weight == 0 and position not in result.rejected):
                statuses[member[index]] = (COUNTED, weight)
                # a zero-weight part was not judged: its norm is measured with the others, off the event loop
                parts[member[index]] = (None, tensor.reshape(-1).float(), result.norms.get(position, -1.0))
            else:
                statuses[member[index]] = (f"{INVALID}: {result.rejected.get(position, '')}", weight)
        for index in range(len(self.sender_peer_ids)):
            statuses.setdefault(member[index], (ABSENT, 0.0))
        coefficients = None
        if self.tensor_part_reducer.policy.aggregation == "centered_clip" and len(result.coefficients) > 1:
            coefficients = {member[senders[position]]: alpha for position, alpha in result.coefficients.items()}
        my_index = self.ordered_peer_ids.index(self.peer_id)
        self.check.record_reduced((my_index, part_index), None, parts, statuses, coefficients)

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


class ByteCountingMixin(CheckedAveragerMixin, hivemind_compat.CleanShutdownMixin):
    """Gives a hivemind averager (GradientAverager, PowerSGDGradientAverager, ...) a ``stats`` object with
    the bytes its all-reduce rounds put on the wire, reducers that check every part they receive, and
    the group's cross-check of every round before its result is applied (crosscheck.py).
    Mix in before the hivemind class.

    :param stats: a CompressionStats to write to (one is created otherwise)
    :param robust_policy: checks and aggregation rule for the parts this peer reduces (robust.py)
    :param max_sample_weight: a self-reported weight above this is clamped
    :param args, kwargs: the hivemind averager's own, and the round check's (``ban_list``, ``check_timeout``)
    """

    def __init__(self, *args, stats: Optional[CompressionStats] = None, robust_policy: RobustPolicy = RobustPolicy(),
                 max_sample_weight: float = DEFAULT_MAX_SAMPLE_WEIGHT, **kwargs):
        self.stats = stats if stats is not None else CompressionStats()
        self.robust_policy, self.max_sample_weight = robust_policy, float(max_sample_weight)
        self._round_runners = []  # lives in the averager process only: the runners of the current round
        self._reduce_share = None  # (averager process too) this peer's share of the current round's reduction
        super().__init__(*args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info: GroupInfo, group_id: Optional[bytes] = None,
                                      **kwargs):
        # hivemind's DecentralizedAverager._run_allreduce_inplace_, with a counting runner, and the
        # result applied only once the round's check passed
        group_id = group_info.group_id if group_id is None else group_id
        check = kwargs.pop("round_check", None)
        runner = _ByteCountingAllReduceRunner(
            p2p=hivemind_compat.averager_p2p(self), servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, robust_policy=self.robust_policy, stats=self.stats,
            max_sample_weight=self.max_sample_weight, round_check=check, **kwargs,
        )
        hivemind_compat.running_group_future(self, group_id).set_result(runner)
        self._round_runners.append(runner)
        my_index = group_info.peer_ids.index(self.peer_id)
        if kwargs.get("peer_fractions") is not None:
            self._reduce_share = share_of(kwargs["peer_fractions"], my_index)
        updates, error = [], None
        try:
            updates = await self._collect_updates(runner, runner.modes[my_index] == AveragingMode.AUX)
        except Exception as failure:
            error = failure
        if check is not None:
            try:
                await self.finish_check(check, round_failed=error is not None)
            finally:
                runner.bytes_sent += check.bytes_sent
                runner.bytes_received += check.bytes_received
        if error is not None:
            raise error
        for tensor, update in zip(tensors, updates):
            tensor.add_(update, alpha=hivemind_compat.averaging_alpha(self))

    @staticmethod
    async def _collect_updates(runner, auxiliary: bool) -> list:
        if auxiliary:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
            return []
        updates = []
        async for update in runner:
            if not bool(torch.isfinite(update).all()):
                # a reducer that answers with garbage: this round must not touch our gradients
                raise AllreduceException("a reducer sent back a non-finite average")
            updates.append(update)
        if runner.tensor_part_container.failed_size:
            # hivemind would keep our own values for a failed reducer's span and call the round a
            # success: peers would then apply different gradients there and drift apart
            raise AllreduceException(f"a reducer failed: {runner.tensor_part_container.failed_size} "
                                     f"entries were not averaged")
        return updates

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
    """hivemind's PowerSGD averager with byte stats (used as a baseline in the benchmark). Its rounds
    are not cross-checked: PowerSGD applies each of its two all-reduces before the next one starts."""

    round_checks = False
