"""Sparsification operators: pick the flat indices of the entries of a tensor worth sending.

Every operator has the same public signature ``op(x, density) -> LongTensor`` of flat indices into
``x.reshape(-1)``; ``k = target_count(x.numel(), density)`` is the number of entries aimed at.

- ``topk``      exact: the k largest |x| (torch.topk). The quality baseline, O(d log k).
- ``randomk``   k uniformly random positions. The cheap unbiased baseline.
- ``gaussiank`` a threshold on |x| from the Gaussian model of the signed values (Shi et al.), then a
                refinement on the *count* so that it lands in [2k/3, 4k/3] on any distribution, with
                O(d) counting passes and no sort of the full tensor.

Chunk-wise forms (``chunked_selector``, spec ``gaussiank:RHO:CHUNK``): the same density of every chunk of
CHUNK consecutive entries (SparseLoCo selects top-k per chunk), so every part of the model sends its
share each round instead of the largest-update layers taking the whole budget.

Every selection is a function of its input only (gaussiank's sample is drawn from a fixed seed): the
same vector selects the same entries on a peer and in the simulator of the swarm.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from functools import partial
from typing import Callable, Dict, Optional

import torch

COUNT_LOW, COUNT_HIGH = 2.0 / 3.0, 4.0 / 3.0  # acceptance band for gaussiank's count, as a multiple of k
MAX_COUNTING_PASSES = 40  # safety net only; continuous inputs land in 1-4 passes
SAMPLE_SEED = 20250821  # gaussiank's sample positions: fixed, so a selection depends on its input only


def target_count(numel: int, density: float) -> int:
    """Number of entries a density asks for: round(density * numel), at least 1, at most numel."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, min(numel, int(round(density * numel))))


def topk(x: torch.Tensor, density: float) -> torch.Tensor:
    """Exact top-k by magnitude (indices not sorted)."""
    flat = x.detach().reshape(-1)
    k = target_count(flat.numel(), density)
    return torch.topk(flat.abs(), k, sorted=False).indices


