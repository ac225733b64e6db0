"""When peers in `averaging.mode: local` average: the schedules (`constant:H`, `adaptive`) and the
group-agreement rules, as pure functions (no hivemind, no processes) so that they can be tested alone.

Every member of an averaging group evaluates the same functions on the same inputs -- the records
all members gathered in the round (:class:`MemberRecord`) -- so all of them agree on the next
averaging point without any extra message.

Adaptive rule (ADPSGD's principle: the spread of the peers' parameters is what local steps cost;
under a budget of rounds, average often while that spread grows fast and rarely when it grows
slowly). Let v(t) be the rate (per epoch) at which the peers' parameter variance grows between two
averaging points. Over a period of H epochs the variance climbs from 0 to about v·H, so the period
costs about v·H²/2 (variance integrated over time). Minimising the total cost Σ v_k·H_k²/2 for a
fixed number of rounds over the remaining epochs gives H(t) ∝ 1/sqrt(v(t)).

* Measuring v: each member gathers a count-sketch (a fixed random ±1 hashing of its model delta
  into SKETCH_SIZE buckets, the same on every peer) of its delta since the last averaging point.
  Sketches are linear and preserve squared norms in expectation, so the weighted spread of the
  gathered sketches estimates Σ w_i ||Δ_i − Δ̄||² / Σ w_i, the parameter variance across the group,
  and every member computes the same number from the same bytes.
* Forecasting v: optimizer updates (Adam, LAMB) are about one learning rate per step, so the
  variance grows with the learning rate -- but not exactly like lr²: as the loss falls the steps
  get noisier and the peers spread more per unit of lr² (measured on the tiny run: v fell only 2x
  while lr² fell 12x). So the model is v = κ · (lr²)^s, fitted to the rounds so far: each round
  adds the point (log of the mean lr² over its period, log v), with exponentially decaying weights,
  and the least-squares slope s is shrunk toward a prior 1/2 (v ∝ lr) and kept in [0, 1]; κ_ref is
  the fitted level. lr comes from the run's warm-up + linear decay schedule, known to every peer.
* The period: spending the remaining budget B of rounds over the remaining epochs up to
  `optimizer.total_epochs` with H(t) ∝ 1/sqrt(v(t)) ∝ lr(t)^-s (the density of rounds kept between
  1/max_period and 1/min_period, see plan_period) gives H_plan. The current measurement then
  corrects it: H = H_plan · sqrt(κ_ref / κ_now), the factor kept within [2/3, 3/2]. So the period
  lengthens while the measured divergence stays below its fitted level (and as the learning rate
  decays) and shortens when the divergence grows, and the budget is self-correcting (rounds spent
  early leave longer periods later). H is rounded and kept within [min_period, max_period]; the
  last budgeted round is planned at `total_epochs` itself so that the run ends on an averaged model.
* The tail is not starved: early rounds may only be spent while the rounds left can still cover
  the rest of the run with periods of at most 1.25x the even period (total_epochs / budget).
  Measured: front-loading that left a last period twice the constant one cost the adaptive run its
  lead -- the final loss is taken there, and late averaging is what removes the peers' spread.
* A peer left out of a round (its group formed without it, or it was too slow) sees the others go
  past the averaging point and downloads the state; a peer whose round failed otherwise retries at
  the next epoch until one succeeds, so it meets the others at their next point, whatever that is.
  Only such retries can exceed the budget.
"""
from __future__ import annotations

import math
import statistics
import struct
from dataclasses import dataclass, replace
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from swarmtrain.config import Schedule
from swarmtrain.training.fingerprint import fingerprints_match
from swarmtrain.training.optimizers import lr_multiplier

RECORD_TAG = "lsgd3"  # the first field of a gathered record; another version is ignored
SKETCH_SIZE = 128
SKETCH_SEED = 20240611
SKETCH_CHUNK = 1 << 20
FINGERPRINT_SIZE = 32  # positions of the last averaged model each member gathers
FINGERPRINT_SEED = 7
FIT_DECAY = 0.8  # weight of a round in the divergence fit drops by this factor with every newer round
PRIOR_SLOPE, PRIOR_WEIGHT = 0.5, 2.0  # v ∝ (lr²)^s: prior s = 1/2 (v ∝ lr), worth two rounds
MAX_CORRECTION = 1.5  # the measurement moves the planned period by at most this factor either way
TAIL_GUARD = 1.25  # the rounds kept for the end of the run average at most this x the even period
# ------------------------------------------------------------------------------------------------
# what each member gathers
# ------------------------------------------------------------------------------------------------


