"""The torch optimizer and learning-rate schedule of a run, from its config: the same on every peer
and on the coordinator (which builds a state averager of the same shape to checkpoint the run)."""
from __future__ import annotations

from functools import partial

import torch
import transformers

from swarmtrain.config import OptimizerConfig


def make_torch_optimizer_factory(config: OptimizerConfig):
    """LAMB (the DeDLOC/sahajBERT choice), AdamW, or AdamW with a frozen variance (adamw_frozen, for
    sparse averaging); bitsandbytes 8-bit state when asked."""

    def create(params):
        common = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
        if config.name == "adamw_frozen":
            from swarmtrain.training.frozen_adam import FrozenVarianceAdamW

            # hivemind initialises the optimizer state with one zero-gradient step (state_averager.
            # initialize_optimizer_state_) and it counts in the step counter: +1 so that exactly
            # freeze_variance_after epochs of real gradients update the variance
            return FrozenVarianceAdamW(params, **common, freeze_variance_after=config.freeze_variance_after + 1)
        if config.name == "lamb" or config.eight_bit:
            import bitsandbytes as bnb  # imported only when used: its import is slow and chatty

            cls = {
                ("lamb", False): bnb.optim.LAMB,
                ("lamb", True): bnb.optim.LAMB8bit,
                ("adamw", True): bnb.optim.AdamW8bit,
            }[config.name, config.eight_bit]
            return cls(params, **common)
        return torch.optim.AdamW(params, **common)

    return create


def make_scheduler_factory(config: OptimizerConfig):
    # hivemind steps the scheduler once per global epoch, so warm-up and decay count epochs
    return partial(
        transformers.get_linear_schedule_with_warmup,
        num_warmup_steps=config.warmup_epochs,
        num_training_steps=config.total_epochs,
    )


def lr_multiplier(epoch: int, warmup_epochs: int, total_epochs: int) -> float:
    """The factor make_scheduler_factory's schedule applies at `epoch` (transformers'
    get_linear_schedule_with_warmup, stepped once per epoch), for code that plans ahead with it."""
    if epoch < warmup_epochs:
        return float(epoch) / float(max(1, warmup_epochs))
    return max(0.0, float(total_epochs - epoch) / float(max(1, total_epochs - warmup_epochs)))