def randomk(x: torch.Tensor, density: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """About k uniformly random flat indices, sorted and distinct.

    Drawn with replacement then de-duplicated (randperm of 50M elements would cost more than the
    selection is worth); the expected shortfall is k^2 / (2d), negligible at the densities we use.
    """
    numel = x.numel()
    k = target_count(numel, density)
    if k == numel:
        return torch.arange(numel, device=x.device)
    return torch.unique(torch.randint(numel, (k,), generator=generator, device=x.device))


class _ThresholdSearch:
    """Counting passes over |x| for one selection, keeping the bracket [too_many, too_few] of thresholds.

    The mask of the last accepted threshold is kept, so the final ``nonzero`` reuses it instead of
    comparing the whole tensor once more.
    """

    def __init__(self, magnitudes: torch.Tensor, k: int):
        self.magnitudes, self.k = magnitudes, k
        self.low_count, self.high_count = COUNT_LOW * k, COUNT_HIGH * k
        self.too_many = (-math.inf, magnitudes.numel())  # (threshold, count) with count above the band
        self.too_few = (math.inf, 0)  # (threshold, count) with count below the band
        self.accepted_mask: Optional[torch.Tensor] = None
        self.passes = 0

    def try_threshold(self, threshold: float) -> bool:
        mask = self.magnitudes > threshold
        count = int(torch.count_nonzero(mask))  # ~50x faster than mask.sum() on CPU
        self.passes += 1
        if self.low_count <= count <= self.high_count:
            self.accepted_mask = mask
            return True
        if count > self.high_count and threshold > self.too_many[0]:
            self.too_many = (threshold, count)
        elif count < self.low_count and threshold < self.too_few[0]:
            self.too_few = (threshold, count)
        return False

    def close_bracket(self) -> bool:
        """Secant on log(count) (tail counts decay roughly exponentially in the threshold), kept strictly
        inside the bracket, bisection as the fallback. The bracket only shrinks: no oscillation."""
        if self.too_many[0] == -math.inf:
            self.too_many = (-1.0, self.magnitudes.numel())
        if self.too_few[0] == math.inf:
            self.too_few = (float(self.magnitudes.max()), 0)
        for _ in range(MAX_COUNTING_PASSES):
            (t_lo, c_lo), (t_hi, c_hi) = self.too_many, self.too_few
            guess = 0.5 * (t_lo + t_hi)
            if c_hi > 0:
                fraction = (math.log(c_lo) - math.log(self.k)) / (math.log(c_lo) - math.log(c_hi))
                secant = t_lo + fraction * (t_hi - t_lo)
                if t_lo < secant < t_hi:
                    guess = secant
            if not t_lo < guess < t_hi:  # float resolution exhausted (massive ties)
                return False
            if self.try_threshold(guess):
                return True
        return False


def gaussiank_indices(flat: torch.Tensor, magnitudes: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """Indices of |x| above a threshold whose count lies in [2k/3, 4k/3]; None if no threshold can do it.

    1. Gaussian guess (the GaussianK idea): t = |mean| + std * Phi^-1(1 - rho/2), from one fused
       mean/std pass over the signed values.
    2. A small uniform sample of |x| (~256/rho points, so ~256 of them above the target quantile)
       screens that guess: when the sample says its count is far outside the band (heavy tails, shifted
       data), the sample's own (1 - rho) quantile replaces it, distribution-free, without a wasted pass.
    3. One full counting pass confirms the threshold; if it misses the band (rare: sampling noise) the
       bracket of thresholds seen so far is closed by secant/bisection, one counting pass per step.
    Unlike the reference's x0.5 / x1.5 steps this cannot oscillate: the bracket only shrinks.
    """
    numel = flat.numel()
    density = k / numel
    search = _ThresholdSearch(magnitudes, k)

    # mean and variance from a sum and a dot product: two fast BLAS-like reductions, whereas
    # torch.std_mean is a slower Welford pass that dominated the selection time
    mean = float(flat.sum()) / numel
    variance = float(torch.dot(flat, flat)) / numel - mean * mean
    std = math.sqrt(max(variance, 0.0) * numel / max(1, numel - 1))
    gaussian_guess = None
    if math.isfinite(mean) and math.isfinite(std) and std > 0:
        gaussian_guess = abs(mean) + std * NormalDist().inv_cdf(1.0 - density / 2.0)

    sample_size = min(numel, max(4096, int(256 / density)))
    positions = torch.randint(numel, (sample_size,), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    sample = magnitudes[positions.to(magnitudes.device)]
    expected_in_sample = density * sample_size
    guesses = []
    if gaussian_guess is not None:
        sample_count = int(torch.count_nonzero(sample > gaussian_guess))
        # trust the Gaussian guess if the sample puts it safely inside the band (margin for sampling noise)
        if 0.8 * expected_in_sample <= sample_count <= 1.2 * expected_in_sample:
            guesses.append(gaussian_guess)
    rank = min(sample_size, max(1, sample_size - int(round(expected_in_sample))))
    guesses.append(float(torch.kthvalue(sample.float(), rank).values))
    if gaussian_guess is not None and gaussian_guess not in guesses:
        guesses.append(gaussian_guess)  # still a useful bracket end if the quantile misses

    for guess in guesses:
        if search.try_threshold(guess):
            return torch.nonzero(search.accepted_mask).reshape(-1)
    if search.close_bracket():
        return torch.nonzero(search.accepted_mask).reshape(-1)
    return None


def gaussiank(x: torch.Tensor, density: float) -> torch.Tensor:
    """GaussianK selection: flat indices (sorted ascending) of about k large-magnitude entries.

    The count lands in [2k/3, 4k/3] for any input with at least 2k/3 distinct-enough magnitudes; if the
    band cannot be reached by a threshold (massive ties), the exact top-k is returned instead.
    Inputs with at most 4k/3 non-zero entries return all of their non-zero entries.
    """
    flat = x.detach().reshape(-1)
    numel = flat.numel()
    k = target_count(numel, density)
    if k >= numel:
        return torch.arange(numel, device=flat.device)
    magnitudes = flat.abs()
    indices = gaussiank_indices(flat, magnitudes, k)
    if indices is not None:
        return indices
    nonzero = torch.nonzero(magnitudes > 0).reshape(-1)
    if len(nonzero) <= COUNT_HIGH * k:
        # nothing to choose between: selecting zeros would only waste bytes
        return nonzero if len(nonzero) else torch.zeros(1, dtype=torch.long, device=flat.device)
    return torch.sort(torch.topk(magnitudes, k, sorted=False).indices).values


SELECTORS: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "topk": topk,
    "randomk": randomk,
    "gaussiank": gaussiank,
}


def _chunk_rows(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """|x| as rows of `chunk` entries, the last one padded with zeros (never selected: a threshold is >= 0
    and selection is strictly above it)."""
    flat = x.detach().reshape(-1)
    rows = -(-flat.numel() // chunk)
    magnitudes = torch.zeros(rows * chunk, dtype=flat.dtype, device=flat.device)
    magnitudes[: flat.numel()] = flat.abs()
    return magnitudes.view(rows, chunk)


def chunked_topk(x: torch.Tensor, density: float, chunk: int) -> torch.Tensor:
    """Exact top-k of every chunk (k = target_count(chunk, density)): sorted flat indices."""
    rows = _chunk_rows(x, chunk)
    k = target_count(chunk, density)
    columns = torch.topk(rows, k, dim=1, sorted=False).indices
    flat = (columns + torch.arange(rows.shape[0], device=rows.device)[:, None] * chunk).reshape(-1)
    flat = flat[(flat < x.numel()) & (rows.reshape(-1)[flat] > 0)]  # not the padding, not exact zeros
    return torch.sort(flat).values


def chunked_gaussiank(x: torch.Tensor, density: float, chunk: int, report: Optional[dict] = None) -> torch.Tensor:
    """GaussianK per chunk: every chunk's Gaussian threshold |mean| + std·Φ⁻¹(1 − ρ/2) from its own
    statistics (one pass over the rows for all chunks at once); a chunk whose count misses its band
    [2k/3, 4k/3] (heavy tails: error-feedback buffers often are) takes its exact k-th largest magnitude
    instead (torch.kthvalue over the chunk, O(chunk)). Sorted flat indices.

    Per-chunk k is small (82 at ρ = 0.02 over 4096), so the band is a few dozen entries wide and the
    Gaussian guess lands in it less often than on a whole tensor; what it saves is the kthvalue of the
    chunks it does fit (``benchmarks/simulate_selection.py`` measures both). `report`, when given, gets
    ``chunks`` and ``fallback_chunks`` (those that took the exact k-th magnitude)."""
    rows = _chunk_rows(x, chunk)
    k = target_count(chunk, density)
    if k >= chunk:
        flat = torch.nonzero(rows.reshape(-1) > 0).reshape(-1)
        return flat[flat < x.numel()]
    signed = torch.zeros_like(rows).reshape(-1)
    signed[: x.numel()] = x.detach().reshape(-1)
    signed = signed.view_as(rows)
    mean = signed.mean(1)
    std = ((signed * signed).mean(1) - mean * mean).clamp(min=0).mul(chunk / (chunk - 1)).sqrt()
    thresholds = mean.abs() + std * NormalDist().inv_cdf(1.0 - density / 2.0)
    counts = (rows > thresholds[:, None]).sum(1)
    missed = torch.nonzero((counts < COUNT_LOW * k) | (counts > COUNT_HIGH * k)).reshape(-1)
    if report is not None:
        report.update(chunks=rows.shape[0], fallback_chunks=len(missed))
    if len(missed):
        # the (chunk - k)-th smallest magnitude: exactly k entries lie strictly above it (ties aside)
        exact = torch.kthvalue(rows[missed], chunk - k, dim=1).values
        thresholds[missed] = exact
    flat = torch.nonzero((rows > thresholds[:, None]).reshape(-1)).reshape(-1)
    return flat[flat < x.numel()]


CHUNKED_SELECTORS = {"topk": chunked_topk, "gaussiank": chunked_gaussiank}


def selector_for(spec) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The selection a CompressionSpec names: ``op(x, density) -> flat indices``."""
    if spec.chunk:
        return partial(CHUNKED_SELECTORS[spec.method], chunk=spec.chunk)
    return SELECTORS[spec.method]


def gather_into_dense(numel: int, indices: torch.Tensor, values: torch.Tensor, out: Optional[torch.Tensor] = None):
    """Sum sparse (indices, values) into a dense vector; duplicate indices are added, never dropped."""
    if out is None:
        out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    out.index_add_(0, indices, values.to(out.dtype))
    return out