def count_sketch(flat: torch.Tensor, size: int = SKETCH_SIZE, seed: int = SKETCH_SEED) -> torch.Tensor:
    """A fixed linear map R^d -> R^size with E||S x||² = ||x||² (each coordinate hashed to one bucket
    with a random sign). The hash is regenerated chunk by chunk from a fixed seed, the same on every
    peer, so nothing of size d is kept."""
    flat = flat.detach().reshape(-1).to(torch.float64)
    out = torch.zeros(size, dtype=torch.float64)
    generator = torch.Generator()
    for chunk_index, start in enumerate(range(0, flat.numel(), SKETCH_CHUNK)):
        values = flat[start : start + SKETCH_CHUNK]
        generator.manual_seed(seed + chunk_index)
        buckets = torch.randint(size, (values.numel(),), generator=generator)
        signs = torch.randint(2, (values.numel(),), generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
        out.index_add_(0, buckets, values * signs)
    return out


@dataclass(frozen=True)
class MemberRecord:
    """What one member gathers in a local-mode averaging round."""

    round_epoch: int  # the epoch at which this member runs the round
    anchor_epoch: int  # the epoch of the last averaged model this member holds
    rounds_done: int  # successful averaging rounds of the swarm so far, as this member knows it
    fit: Tuple[float, ...]  # the divergence fit's weighted sums (n, Σx, Σy, Σxx, Σxy), see decide_after_round
    anchor_fingerprint: Tuple[float, ...]  # its last averaged model at FINGERPRINT positions
    sketch: Tuple[float, ...]  # count-sketch of its delta since that model (fp16 on the wire)
    weight: float  # samples it trained on since that model
    peers_seen: int  # peers its progress tracker sees (a group smaller than this is partial)
    local_steps: int = 0  # optimizer steps it took since that model (0 for a member tagging along)

    def to_wire(self) -> list:
        sketch = torch.tensor(self.sketch, dtype=torch.float64)
        scale = float(sketch.abs().max()) if len(self.sketch) else 0.0
        scaled = (sketch / scale) if scale > 0 else sketch
        return [RECORD_TAG, int(self.round_epoch), int(self.anchor_epoch), int(self.rounds_done),
                struct.pack("<5d", *self.fit),
                struct.pack(f"<{len(self.anchor_fingerprint)}f", *self.anchor_fingerprint),
                scaled.to(torch.float16).numpy().tobytes(), scale, float(self.weight), int(self.peers_seen),
                int(self.local_steps)]

    @classmethod
    def from_wire(cls, data) -> Optional["MemberRecord"]:
        """None for anything that is not a well-formed record of this version (never raises)."""
        try:
            if not isinstance(data, (list, tuple)) or len(data) != 11 or data[0] != RECORD_TAG:
                return None
            _, round_epoch, anchor_epoch, rounds_done, fit_bytes, fingerprint_bytes, sketch_bytes, scale, \
                weight, peers_seen, local_steps = data
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                       for x in (round_epoch, anchor_epoch, rounds_done, peers_seen, local_steps)):
                return None
            if not isinstance(fit_bytes, bytes) or len(fit_bytes) != 40:
                return None
            fit = struct.unpack("<5d", fit_bytes)
            if not all(map(math.isfinite, fit)) or fit[0] < 0:
                return None
            if not isinstance(fingerprint_bytes, bytes) or len(fingerprint_bytes) != 4 * FINGERPRINT_SIZE:
                return None
            if not isinstance(sketch_bytes, bytes) or len(sketch_bytes) != 2 * SKETCH_SIZE:
                return None
            scale, weight = float(scale), float(weight)
            if not (math.isfinite(scale) and scale >= 0 and math.isfinite(weight) and weight >= 0):
                return None
            fingerprint_values = struct.unpack(f"<{FINGERPRINT_SIZE}f", fingerprint_bytes)
            sketch = torch.frombuffer(bytearray(sketch_bytes), dtype=torch.float16).to(torch.float64) * scale
            if not (all(map(math.isfinite, fingerprint_values)) and bool(torch.isfinite(sketch).all())):
                return None
            return cls(round_epoch, anchor_epoch, rounds_done, fit, tuple(fingerprint_values),
                       tuple(sketch.tolist()), weight, peers_seen, local_steps)
        except Exception:
            return None


