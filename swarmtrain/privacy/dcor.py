"""Distance correlation (Székely, Rizzo & Bakirov 2007) in batched, differentiable torch.

Two estimators, both computed from Euclidean (not squared) pairwise distances:

* V-statistic (``unbiased=False``): double-centred distance matrices, dCov² = mean(A∘B).
  Always in [0, 1]; biased upward at small n / high dimension. Matches
  ``dcor.distance_correlation_sqr`` / ``dcor.distance_correlation``.
* U-statistic (``unbiased=True``): U-centred matrices, dCov² = Σ(Ã∘B̃)/(n(n-3)). Unbiased for the
  population dCov², so it can be slightly negative under independence. Matches
  ``dcor.u_distance_correlation_sqr``. Needs n ≥ 4.

``distance_correlation_sqr`` returns the squared correlation (dCor²); ``distance_correlation``
returns dCor = √max(dCor², 0), i.e. the same quantity ``dcor.distance_correlation`` returns for
the V form (a negative U estimate is reported as 0).

Numerics: inputs are promoted to float64 *before* centring, so float32 activations sharing a large
common offset keep their small differences (torch.cdist on the raw float32 values would lose them);
each input is then divided by its (detached) RMS, which changes nothing mathematically because dCor
is scale invariant, but makes the zero-variance epsilon a relative threshold. Distances use
``torch.cdist`` in its direct-difference mode, whose gradient is defined as 0 at zero distance
(diagonal, duplicate rows), and every square root is guarded so gradients stay finite everywhere.
"""
from __future__ import annotations

import torch

# A denominator √(dVar²(X)·dVar²(Z)) at or below this (inputs are RMS-normalised, so this is
# relative) is treated as zero variance: the correlation is defined as 0, as the dcor package does.
ZERO_VARIANCE_EPS = 1e-12


def _flatten_per_sample(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension, got a scalar")
    flat = t.reshape(t.shape[0], -1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    return flat.to(torch.float64)


def _normalised(flat64: torch.Tensor) -> torch.Tensor:
    """Centre columns and divide by the detached RMS (identity for dCor, but relative epsilon)."""
    centred = flat64 - flat64.mean(dim=0, keepdim=True)
    rms = centred.detach().pow(2).mean().sqrt()
    # A constant input stays all-zero: its distances are 0 and it yields dCor = 0 below.
    scale = torch.where(rms > 0, rms, torch.ones_like(rms))
    return centred / scale


def _pairwise_distances(flat64: torch.Tensor) -> torch.Tensor:
    # Direct differences (no |a|²+|b|²-2ab expansion): exact zeros on duplicates, and the backward
    # of cdist defines the gradient at zero distance as 0 instead of dividing by it.
    return torch.cdist(flat64, flat64, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


def _double_centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def _u_centred(d: torch.Tensor) -> torch.Tensor:
    n = d.shape[0]
    row = d.sum(dim=1, keepdim=True) / (n - 2)
    col = d.sum(dim=0, keepdim=True) / (n - 2)
    total = d.sum() / ((n - 1) * (n - 2))
    centred = d - row - col + total
    # The U-centred matrix has a zero diagonal by definition.
    return centred * (1.0 - torch.eye(n, dtype=d.dtype, device=d.device))


def _safe_sqrt(t: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """√t where t > floor, else 0 — with a finite (zero) gradient on the masked side."""
    positive = t > floor
    return torch.where(positive, torch.sqrt(torch.where(positive, t, torch.ones_like(t))), torch.zeros_like(t))


def distance_stats_sqr(x: torch.Tensor, z: torch.Tensor, *, unbiased: bool = False):
    """Return (dCov²(X,Z), dVar²(X), dVar²(Z), dCor²(X,Z)) as float64 0-d tensors.

    The covariances are those of the RMS-normalised inputs (see module docstring); dCor² is exact.
    """
    fx = _flatten_per_sample(x, "x")
    fz = _flatten_per_sample(z, "z")
    n = fx.shape[0]
    if fz.shape[0] != n:
        raise ValueError(f"x and z must have the same number of samples, got {n} and {fz.shape[0]}")
    if unbiased and n < 4:
        raise ValueError(f"the unbiased (U-statistic) distance correlation needs at least 4 samples, got {n}")
    if n < 2:
        raise ValueError(f"distance correlation needs at least 2 samples, got {n}")

    a = _pairwise_distances(_normalised(fx))
    b = _pairwise_distances(_normalised(fz))
    if unbiased:
        a_c, b_c = _u_centred(a), _u_centred(b)
        norm = n * (n - 3)
        dcov_xz, dvar_x, dvar_z = (a_c * b_c).sum() / norm, (a_c * a_c).sum() / norm, (b_c * b_c).sum() / norm
    else:
        a_c, b_c = _double_centred(a), _double_centred(b)
        dcov_xz, dvar_x, dvar_z = (a_c * b_c).mean(), (a_c * a_c).mean(), (b_c * b_c).mean()

    # dcor takes |dVar²(X)·dVar²(Z)| too: in the U form a variance estimate can be negative.
    denom_sqr = (dvar_x * dvar_z).abs()
    denom = _safe_sqrt(denom_sqr, floor=ZERO_VARIANCE_EPS**2)
    has_variance = denom > ZERO_VARIANCE_EPS
    dcor_sqr = torch.where(has_variance, dcov_xz / torch.where(has_variance, denom, torch.ones_like(denom)),
                           torch.zeros_like(denom))
    return dcov_xz, dvar_x, dvar_z, dcor_sqr


def distance_correlation_sqr(x: torch.Tensor, z: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """Squared distance correlation dCor²(X, Z) of two batches ([n, ...], flattened per sample).

    ``unbiased=False``: V-statistic, in [0, 1] (= ``dcor.distance_correlation_sqr``).
    ``unbiased=True``: bias-corrected U-statistic, may be < 0 (= ``dcor.u_distance_correlation_sqr``).
    Computed in float64, returned in x's floating dtype (float32 for float32 activations).
    """
    out = distance_stats_sqr(x, z, unbiased=unbiased)[3]
    return out.to(x.dtype) if x.is_floating_point() else out


def distance_correlation(x: torch.Tensor, z: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """Distance correlation dCor(X, Z) = √max(dCor², 0) — NOT squared — of two batches.

    ``unbiased=False`` equals ``dcor.distance_correlation``; ``unbiased=True`` equals
    √max(``dcor.u_distance_correlation_sqr``, 0). Differentiable with finite gradients everywhere
    (at dCor = 0 the gradient is 0). Inputs are [n, ...] tensors, flattened per sample.
    """
    dcor_sqr = distance_stats_sqr(x, z, unbiased=unbiased)[3]
    out = _safe_sqrt(dcor_sqr)
    return out.to(x.dtype) if x.is_floating_point() else out
