"""The simulation loop: time in ticks, epochs, rounds, evaluation, results.

Time is counted in ticks: in one tick every present peer of speed 1 takes one local step, a peer of
speed s < 1 steps in a share s of the ticks (evenly spread). Samples count toward the swarm's epoch as
hivemind's progress tracker counts them; when the epoch's samples reach ``target_batch_size`` the
swarm moves to the next epoch at the end of the tick -- after a round when one is due -- and the
samples counter starts from zero (hivemind drops the excess too). Rounds never fail and cost no
time: the simulator measures what the arithmetic of averaging does to training, not the network.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from swarmtrain.config import RunConfig
from swarmtrain.data import Corpus, load_corpus
from swarmtrain.errors import UserError
from swarmtrain.models import build_model, heldout_loss
from swarmtrain.signals import raise_if_stop_requested
from swarmtrain.simulate.replicas import Replica, Trainee
from swarmtrain.simulate.rounds import LocalAveraging, SyncAveraging
from swarmtrain.simulate.workers import StepWorkers


@dataclass
class SimulationOptions:
    """How the simulated swarm runs.

    :param peers: number of peers
    :param steps: ticks to simulate (local steps of a peer of speed 1)
    :param batch_size: samples per local step
    :param seed: varies the model's initial weights (run seed + this), data orders and dropout
    :param speeds: per peer, the share of ticks it steps in, (0, 1] (None: all 1)
    :param joins: peer index -> tick at which it joins (others are there from tick 0)
    :param leaves: peer index -> tick at which it leaves
    :param disjoint_shards: each peer reads only its own contiguous 1/peers of the training blocks
      (non-identical data) instead of all of them in its own order
    :param eval_every: evaluate the swarm's model at the first epoch end after every this many ticks
    :param max_epochs: stop when the swarm reaches this epoch (as a peer's --max-epochs), if before `steps`
    :param workers: processes that run the peers' forward and backward passes, this one included, one core
      each (1: all in this process; more: workers - 1 forked, see workers.py -- the same floats, faster when
      the machine has that many free cores)
    :param overlap_delay: mode local, averaging.overlap: ticks a round takes to land, the peers stepping on
      meanwhile (a real round's seconds over a local step's); 0: rounds land at once
    """

    peers: int = 4
    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    speeds: Optional[Sequence[float]] = None
    joins: Dict[int, int] = field(default_factory=dict)
    leaves: Dict[int, int] = field(default_factory=dict)
    disjoint_shards: bool = False
    eval_every: int = 100
    max_epochs: Optional[int] = None
    workers: int = 1
    overlap_delay: int = 0

    def check(self) -> None:
        if self.peers < 1 or self.steps < 1 or self.batch_size < 1 or self.workers < 1:
            raise UserError("--peers, --steps, --batch-size and --workers must be at least 1")
        if self.overlap_delay < 0:
            raise UserError("--overlap-delay is a number of ticks, 0 or more")
        if self.speeds is not None and (len(self.speeds) != self.peers or not all(0 < s <= 1 for s in self.speeds)):
            raise UserError(f"--speeds needs one number in (0, 1] per peer ({self.peers}), e.g. 1,1,0.5,0.25")
        for name, plan in (("--join", self.joins), ("--leave", self.leaves)):
            if any(not 0 <= peer < self.peers or tick < 0 for peer, tick in plan.items()):
                raise UserError(f"{name} takes PEER:TICK with PEER in 0..{self.peers - 1} and TICK >= 0")


@dataclass
class SimulationResult:
    """What a simulated run produced (JSON-ready through ``to_dict``)."""

    seed: int
    mode: str
    compression: str
    peers: int
    ticks: int
    epochs: int
    samples: int
    steps_per_peer: List[int]
    curve: List[dict]  # {"tick", "epoch", "samples", "heldout_loss", "train_loss"}
    rounds: List[dict]
    wall_seconds: float
    stopped_early: bool = False

    @property
    def final_loss(self) -> float:
        return self.curve[-1]["heldout_loss"] if self.curve else math.nan

    def bytes_sent_per_peer(self) -> float:
        """Averaging bytes sent per peer over the run (mean over the peers that took part)."""
        totals: Dict[int, int] = {}
        for entry in self.rounds:
            for peer, sent in zip(entry["members"], entry["bytes_sent"]):
                totals[peer] = totals.get(peer, 0) + sent
        return sum(totals.values()) / max(1, len(totals))

    def to_dict(self) -> dict:
        steps = sum(self.steps_per_peer)
        return dict(seed=self.seed, mode=self.mode, compression=self.compression, peers=self.peers, ticks=self.ticks,
                    epochs=self.epochs, samples=self.samples, steps_per_peer=self.steps_per_peer,
                    final_heldout_loss=self.final_loss, bytes_sent_per_peer=self.bytes_sent_per_peer(),
                    rounds_done=len(self.rounds), wall_seconds=self.wall_seconds,
                    optimizer_steps_per_minute=60.0 * steps / max(self.wall_seconds, 1e-9),
                    stopped_early=self.stopped_early, curve=self.curve, rounds=self.rounds)


def data_seed(seed: int, peer: int) -> int:
    """A simulated peer's data seed (the trainer derives its own from its peer ID)."""
    return int.from_bytes(hashlib.sha256(f"simulated-peer-{seed}-{peer}".encode()).digest()[:8], "little")


def _shard(corpus: Corpus, peer: int, peers: int) -> Corpus:
    blocks = corpus.train.shape[0]
    part = corpus.train[peer * blocks // peers : (peer + 1) * blocks // peers]
    return Corpus(part, corpus.heldout, f"{corpus.description} (shard {peer + 1}/{peers})", corpus.vocabulary)


def _steps_now(speed: float, tick: int) -> bool:
    return math.floor((tick + 1) * speed + 1e-9) > math.floor(tick * speed + 1e-9)


class Simulation:
    """One simulated run of a run config (see the module docstring).

    :param config: the run config (its model, data, optimizer, target batch size and averaging)
    :param options: peers, length, heterogeneity
    :param corpus: the data (loaded from the config when None)
    :param on_progress: called with (tick, epoch, last evaluated loss) after every evaluation
    """

    def __init__(self, config: RunConfig, options: SimulationOptions, corpus: Optional[Corpus] = None,
                 on_progress: Optional[Callable[[int, int, float], None]] = None):
        options.check()
        if config.model is None:
            raise UserError("the simulator trains the run's model: this config has no model section (a split run?)")
        self.config, self.options, self.on_progress = config, options, on_progress
        self.corpus = corpus if corpus is not None else load_corpus(config.data)
        model_seed = config.seed + options.seed
        local = config.averaging.mode == "local"
        self.replicas = []
        for index in range(options.peers):
            data = _shard(self.corpus, index, options.peers) if options.disjoint_shards else self.corpus
            self.replicas.append(Replica(index, data, options.batch_size, data_seed(options.seed, index),
                                         config.data.num_shards,
                                         Trainee(config, model_seed, self.corpus.vocabulary) if local else None))
        if local:
            self.averaging = LocalAveraging(config, self.replicas[0].trainee, overlap_delay=options.overlap_delay)
            self.shared = None
        else:
            self.shared = Trainee(config, model_seed, self.corpus.vocabulary)
            self.averaging = SyncAveraging(config, self.shared)
        self.evaluator = build_model(config.model, config.data.seq_len, model_seed, self.corpus.vocabulary)
        self.epoch = self.epoch_samples = self.samples = self.tick = 0
        self.curve: List[dict] = []
        self._next_eval = 0
        self.workers: Optional[StepWorkers] = None
        # the order of a round's group: member i reduces span i. hivemind's matchmaking orders groups
        # at random, so which peer reduces which span (and absorbs its rounding) varies; a test
        # replaying a real swarm's rounds sets the order it recorded
        self.group_order: Callable[[int, List[Replica]], List[Replica]] = lambda epoch, members: members

    # -------------------------------------------------------------- the loop
    def run(self) -> SimulationResult:
        started, stopped = time.perf_counter(), False
        workers = min(self.options.workers, self.options.peers)
        self.workers = StepWorkers(self.replicas, self.shared, workers) if workers > 1 else None
        try:
            self._evaluate()
            while self.tick < self.options.steps and self.epoch < (self.options.max_epochs or math.inf):
                raise_if_stop_requested()
                if self.workers is not None and self.shared is not None:
                    self._sync_epoch_in_workers()
                else:
                    self._one_tick()
            if self.shared is None:
                self.averaging.land(self.tick, now=True)  # as a peer at a planned end settles its last round
            if not self.curve or self.curve[-1]["tick"] != self.tick:
                self._evaluate()
        except KeyboardInterrupt:
            stopped = True  # what ran so far is the result
        finally:
            if self.workers is not None:
                self.workers.close()
                self.workers = None
        mode = self.config.averaging.mode
        return SimulationResult(self.options.seed, mode, str(self.config.averaging.compression), self.options.peers,
                                self.tick, self.epoch, self.samples, [r.steps for r in self.replicas], self.curve,
                                [entry.to_dict() for entry in self.averaging.rounds], time.perf_counter() - started,
                                stopped)

    def _present(self) -> List[Replica]:
        tick, options = self.tick, self.options
        return [r for r in self.replicas
                if options.joins.get(r.index, 0) <= tick < options.leaves.get(r.index, options.steps + 1)]

    def _stepping(self, present: List[Replica], tick: int) -> List[Replica]:
        speeds = self.options.speeds
        return [replica for replica in present if speeds is None or _steps_now(speeds[replica.index], tick)]

    def _one_tick(self) -> None:
        present = self._present()
        self._admit_joiners(present)
        stepping = self._stepping(present, self.tick)
        if self.workers is None:
            for replica in stepping:
                replica.step(self.epoch, self.shared)
        else:
            for replica, loss in zip(stepping, self.workers.backward(stepping)):
                if loss is not None:
                    self.workers.install_gradients(replica)
                replica.finish_step(loss, self.epoch, self.shared)
        for replica in stepping:
            self.epoch_samples += replica.batch_size
            self.samples += replica.batch_size
        self.tick += 1
        if self.shared is None:
            self.averaging.land(self.tick)
        if self.epoch_samples >= self.config.target_batch_size:
            self._end_epoch(present)

    def _sync_epoch_in_workers(self) -> None:
        """Mode sync with workers: the ticks up to the epoch's end in one go -- the parameters change only
        there, and which peers step in which tick does not depend on what they compute -- so each worker
        gets one command per epoch rather than one per tick (on a loaded machine every hand-over waits for
        the scheduler). The workers sum each peer's gradients in the order _accumulate does."""
        plan, tick, samples = [], self.tick, self.epoch_samples
        while tick < self.options.steps and samples < self.config.target_batch_size:
            self.tick = tick  # _present reads it
            present = self._present()
            stepping = self._stepping(present, tick)
            plan.append((present, stepping))
            samples += sum(replica.batch_size for replica in stepping)
            tick += 1
        self.tick = tick - len(plan)
        if any(replica.accumulated is not None for _, stepping in plan for replica in stepping):
            for _ in plan:  # a sum left from an earlier epoch: add to it step by step, as _accumulate does
                self._one_tick()
            return
        losses = self.workers.accumulate([stepping for _, stepping in plan])
        for replica, replica_losses in losses.items():
            replica.add_accumulated(replica_losses, self.workers.accumulated(replica))
        for _, stepping in plan:
            for replica in stepping:
                self.epoch_samples += replica.batch_size
                self.samples += replica.batch_size
        self.tick = tick
        if self.epoch_samples >= self.config.target_batch_size:
            self._end_epoch(plan[-1][0])

    def _admit_joiners(self, present: List[Replica]) -> None:
        if self.shared is not None or self.tick == 0:
            return
        for replica in present:
            if self.options.joins.get(replica.index, 0) == self.tick:
                donors = [r for r in present if r is not replica and self.options.joins.get(r.index, 0) < self.tick]
                self.averaging.admit(replica, donors[0] if donors else None, self.epoch)

    def _end_epoch(self, present: List[Replica]) -> None:
        averaged = False
        if self.shared is None:
            if len(present) > 1 and self.averaging.due(self.epoch):
                group = self.group_order(self.epoch + 1, present)
                self.averaging.run_round(group, self.epoch + 1, self.tick, peers_seen=len(present))
                averaged = True
        else:
            averaged = self.averaging.run_round(present, self.epoch, self.tick) is not None
        self.epoch += 1
        self.epoch_samples = 0
        if averaged and self.tick >= self._next_eval:
            self._evaluate()

    def _evaluate(self) -> None:
        """Held-out loss of the swarm's model: mode local's last averaged model, mode sync's parameters."""
        if self.shared is None:
            self.evaluator.load_state_dict(self.replicas[0].trainee.model.state_dict())
            flat, offset = self.averaging.flat_anchor(), 0
            with torch.no_grad():
                for param in self.evaluator.parameters():
                    param.copy_(flat[offset : offset + param.numel()].view_as(param))
                    offset += param.numel()
            model = self.evaluator
        else:
            model = self.shared.model
        loss = heldout_loss(model, self.corpus.heldout, self.config.model.kind, vocabulary=self.corpus.vocabulary)
        recent = [loss for r in self.replicas for loss in r.losses]
        for replica in self.replicas:
            replica.losses.clear()
        self.curve.append(dict(tick=self.tick, epoch=self.epoch, samples=self.samples, heldout_loss=loss,
                               train_loss=sum(recent) / len(recent) if recent else None))
        self._next_eval = self.tick + self.options.eval_every
        if self.on_progress is not None:
            self.on_progress(self.tick, self.epoch, loss)


def simulate(config: RunConfig, options: SimulationOptions, corpus: Optional[Corpus] = None,
             on_progress: Optional[Callable[[int, int, float], None]] = None) -> SimulationResult:
    """Run one simulated swarm (see Simulation)."""
    return Simulation(config, options, corpus, on_progress).run()