def parse_records(gathered: Dict[Hashable, object]) -> Dict[Hashable, MemberRecord]:
    records = {}
    for peer, data in gathered.items():
        record = MemberRecord.from_wire(data)
        if record is not None:
            records[peer] = record
    return records


def _sort_key(peer) -> bytes:
    return peer.to_bytes() if hasattr(peer, "to_bytes") else str(peer).encode()


def reference_member(records: Dict[Hashable, MemberRecord], tolerance: float) -> Optional[Hashable]:
    """The member whose last averaged model the group holds: the anchor most members match; ties go
    to the newer averaged model (anchor_epoch: a member that missed rounds holds an older one), then
    to the longer history (rounds_done), then to the larger peer ID -- the same answer on every
    member."""
    if not records:
        return None

    def standing(peer):
        support = sum(fingerprints_match(records[peer].anchor_fingerprint, other.anchor_fingerprint, tolerance)
                      for other in records.values())
        return support, records[peer].anchor_epoch, records[peer].rounds_done, _sort_key(peer)

    return max(records, key=standing)


def in_step_with(records: Dict[Hashable, MemberRecord], reference, tolerance: float) -> List[Hashable]:
    """Members holding the reference's averaged model: their deltas are from the same origin."""
    anchor = records[reference].anchor_fingerprint
    return [peer for peer, record in records.items()
            if fingerprints_match(record.anchor_fingerprint, anchor, tolerance)]


def sketch_divergence(records: Sequence[MemberRecord]) -> Optional[Tuple[float, float]]:
    """(weighted variance of the members' deltas, squared norm of their weighted mean), estimated from
    the sketches; None with fewer than two contributing members."""
    contributing = [record for record in records if record.weight > 0]
    if len(contributing) < 2:
        return None
    sketches = [record.sketch for record in contributing]
    weights = [record.weight for record in contributing]
    total = math.fsum(weights)
    mean = [math.fsum(w * s[j] for w, s in zip(weights, sketches)) / total for j in range(len(sketches[0]))]
    variance = math.fsum(w * math.fsum((s[j] - mean[j]) ** 2 for j in range(len(mean)))
                         for w, s in zip(weights, sketches)) / total
    return variance, math.fsum(m * m for m in mean)


# ------------------------------------------------------------------------------------------------
# the controller
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerSettings:
    schedule: Schedule
    total_epochs: int  # the horizon of the budget: the learning rate reaches zero here
    warmup_epochs: int = 0
    round_budget: int = 1
    min_period: int = 1
    max_period: int = 32

    @classmethod
    def from_config(cls, config) -> "ControllerSettings":
        averaging, optimizer = config.averaging, config.optimizer
        budget = averaging.resolved_round_budget(optimizer.total_epochs)
        return cls(averaging.schedule, optimizer.total_epochs, optimizer.warmup_epochs, budget,
                   averaging.min_period, averaging.max_period)

    def lr(self, epoch: int) -> float:
        return lr_multiplier(epoch, self.warmup_epochs, self.total_epochs)


@dataclass(frozen=True)
class ControllerState:
    next_epoch: int  # the next averaging point
    rounds_done: int = 0
    anchor_epoch: int = 0
    fit: Tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict:
        return dict(next_epoch=self.next_epoch, rounds_done=self.rounds_done, anchor_epoch=self.anchor_epoch,
                    fit=list(self.fit))

    @classmethod
    def from_dict(cls, data) -> Optional["ControllerState"]:
        try:
            fit = tuple(float(x) for x in data.get("fit", (0.0,) * 5))
            state = cls(int(data["next_epoch"]), int(data["rounds_done"]), int(data["anchor_epoch"]), fit)
            ok = len(fit) == 5 and all(map(math.isfinite, fit)) and state.next_epoch >= 0 and state.rounds_done >= 0
            return state if ok else None
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


