"""`averaging.mode: local`: every peer steps on its own; at averaging points the peers average the
model delta since the last point (a pseudo-gradient) and apply it with an outer step.

How a round goes (for every peer, at the epoch the schedule names -- epochs are hivemind's swarm-wide
counter of `target_batch_size` samples, so all peers reach them together)::

    Δ_i      = θ_i − anchor                      anchor: the last averaged model, the same on every peer
    Δ̄        = average of the Δ_i, weights = samples each trained on since the anchor, through the
               gradient path's compression (none / fp16 dense, or sparse GaussianK & co. with error
               feedback: what a peer's sparse selection leaves out stays in its residual for next time)
    m        = μ·m + Δ̄                            outer momentum buffer (only when outer_momentum μ > 0)
    anchor  += outer_lr · (Δ̄ + μ·m)              Nesterov; outer_lr 1, μ 0: plain averaging, anchor + Δ̄
    θ_i      = anchor
    r_i     *= β                                  sparse compression: the error-feedback residual decays
                                                  (averaging.feedback_decay; SparseLoCo's e ← βe + Δ, whose
                                                  decayed buffer stands in for the outer momentum)

What is averaged, and what is not:

* the model delta only. The inner optimizer's state (Adam/LAMB moments) stays local, as in DiLoCo:
  averaging it would triple the bytes of every round (two moment tensors per parameter, which do
  not sparsify), and moments only rescale each peer's own steps. The outer momentum buffer is
  never sent either: it is a function of the averaged deltas alone, identical on every peer.
  The error-feedback residual is by definition each peer's own.
* the schedule's state (next point, rounds spent, divergence level) travels in the round's gather
  (see schedule.py), so the group agrees on the next point without another message.

A peer joining (or re-synchronising) downloads the state from a peer: this module's state averager
serves the *last averaged model* (anchor) as the parameters, not the donor's half-trained local
model, together with the outer momentum and the schedule's state, so the newcomer starts from the
model everyone's next delta refers to. A coordinator downloading state for a checkpoint (a plain
hivemind TrainingStateAverager) thereby saves the averaged model as well and ignores the rest.

A member whose averaged model does not match its group's (its last round failed while the others
averaged, or its state download was one round stale) contributes with weight 0 -- its delta is from
another origin -- and re-synchronises by downloading the state (the trainer does it when
``optimizer.diverged``). Nothing waits forever: a pre-scheduled round whose group has not formed
shortly after its scheduled time is cancelled and the peer trains on, retrying at the next epoch;
the all-reduce itself is bounded by ``averaging_timeout``.

With ``averaging.overlap`` a round runs in the background, its matchmaking included: the peer hands its
delta to the averager and goes on with the next period's local steps; when the round lands (checked at every step, waited for at
the next round point, before a checkpoint or an evaluation, and at the end) the outer step moves the
anchor as above and the peer keeps what it learned meanwhile, θ_i = anchor + (θ_i − θ_i at the hand-over)
-- streaming DiLoCo's delayed outer step. One round is in flight at a time; the next round's record
(anchor fingerprint, schedule) is built only after the last one landed, so every member still gathers
the same anchor. The local steps taken meanwhile count towards the next round's delta and weight.
With a round in flight almost always, a donor's anchor is almost always about to be replaced: a peer
that downloaded it would miss that round's result and be out of step at its next one. So a donor asked
mid-round serves once its round has landed, the new anchor, labelled so that the downloader's next
round is the one the donor has just begun (LocalStateAverager.get_current_state).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import CompressionInfo, TensorRole
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state, load_optimizer_state
from hivemind.utils import get_dht_time

from swarmtrain import hivemind_compat
from swarmtrain.averaging.rounds import NO_OTHER_PEERS, LocalRoundRecord, describe_round_failure
from swarmtrain.averaging.schedule import (FINGERPRINT_SEED, FINGERPRINT_SIZE, ControllerSettings, ControllerState,
                                           MemberRecord, count_sketch, decide_after_round, first_round_epoch,
                                           in_step_with, parse_records, reference_member, state_after_failure)
from swarmtrain.averaging.sync import SwarmOptimizer
from swarmtrain.compression.stats import AveragingTraffic
from swarmtrain.training.fingerprint import fingerprint, fingerprint_positions

logger = logging.getLogger("swarmtrain.peer")
ANCHOR_TOLERANCE_LR = 0.5  # averaged models "match" when they agree within this many learning rates
# a round's matchmaking key carries its epoch modulo 2**ROUND_KEY_BITS (see schedule_round); the traffic
# meter of the benchmarks (benchmarks/traffic_meter.py) recognises keys of up to 5 group bits
ROUND_KEY_BITS = 4
# a download that found the swarm's state mid-round asks again this often, until the round has landed
MID_ROUND_RETRY_SECONDS = 0.25
LANDING_POLL_SECONDS = 0.05  # a donor waiting for a scheduled round re-checks this often whether it was dropped


# ------------------------------------------------------------------------------------------------
# the averager of model deltas (the gradient path's averagers, plus the in-step check)
# ------------------------------------------------------------------------------------------------


class InStepWeightMixin:
    """Runs in the averager's process, once the group and its gathered records are known: a member
    whose last averaged model differs from the group's reference sends its delta with weight 0.
    Mixed in front of the gradient path's averagers (compression.factory.make_averager_factory).

    :param anchor_tolerance: averaged models whose fingerprints agree within this hold the same model
    """

    def __init__(self, *args, anchor_tolerance: float, **kwargs):
        self.anchor_tolerance = float(anchor_tolerance)
        # 1.0 when the last round found us out of step: shared, so the training process learns it
        # even when the round then failed (an out-of-step delta can also be rejected as an outlier)
        self.out_of_step = torch.zeros(1).share_memory_()
        super().__init__(*args, **kwargs)

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        try:
            gathered = {}
            for peer_id, raw in zip(group_info.peer_ids, group_info.gathered):
                gathered[peer_id] = self.serializer.loads(self.serializer.loads(raw)[2])
            records = parse_records(gathered)
            reference = reference_member(records, self.anchor_tolerance)
            if self.peer_id not in records or self.peer_id not in in_step_with(records, reference,
                                                                                 self.anchor_tolerance):
                kwargs["weight"] = 0.0
                self.out_of_step.fill_(1.0)
        except Exception as error:  # malformed gathers: average as asked, the host process sorts it out
            logger.debug(f"could not check the group's averaged models: {error!r}")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)


# ------------------------------------------------------------------------------------------------
# the state averager: serves and loads the averaged model
# ------------------------------------------------------------------------------------------------


class LocalStateAverager(hivemind_compat.CleanShutdownMixin, TrainingStateAverager):
    """hivemind's TrainingStateAverager whose state (for joiners and checkpoints) is the last averaged
    model, the optimizer state, then the outer momentum buffers, with the schedule's state in the
    metadata (``local_sgd``). A plain TrainingStateAverager reading it takes the averaged model as the
    parameters and ignores the rest. The owner sets ``local_anchor`` / ``local_momentum`` /
    ``local_schedule`` after construction and changes them under ``lock_averaged_tensors``."""

    local_anchor: Optional[List[torch.Tensor]] = None
    local_momentum: Optional[List[torch.Tensor]] = None
    local_schedule: Optional[dict] = None
    local_state_loaded: Optional[dict] = None  # set by a successful download: {"schedule": dict or None}
    # averaging.overlap: the epoch of the round in flight (None: none), and how a donor serves meanwhile.
    # Its anchor is that round's starting point, which the round will replace: a downloader that took it
    # and missed the round would be out of step at its next one. So a donor asked mid-round first waits
    # (up to local_landing_wait seconds) for the round to land, then serves the new anchor, labelled so
    # that the downloader's next round is the one the donor starts next (whose matchmaking is then
    # just beginning). Only if the round does not land in time is the state marked round_in_flight,
    # and the downloader refuses it and asks again.
    local_round_epoch: Optional[int] = None
    # whether a round is scheduled from our anchor (its group forming before the epoch's end): a donor
    # waits for that one too, or a downloader would get the anchor just as the group closes without it
    local_round_pending: Optional[Callable[[], bool]] = None
    local_landing_wait: float = 0.0
    local_landed: Optional[threading.Condition] = None  # notified when a round lands (or is dropped)
    local_landings: int = 0
    # set by load_state_from_peers: the donor's state was mid-round (refused; ask again once it landed)
    refused_mid_round: bool = False

    def get_current_state(self):
        if self.local_anchor is None:
            return super().get_current_state()
        landed = self._wait_for_landing()
        with torch.no_grad(), self.lock_averaged_tensors:
            parameters = tuple(tensor.detach().clone() for tensor in self.local_anchor)
            optimizer_metadata, optimizer_tensors = dump_optimizer_state(self.optimizer)
            optimizer_tensors = [tensor.clone() for tensor in optimizer_tensors]
            momentum = tuple(tensor.detach().clone() for tensor in self.local_momentum or ())
            schedule = dict(self.local_schedule or {})
            # mid-round, the anchor is the round's starting point: labelled the epoch before the round's,
            # a downloader's next round is that one (or, with the round just started, the next)
            epoch = self.local_epoch if self.local_round_epoch is None else self.local_round_epoch - 1
        infos = [CompressionInfo.from_tensor(tensor, key=key, role=TensorRole.PARAMETER)
                 for tensor, key in zip(parameters, self.parameter_names)]
        infos += [CompressionInfo.from_tensor(tensor, key=i, role=TensorRole.OPTIMIZER)
                  for i, tensor in enumerate(optimizer_tensors)]
        infos += [CompressionInfo.from_tensor(tensor, key=f"outer_momentum_{i}", role=TensorRole.UNSPECIFIED)
                  for i, tensor in enumerate(momentum)]
        metadata = dict(epoch=epoch, group_bits=self.get_group_bits(), optimizer_metadata=optimizer_metadata,
                        local_sgd=dict(schedule=schedule, momentum_tensors=len(momentum),
                                       round_in_flight=not landed))
        return metadata, [*parameters, *optimizer_tensors, *momentum], infos

    def _wait_for_landing(self) -> bool:
        """While a round starts from our anchor (scheduled, or in flight), wait for it to land, up to
        local_landing_wait seconds. False only when a round in flight did not land in time (a scheduled
        round whose group never formed does not hold the state back)."""
        if self.local_landed is None:
            return True
        deadline = time.monotonic() + self.local_landing_wait
        with self.local_landed:
            seen = self.local_landings
            while self._round_under_way() and self.local_landings == seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self.local_round_epoch is None
                self.local_landed.wait(min(remaining, LANDING_POLL_SECONDS))
        return True

    def _round_under_way(self) -> bool:
        pending = self.local_round_pending
        return self.local_round_epoch is not None or (pending is not None and pending())

    def load_state_from_peers(self, **kwargs):
        if self.local_anchor is None:
            return super().load_state_from_peers(**kwargs)
        loaded = DecentralizedAverager.load_state_from_peers(self, **kwargs)
        if loaded is None:
            return
        metadata, flat_tensors = loaded
        local = metadata.get("local_sgd") if isinstance(metadata, dict) and isinstance(metadata.get("local_sgd"), dict) else {}
        if local.get("round_in_flight") is True:
            # the donor's round did not land while it waited: its anchor is about to be replaced, and taken
            # now we would be out of step at our next round
            self.refused_mid_round = True
            return
        if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int) \
                or metadata["epoch"] < self.local_epoch - 1:  # (a landed round's label may lag by one)
            logger.warning("refusing a downloaded state: it is older than ours or malformed")
            return
        num_momentum = local.get("momentum_tensors", 0)
        parameters = [param for group in self.optimizer.param_groups for param in group["params"]]
        if not isinstance(num_momentum, int) or num_momentum < 0 or len(flat_tensors) < len(parameters) + num_momentum:
            logger.warning("refusing a downloaded state: it has too few tensors")
            return
        loaded_parameters = flat_tensors[: len(parameters)]
        optimizer_tensors = flat_tensors[len(parameters): len(flat_tensors) - num_momentum]
        momentum = flat_tensors[len(flat_tensors) - num_momentum:] if num_momentum else []
        if any(mine.shape != theirs.shape for mine, theirs in zip(parameters, loaded_parameters)):
            logger.warning("refusing a downloaded state: its parameters have other shapes")
            return
        if not all(bool(torch.isfinite(tensor).all()) for tensor in [*loaded_parameters, *momentum]
                   if tensor.is_floating_point()):
            logger.warning("refusing a downloaded state: it has non-finite values")
            return
        with torch.no_grad(), self.lock_averaged_tensors:
            try:
                load_optimizer_state(self.optimizer, metadata["optimizer_metadata"], optimizer_tensors)
            except (StopIteration, IndexError, KeyError, TypeError, ValueError, RuntimeError) as error:
                logger.warning(f"refusing a downloaded state: its optimizer state does not fit ({error!r})")
                return
            for param, anchor, value in zip(parameters, self.local_anchor, loaded_parameters):
                param.copy_(value)
                anchor.copy_(value)
            if self.local_momentum is not None:
                usable = len(momentum) == len(self.local_momentum) and all(
                    a.shape == b.shape for a, b in zip(momentum, self.local_momentum))
                for buffer, value in zip(self.local_momentum, momentum if usable else self.local_momentum):
                    if usable:
                        buffer.copy_(value)
                    else:
                        buffer.zero_()
            schedule = local.get("schedule") if isinstance(local.get("schedule"), dict) else None
            self.local_state_loaded = dict(schedule=schedule)
        if not self.reuse_tensors:
            hivemind_compat.load_local_tensors_into_averager(self)
        self.local_epoch = metadata["epoch"]
        hivemind_compat.update_scheduler(self)


# the RPC handlers of an averager are named after its class: keep hivemind's name, so that peers and
# the coordinator (a plain TrainingStateAverager) reach each other's state
LocalStateAverager.__name__ = LocalStateAverager.__qualname__ = "TrainingStateAverager"


# ------------------------------------------------------------------------------------------------
# the optimizer
# ------------------------------------------------------------------------------------------------


class _RoundInFlight(NamedTuple):
    """A round handed to the averager in the background (``averaging.overlap``)."""

    control: StepControl
    epoch: int
    started: float
    weight: float
    launched: List[torch.Tensor]  # our parameters at the hand-over (the delta was taken from them)
    samples: int  # samples and steps in that delta: ours again if the round fails
    steps: int


class LocalSwarmOptimizer(SwarmOptimizer):
    """hivemind.Optimizer with local updates (every step is a local optimizer step; epochs are still
    counted swarm-wide, and the learning rate follows them), plus averaging rounds of the model delta
    at the points the schedule picks. See the module docstring.

    :param settings: the schedule's settings (when to average)
    :param delta_averager_factory: builds the averager of model deltas (the gradient path's factory,
      compression.factory.make_averager_factory, with InStepWeightMixin)
    :param outer_lr: the outer step's learning rate (1: plain averaging)
    :param outer_momentum: the outer step's Nesterov momentum (0: none)
    :param feedback_decay: β, the factor a sparse averager's error-feedback residual is multiplied by
      after each successful round (1: plain error feedback)
    :param anchor_tolerance: averaged models whose fingerprints agree within this are the same model
    :param background_rounds: rounds run while the next local steps do (``averaging.overlap``; see the
      module docstring)
    :param kwargs: SwarmOptimizer's and hivemind.Optimizer's
    """

    state_averager_class = LocalStateAverager  # serves the averaged model, momentum and schedule to joiners

    def _download_a_landed_state(self, **kwargs):
        """Download the swarm's state, asking again while a donor says its state is mid-round (it waits
        for its round to land before it answers, so that happens only when the round outlasted that
        wait). Gives up after a few rounds' time, and the peer trains on with its own state."""
        averager = self.state_averager
        patience = self._landing_patience
        deadline, said = time.monotonic() + patience, False
        while True:
            averager.local_state_loaded, averager.refused_mid_round = None, False
            loaded = super().load_state_from_peers(**kwargs)
            if averager.local_state_loaded is not None or not averager.refused_mid_round:
                return loaded
            if time.monotonic() > deadline:
                logger.warning(f"every donor's state was mid-round for {patience:.0f} s; keeping ours for now")
                return loaded
            if not said:
                logger.info("the swarm's state is mid-round; asking again once its round has landed")
                said = True
            time.sleep(MID_ROUND_RETRY_SECONDS)

    def _download_satisfies(self, wanted: int) -> bool:
        # a donor serves the starting point of the round it has just begun, labelled the epoch before
        # that round's: one behind the swarm's counter, and what the swarm's next round refers to
        lag = 1 if self.state_averager.local_state_loaded is not None else 0
        return self.local_epoch >= wanted - lag

    @property
    def resync_after_failed_round(self) -> bool:
        """For the trainer: a failed round is retried at the next epoch, unless it showed that our
        averaged model is not the swarm's (then we download the state)."""
        return self._failed_out_of_step

    def __init__(self, *, settings: ControllerSettings, delta_averager_factory, outer_lr: float = 1.0,
                 outer_momentum: float = 0.0, feedback_decay: float = 1.0, anchor_tolerance: float,
                 background_rounds: bool = False, **kwargs):
        self.settings = settings
        self.background_rounds = bool(background_rounds)
        self._in_flight: Optional[_RoundInFlight] = None
        self.outer_lr, self.outer_momentum = float(outer_lr), float(outer_momentum)
        self.feedback_decay = float(feedback_decay)
        self.anchor_tolerance = float(anchor_tolerance)
        self._scheduled: Optional[StepControl] = None
        self._samples_since_anchor = self._steps_since_anchor = 0
        self._fresh = False  # state just downloaded: tag along in the next round (weight 0, zero delta)
        self._failed_out_of_step = False
        self._control_bytes = 0
        super().__init__(use_local_updates=True, average_state_every=10**9, delay_state_averaging=False, **kwargs)
        parameters = self._optimized_parameters()
        with torch.no_grad():
            # taken after hivemind's optimizer initialisation (a zero-gradient step): the same on every peer
            self.anchor = [param.detach().to("cpu", torch.float32, copy=True) for param in parameters]
            self.momentum = [torch.zeros_like(a) for a in self.anchor] if self.outer_momentum > 0 else None
        self._positions = fingerprint_positions([param.numel() for param in parameters], FINGERPRINT_SIZE,
                                               FINGERPRINT_SEED)
        self.schedule_state = ControllerState(first_round_epoch(settings, self.local_epoch), 0, self.local_epoch)
        averaged_deltas = tuple(torch.zeros_like(a).share_memory_() for a in self.anchor)  # shared before the fork
        self.delta_averager = delta_averager_factory(
            dht=self.dht, prefix=f"{self.run_id}_grad_averager",  # the pseudo-gradient's averager
            parameters=parameters, averaged_grads=averaged_deltas, reuse_grad_buffers=True, warn=False,
            # rounds use the run's matchmaking window, as sync mode does (matchmaking starts that much
            # before the epoch's expected end, so it overlaps training). Twice that window, once meant for
            # rare rounds, made each round of a recipe that averages every epoch ~2 s longer on home links:
            # 4.4 s against 2.2 s, 215 s against 136 s for the run, at 1-3 more failed rounds in 40
            # (benchmarks/wan.py local_sparseloco, issue #14 note)
            min_matchmaking_time=self.matchmaking_time, allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, allow_state_sharing=False, start=True,
        )
        averager = self.state_averager
        with averager.lock_averaged_tensors:
            averager.local_momentum = self.momentum
            averager.local_schedule = self.schedule_state.to_dict()
            averager.local_anchor = self.anchor
            averager.local_landed = threading.Condition()
            averager.local_landing_wait = self._landing_patience
            averager.local_round_pending = self._round_scheduled

    # -------------------------------------------------------------- hivemind seams
    def step(self, closure=None, batch_size: Optional[int] = None, grad_scaler=None):
        if self._in_flight is not None:
            self.overlapped_steps += 1
            self._land_round_if_over()
        if not self.auxiliary:
            self._samples_since_anchor += batch_size if batch_size is not None else (self.batch_size_per_step or 0)
            self._steps_since_anchor += 1
            self._maybe_preschedule_round()
        return super().step(closure=closure, batch_size=batch_size, grad_scaler=grad_scaler)

    def _update_global_epoch(self, grad_scaler) -> None:
        if self._in_flight is not None and self.local_epoch + 1 >= self.schedule_state.next_epoch:
            self.settle()  # one round in flight: the next one's record needs the anchor it produces
        if not self.auxiliary and self._in_flight is None and self.local_epoch + 1 >= self.schedule_state.next_epoch:
            # the round comes before the transition, as a gradient round does in sync mode: while it
            # runs this peer still reports the old epoch, so nobody counts its idle time as samples
            # of the new one (hivemind extrapolates each peer's samples/s since its last report)
            epoch, started = self.local_epoch + 1, time.perf_counter()
            self._mark_round_in_flight(epoch)  # a donor asked meanwhile serves once the round has landed
            try:
                if self.background_rounds:  # the group forms while we compute (see _land_round)
                    control = self._scheduled_or_new_round(epoch)
                else:
                    control = self._group_for_round(epoch, started)  # the tracker runs: we see who moved on
                if control is not None:
                    with self.tracker.pause_updates():
                        self._average_in_group(control, epoch, started)
            finally:
                if self._in_flight is None:  # (a background round stays marked until it lands)
                    self._mark_round_in_flight(None)
        super()._update_global_epoch(grad_scaler)
        if self.local_epoch < self.tracker.global_epoch:
            self._catch_up_epoch()

    def _should_load_state_from_peers(self) -> bool:
        """hivemind downloads the state whenever a peer's epoch counter is off the swarm's. In mode
        local a peer an epoch or more behind (a slow machine, a long round) still holds a good
        model -- whether it does is what the next round's comparison of averaged models tells, and
        a peer found out of step downloads then. So: never here; _update_global_epoch catches the
        counter up instead."""
        return False

    def _catch_up_epoch(self) -> None:
        with self.tracker.pause_updates():
            self.state_averager.local_epoch = self.tracker.global_epoch
            hivemind_compat.update_scheduler(self.state_averager)
            self.tracker.update_epoch(new_epoch=self.local_epoch)
        if not self.client_mode:
            self.state_averager.state_sharing_priority = self.local_epoch

    def load_state_from_peers(self, **kwargs):
        self._abandon_scheduled_round()
        self._drop_round_in_flight()
        loaded = self._download_a_landed_state(**kwargs)
        got = self.state_averager.local_state_loaded
        if got is not None:
            # params and anchor are the downloaded averaged model now (LocalStateAverager did it)
            state = ControllerState.from_dict(got["schedule"]) if got["schedule"] else None
            if state is None:  # a donor without local-mode state (the coordinator resuming a run)
                state = ControllerState(first_round_epoch(self.settings, self.local_epoch), 0, self.local_epoch)
            self._set_schedule_state(state)
            self._samples_since_anchor = self._steps_since_anchor = 0
            residual = getattr(self.delta_averager, "residual", None)
            if residual is not None:
                residual.zero_()  # our unsent delta referred to the model we just replaced
            # our first round: tag along (weight 0, zero delta). A few steps' delta next to the others'
            # full periods would look like an outlier to the reducers' median rules, and drag the average
            self._fresh = True
            self.diverged = self._failed_out_of_step = False
            self.delta_averager.out_of_step.zero_()
            anchor_sum, digest = _describe_model(self.anchor)
            logger.info(f"took the swarm's averaged model of epoch {state.anchor_epoch} at epoch {self.local_epoch} "
                        f"({state.rounds_done} rounds so far; digest {digest}, sum {anchor_sum:.6f}); next "
                        f"averaging at epoch {self.next_averaging_epoch}")
            if not self.auxiliary:
                self._maybe_preschedule_round(right_away=True)
        return loaded

    @property
    def next_averaging_epoch(self) -> int:
        """The epoch whose start the next round leads into. A schedule point already behind us (a
        donor's state that lone epochs kept overdue, a resumed peer) is due at our next epoch."""
        return max(self.schedule_state.next_epoch, self.local_epoch + 1)

    def state_is_finite(self) -> bool:
        return super().state_is_finite() and all(bool(torch.isfinite(anchor).all()) for anchor in self.anchor)

    def restore_checkpoint(self, model, model_state: dict, optimizer_state: Optional[dict]) -> None:
        super().restore_checkpoint(model, model_state, optimizer_state)
        with torch.no_grad(), self.state_averager.lock_averaged_tensors:
            for anchor, param in zip(self.anchor, self._optimized_parameters()):
                anchor.copy_(param.detach().to("cpu", torch.float32))
            for buffer in self.momentum or ():
                buffer.zero_()
        self._samples_since_anchor = self._steps_since_anchor = 0
        residual = getattr(self.delta_averager, "residual", None)
        if residual is not None:
            residual.zero_()

    def settle(self, timeout: Optional[float] = None) -> None:
        """Land the round in flight (``averaging.overlap``): wait up to `timeout` seconds (None: the
        averaging timeout) and apply its outer step. Before a checkpoint, an evaluation, the next round."""
        if self._in_flight is None:
            return
        deadline = time.monotonic() + (self.averaging_timeout if timeout is None else timeout)
        while not self._land_round_if_over():
            if time.monotonic() >= deadline:
                return  # still under way: it lands later
            time.sleep(0.02)

    def shutdown(self):
        self._abandon_scheduled_round()
        self._drop_round_in_flight()
        super().shutdown()
        self.delta_averager.shutdown()

    @property
    def traffic(self) -> AveragingTraffic:
        return dataclasses.replace(self.delta_averager.stats.snapshot(), control_bytes_total=float(self._control_bytes))

    # -------------------------------------------------------------- rounds
    def _member_record(self, round_epoch: int) -> MemberRecord:
        return member_record(round_epoch, self.schedule_state, self.anchor, self._optimized_parameters(),
                             self._positions, 0.0 if self._fresh else float(self._samples_since_anchor),
                             int(self.tracker.global_progress.num_peers), 0 if self._fresh else self._steps_since_anchor)

    def _schedule_round(self, scheduled_time: float, round_epoch: int) -> StepControl:
        gather = self._member_record(round_epoch).to_wire()
        self._control_bytes += len(self.delta_averager.serializer.dumps(gather))
        return schedule_round(self.delta_averager, scheduled_time, round_epoch, gather, self.averaging_timeout)

    def _round_scheduled(self) -> bool:
        control = self._scheduled
        return control is not None and not control.done()

    def _maybe_preschedule_round(self, right_away: bool = False) -> None:
        """Start matchmaking for the round at the end of this epoch, when that end is near (as
        hivemind pre-schedules gradient rounds): the group forms while we still train. `right_away`:
        with twice the margin (just after a download: the others' group may be forming already, and
        our first step after it can be slow)."""
        if self._scheduled is not None:
            if self._scheduled.done():  # its matchmaking gave up in the background
                self._scheduled = None
            return
        if self._in_flight is not None:
            return  # the record would hold the anchor from before the round in flight
        if self.local_epoch + 1 < self.schedule_state.next_epoch or self.tracker.global_progress.num_peers <= 1:
            return
        if self.local_epoch < self.tracker.global_epoch:
            return  # behind the swarm: hivemind downloads the state first
        eta = self.tracker.estimated_next_update_time - get_dht_time()
        if eta <= (2 if right_away else 1) * self.matchmaking_time:
            start = get_dht_time() + max(eta, self.matchmaking_time / 2)
            try:
                self._scheduled = self._schedule_round(start, self.local_epoch + 1)
            except Exception as error:
                logger.warning(f"could not start matchmaking for an averaging round: {error!r}")

    def _abandon_scheduled_round(self) -> None:
        control, self._scheduled = self._scheduled, None
        if control is None or control.done():
            return
        if control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP):
            control.cancel()
        else:
            self._tag_along_with_zero_weight(control)  # the group formed: do not leave it waiting

    def _scheduled_or_new_round(self, epoch: int) -> Optional[StepControl]:
        """The pre-scheduled round, or one scheduled now; None when no other peer is there (recorded)."""
        control, self._scheduled = self._scheduled, None
        if control is not None and control.done():
            control = None  # its matchmaking failed in the background
        if control is None:
            if self.tracker.global_progress.num_peers <= 1:
                self.rounds.append(LocalRoundRecord(epoch, 0, False, 0.0, NO_OTHER_PEERS,
                                                    next_epoch=self.schedule_state.next_epoch))
                return None  # still due: we try again at the next epoch
            control = self._schedule_round(get_dht_time() + self.matchmaking_time, epoch)
        return control

    def _group_for_round(self, epoch: int, started: float) -> Optional[StepControl]:
        """The group for the round leading into `epoch` (pre-scheduled, or looked for now), or None
        (recorded as a failed round). Nothing waits for ever: we stop looking as soon as another
        peer is past this averaging point (its round is over, or it had none), or after
        averaging_timeout."""
        control = self._scheduled_or_new_round(epoch)
        if control is None:
            return None
        give_up_at, reason = max(control.scheduled_time, get_dht_time()) + self.averaging_timeout, None
        while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP) and not control.done():
            stale = self.tracker.global_epoch >= epoch and get_dht_time() > control.scheduled_time
            if stale:  # they averaged without us, or had no round here: either way their state heals us
                reason = "the others went past this averaging point without us"
            elif get_dht_time() > give_up_at:
                reason = "no group formed in time"
            if reason:
                control.cancel()
                self._round_failed(epoch, started, reason, stale=stale)
                return None
            time.sleep(0.02)
        if control.done():  # matchmaking failed just now
            try:
                error = control.exception(timeout=0)
            except BaseException as cancelled:
                error = cancelled
            self._round_failed(epoch, started, describe_round_failure(error))
            return None
        return control

    def _average_in_group(self, control: StepControl, epoch: int, started: float) -> None:
        parameters = self._optimized_parameters()
        weight = 0.0 if self._fresh else float(self._samples_since_anchor)
        with torch.no_grad(), self.delta_averager.get_tensors() as buffers:
            for buffer, param, anchor in zip(buffers, parameters, self.anchor):
                if self._fresh:
                    buffer.zero_()
                else:
                    buffer.copy_(param.detach().to("cpu", torch.float32)).sub_(anchor)
        self.delta_averager.out_of_step.zero_()
        if hasattr(self.delta_averager, "set_schedule_epoch"):
            self.delta_averager.set_schedule_epoch(epoch)  # a density warm-up counts epochs, not rounds
        control.weight = weight
        control.allow_allreduce()
        if self.background_rounds:
            launched = [param.detach().clone() for param in parameters]
            self._in_flight = _RoundInFlight(control, epoch, started, weight, launched,
                                             self._samples_since_anchor, self._steps_since_anchor)
            self._samples_since_anchor = self._steps_since_anchor = 0  # from here on: the next round's delta
            return
        try:
            gathered = control.result(timeout=self.averaging_timeout)
        except BaseException as error:
            if not control.done():
                control.cancel()
            return self._round_failed(epoch, started, describe_round_failure(error))
        with torch.no_grad(), self.delta_averager.get_tensors() as buffers:
            averaged = [buffer.clone() for buffer in buffers]
        self._apply_round(epoch, started, gathered, averaged, weight)

    def _land_round_if_over(self) -> bool:
        """Land the round in flight if it is over: finished, or left behind (then cancelled and recorded as
        stale: waiting on would hold it until the averaging timeout -- a peer whose epoch counter lagged at
        the start handed its round over after the others had averaged it). True when it landed."""
        flight = self._in_flight
        if flight.control.done():
            self._land_round()
            return True
        if self._left_behind(flight):
            flight.control.cancel()
            self._land_round(stale=True)
            return True
        return False

    def _left_behind(self, flight: _RoundInFlight) -> bool:
        """A background round still looking for its group while the swarm is an epoch further, well after
        the group should have formed: the others averaged without us (or had no round here)."""
        control = flight.control
        return (control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
                and self.tracker.global_epoch > flight.epoch
                and get_dht_time() > control.scheduled_time + self.matchmaking_time)

    def _mark_round_in_flight(self, round_epoch: Optional[int]) -> None:
        """The round of `round_epoch` is in flight now (None: it landed or was dropped)."""
        averager = self.state_averager
        with averager.local_landed or contextlib.nullcontext():
            with averager.lock_averaged_tensors:
                averager.local_round_epoch = round_epoch
            if round_epoch is None and averager.local_landed is not None:
                averager.local_landings += 1
                averager.local_landed.notify_all()

    def _land_round(self, stale: bool = False) -> None:
        """The round in flight has finished: apply it (or record its failure; `stale`: we gave it up,
        the others went past this averaging point without us)."""
        flight, self._in_flight = self._in_flight, None
        try:
            self._apply_landed_round(flight, stale)
        finally:
            self._mark_round_in_flight(None)

    def _apply_landed_round(self, flight: _RoundInFlight, stale: bool) -> None:
        note = "the others went past this averaging point without us" if stale else None
        if note is None:
            try:
                gathered = flight.control.result(timeout=0)
            except BaseException as error:
                note = describe_round_failure(error)
        if note is not None:
            # the anchor stays: our delta from it still holds the steps the round would have averaged
            self._samples_since_anchor += flight.samples
            self._steps_since_anchor += flight.steps
            return self._round_failed(flight.epoch, flight.started, note, stale=stale)
        with torch.no_grad(), self.delta_averager.get_tensors() as buffers:
            averaged = [buffer.clone() for buffer in buffers]
        self._apply_round(flight.epoch, flight.started, gathered, averaged, flight.weight, launched=flight.launched)

    def _drop_round_in_flight(self) -> None:
        """Before our state is replaced or we leave: the round's group still needs our parts, so it runs
        out (up to the averaging timeout) but its result is not applied."""
        flight, self._in_flight = self._in_flight, None
        self._mark_round_in_flight(None)
        if flight is None or flight.control.done():
            return
        if flight.control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP):
            flight.control.cancel()  # no group yet: nobody waits for our parts
            return
        try:
            flight.control.result(timeout=self.averaging_timeout)
        except BaseException as error:
            logger.debug(f"a round in flight while our state was replaced: {error!r}")

    def _round_failed(self, epoch: int, started: float, note: str, stale: bool = False) -> None:
        self._set_schedule_state(state_after_failure(self.settings, self.schedule_state, epoch))
        if stale or bool(self.delta_averager.out_of_step.item()):
            self._failed_out_of_step = True
            note = f"our averaged model is not the swarm's; {note}"
        self.delta_averager.out_of_step.zero_()
        self.rounds.append(LocalRoundRecord(epoch, 0, False, time.perf_counter() - started, note,
                                            next_epoch=self.schedule_state.next_epoch, finished_at=time.time()))
        logger.info(f"epoch {epoch}: averaging round failed ({note}); training on, next attempt at epoch "
                    f"{self.next_averaging_epoch}")

    def _apply_round(self, epoch: int, started: float, gathered: Dict, averaged: List[torch.Tensor],
                     weight: float, launched: Optional[List[torch.Tensor]] = None) -> None:
        """Apply a finished round: the outer step, then our parameters become the new anchor (with
        `launched`, the parameters at a background round's hand-over: the new anchor plus the local
        steps taken since)."""
        records = parse_records(gathered)
        reference = reference_member(records, self.anchor_tolerance)
        mine = self.dht.peer_id
        if reference is None or mine not in records:
            return self._round_failed(epoch, started, "the group's records are malformed")
        in_step = in_step_with(records, reference, self.anchor_tolerance)
        decision = decide_after_round(self.settings, records[reference], [records[p] for p in in_step],
                                      group_size=len(gathered))
        self._control_bytes += sum(len(self.delta_averager.serializer.dumps(data)) for peer, data in gathered.items()
                                   if peer != mine)
        parameters = self._optimized_parameters()
        with torch.no_grad(), self.state_averager.lock_averaged_tensors:
            if mine in in_step:
                outer_step(self.anchor, self.momentum, averaged, self.outer_lr, self.outer_momentum)
                residual = getattr(self.delta_averager, "residual", None)
                if residual is not None and self.feedback_decay != 1.0:
                    residual.mul_(self.feedback_decay)  # the averager process wrote it before the round returned
            else:
                # our averaged model was not the group's: the trainer downloads the state (diverged)
                self.diverged = True
            if launched is None:
                for param, anchor in zip(parameters, self.anchor):
                    param.copy_(anchor.to(param.device, param.dtype))
            else:
                land_delayed_outer_step(parameters, launched, self.anchor)
        if launched is None:
            self._samples_since_anchor = self._steps_since_anchor = 0
        self._fresh = self._failed_out_of_step = False
        self._set_schedule_state(decision.state)
        self._synced_epochs += 1
        anchor_sum, digest = _describe_model(self.anchor)
        self.rounds.append(LocalRoundRecord(
            epoch, len(gathered), True, time.perf_counter() - started,
            decision.reason if mine in in_step else "our averaged model differed from the group's; re-synchronising",
            next_epoch=decision.state.next_epoch, round_index=decision.state.rounds_done, period=decision.period,
            in_step=mine in in_step,
            members_in_step=len(in_step), divergence=decision.relative_divergence, kappa=decision.kappa,
            exponent=decision.exponent if self.settings.schedule.kind == "adaptive" else None,
            correction=decision.correction if self.settings.schedule.kind == "adaptive" else None,
            anchor_sum=anchor_sum, anchor_digest=digest,
            finished_at=time.time(), weight=weight,
        ))

    def _set_schedule_state(self, state: ControllerState) -> None:
        self.schedule_state = state
        with self.state_averager.lock_averaged_tensors:
            self.state_averager.local_schedule = state.to_dict()


