"""The simulated peers: each holds the run's model, inner optimizer and learning-rate schedule, built by
the functions the swarm's peers use (models.build_model, training.optimizers), and its own data.

What a peer does per local step is the trainer's step (peer/trainer.py: loss, backward, gradient
clipping) followed by what hivemind.Optimizer does with it:

* mode local: the torch optimizer steps at once, then hivemind brings the scheduler up to the peer's
  epoch (``TrainingStateAverager._update_scheduler`` runs after the optimizer step, so the first step
  of an epoch still uses the previous epoch's learning rate -- the simulator keeps that lag);
* mode sync: the gradient is accumulated (hivemind's GradientAverager: summed, divided by the number of
  steps at the round) and the optimizer steps once per epoch with the swarm's average.

hivemind also runs one optimizer step with zero gradients before building the scheduler
(``initialize_optimizer_state_``: with AdamW that step applies weight decay at the base learning rate
and counts in the step counter); the simulator calls the same function.

Each replica is an ordinary model, so its numbers are the trainer's exactly; the replicas' backward
passes run one after another in this process, or split between worker processes (workers.py: the
same floats). Every replica draws its dropout masks from its own generator, as every real peer draws
from its own process's, so the draws do not depend on which replicas step in a tick or where.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import List, Optional

import torch
from hivemind.optim.state_averager import initialize_optimizer_state_

from swarmtrain.config import RunConfig
from swarmtrain.data import BYTE_VOCABULARY, Corpus, Vocabulary, peer_batches
from swarmtrain.models import build_model, compute_loss
from swarmtrain.training.optimizers import make_scheduler_factory, make_torch_optimizer_factory


def sync_scheduler(scheduler, epoch: int) -> None:
    """hivemind's TrainingStateAverager._update_scheduler: step the scheduler up to `epoch`."""
    with warnings.catch_warnings():
        # a joiner's scheduler is brought to the swarm's epoch before its first step: torch warns about the order
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        while scheduler._step_count <= epoch:
            scheduler.step()


