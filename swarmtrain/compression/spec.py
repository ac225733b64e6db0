"""Parsing of the `averaging.compression` config field.

Accepted forms (case-insensitive):
    none                 dense float32
    fp16                 dense float16
    topk:RHO             exact top-k sparsification (torch.topk), error feedback
    randomk:RHO          uniform random-k sparsification, error feedback
    gaussiank:RHO        GaussianK sparsification, error feedback
    any sparse form may end in "+8bit" to send its values 8-bit blockwise-quantized
RHO is the density, a number in (0, 1], e.g. gaussiank:0.01 or topk:1e-3+8bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DENSE_METHODS = ("none", "fp16")
SPARSE_METHODS = ("topk", "randomk", "gaussiank")
ACCEPTED_FORMS = "none, fp16, topk:RHO, randomk:RHO, gaussiank:RHO (RHO in (0, 1]; sparse forms may end in +8bit)"


@dataclass(frozen=True)
class CompressionSpec:
    method: str  # one of DENSE_METHODS + SPARSE_METHODS
    density: Optional[float] = None  # only for sparse methods
    eight_bit_values: bool = False

    @property
    def is_sparse(self) -> bool:
        return self.method in SPARSE_METHODS

    def __str__(self) -> str:
        text = self.method if self.density is None else f"{self.method}:{self.density:g}"
        return text + ("+8bit" if self.eight_bit_values else "")


def parse_compression_spec(spec: str) -> CompressionSpec:
    """Parse a compression spec; raise ValueError naming the accepted forms on anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compression must be one of: {ACCEPTED_FORMS}; got {spec!r}")
    text = spec.strip().lower()
    eight_bit = text.endswith("+8bit")
    if eight_bit:
        text = text[: -len("+8bit")]
    method, sep, density_text = text.partition(":")
    if method in DENSE_METHODS and not sep:
        if eight_bit:
            raise ValueError(f"'+8bit' applies to sparse forms only; got {spec!r}. Accepted: {ACCEPTED_FORMS}")
        return CompressionSpec(method)
    if method in SPARSE_METHODS and sep:
        try:
            density = float(density_text)
        except ValueError:
            density = float("nan")
        if not 0.0 < density <= 1.0:  # also rejects nan
            raise ValueError(
                f"density in {spec!r} must be a number in (0, 1], e.g. {method}:0.01. Accepted: {ACCEPTED_FORMS}"
            )
        return CompressionSpec(method, density, eight_bit)
    raise ValueError(f"compression must be one of: {ACCEPTED_FORMS}; got {spec!r}")