def round_group_bits(round_epoch: int) -> str:
    """The group bits of the round leading into `round_epoch` (its epoch modulo 2**ROUND_KEY_BITS)."""
    return format(round_epoch % 2 ** ROUND_KEY_BITS, f"0{ROUND_KEY_BITS}b")


def schedule_round(averager: DecentralizedAverager, scheduled_time: float, round_epoch: int, gather,
                   timeout: float) -> StepControl:
    """Start matchmaking for the round leading into `round_epoch`, under a key only that round's members
    use. Rounds of different epochs used to share one key: a peer whose counter ran an epoch ahead
    (it stepped alone at the start, before its tracker saw the others) joined the others' round of the
    epoch before, every round of the run, and finished before their last one (the demo ended with its
    model apart). Now such a peer averages in step with nobody once, is found out of step by the
    anchor check, and re-synchronises. (Matchmaking runs one round at a time: a round's bits are set
    only after the last one's group formed or was given up.)"""
    averager.set_group_bits(round_group_bits(round_epoch))
    # no retries inside the step: a second group found later could be the others' *next* round;
    # a failed round is retried at the next epoch instead, with a fresh record
    return averager.schedule_step(scheduled_time=scheduled_time, gather=gather, timeout=timeout,
                                  allow_retries=False)


def member_record(round_epoch: int, state: ControllerState, anchor: List[torch.Tensor], parameters,
                  positions, weight: float, peers_seen: int, local_steps: int = 0) -> MemberRecord:
    """What a member gathers in the round at `round_epoch` (the simulator of the swarm builds it here too):
    its schedule state, its averaged model's fingerprint, the sketch of its delta since that model."""
    with torch.no_grad():
        delta = torch.cat([(param.detach().to("cpu", torch.float32) - base).reshape(-1)
                           for param, base in zip(parameters, anchor)])
    return MemberRecord(
        round_epoch=round_epoch, anchor_epoch=state.anchor_epoch, rounds_done=state.rounds_done, fit=state.fit,
        anchor_fingerprint=tuple(fingerprint(anchor, positions)), sketch=tuple(count_sketch(delta).tolist()),
        weight=weight, peers_seen=peers_seen, local_steps=local_steps,
    )