class Trainee:
    """A model with the run's optimizer and schedule, as a swarm peer builds them.

    :param config: the run config
    :param model_seed: seed of the model's initial weights (the same for every peer of a run)
    :param vocabulary: the run's tokenizer's (sizes the model; masked models mask with it)
    """

    def __init__(self, config: RunConfig, model_seed: int, vocabulary: Vocabulary = BYTE_VOCABULARY):
        self.config, self.vocabulary = config, vocabulary
        self.model = build_model(config.model, config.data.seq_len, model_seed, vocabulary)
        self.model.train()
        self.parameters = list(self.model.parameters())
        self.optimizer = make_torch_optimizer_factory(config.optimizer)(self.parameters)
        initialize_optimizer_state_(self.optimizer)  # as hivemind does before it builds the scheduler
        self.scheduler = make_scheduler_factory(config.optimizer)(self.optimizer)

    def backward(self, batch: torch.Tensor, mask_generator: torch.Generator) -> Optional[float]:
        """The trainer's step up to the swarm optimizer: loss, backward, clipping. None: a non-finite loss
        (the trainer skips the batch)."""
        loss = compute_loss(self.model, batch, self.config.model.kind, mask_generator, self.vocabulary)
        if not torch.isfinite(loss):
            self.optimizer.zero_grad()
            return None
        loss.backward()
        if self.config.optimizer.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.optimizer.max_grad_norm)
        return loss.item()

    def flat_parameters(self) -> torch.Tensor:
        return torch.cat([param.detach().reshape(-1).float() for param in self.parameters])

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for param in self.parameters:
            param.copy_(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()


class Replica:
    """One simulated peer: a Trainee (mode local; sync shares one), its batches and its state in the swarm.

    :param index: the peer's position in the simulation
    :param corpus: the data it reads (the run's, or its own shard of it)
    :param batch_size: samples per local step
    :param data_seed: seeds its batch order and its masking generator (the trainer seeds both with
      the peer's identity)
    :param trainee: its model and optimizer (None in mode sync, where the peers share one)
    """

    def __init__(self, index: int, corpus: Corpus, batch_size: int, data_seed: int, num_shards: int,
                 trainee: Optional[Trainee] = None):
        self.index, self.batch_size, self.trainee = index, batch_size, trainee
        self.batches = peer_batches(corpus, num_shards, batch_size, data_seed)
        self.mask_generator = torch.Generator().manual_seed(data_seed)
        # dropout draws come from torch's global generator: each replica swaps its own state in (backward)
        self.dropout_state = torch.Generator().manual_seed(_dropout_seed(data_seed)).get_state()
        self.steps = 0
        self.samples_since_anchor = 0  # mode local: the weight of its next delta
        self.steps_since_anchor = 0  # mode local: the local steps it reports (schedule steps:H)
        self.fresh = False  # mode local: joined (downloaded the state) since the last round
        self.residual: Optional[torch.Tensor] = None  # sparse compression: its error-feedback residual
        self.accumulated: Optional[List[torch.Tensor]] = None  # mode sync: gradients summed this epoch
        self.accumulated_steps = 0
        self.accumulated_samples = 0
        self.losses: List[float] = []  # training losses since the last report

    def next_batch(self) -> torch.Tensor:
        return next(self.batches)

    def backward(self, trainee: Trainee, batch: torch.Tensor) -> Optional[float]:
        """The trainer's step on `trainee` (its own, or mode sync's shared one), with this replica's
        dropout and masking draws; the gradients are left in the trainee's ``.grad``."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.dropout_state)
        try:
            return trainee.backward(batch, self.mask_generator)
        finally:
            self.dropout_state = torch.get_rng_state()
            torch.set_rng_state(outer)

    def step(self, epoch: int, shared: Optional[Trainee]) -> None:
        """One local step in this process: the backward, then what the swarm optimizer does with it."""
        loss = self.backward(shared if shared is not None else self.trainee, self.next_batch())
        self.finish_step(loss, epoch, shared)

    def finish_step(self, loss: Optional[float], epoch: int, shared: Optional[Trainee]) -> None:
        """After the backward (`loss` None: non-finite, no gradient): mode local's optimizer step, or mode
        sync's accumulation into this peer's sum."""
        if loss is None:
            return
        if shared is None:
            self._local_step(loss, epoch)
        else:
            self._accumulate(loss, shared)

    def _local_step(self, loss: float, epoch: int) -> None:
        """Mode local: the torch optimizer steps at once, then hivemind brings the scheduler to the epoch."""
        trainee = self.trainee
        trainee.optimizer.step()
        sync_scheduler(trainee.scheduler, epoch)
        trainee.optimizer.zero_grad()
        self._count(loss)
        self.samples_since_anchor += self.batch_size
        self.steps_since_anchor += 1

    def _accumulate(self, loss: float, shared: Trainee) -> None:
        """Mode sync: the gradient at the swarm's parameters, added to this peer's sum."""
        with torch.no_grad():
            grads = [param.grad.detach().clone() for param in shared.parameters]
            if self.accumulated is None:
                self.accumulated = grads
            else:
                for total, grad in zip(self.accumulated, grads):
                    total.add_(grad)
        shared.optimizer.zero_grad()
        self.accumulated_steps += 1
        self.accumulated_samples += self.batch_size
        self._count(loss)

    def add_accumulated(self, losses: List[Optional[float]], summed: Optional[List[torch.Tensor]]) -> None:
        """Mode sync: the steps a worker took for this peer (their losses, None: non-finite) and the sum
        of their gradients (None: no finite step), into a sum that was empty."""
        assert self.accumulated is None, "a worker's sum is added to an empty one only"
        for loss in losses:
            if loss is not None:
                self.accumulated_steps += 1
                self.accumulated_samples += self.batch_size
                self._count(loss)
        if summed is not None:
            self.accumulated = [tensor.clone() for tensor in summed]

    def take_accumulated(self) -> Optional[torch.Tensor]:
        """Mode sync, at the round: the mean gradient of this epoch's steps (flat), and a reset."""
        if self.accumulated is None:
            return None
        flat = torch.cat([grad.reshape(-1) for grad in self.accumulated]) / self.accumulated_steps
        self.accumulated, self.accumulated_steps = None, 0
        return flat

    def _count(self, loss: float) -> None:
        self.steps += 1
        self.losses.append(loss)


def _dropout_seed(data_seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dropout-{data_seed}".encode()).digest()[:8], "little")
