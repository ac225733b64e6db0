"""The averaging of the simulated swarm, per mode, with the swarm's own functions: the schedule
(averaging/schedule.py), the member records and the outer step (averaging/local.py), the density
warm-up (compression/feedback.py), the selection (compression/selection.py) and the reductions of
``reduction.py``.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
from hivemind.utils import MSGPackSerializer

from swarmtrain.averaging.local import ANCHOR_TOLERANCE_LR, land_delayed_outer_step, member_record, outer_step
from swarmtrain.averaging.schedule import (FINGERPRINT_SEED, FINGERPRINT_SIZE, ControllerSettings, ControllerState,
                                           decide_after_round, first_round_epoch, in_step_with, parse_records,
                                           reference_member)
from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.robust import RobustPolicy
from swarmtrain.compression.selection import selector_for
from swarmtrain.config import RunConfig
from swarmtrain.simulate.reduction import RoundResult, dense_round, sparse_round
from swarmtrain.simulate.replicas import Replica, Trainee, sync_scheduler
from swarmtrain.training.fingerprint import fingerprint_positions


@dataclass
class SimulatedRound:
    """One averaging round of the simulation (per-member lists are in member order)."""

    epoch: int  # the round's epoch (the epoch the swarm enters with it)
    tick: int
    members: List[int]  # peer indices
    weights: List[float]
    bytes_sent: List[int]
    bytes_received: List[int]
    control_bytes: int = 0  # mode local: the gathered member records (sent to every other member)
    density: Optional[float] = None
    sent_entries: Optional[List[int]] = None
    next_epoch: Optional[int] = None  # mode local: the next averaging point the group agreed on
    period: Optional[int] = None
    divergence: Optional[float] = None  # the schedule's sketched variance / ||mean delta||²

    def to_dict(self) -> dict:
        return asdict(self)


class Averaging:
    """What both modes share: the compression of the run and the bookkeeping of rounds.

    :param config: the run config
    """

    def __init__(self, config: RunConfig):
        averaging = config.averaging
        self.config, self.spec = config, averaging.compression
        self.policy = RobustPolicy(aggregation=averaging.aggregation, max_norm_ratio=averaging.max_norm_ratio)
        self.density_schedule = None
        self.selector = None
        if self.spec.is_sparse:
            self.density_schedule = DensitySchedule.for_spec(
                self.spec, dense_warmup_epochs=averaging.dense_warmup_epochs,
                density_warmup_epochs=averaging.density_warmup_epochs) or DensitySchedule(self.spec.density)
            self.selector = selector_for(self.spec)
        self.rounds: List[SimulatedRound] = []

    def reduce(self, flats: Sequence[torch.Tensor], members: Sequence[Replica], weights: Sequence[float],
               epoch: int) -> RoundResult:
        """The all-reduce (sparse members' residuals are replaced by the round's)."""
        if not self.spec.is_sparse:
            return dense_round(flats, weights, self.spec, self.policy)
        residuals = [member.residual if member.residual is not None else torch.zeros_like(flat)
                     for member, flat in zip(members, flats)]
        result = sparse_round(flats, residuals, weights, self.spec, self.density_schedule(epoch), self.selector,
                              self.policy)
        for member, residual in zip(members, result.residuals):
            member.residual = residual
        return result

    def record(self, epoch: int, tick: int, members: Sequence[Replica], weights: Sequence[float],
               result: RoundResult, **extra) -> SimulatedRound:
        density = self.density_schedule(epoch) if self.density_schedule is not None else None
        entry = SimulatedRound(epoch, tick, [m.index for m in members], [float(w) for w in weights],
                               result.traffic.sent, result.traffic.received, density=density,
                               sent_entries=result.traffic.sent_entries or None, **extra)
        self.rounds.append(entry)
        return entry


class LocalAveraging(Averaging):
    """Mode local: averaging rounds of the model deltas at the points the schedule picks, applied with
    the outer step, as LocalSwarmOptimizer does (averaging/local.py).

    :param config: the run config
    :param first: any replica's trainee after initialisation (the anchor is its parameters)
    :param overlap_delay: ticks a round takes to land (averaging.overlap): its members step on from their
      own parameters meanwhile, then take the new anchor plus the steps taken since the hand-over; 0: at once
    """

    def __init__(self, config: RunConfig, first: Trainee, overlap_delay: int = 0):
        super().__init__(config)
        self.overlap_delay = int(overlap_delay)
        self.in_flight: Optional[tuple] = None  # (landing tick, [(member, its flat parameters at the hand-over)])
        averaging = config.averaging
        self.settings = ControllerSettings.from_config(config)
        self.state = ControllerState(first_round_epoch(self.settings, 0), 0, 0)
        self.anchor = [param.detach().to(torch.float32).clone() for param in first.parameters]
        self.momentum = [torch.zeros_like(a) for a in self.anchor] if averaging.outer_momentum > 0 else None
        self.positions = fingerprint_positions([a.numel() for a in self.anchor], FINGERPRINT_SIZE, FINGERPRINT_SEED)
        self.tolerance = ANCHOR_TOLERANCE_LR * config.optimizer.lr
        self.serializer = MSGPackSerializer

    def due(self, epoch: int) -> bool:
        """Whether the transition out of `epoch` runs a round (LocalSwarmOptimizer._update_global_epoch)."""
        return epoch + 1 >= self.state.next_epoch

    def flat_anchor(self) -> torch.Tensor:
        return torch.cat([a.reshape(-1) for a in self.anchor])

    def admit(self, joiner: Replica, donor: Optional[Replica], epoch: int) -> None:
        """A peer joining the run downloads the state: the averaged model, the donor's optimizer state;
        its first round it tags along with weight 0 (LocalSwarmOptimizer.load_state_from_peers)."""
        joiner.trainee.load_flat(self.flat_anchor())
        if donor is not None:
            joiner.trainee.optimizer.load_state_dict(copy.deepcopy(donor.trainee.optimizer.state_dict()))
        sync_scheduler(joiner.trainee.scheduler, epoch)
        joiner.residual, joiner.samples_since_anchor, joiner.steps_since_anchor, joiner.fresh = None, 0, 0, True

    def land(self, tick: int, now: bool = False) -> None:
        """Apply the round in flight once its landing tick came (`now`: at once -- the next round is due, and
        a real peer waits for the one in flight), with the swarm's own arithmetic (land_delayed_outer_step)."""
        if self.in_flight is None or (tick < self.in_flight[0] and not now):
            return
        _, launched = self.in_flight
        self.in_flight = None
        anchor = self.flat_anchor()
        for member, before in launched:
            flat = member.trainee.flat_parameters()
            land_delayed_outer_step([flat], [before], [anchor])
            member.trainee.load_flat(flat)

    def run_round(self, members: Sequence[Replica], epoch: int, tick: int, peers_seen: int) -> SimulatedRound:
        """The round at `epoch` among `members` (every present peer: the simulator's groups never fail)."""
        self.land(tick, now=True)
        weights = [0.0 if m.fresh else float(m.samples_since_anchor) for m in members]
        gathered = {m.index: member_record(epoch, self.state, self.anchor, m.trainee.parameters, self.positions,
                                           weight, peers_seen, 0 if m.fresh else m.steps_since_anchor).to_wire()
                    for m, weight in zip(members, weights)}
        records = parse_records(gathered)  # through the wire form, as the members read each other's
        reference = reference_member(records, self.tolerance)
        in_step = in_step_with(records, reference, self.tolerance)
        decision = decide_after_round(self.settings, records[reference], [records[p] for p in in_step],
                                      group_size=len(members))
        anchor = self.flat_anchor()
        flats = [torch.zeros_like(anchor) if m.fresh else m.trainee.flat_parameters() - anchor for m in members]
        result = self.reduce(flats, members, weights, epoch)
        averaged, offset = [], 0
        for base in self.anchor:
            averaged.append(result.averaged[offset : offset + base.numel()].view_as(base))
            offset += base.numel()
        outer_step(self.anchor, self.momentum, averaged, self.config.averaging.outer_lr,
                   self.config.averaging.outer_momentum)
        anchor = self.flat_anchor()
        launched = []
        for member in members:
            if member.residual is not None and self.config.averaging.feedback_decay != 1.0:
                member.residual.mul_(self.config.averaging.feedback_decay)
            if self.overlap_delay > 0:
                launched.append((member, member.trainee.flat_parameters()))
            else:
                member.trainee.load_flat(anchor)
            member.samples_since_anchor, member.steps_since_anchor, member.fresh = 0, 0, False
        if launched:
            self.in_flight = (tick + self.overlap_delay, launched)
        self.state = decision.state
        control = sum(len(self.serializer.dumps(record)) for record in gathered.values()) * (len(members) - 1)
        return self.record(epoch, tick, members, weights, result, control_bytes=control,
                           next_epoch=decision.state.next_epoch, period=decision.period,
                           divergence=decision.relative_divergence)


class SyncAveraging(Averaging):
    """Mode sync (DeDLOC): at the end of every epoch the peers average their accumulated gradients and
    all take the same optimizer step. The peers of a sync swarm hold the same parameters, so they
    share one Trainee here.

    :param config: the run config
    :param trainee: the swarm's model and optimizer
    """

    def __init__(self, config: RunConfig, trainee: Trainee):
        super().__init__(config)
        self.trainee = trainee

    def run_round(self, members: Sequence[Replica], epoch: int, tick: int) -> Optional[SimulatedRound]:
        contributing = [m for m in members if m.accumulated is not None]
        if not contributing:
            return None
        weights = [float(m.accumulated_samples) for m in contributing]
        flats = [m.take_accumulated() for m in contributing]
        for member in members:
            member.accumulated_samples = 0
        result = self.reduce(flats, contributing, weights, epoch)
        offset = 0
        for param in self.trainee.parameters:
            param.grad = result.averaged[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()
        # hivemind: the epoch is incremented, the optimizer steps, then the scheduler follows the epoch
        self.trainee.optimizer.step()
        sync_scheduler(self.trainee.scheduler, epoch + 1)
        self.trainee.optimizer.zero_grad()
        return self.record(epoch, tick, contributing, weights, result)
