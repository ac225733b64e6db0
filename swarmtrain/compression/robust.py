"""Checks and robust aggregation for the parts a reducer receives in an all-reduce round.

hivemind's reducer trusts every sender: one NaN, or one gradient scaled by 1e6, and every peer of the
group applies garbage. Both averagers of this package (the sparse one and the dense hivemind one)
run every part of a round through :func:`aggregate` once all senders' parts for it are in:

1. validity: a part with non-finite values (or a non-finite / negative weight) is rejected;
2. outliers: with at least ``min_group_for_outliers`` valid non-empty parts, a part whose L2 norm
   exceeds ``max_norm_ratio`` x the median norm of those is scaled down to that bound, and one beyond
   ``reject_factor`` x the bound (garbage: a x1e6 gradient) is rejected. Scaling down bounds a sender's
   pull exactly as a part just under the bound does, which is let through anyway, without failing an
   honest sender's round: one part of an honest mixed-precision peer at ~11x its groupmates' median was
   refused in a CI run. A self-reported weight above
   ``max_weight_ratio`` x the median weight is clamped to it. With fewer parts (a group of two) the
   median says nothing -- the median of two norms is their mean, so a x1e6 part is only ~2x it -- and
   the reducer rejects nothing on norm: every *member* then compares each sender's whole gradient with
   its own over the round's units (verify.small_group_outliers) and does not apply a result that
   averages in one far larger than its own. Whoever is the outlier, an honest member never applies it.
   Not per part: a part is one parameter tensor, and two honest peers' parts of one tensor at the same
   parameters differ by up to ~80x (a LayerNorm bias, one micro-batch each), their whole gradients by
   < 3x (benchmarks/honest_norm_ratios.py); a per-part rule against one's own part refused honest
   rounds of two;
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
from dataclasses import dataclass, field
from typing import Dict, Iterable, Literal, Mapping, Optional, Sequence, Tuple

import torch

AGGREGATIONS = ("mean", "clip", "centered_clip")


@dataclass(frozen=True)
class RobustPolicy:
    """What a reducer does with the parts it receives (the run config's averaging.aggregation and
    averaging.max_norm_ratio; the rest are fixed).

    :param aggregation: mean, clip or centered_clip (see the module docstring)
    :param max_norm_ratio: a part whose norm exceeds this x the group's median is scaled down to it (0: never)
    :param reject_factor: a part beyond this x that bound is rejected, and its sender told
    :param max_weight_ratio: a self-reported weight above this x the median weight is clamped (0: never)
    :param min_group_for_outliers: the norm and weight rules need at least this many valid parts
    :param centered_clip_iterations: iterations of CenteredClip
    """
    aggregation: Literal["mean", "clip", "centered_clip"] = "mean"
    max_norm_ratio: float = 10.0  # 0 disables the outlier rules
    reject_factor: float = 10.0
    max_weight_ratio: float = 4.0  # 0 disables weight clamping
    min_group_for_outliers: int = 3
    centered_clip_iterations: int = 3


@dataclass
class Aggregate:
    """A checked average.

    :param average: the aggregate of the kept parts
    :param total_weight: their effective weights' sum
    :param rejected: index -> why, for the parts left out
    :param coefficients: index -> coefficient of each kept part (see below)
    :param norms: index -> the float32-rounded norm each valid part was judged by
    """

    average: torch.Tensor
    total_weight: float
    rejected: Dict[int, str]  # index of the part -> why
    # index of each averaged part -> its coefficient: average = sum of coefficient x part (up to float32
    # rounding). A checker recomputes the coefficients of mean and clip from norms and weights alone
    # (:func:`plan`); CenteredClip's depend on the parts' geometry and are reported by the reducer
    coefficients: Dict[int, float] = field(default_factory=dict)
    norms: Dict[int, float] = field(default_factory=dict)  # index -> float64 norm of each valid part judged


@dataclass(frozen=True)
class Plan:
    """What a reducer does with the valid parts of one span, decided from their norms and weights only
    (so that every member of the group can recompute it from the numbers the reducer reports).

    :param kept: indices of the parts that are averaged
    :param weights: their effective weights (after the median cap), in the order of ``kept``
    :param rejected: index -> why, for parts left out on norm
    :param coefficients: index -> coefficient of the part in the average, for mean and clip (None for
      centered_clip, whose coefficients come out of its iterations)
    """
    kept: Tuple[int, ...]
    weights: Tuple[float, ...]
    rejected: Dict[int, str]
    coefficients: Optional[Dict[int, float]]

    @property
    def total_weight(self) -> float:
        return float(sum(self.weights))


def _median(values: Sequence[float]) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).median())


def median_rule_applies(norms: Iterable[float], policy: "RobustPolicy") -> bool:
    """Whether the outlier rule can judge these parts by their median: it is on, and enough of them are
    non-empty (empty parts -- a sparse sender that selected nothing in this span -- say nothing about
    scale). Otherwise the members judge on whole gradients (verify.small_group_outliers)."""
    return bool(policy.max_norm_ratio) and sum(norm > 0 for norm in norms) >= policy.min_group_for_outliers


def plan(norms: Mapping[int, float], weights: Mapping[int, float], policy: "RobustPolicy") -> Plan:
    """The outlier rules and the coefficients of mean / clip, on scalars.

    :param norms: index -> L2 norm, for the valid parts with a positive weight (float64 numbers: the
      caller computes them once and reports them, so that checkers reproduce the decision exactly)
    :param weights: index -> weight (already clamped to the run's maximum), for the same parts
    :param policy: the rules
    """
    rejected: Dict[int, str] = {}
    norms = {index: float(norm) for index, norm in norms.items()}
    bound = math.inf  # a kept part's norm counts for at most this much (the median rule's bound)
    if median_rule_applies(norms.values(), policy):
        bound = policy.max_norm_ratio * _median([norm for norm in norms.values() if norm > 0])
        reject_ratio = policy.max_norm_ratio * policy.reject_factor
        for index, norm in list(norms.items()):
            if norm > policy.reject_factor * bound:
                rejected[index] = f"norm {norm:.3g} > {reject_ratio:g} x the group's median"
                del norms[index]
    kept = tuple(sorted(norms))
    kept_weights = [float(weights[index]) for index in kept]
    if policy.max_weight_ratio and len(kept) >= policy.min_group_for_outliers:
        cap = policy.max_weight_ratio * _median(kept_weights)
        kept_weights = [min(weight, cap) for weight in kept_weights]
    total = float(sum(kept_weights))
    coefficients = None
    if policy.aggregation == "mean" or len(kept) == 1:
        coefficients = {index: weight * _shrink(norms[index], bound) / total
                        for index, weight in zip(kept, kept_weights)} if total > 0 else {}
    elif policy.aggregation == "clip" and total > 0:
        tau = min(_median([norms[index] for index in kept]), bound)
        coefficients = {index: weight * _shrink(norms[index], tau) / total for index, weight in zip(kept, kept_weights)}
    return Plan(kept, tuple(kept_weights), rejected, coefficients)


def _shrink(norm: float, bound: float) -> float:
    """The factor that scales a part of this norm down to ``bound`` (1 for a part within it)."""
    return bound / norm if norm > bound else 1.0


def check_parts(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> Tuple[Dict[int, float], Dict[int, str]]:
    """(index -> float64 norm of each valid part with a positive weight, index -> why a part is invalid).

    A zero-weight part (a peer tagging along) is neither judged nor averaged."""
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
        elif weight > 0:
            # rounded to float32: the round's check sends norms as float32, and every member must reach
            # the reducer's decisions from the very numbers it decided on
            norms[index] = float(part.double().norm().float())
    return norms, rejected


def aggregate(parts: Sequence[torch.Tensor], weights: Sequence[float], policy: RobustPolicy) -> Aggregate:
    """Checked (and optionally robust) weighted average of equally shaped float tensors."""
    if not parts:
        raise ValueError("nothing to aggregate")
    shape = parts[0].shape
    norms, rejected = check_parts(parts, weights)
    decided = plan(norms, {index: weights[index] for index in norms}, policy)
    rejected.update(decided.rejected)
    kept = list(decided.kept)
    if not kept or decided.total_weight <= 0:
        return Aggregate(torch.zeros(shape, dtype=torch.float32), 0.0, rejected, {}, norms)
    stacked = torch.stack([parts[index].float() for index in kept]).reshape(len(kept), -1)
    if decided.coefficients is not None:
        coefficients = torch.tensor([decided.coefficients[index] for index in kept], dtype=torch.float32)
        average = (coefficients[:, None] * stacked).sum(0)
        by_index = dict(decided.coefficients)
    else:
        weight_tensor = torch.tensor(decided.weights, dtype=torch.float64)
        norm_tensor = torch.tensor([norms[index] for index in kept], dtype=torch.float64)
        average, mixing = _centered_clip(stacked, weight_tensor, norm_tensor, policy)
        by_index = {index: float(value) for index, value in zip(kept, mixing)}
    return Aggregate(average.reshape(shape), decided.total_weight, rejected, by_index, norms)


def _centered_clip(flat: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor,
                   policy: RobustPolicy) -> Tuple[torch.Tensor, torch.Tensor]:
    """CenteredClip from the clipped mean, also returning the mixing coefficients: every step moves the
    center to a convex combination of itself and the parts, so the result is sum(alpha_i x part_i) with
    alpha_i >= 0 and sum(alpha) <= 1 -- what a checker of the group verifies (verify.py)."""
    total = weights.sum()
    tau = float(norms.median())
    alpha = weights * torch.clamp(tau / norms.clamp_min(1e-30), max=1.0) / total
    center = (alpha.float()[:, None] * flat).sum(0)
    for _ in range(policy.centered_clip_iterations):
        offsets = flat - center
        distances = offsets.double().norm(dim=1)
        tau = float(distances.median())
        if tau == 0:
            break
        beta = weights * torch.clamp(tau / distances.clamp_min(1e-30), max=1.0) / total
        center = center + (beta.float()[:, None] * offsets).sum(0)
        alpha = alpha * (1.0 - beta.sum()) + beta
    return center, alpha
