"""Checks and robust aggregation for the parts a reducer receives in an all-reduce round.

hivemind's reducer trusts every sender: one NaN, or one gradient scaled by 1e6, and every peer of the
group applies garbage. Both averagers of this package (the sparse one and the dense hivemind one)
run every part of a round through :func:`aggregate` once all senders' parts for it are in:

1. validity: a part with non-finite values (or a non-finite / negative weight) is rejected;
2. outliers: with at least ``min_group_for_outliers`` valid non-empty parts, a part whose L2 norm
   exceeds ``max_norm_ratio`` x the median norm of those is rejected (needs a majority to say what
   "normal" is: with two senders nobody can tell which one is off, so nothing is rejected on norm);
   a self-reported weight above ``max_weight_ratio`` x the median weight is clamped to it;
3. aggregation of what is left: ``mean`` (hivemind's weighted mean), ``clip`` (each part clipped to
   the median norm first: bounds what any one sender can move the average) or ``centered_clip``
   (Karimireddy et al. 2021, as used by Gorbunov et al. 2022 for collaborative training: iterate
   v <- v + Σ w_i·(x_i - v)·min(1, τ/‖x_i - v‖) / Σ w_i from the clipped mean, τ the median distance).

A rejected sender is told so by the reducer (its round fails, so it keeps its own gradient and error
feedback residual and re-synchronises) and the round completes for the others. Norm rules work per
part: the reducer only ever sees its own span of the flat gradient, but an outsized gradient is
outsized in every span.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Literal, Sequence

import torch

AGGREGATIONS = ("mean", "clip", "centered_clip")


@dataclass(frozen=True)
class RobustPolicy:
    """What a reducer does with the parts it receives (the run config's averaging.aggregation and
    averaging.max_norm_ratio; the rest are fixed).

    :param aggregation: mean, clip or centered_clip (see the module docstring)
    :param max_norm_ratio: a part whose norm exceeds this x the group's median is rejected (0: never)
    :param max_weight_ratio: a self-reported weight above this x the median weight is clamped (0: never)
    :param min_group_for_outliers: the norm and weight rules need at least this many valid parts
    :param centered_clip_iterations: iterations of CenteredClip
    """
    aggregation: Literal["mean", "clip", "centered_clip"] = "mean"
    max_norm_ratio: float = 10.0  # 0 disables outlier rejection
    max_weight_ratio: float = 4.0  # 0 disables weight clamping
    min_group_for_outliers: int = 3
    centered_clip_iterations: int = 3


@dataclass
class Aggregate:
    average: torch.Tensor
    total_weight: float
    rejected: Dict[int, str]  # index of the part -> why


def _median(values: Sequence[float]) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).median())


def aggregate(parts: Sequence[torch.Tensor], weights: Sequence[float], policy: RobustPolicy) -> Aggregate:
    """Checked (and optionally robust) weighted average of equally shaped float tensors."""
    if not parts:
        raise ValueError("nothing to aggregate")
    shape = parts[0].shape
    rejected: Dict[int, str] = {}
    norms: Dict[int, float] = {}
    for index, (part, weight) in enumerate(zip(parts, weights)):
        if part.shape != shape:
            rejected[index] = f"shape {tuple(part.shape)} != {tuple(shape)}"
        elif not math.isfinite(weight) or weight < 0:
            rejected[index] = f"invalid weight {weight}"
        elif not bool(torch.isfinite(part).all()):
            rejected[index] = "non-finite values"
        elif weight > 0:  # a zero-weight part (a peer tagging along) is not averaged: nothing to judge
            norms[index] = float(part.double().norm())
    # empty parts (a sparse sender that selected nothing in this span) say nothing about scale
    nonzero = [norm for norm in norms.values() if norm > 0]
    if policy.max_norm_ratio and len(nonzero) >= policy.min_group_for_outliers:
        bound = policy.max_norm_ratio * _median(nonzero)
        for index, norm in list(norms.items()):
            if norm > bound:
                rejected[index] = f"norm {norm:.3g} > {policy.max_norm_ratio:g} x the group's median"
                del norms[index]
    kept = list(norms)
    if not kept:
        return Aggregate(torch.zeros(shape, dtype=torch.float32), 0.0, rejected)
    kept_weights = [float(weights[index]) for index in kept]
    if policy.max_weight_ratio and len(kept) >= policy.min_group_for_outliers:
        cap = policy.max_weight_ratio * _median(kept_weights)
        kept_weights = [min(weight, cap) for weight in kept_weights]
    stacked = torch.stack([parts[index].float() for index in kept])
    weight_tensor = torch.tensor(kept_weights, dtype=torch.float32)
    total_weight = float(weight_tensor.sum())
    if policy.aggregation == "mean" or len(kept) == 1:
        average = _weighted_mean(stacked, weight_tensor)
    else:
        average = _robust_mean(stacked, weight_tensor, policy)
    return Aggregate(average.reshape(shape), total_weight, rejected)


def _weighted_mean(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    flat = stacked.reshape(len(stacked), -1)
    return (weights[:, None] * flat).sum(0) / weights.sum()


def _clip_to(vectors: torch.Tensor, tau: float) -> torch.Tensor:
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors * torch.clamp(tau / norms.clamp_min(1e-30), max=1.0)


def _robust_mean(stacked: torch.Tensor, weights: torch.Tensor, policy: RobustPolicy) -> torch.Tensor:
    flat = stacked.reshape(len(stacked), -1)
    tau = float(flat.norm(dim=1).median())
    clipped_mean = _weighted_mean(_clip_to(flat, tau), weights)
    if policy.aggregation == "clip":
        return clipped_mean
    center = clipped_mean
    for _ in range(policy.centered_clip_iterations):
        offsets = flat - center
        tau = float(offsets.norm(dim=1).median())
        if tau == 0:
            break
        center = center + _weighted_mean(_clip_to(offsets, tau), weights)
    return center