def first_round_epoch(settings: ControllerSettings, start_epoch: int = 0) -> int:
    """The first averaging point of a run (or after a peer lost track of the swarm's plan)."""
    if settings.schedule.kind == "constant":
        period = settings.schedule.period
        return (start_epoch // period + 1) * period
    if settings.schedule.kind == "steps":
        # the first round measures how many local steps an epoch holds for this swarm
        return start_epoch + 1
    # adaptive: where an even spread of the budget would put it (earlier, the swarm is still finding
    # itself: groups are partial and rounds fail, wasting budget), after epochs that moved the
    # parameters at all
    even = int(round(settings.total_epochs / max(1, settings.round_budget)))
    epoch = start_epoch + max(settings.min_period, min(settings.max_period, even))
    while epoch < settings.total_epochs and _lr_squared_sum(settings, start_epoch, epoch) <= 0:
        epoch += 1
    return epoch


def _lr_squared_sum(settings: ControllerSettings, start: int, end: int) -> float:
    return math.fsum(settings.lr(epoch) ** 2 for epoch in range(start, end))


@dataclass(frozen=True)
class RoundDecision:
    state: ControllerState  # everyone's state after the round
    period: int  # next_epoch - round epoch
    kappa: Optional[float] = None  # this round's measured divergence level v / (lr²)^s (adaptive)
    relative_divergence: Optional[float] = None  # variance / ||mean delta||², for logs and benchmarks
    reason: str = ""
    correction: float = 1.0  # sqrt(κ_ref / κ), clamped: < 1 shortened the period, > 1 lengthened it
    exponent: float = PRIOR_SLOPE  # the fitted s of v ∝ (lr²)^s


def decide_after_round(settings: ControllerSettings, reference: MemberRecord, members: Sequence[MemberRecord],
                       group_size: int) -> RoundDecision:
    """The next averaging point after a successful round, from data every member holds identically:
    the reference member's record (the group's history) and the records of the members in step."""
    epoch, rounds_done = reference.round_epoch, reference.rounds_done + 1
    peers_seen = max(record.peers_seen for record in members) if members else 0
    partial = group_size < peers_seen
    measured = sketch_divergence(members)
    relative = None
    if measured is not None and measured[1] > 0:
        relative = measured[0] / measured[1]

    if settings.schedule.kind == "constant":
        period = settings.schedule.period
        next_epoch = (epoch // period + 1) * period
        state = ControllerState(next_epoch, rounds_done, epoch, reference.fit)
        return RoundDecision(state, next_epoch - epoch, None, relative, "constant")
    if settings.schedule.kind == "steps":
        period, reason = period_for_local_steps(settings.schedule.period, epoch - reference.anchor_epoch, members,
                                                settings.max_period)
        state = ControllerState(epoch + period, rounds_done, epoch, reference.fit)
        return RoundDecision(state, period, None, relative, reason)

    fit, kappa, correction = reference.fit, None, 1.0
    periods = epoch - reference.anchor_epoch
    lr_squared = _lr_squared_sum(settings, reference.anchor_epoch, epoch) / max(1, periods)
    if measured is not None and measured[0] > 0 and lr_squared > 0 and periods > 0:
        x, y = math.log(lr_squared), math.log(measured[0] / periods)  # v: variance growth per epoch
        fit = tuple(FIT_DECAY * value for value in fit)
        fit = (fit[0] + 1, fit[1] + x, fit[2] + y, fit[3] + x * x, fit[4] + x * y)
        slope, level = fitted_divergence(fit)
        log_kappa = y - slope * x
        kappa = math.exp(log_kappa)
        correction = min(MAX_CORRECTION, max(1.0 / MAX_CORRECTION, math.exp(0.5 * (level - log_kappa))))
    slope, _ = fitted_divergence(fit)

    period, reason = plan_period(settings, epoch, rounds_done, correction, slope)
    if partial:  # the peers left out find the others past this point and download the state
        reason += f" (group of {group_size} < {peers_seen} peers seen)"
    state = ControllerState(epoch + period, rounds_done, epoch, fit)
    return RoundDecision(state, period, kappa, relative, reason, correction, slope)


def period_for_local_steps(steps: int, epochs: int, members: Sequence[MemberRecord],
                           max_period: int) -> Tuple[int, str]:
    """Epochs until the next round so that a typical member takes about `steps` local steps (``steps:H``).

    An epoch is a fixed number of samples for the whole swarm, so the local steps it holds for each peer
    fall as peers join (and differ with each peer's speed): H local steps between rounds -- what the
    recipe's measurements are in -- is H / (steps per epoch) epochs, re-measured at every round. The
    rate is the median member's over the epochs since the group's last averaged model (members in step
    share it), so one very fast or very slow peer does not set it; every member computes it from the
    same gathered records. Kept within [1, max_period]; the last period stands when nothing was measured."""
    rates = [record.local_steps / epochs for record in members if record.local_steps > 0] if epochs > 0 else []
    if not rates:
        return max(1, min(epochs, max_period)), f"steps:{steps}, no steps measured: period kept"
    rate = statistics.median(rates)
    period = max(1, min(max_period, int(round(steps / rate))))
    return period, f"steps:{steps} at {rate:.2f} local steps per epoch"


def fitted_divergence(fit: Sequence[float]) -> Tuple[float, Optional[float]]:
    """(s, log κ_ref) of v = κ·(lr²)^s from the weighted sums of (x = log lr², y = log v)."""
    n, sx, sy, sxx, sxy = fit
    if n <= 0:
        return PRIOR_SLOPE, None
    mean_x, mean_y = sx / n, sy / n
    spread = sxx / n - mean_x * mean_x
    if spread > 1e-4:
        slope = (n * (sxy / n - mean_x * mean_y) / spread + PRIOR_WEIGHT * PRIOR_SLOPE) / (n + PRIOR_WEIGHT)
    else:
        slope = PRIOR_SLOPE
    slope = min(1.0, max(0.0, slope))
    return slope, mean_y - slope * mean_x


def plan_period(settings: ControllerSettings, epoch: int, rounds_done: int, correction: float = 1.0,
                exponent: float = 1.0) -> Tuple[int, str]:
    """Epochs until the next averaging point (adaptive), given `rounds_done` rounds spent.

    The remaining rounds are spread over the remaining epochs with a density proportional to
    lr^exponent (H ∝ 1/sqrt(v), v ∝ (lr²)^exponent), but never sparser than one round per
    max_period epochs nor denser than one per min_period: the density is
    min(1/min_period, max(lr(e)^exponent / c, 1/max_period)) with c chosen so that it sums to the
    rounds left."""
    horizon, remaining = settings.total_epochs, settings.round_budget - rounds_done
    if epoch >= horizon:
        return settings.max_period, "past optimizer.total_epochs"
    if remaining <= 1:
        # the last budgeted round (or one over, after retries) ends the run on an averaged model;
        # max_period always holds (the budget is checked to allow it, see check_round_budget)
        return min(horizon - epoch, settings.max_period), "last round of the budget, at total_epochs"
    lrs = [settings.lr(e) ** exponent for e in range(epoch, horizon)]
    low, high = 1.0 / settings.max_period, 1.0 / settings.min_period

    def rounds_for(scale: float) -> float:
        return math.fsum(min(high, max(lr / scale, low)) for lr in lrs)

    if rounds_for(1e30) >= remaining:  # even the longest periods need more rounds than are left
        planned = (horizon - epoch) / remaining
    elif rounds_for(1e-30) <= remaining:
        planned = float(settings.min_period)
    else:
        lo, hi = -69.0, 69.0  # bisection on log(scale)
        for _ in range(100):
            middle = (lo + hi) / 2
            lo, hi = (middle, hi) if rounds_for(math.exp(middle)) > remaining else (lo, middle)
        density = min(high, max(lrs[0] / math.exp(hi), low))
        planned = 1.0 / density
    period = int(round(planned * correction))
    # the tail is not starved (the final loss is measured there, and late averaging is what removes
    # the peers' spread at the end): the rounds left after this one must be able to cover the rest
    # with periods of at most TAIL_GUARD x the run's even period, so early rounds are not overspent
    even = settings.total_epochs / max(1, settings.round_budget)
    period = max(period, int(math.ceil(horizon - epoch - (remaining - 1) * TAIL_GUARD * even)))
    period = max(settings.min_period, min(settings.max_period, period))
    # leave the later rounds room: at least min_period each, and enough of them to reach the
    # horizon in periods of at most max_period
    period = max(period, horizon - epoch - (remaining - 1) * settings.max_period)
    period = max(settings.min_period, min(period, horizon - epoch - (remaining - 1) * settings.min_period))
    if horizon - (epoch + period) < settings.min_period:
        period = horizon - epoch
    return max(1, min(period, settings.max_period)), f"planned {planned:.2f} x correction {correction:.2f}"


def state_after_failure(settings: ControllerSettings, state: ControllerState, epoch: int) -> ControllerState:
    """A round that did not complete for us: try again at the next epoch (others may have averaged
    without us; the next round we share tells, and our anchor is then replaced)."""
    return replace(state, next_epoch=epoch + 1)
