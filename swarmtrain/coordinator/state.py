"""The coordinator's copy of the training state: periodic checkpoints, and resuming a run.

The coordinator loads the state from peers like any late joiner (hivemind's state averager with
the peers' own prefix), so checkpoints cost the swarm one state download each, and the run
survives every peer leaving. On --resume it serves the saved state to the first peers instead.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import hivemind
import torch
from hivemind.optim.state_averager import TrainingStateAverager

from swarmtrain import __version__
from swarmtrain.access.guard import with_access_guard
from swarmtrain.config import RunConfig
from swarmtrain.errors import UserError
from swarmtrain.data import pinned_vocabulary
from swarmtrain.models import build_model
from swarmtrain.signals import children_ignore_interrupts
from swarmtrain.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from swarmtrain.training.optimizers import make_scheduler_factory, make_torch_optimizer_factory

logger = logging.getLogger("swarmtrain.coordinator")


class StateKeeper:
    """The coordinator's state averager: it downloads the swarm's state for checkpoints and, on --resume,
    serves a saved one to the first peers.

    :param config: the run config (the model and optimizer must be the peers')
    :param dht: the coordinator's DHT
    :param resume_from: a checkpoint (directory) to start the swarm from, or None
    :param access: on a token-gated run, the coordinator's LocalAccess (it serves its state to token
      holders only); None on an open run
    """

    def __init__(self, config: RunConfig, dht: hivemind.DHT, resume_from: Optional[str] = None, *, access=None):
        self.config = config
        if config.model is None:  # a split run: the trunk lives on its hosts, the bottoms with the data owners
            raise UserError("--checkpoint-dir / --resume: a split run (privacy.split) has no coordinator checkpoints; "
                            "start the coordinator without them")
        # (the config is the published one: data.vocab_size is the run's tokenizer's)
        self.model = build_model(config.model, config.data.seq_len, config.seed, pinned_vocabulary(config.data))
        self.resumed_epoch = 0
        checkpoint = None
        if resume_from is not None:
            try:
                checkpoint = load_checkpoint(resume_from, run_id=config.run_id)
            except FileNotFoundError:
                raise UserError(f"--resume {resume_from}: no intact checkpoint of run {config.run_id!r} there") from None
            except CheckpointError as error:
                raise UserError(f"--resume {resume_from}: that checkpoint is damaged ({error}); give an intact one, "
                                "or the directory that holds it to use the newest intact one") from None
            if checkpoint.meta.get("run_id") not in (None, config.run_id):
                raise UserError(f"--resume {resume_from}: that checkpoint is of run {checkpoint.meta['run_id']!r}, "
                                f"not {config.run_id!r}")
            self.model.load_state_dict(checkpoint.model_state)
        with children_ignore_interrupts():
            # same prefix, parameters and optimizer as the peers' state averagers (see hivemind.Optimizer)
            # on a token-gated run a resumed coordinator serves its state to token holders only
            self.averager = with_access_guard(TrainingStateAverager, access)(
                dht=dht, prefix=f"{config.run_id}_state_averager",
                optimizer=make_torch_optimizer_factory(config.optimizer), params=self.model.parameters(),
                scheduler=make_scheduler_factory(config.optimizer),
                offload_optimizer=True, custom_gradients=True,
                # serves state only when resuming: otherwise peers are the better donors
                client_mode=checkpoint is None, allow_state_sharing=checkpoint is not None,
                min_matchmaking_time=config.averaging.matchmaking_time,
                request_timeout=config.averaging.request_timeout, start=True,
            )
        if checkpoint is not None:
            # the averager has run one zero-gradient step to create the optimizer state (weight decay
            # moved the weights a little): put the saved weights into its parameters, exactly
            # (with offload_optimizer the optimizer owns copies of the model's parameters: those are served)
            optimized = [p for group in self.averager.optimizer.param_groups for p in group["params"]]
            with torch.no_grad():
                for (name, _), param in zip(self.model.named_parameters(), optimized):
                    param.copy_(checkpoint.model_state[name])
            self.model.load_state_dict(checkpoint.model_state)
            if checkpoint.optimizer_state is not None:
                state = dict(checkpoint.optimizer_state)
                state["state"] = dict(state["state"])
                state["state"].pop("local_epoch", None)
                self.averager.optimizer.load_state_dict(state)
            self.averager.local_epoch = checkpoint.epoch
            self.averager.state_sharing_priority = checkpoint.epoch
            self.resumed_epoch = checkpoint.epoch
            logger.info(f"resumed from {checkpoint.path}: serving the state of epoch {checkpoint.epoch} to peers")
        self.last_saved_epoch = self.resumed_epoch

    def checkpoint(self, directory: str | Path, keep_last: int) -> Optional[Path]:
        """Download the newest state from peers and save it; None when there was nothing new."""
        before = self.averager.local_epoch
        self.averager.load_state_from_peers(timeout=60)
        epoch = self.averager.local_epoch
        if epoch <= self.last_saved_epoch or epoch == before and epoch == 0:
            return None
        path = save_checkpoint(
            directory, epoch, self.model.state_dict(), self.averager.optimizer.state_dict(),
            meta={"run_id": self.config.run_id, "version": __version__, "source": "coordinator"}, keep_last=keep_last,
        )
        self.last_saved_epoch = epoch
        return path

    def shutdown(self) -> None:
        self.averager.shutdown()
