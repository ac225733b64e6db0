"""Checking what reducers send back: the arithmetic of a round's cross-check (pure functions, no network;
``crosscheck.py`` runs it over the group, ``benchmarks/poison.py`` and a simulator can call it directly).

hivemind's all-reduce trusts reducers: a reducer that answers with K x the average, its negation, or
anything else is applied by every peer of its group. Following BTARD-SGD (Gorbunov et al., "Secure
Distributed Training at Scale", ICML 2022) the group checks every reducer's result with random
projections, which cost a few numbers per part instead of a second copy of the data::

    before the round   each member i draws a secret seed s_i and puts H(s_i) in the group's gather
    the round          as usual: sender j sends part x_j,u of unit u to u's reducer r, r answers y_u
    phase 1 (reveal)   once a member holds all its answers it reveals s_i; the reducer r also reports,
                       per unit, each sender's status (counted / invalid / absent) and the weight it
                       received (and, for CenteredClip, its mixing coefficients)
    seed               S = H(group id, s_1, ..., s_n), and z_u = Gaussian vector of unit u from S
    phase 2 (measure)  every sender j publishes its claim (||x_j,u||, <x_j,u, z_u>) for each unit it sent
                       to; every reducer publishes its view of the same numbers for each part it received
    verdict            member i checks, per unit: claims == views (else the reducer or the sender lies);
                       the plan (robust.plan: kept parts and coefficients alpha) recomputed from the
                       views; and <y_u received, z_u> == sum_j alpha_j <x_j,u, z_u> within a rigorous
                       rounding bound. A member applies the round only if every unit passes.

Why it is sound: no reducer knows z when it answers (S needs the seed of every member, and an honest
member reveals its seed only after it holds all its answers; seeds are committed in the gather, so a
colluding member cannot grind S either). An error e in an answer then shows as <e, z> ~ N(0, ||e||^2),
and the check misses it with probability ~ 0.8 x tolerance / ||e|| per projection (PROJECTIONS of
them). The sender cannot frame an honest reducer either: the reducer holds the sender's part and
publishes its own view, so a false claim surfaces as a *dispute* between the two -- the round fails
for the group, only the party that knows the truth (the misreported sender) names the other one.

A reducer and a sender that collude can agree on a false measure of the sender's part and hide an error
of the answer in it. They can do no more than one lying sender could: the measure must be plausible
for the norm they claim (the projections' joint size concentrates around sqrt(m) x the norm, else
both are named), and the norm must pass the outlier rule like any other (in a group too small for
a median: every member's own comparison of whole gradients, :func:`small_group_outliers`).

The sparse round re-sparsifies the average (top-k, not linear): its unit is a reducer's span and the
check runs on the kept support K that the reducer broadcast -- senders project their part restricted to
the K they received, the reducer projects what it received on the K it sent. A reducer that sends
different K to different members (equivocation) is caught the same way. What is not checked: that K
is the top-k of the average (a reducer choosing another support wastes the round's selection; no
gradient mass is lost, error feedback keeps what was not applied in the senders' residuals).

Unverifiable claims: a reducer may report a sender invalid (non-finite) or absent (silent). Other
members cannot tell whether that is true; excluding a part is not poisoning (the rest is averaged
honestly), so they accept it; the sender itself knows and names the reducer when it lied about a
valid part.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from swarmtrain.compression.robust import RobustPolicy, median_rule_applies, plan

PROJECTIONS = 8  # at most, random directions per unit: a liar escapes all m of them with probability ~ p^m
# A lying reducer alone is caught by one or two directions when the wire rounds little (fp32, fp16); an
# 8-bit answer rounds up to ~1% of its block's maximum, and a colluding pair is caught by the joint size
# of the projections (Measure.plausible), which concentrates only with several: sparse supports are
# short, so they get eight; dense units are long (z costs O(d) per direction), so four
SPARSE_PROJECTIONS, DENSE_PROJECTIONS = 8, 4
SEED_BYTES = 16
# |<e, z>| <= 10 ||e|| for z uniform on [-sqrt 3, sqrt 3]: Hoeffding bounds the chance that an honest
# rounding error e fails this by 2 exp(-10^2 / 6) ~ 1e-7 when ||e|| reaches its worst-case bound; the
# actual error is about half the bound (rounding errors spread over the interval), which makes it ~1e-28
TOLERANCE_SIGMAS = 10.0
# a part's projections are sums of its entries times z, each sub-Gaussian with variance proxy 3 ||x||^2
# (Hoeffding); by the chi-square tail (Laurent & Massart) sum_k <x, z_k>^2 exceeds
# 3 ||x||^2 (m + 2 sqrt(m L) + 2 L) with probability e^-L. L = 23: ~1e-10. Larger ones cannot be
# projections of a vector of that norm
PLAUSIBLE_LOG = 23.0
_UNIFORM_SCALE = 2.0 * math.sqrt(3.0)
# claims and views are float64 sums of the same float32 numbers, sent as float32: they agree to float32
# rounding (2^-24 relative) and the sums' order; norms are rounded to float32 before anyone judges them
AGREEMENT_RELATIVE = 1e-6
FLOAT32_EPS = 2.0**-23
FP16_RELATIVE, FP16_SUBNORMAL = 2.0**-11, 2.0**-25  # round-to-nearest into fp16: relative and absolute error

UnitKey = Tuple[int, int]  # (index of the reducer in the group, index of the part in its span)

COUNTED, INVALID, ABSENT = "c", "invalid", "a"  # a reducer's report of each sender's part (short: on the wire)


# ------------------------------------------------------------------------------------------------
# seeds and projections
# ------------------------------------------------------------------------------------------------


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def commitment(seed: bytes) -> bytes:
    return hashlib.sha256(b"swarmtrain round check seed\n" + seed).digest()[:16]


def round_seed(group_id: bytes, seeds: Sequence[bytes]) -> bytes:
    """S: the group's seeds in group order, revealed after every answer of the round was delivered."""
    digest = hashlib.sha256(b"swarmtrain round check\n" + group_id)
    for seed in seeds:
        digest.update(seed)
    return digest.digest()


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    return (values >> bits) & ((1 << (64 - bits)) - 1)  # logical, on int64