@torch.no_grad()
def outer_step(anchor: List[torch.Tensor], momentum: Optional[List[torch.Tensor]], averaged: List[torch.Tensor],
               outer_lr: float, outer_momentum: float) -> None:
    """anchor += outer_lr · (Δ̄ + μ·m) with m = μ·m + Δ̄ (Nesterov), in place; without momentum buffers
    (μ = 0) anchor += outer_lr · Δ̄."""
    for index, (base, update) in enumerate(zip(anchor, averaged)):
        if momentum is not None:
            momentum[index].mul_(outer_momentum).add_(update)
            update = update.add(momentum[index], alpha=outer_momentum)
        base.add_(update, alpha=outer_lr)


@torch.no_grad()
def land_delayed_outer_step(parameters, launched: List[torch.Tensor], anchor: List[torch.Tensor]) -> None:
    """θ = anchor + (θ − θ at the hand-over), in place: a background round's new averaged model, plus
    the local steps taken while the round ran."""
    for param, before, base in zip(parameters, launched, anchor):
        param.add_(base.to(param.device, param.dtype) - before)


def _describe_model(tensors: List[torch.Tensor]) -> tuple:
    """(float64 sum, SHA-256 prefix of the bytes) of a model: equal sums within float noise for dense
    averaging, equal digests for bit-identical models."""
    flat = torch.cat([tensor.detach().reshape(-1).cpu().float() for tensor in tensors])
    return float(flat.double().sum()), hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
