"""Gradient averagers for hivemind.Optimizer: a sparse one (GaussianK / top-k / random-k with error
feedback over the sparse all-reduce of ``sparse_round``) and byte-counting wrappers of hivemind's
dense ones, whose reducers check every part they receive (``robust``).
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
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.p2p import PeerID
from hivemind.utils import get_logger
from hivemind.utils.asyncio import enter_asynchronously

from swarmtrain import hivemind_compat
from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.robust import RobustPolicy, aggregate
from swarmtrain.compression.selection import selector_for
from swarmtrain.compression.sparse_reduce import share_of
from swarmtrain.compression.sparse_round import RejectedPart, SparseAllReduceRound
from swarmtrain.compression.spec import CompressionSpec
from swarmtrain.compression.stats import CompressionStats
from swarmtrain.compression.wire import SPARSE_WIRE_VERSION, decode_sparse, encode_sparse

logger = get_logger(__name__)

DEFAULT_MAX_SAMPLE_WEIGHT = 2.0**20  # a self-reported weight above this is clamped


class SparseGradientAverager(hivemind_compat.CleanShutdownMixin, GradientAverager):
    """hivemind GradientAverager whose all-reduce is the sparse, error-feedback round of sparse_round.py.

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
                reducer_timeout=kwargs.get("reducer_timeout"),
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
      without failing its round), or None
    """

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


class ByteCountingMixin(hivemind_compat.CleanShutdownMixin):
    """Gives a hivemind averager (GradientAverager, PowerSGDGradientAverager, ...) a ``stats`` object with
    the bytes its all-reduce rounds put on the wire, and reducers that check every part they receive.
    Mix in before the hivemind class.

    :param stats: a CompressionStats to write to (one is created otherwise)
    :param robust_policy: checks and aggregation rule for the parts this peer reduces (robust.py)
    :param max_sample_weight: a self-reported weight above this is clamped
    :param args, kwargs: the hivemind averager's own
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
        # same steps as hivemind's DecentralizedAverager._run_allreduce_inplace_, with a counting runner
        group_id = group_info.group_id if group_id is None else group_id
        runner = _ByteCountingAllReduceRunner(
            p2p=hivemind_compat.averager_p2p(self), servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, robust_policy=self.robust_policy, stats=self.stats,
            max_sample_weight=self.max_sample_weight, **kwargs,
        )
        hivemind_compat.running_group_future(self, group_id).set_result(runner)
        self._round_runners.append(runner)
        my_index = group_info.peer_ids.index(self.peer_id)
        if kwargs.get("peer_fractions") is not None:
            self._reduce_share = share_of(kwargs["peer_fractions"], my_index)
        if runner.modes[my_index] != AveragingMode.AUX:
            index = 0
            async for update in runner:
                if not bool(torch.isfinite(update).all()):
                    # a reducer that answers with garbage: this round must not touch our gradients
                    raise AllreduceException("a reducer sent back a non-finite average")
                tensors[index].add_(update, alpha=hivemind_compat.averaging_alpha(self))
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