def _hash(key: int, indices: torch.Tensor) -> torch.Tensor:
    """splitmix64 of (key, index) as int64: any entry of the stream without computing the others."""
    x = indices * _GOLDEN + key  # wraps around in int64, as the hash wants
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def projection_vectors(seed: bytes, indices: torch.Tensor, count: int = PROJECTIONS) -> torch.Tensor:
    """z: count x len(indices) float64 directions at these flat indices of the averaged vector, each
    entry uniform on [-sqrt(3), sqrt(3)] (mean 0, variance 1) from one 32-bit half of a hash per pair
    of rows. Depends on the index only, never on how the vector is cut into parts, and on nothing but
    this code (not on torch's RNG, nor on transcendental functions that may round differently on
    another CPU). Uniform rather than Gaussian for speed: the bound of the honest rounding error is then
    Hoeffding's (TOLERANCE_SIGMAS)."""
    indices = indices.to(torch.int64)
    rows = []
    for pair in range((count + 1) // 2):
        key = _int64(int.from_bytes(hashlib.sha256(seed + bytes([pair])).digest()[:8], "little"))
        hashed = _hash(key, indices)
        for half in (hashed & 0xFFFFFFFF, _shift_right(hashed, 32)):
            rows.append((half.double() * 2.0**-32 - 0.5) * _UNIFORM_SCALE)
    if not rows:
        return torch.zeros(0, len(indices), dtype=torch.float64)
    return torch.stack(rows[:count])


DENSE_BLOCK = 1 << 16  # contiguous ranges draw z block by block (a block's stream is one PCG64 seed)


def _block_directions(seed: bytes, block: int, count: int):
    """The ``count`` x DENSE_BLOCK float64 entries of z for flat indices [block * DENSE_BLOCK, ...): per pair
    of rows one PCG64 raw stream (numpy keeps its output stable across versions) seeded by (seed, pair,
    block); the low and the high 32 bits of a raw value give one entry each."""
    import numpy as np

    rows = np.empty(((count + 1) // 2 * 2, DENSE_BLOCK), dtype=np.float64)
    for pair in range((count + 1) // 2):
        key = hashlib.sha256(seed + b"dense" + bytes([pair]) + block.to_bytes(8, "little")).digest()
        raw = np.random.PCG64(int.from_bytes(key[:16], "little")).random_raw(DENSE_BLOCK)
        np.bitwise_and(raw, np.uint64(0xFFFFFFFF), out=rows[2 * pair], casting="unsafe")
        np.right_shift(raw, np.uint64(32), out=rows[2 * pair + 1], casting="unsafe")
    rows *= 2.0**-32
    rows -= 0.5
    rows *= _UNIFORM_SCALE
    return rows[:count]


def _range_blocks(start: int, end: int):
    """(block, [lo, hi) within the block, [lo, hi) within the range) for each block [start, end) touches."""
    for block in range(start // DENSE_BLOCK, (end - 1) // DENSE_BLOCK + 1 if end > start else 0):
        base = block * DENSE_BLOCK
        lo, hi = max(start, base), min(end, base + DENSE_BLOCK)
        yield block, (lo - base, hi - base), (lo - start, hi - start)


def projection_range(seed: bytes, start: int, end: int, count: int = PROJECTIONS) -> torch.Tensor:
    """z for the contiguous flat indices [start, end) (float64, count x (end - start)), as
    :func:`projection_vectors` but ~20x faster (:func:`_block_directions`, DENSE_BLOCK indices at a time).
    Depends on the index only, not on how the range is cut. Dense units use this (through
    :func:`project_range`, which never holds the whole of z), sparse supports projection_vectors."""
    z = torch.zeros(count, max(0, end - start), dtype=torch.float64)
    for block, (lo, hi), (first, last) in _range_blocks(start, end):
        z[:, first:last] = torch.from_numpy(_block_directions(seed, block, count)[:, lo:hi])
    return z


def project_range(seed: bytes, start: int, end: int, rows: Sequence[torch.Tensor], count: int = PROJECTIONS,
                  cache: Optional[Dict[int, object]] = None):
    """Each of ``rows`` (vectors on the flat indices [start, end)) projected on the range's z, and its L2
    norm: (len(rows) x count projections, len(rows) norms), float64 sums of the float32 entries. Works a
    block of z at a time, so a 7M-entry unit never holds z or a float64 copy of its rows whole (a member
    measures every row of a unit against the same block of z, generated once). ``cache``: blocks of z
    kept between calls of one round (same seed and count), for units that share a block (its last few)."""
    import numpy as np

    flat = [row.reshape(-1).float() for row in rows]
    projections = np.zeros((len(flat), count), dtype=np.float64)
    squares = np.zeros(len(flat), dtype=np.float64)
    block_rows = np.empty((len(flat), DENSE_BLOCK), dtype=np.float64)
    for block, (lo, hi), (first, last) in _range_blocks(start, end):
        z = None if cache is None else cache.get(block)
        if z is None:
            z = _block_directions(seed, block, count)
            if cache is not None:
                cache[block] = z
                while len(cache) > 4:  # units come in order: older blocks are not needed again
                    cache.pop(next(iter(cache)))
        z = z[:, lo:hi]
        values = block_rows[:, : last - first]
        for index, row in enumerate(flat):
            values[index] = row[first:last].numpy()
        projections += values @ z.T
        squares += np.einsum("ij,ij->i", values, values)
    return torch.from_numpy(projections), torch.from_numpy(np.sqrt(squares))


@dataclass(frozen=True)
class Measure:
    """What a party says about one part: its full L2 norm, and its projections on the unit's z restricted
    to the checked support with the number of entries projected. A *norm-only* measure (no projections)
    is what a sender can say about a sparse part that got no answer: it does not know the support.

    :param norm: the part's L2 norm (float32-rounded)
    :param projections: <part, z_k> on the checked support, one per direction (float32-rounded)
    :param count: entries of the support projected
    """

    norm: float
    projections: Tuple[float, ...]
    count: int

    @property
    def norm_only(self) -> bool:
        return not self.projections

    def to_wire(self) -> bytes:
        """count (uint32), norm, projections (float32 each): 16 bytes with two projections."""
        return struct.pack(f"<If{len(self.projections)}f", self.count, self.norm, *self.projections)

    @classmethod
    def from_wire(cls, data) -> "Measure":
        if not isinstance(data, bytes) or len(data) % 4 or not 8 <= len(data) <= 8 + 4 * PROJECTIONS:
            raise ValueError("malformed measure")
        count, norm, *projections = struct.unpack(f"<If{len(data) // 4 - 2}f", data)
        return cls(norm, tuple(projections), count)

    def plausible(self) -> bool:
        """Whether the projections could be of a vector with this norm (see PLAUSIBLE_LOG)."""
        m = len(self.projections)
        total = sum(p * p for p in self.projections)
        limit = 3.0 * (m + 2.0 * math.sqrt(m * PLAUSIBLE_LOG) + 2.0 * PLAUSIBLE_LOG) * self.norm**2
        return math.isfinite(self.norm) and math.isfinite(total) and total <= limit * (1.0 + 1e-6) + 1e-30

    def agrees_with(self, other: "Measure") -> bool:
        """Same norm, and the same projections when both have them."""
        if not _close(self.norm, other.norm, AGREEMENT_RELATIVE * max(self.norm, 1e-30)):
            return False
        if self.norm_only or other.norm_only:
            return True
        if self.count != other.count or len(self.projections) != len(other.projections):
            return False
        scale = AGREEMENT_RELATIVE * (self.norm * math.sqrt(self.count + 1) * 8.0) + 1e-300
        return all(_close(a, b, scale) for a, b in zip(self.projections, other.projections))


def _close(a: float, b: float, tolerance: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance


def float32(value: float) -> float:
    """``value`` rounded to float32, as it travels (and as every party must judge it)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def measure(values: torch.Tensor, z: torch.Tensor, norm: Optional[float] = None) -> Measure:
    """A part's Measure: ``values`` are the entries at the checked support (z's columns), ``norm`` the
    part's full norm (defaults to the norm of ``values``), all rounded to float32 as they travel."""
    values = values.reshape(-1).double()
    full_norm = float(values.norm()) if norm is None else float(norm)
    projections = tuple(float32(float(value)) for value in (z @ values))
    return Measure(float32(full_norm), projections, int(values.numel()))


# ------------------------------------------------------------------------------------------------
# rounding bounds of an answer
# ------------------------------------------------------------------------------------------------


_CODES: Dict[str, torch.Tensor] = {}


def _eight_bit_codes() -> torch.Tensor:
    """bitsandbytes' dynamic map (wire.py's 8-bit codes, in [-1, 1]), sorted."""
    if "8bit" not in _CODES:
        import bitsandbytes.functional as bnb_functional  # lazily: its import is slow and chatty

        _CODES["8bit"] = torch.sort(bnb_functional.create_dynamic_map().double()).values
    return _CODES["8bit"]


def _eight_bit_bound(values: torch.Tensor) -> float:
    """Round-to-nearest into the dynamic map of each block's absmax: a value decoded as code c x absmax
    came from within half the gap to c's neighbours. The block's absmax is its largest decoded magnitude
    (that element is coded 1.0 exactly). Per element, so heavy-tailed blocks get a tight bound."""
    from swarmtrain.compression.wire import EIGHT_BIT_BLOCK

    codes = _eight_bit_codes()
    gaps = codes[1:] - codes[:-1]
    below = torch.cat([gaps[:1], gaps])  # gap to the lower neighbour of each code (the first: its upper one)
    above = torch.cat([gaps, gaps[-1:]])
    half_gap = torch.maximum(below, above) / 2.0
    padded = torch.zeros(-(-values.numel() // EIGHT_BIT_BLOCK) * EIGHT_BIT_BLOCK, dtype=torch.float64)
    padded[: values.numel()] = values
    blocks = padded.reshape(-1, EIGHT_BIT_BLOCK)
    absmax = blocks.abs().max(dim=1, keepdim=True).values
    normalized = (blocks / absmax.clamp_min(1e-300)).clamp(-1.0, 1.0)
    nearest = torch.searchsorted(codes, normalized.reshape(-1).contiguous()).clamp(1, len(codes) - 1)
    nearest = torch.where((codes[nearest] - normalized.reshape(-1)).abs()
                          < (codes[nearest - 1] - normalized.reshape(-1)).abs(), nearest, nearest - 1)
    errors = half_gap[nearest].reshape(blocks.shape) * absmax
    # 1% for the float32 scale and the float arithmetic of (de)quantization
    return 1.01 * float(errors.reshape(-1)[: values.numel()].norm()) + 1e-30


def quantization_bound(values: torch.Tensor, value_format: str, norm: Optional[float] = None) -> float:
    """An upper bound on the L2 norm of the rounding error of ``values`` (decoded, in wire order) as the
    wire format ``value_format`` rounds them; fp32 rounds nothing. ``norm``: the values' L2 norm when the
    caller measured it already (fp16 needs nothing else: no second pass over a 7M-entry answer)."""
    if value_format in ("fp32", "none"):
        return 0.0
    if value_format == "fp16":
        norm = float(values.reshape(-1).double().norm()) if norm is None else float(norm)
        return FP16_RELATIVE * norm + FP16_SUBNORMAL * math.sqrt(values.numel())
    values = values.reshape(-1).double()
    if value_format == "8bit":
        return _eight_bit_bound(values)
    # a format this check does not know: assume any rounding up to the values themselves
    return float(values.norm())


# ------------------------------------------------------------------------------------------------
# judging one unit
# ------------------------------------------------------------------------------------------------


@dataclass
class UnitEvidence:
    """Everything a member knows about one unit once both phases are in.

    :param reducer: the reducer's index in the group
    :param statuses: the reducer's report: sender index -> (status, weight received); senders it does
      not list are absent
    :param coefficients: the reducer's reported mixing coefficients (CenteredClip only)
    :param views: the reducer's measures of the parts it counted
    :param claims: sender index -> its own measure of its part (None: not available first-hand)
    :param weights: sender index -> the weight it says it sent
    :param output: this member's measure of the answer it received (None: it received none)
    :param output_bound: the rounding bound of that answer (``quantization_bound`` of what was decoded)
    """

    reducer: int
    statuses: Dict[int, Tuple[str, float]]
    coefficients: Optional[Dict[int, float]]
    views: Dict[int, Measure]
    claims: Dict[int, Optional[Measure]]
    weights: Dict[int, float]
    output: Optional[Measure] = None
    output_bound: float = 0.0


@dataclass
class Verdict:
    """The outcome of checking a round (or one unit of it), from one member's point of view.

    :param liars: group index -> what it did, for parties proven (to this member) to have lied
    :param disputes: (reducer, sender, what) where one of the two lies and this member cannot tell which
    :param outliers: sender index -> why this member refuses a result that averages its part in
    :param unverifiable: what could not be checked (a missing message...): the round is not applied
    """

    liars: Dict[int, str] = field(default_factory=dict)  # reducer index -> what it did
    disputes: List[Tuple[int, int, str]] = field(default_factory=list)  # (reducer, sender, what)
    outliers: Dict[int, str] = field(default_factory=dict)  # sender index -> why we refuse its part
    unverifiable: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.liars or self.disputes or self.outliers or self.unverifiable)

    def merge(self, other: "Verdict") -> "Verdict":
        for index, reason in other.liars.items():
            self.liars.setdefault(index, reason)
        for index, reason in other.outliers.items():
            self.outliers.setdefault(index, reason)
        self.disputes += other.disputes
        self.unverifiable += other.unverifiable
        return self

    def describe(self) -> str:
        parts = [f"reducer #{index} {reason}" for index, reason in self.liars.items()]
        parts += [f"reducer #{r} and sender #{s} disagree: {reason}" for r, s, reason in self.disputes]
        parts += [f"sender #{index}: {reason}" for index, reason in self.outliers.items()]
        parts += self.unverifiable
        return "; ".join(parts) or "ok"


def judge_unit(evidence: UnitEvidence, me: int, policy: RobustPolicy, max_weight: float,
               my_part_valid: Callable[[], bool] = lambda: True) -> Verdict:
    """Member ``me``'s verdict on one unit (see the module docstring for the rules).

    :param max_weight: the run's clamp of self-reported weights (the reducer applies the same)
    :param my_part_valid: whether this member's own part was finite (it knows; asked only when needed)"""
    verdict, reducer = Verdict(), evidence.reducer
    counted = [sender for sender, (status, _) in sorted(evidence.statuses.items()) if status == COUNTED]
    missing = [sender for sender in counted if sender not in evidence.views]
    if missing:
        verdict.liars[reducer] = f"counted sender(s) {missing} but published no measure of their parts"
        return verdict
    norms = _judged_norms(evidence)
    weights = {j: min(evidence.statuses[j][1], max_weight) for j in norms}
    decided = plan(norms, weights, policy)
    _check_reports(evidence, me, counted, set(decided.kept), my_part_valid, verdict)
    if not verdict.ok:
        return verdict
    coefficients = decided.coefficients
    if coefficients is None:  # CenteredClip: the reducer's coefficients, which must mix the kept parts
        coefficients = evidence.coefficients or {}
        if set(coefficients) != set(decided.kept) or any(not math.isfinite(a) or a < -1e-9 for a in coefficients.values()) \
                or sum(coefficients.values()) > 1.0 + 1e-6:
            verdict.liars[reducer] = "reported mixing coefficients that are not a convex combination of the kept parts"
            return verdict
    if evidence.output is not None:
        _check_output(evidence, coefficients, verdict)
    return verdict


def _check_reports(evidence: UnitEvidence, me: int, counted: Sequence[int], kept: set,
                   my_part_valid: Callable[[], bool], verdict: Verdict) -> None:
    """Compare the reducer's report with the senders' own words. A kept part needs its sender's full
    measure and weight; a part left out needs at least its norm (it decided the exclusion)."""
    reducer = evidence.reducer
    for sender in counted:
        claim, view = evidence.claims.get(sender), evidence.views[sender]
        weight = evidence.statuses[sender][1]
        if claim is None or (sender in kept and (claim.norm_only or sender not in evidence.weights)):
            verdict.unverifiable.append(f"no first-hand measure of sender #{sender}'s part for reducer #{reducer}")
            continue
        if claim.agrees_with(view) and evidence.weights.get(sender, weight) == weight:
            if not view.plausible():
                # both say so, and it cannot be: a pair covering for each other (the reducer hides an
                # error of its answer in the measure of its accomplice's part)
                verdict.liars[reducer] = f"reported a measure of sender #{sender}'s part impossible for its norm"
                verdict.liars[sender] = f"claimed a measure of its part impossible for its norm (reducer #{reducer})"
            continue
        if sender == me:
            verdict.liars[reducer] = "misreported the part we sent it"
        else:
            verdict.disputes.append((reducer, sender, "the sender's part as the reducer reports it differs from "
                                                      "the sender's own measure"))
    for sender, (status, _) in evidence.statuses.items():
        if sender != me:
            continue
        if status.startswith(INVALID) and my_part_valid():
            verdict.liars[reducer] = f"refused our valid part ({status})"
        elif status == ABSENT and evidence.output is not None:
            verdict.liars[reducer] = "reported our part absent, yet answered it"


def _check_output(evidence: UnitEvidence, coefficients: Mapping[int, float], verdict: Verdict) -> None:
    output = evidence.output
    expected = [0.0] * len(output.projections)
    arithmetic = 0.0
    # each projection travels as float32: rounding of 2^-24 of its size, from every term of the sum
    travel = FLOAT32_EPS * max((abs(value) for value in output.projections), default=0.0)
    for sender, alpha in coefficients.items():
        view = evidence.views[sender]
        if len(view.projections) != len(expected):
            verdict.liars[evidence.reducer] = "published measures of another size than its answer's"
            return
        for k in range(len(expected)):
            expected[k] += alpha * view.projections[k]
        arithmetic += abs(alpha) * view.norm
        travel += FLOAT32_EPS * abs(alpha) * max(abs(value) for value in view.projections)
    # the reducer's float32 weighted sum, its answer's own rounding, and the wire format's rounding
    bound = (4.0 * (len(coefficients) + 3) * FLOAT32_EPS * (arithmetic + output.norm) + evidence.output_bound
             + 1e-30)
    deviation = max((abs(a - b) for a, b in zip(output.projections, expected)), default=0.0)
    if not math.isfinite(deviation) or deviation > TOLERANCE_SIGMAS * bound + 2.0 * travel:
        verdict.liars[evidence.reducer] = (f"answered a result that is not the average of the parts it received "
                                           f"(projection off by {deviation:.3g}, rounding allows {TOLERANCE_SIGMAS * bound:.3g})")


def _judged_norms(evidence: UnitEvidence) -> Dict[int, float]:
    """sender -> its part's norm as the reducer reports it, for the parts the reducer counted with a
    positive weight (those the outlier rules judge)."""
    return {j: evidence.views[j].norm for j, (status, weight) in sorted(evidence.statuses.items())
            if status == COUNTED and weight > 0 and j in evidence.views}


def small_group_outliers(evidences: Sequence[UnitEvidence], me: int, policy: RobustPolicy) -> Dict[int, str]:
    """Where a unit has too few parts for the median rule (a group of two; or a sparse round in which a
    member selected nothing of a tensor), the member judges those units' senders itself, on whole
    gradients: sender j is an outlier when its gradient is more than ``max_norm_ratio`` x ours (both L2
    over every unit where both parts are non-empty, from the reducers' views, ours from our own
    measure). The member then does not apply the round, whoever reduced what. Pooled over the whole
    round, not over the median-less units alone: a unit is one parameter tensor, whose honest norms
    differ between peers by up to ~80x where whole gradients differ by < 3x (robust.py). The few small
    tensors a sparse round of three left median-less once pooled to 10.8x between two honest peers
    of mode local (one of which had run twice the other's local steps) and refused the round.

    :returns: sender index -> why this member refuses a round that averages its parts in"""
    if not policy.max_norm_ratio:
        return {}
    ours: Dict[int, float] = {}
    theirs: Dict[int, float] = {}
    judged = set()  # senders with a part in a unit the median rule could not judge
    for evidence in evidences:
        norms = _judged_norms(evidence)
        if me not in norms:
            continue
        if not median_rule_applies(norms.values(), policy):
            judged.update(sender for sender in norms if sender != me)
        claim = evidence.claims.get(me)
        own = claim.norm if claim is not None else norms[me]
        for sender, norm in norms.items():
            if sender != me and norm > 0 and own > 0:
                ours[sender] = ours.get(sender, 0.0) + own * own
                theirs[sender] = theirs.get(sender, 0.0) + norm * norm
    outliers = {}
    for sender in sorted(judged & set(theirs)):
        norm, own = math.sqrt(theirs[sender]), math.sqrt(ours[sender])
        if norm > policy.max_norm_ratio * own:
            outliers[sender] = f"gradient norm {norm:.3g} > {policy.max_norm_ratio:g} x ours ({own:.3g}) on the same units"
    return outliers
