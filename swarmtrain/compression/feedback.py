"""Error feedback and the density warm-up schedule.

Error feedback (a.k.a. memory): whatever a sparsifier does not send stays in a residual that is added
to the next gradient, so no gradient mass is lost, only delayed. The averager in ``averager.py`` keeps
its own shared-memory residual; :class:`ErrorFeedbackSparsifier` is the single-process form of the
same rule, used by tests and benchmarks and usable for local (non-swarm) training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from swarmtrain.compression.selection import SELECTORS


@dataclass(frozen=True)
class DensitySchedule:
    """Density per epoch: geometric interpolation from ``initial`` down to ``target`` over
    ``warmup_epochs`` epochs, then ``target``.

    :param target: the density after the warm-ups, in (0, 1]
    :param initial: the density at the start of the geometric warm-up (None: no warm-up)
    :param warmup_epochs: epochs of the geometric warm-up
    :param dense_epochs: epochs at density 1 before everything else (the 1-bit Adam warm-up)

    Geometric because the useful quantity is the compression ratio 1/rho, which the reference runs
    step by constant factors (1/64 -> 0.004 -> 0.001); a linear ramp would spend almost all warm-up
    epochs near the dense end.
    """

    target: float
    initial: Optional[float] = None
    warmup_epochs: int = 0
    dense_epochs: int = 0  # before all of the above: density 1 (every entry sent) for this many epochs

    def __post_init__(self):
        for name, value in (("target", self.target), ("initial", self.initial)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} density must be in (0, 1], got {value}")
        if self.warmup_epochs < 0 or self.dense_epochs < 0:
            raise ValueError("warmup_epochs and dense_epochs must be >= 0")

    @classmethod
    def for_spec(cls, spec, *, dense_warmup_epochs: int = 0, density_warmup_epochs: int = 0) -> Optional["DensitySchedule"]:
        """A sparse spec's density per epoch from the run config's warm-ups (``averaging.dense_warmup_epochs``
        at density 1, then the geometric warm-up from 1/64 over ``averaging.density_warmup_epochs``);
        None for a dense spec or a constant density."""
        if not spec.is_sparse or not (density_warmup_epochs or dense_warmup_epochs):
            return None
        return cls(spec.density, initial=max(spec.density, 1 / 64), dense_epochs=dense_warmup_epochs,
                   warmup_epochs=density_warmup_epochs)

    def __call__(self, epoch: int) -> float:
        if epoch < self.dense_epochs:
            return 1.0
        epoch -= self.dense_epochs
        if self.initial is None or self.warmup_epochs == 0 or epoch >= self.warmup_epochs:
            return self.target
        progress = max(0, epoch) / self.warmup_epochs
        return math.exp((1.0 - progress) * math.log(self.initial) + progress * math.log(self.target))


class ErrorFeedbackSparsifier:
    """``compress(grad)`` selects from ``grad + residual`` and keeps the unsent rest as the new residual.

    Invariant after every call: ``sent_dense + residual_after == grad + residual_before`` exactly, where
    ``sent_dense`` is the dense form of the returned (indices, values).

    :param numel: length of the flat gradient
    :param method: the selection (gaussiank, topk, randomk) when no `selector` is given
    :param schedule: the density per epoch (give this or `density`)
    :param density: a constant density
    :param selector: a selection function (vector, density) -> indices, instead of `method`'s
    """

    def __init__(self, numel: int, method: str = "gaussiank", schedule: Optional[DensitySchedule] = None,
                 density: Optional[float] = None, selector: Optional[Callable] = None):
        if schedule is None:
            if density is None:
                raise ValueError("give a density or a DensitySchedule")
            schedule = DensitySchedule(density)
        self.schedule = schedule
        self.selector = selector or SELECTORS[method]
        self.residual = torch.zeros(numel)
        self.epoch = 0

    def compress(self, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        corrected = grad.detach().reshape(-1).to(self.residual.dtype) + self.residual
        indices = self.selector(corrected, self.schedule(self.epoch))
        values = corrected[indices]
        corrected[indices] = 0.0
        self.residual = corrected
        return indices, values
