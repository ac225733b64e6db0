"""Parsing of the `averaging.compression` config field.

Accepted forms (case-insensitive):
    none                 dense float32
    fp16                 dense float16
    topk:RHO             exact top-k sparsification (torch.topk), error feedback
    randomk:RHO          uniform random-k sparsification, error feedback
    gaussiank:RHO        GaussianK sparsification, error feedback
    gaussiank:RHO:CHUNK  (and topk) the selection runs per chunk of CHUNK consecutive entries, RHO of
                         each (SparseLoCo's chunk-wise top-k); see selection.chunked_selector
    any sparse form may end in "+8bit" (values 8-bit blockwise-quantized) or "+2bit" (senders' values as
    a sign and one of two magnitudes per block, SparseLoCo's 2-bit values; the averages come back fp16)
RHO is the density, a number in (0, 1], e.g. gaussiank:0.01, topk:1e-3+8bit or gaussiank:0.02+2bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DENSE_METHODS = ("none", "fp16")
SPARSE_METHODS = ("topk", "randomk", "gaussiank")
CHUNKED_METHODS = ("topk", "gaussiank")
VALUE_SUFFIXES = {"+8bit": "8bit", "+2bit": "2bit"}
ACCEPTED_FORMS = ("none, fp16, topk:RHO, randomk:RHO, gaussiank:RHO (RHO in (0, 1]; gaussiank and topk may add "
                  ":CHUNK, e.g. gaussiank:0.02:4096; sparse forms may end in +8bit or +2bit)")


@dataclass(frozen=True)
class CompressionSpec:
    """One parsed `averaging.compression`.

    :param method: one of DENSE_METHODS + SPARSE_METHODS
    :param density: the share of entries sent (sparse methods only)
    :param eight_bit_values: sparse values travel 8-bit blockwise-quantized
    :param two_bit_values: sparse values travel as a sign and one of two magnitudes per block
    :param chunk: the selection picks `density` of each chunk of this many consecutive entries
      (None: of the whole vector at once)
    """

    method: str
    density: Optional[float] = None
    eight_bit_values: bool = False
    two_bit_values: bool = False
    chunk: Optional[int] = None

    @property
    def is_sparse(self) -> bool:
        return self.method in SPARSE_METHODS

    @property
    def value_format(self) -> str:
        """How a sparse spec's selected values travel from senders to reducers (wire.VALUE_FORMATS)."""
        return "8bit" if self.eight_bit_values else "2bit" if self.two_bit_values else "fp16"

    @property
    def average_format(self) -> str:
        """How the reducers' averages travel back. fp16 under +2bit: a sender's 2-bit rounding stays in
        its own residual, but a reducer re-quantizing the average to 2 bits would take n x that rounding
        of the whole group into its residual (sparse_reduce.absorb_requantization)."""
        return "fp16" if self.two_bit_values else self.value_format

    def __str__(self) -> str:
        text = self.method if self.density is None else f"{self.method}:{self.density:g}"
        text += f":{self.chunk}" if self.chunk else ""
        return text + ("+8bit" if self.eight_bit_values else "+2bit" if self.two_bit_values else "")


def _parse_sparse(spec: str, method: str, arguments: str, value_format: str) -> CompressionSpec:
    density_text, _, chunk_text = arguments.partition(":")
    try:
        density = float(density_text)
    except ValueError:
        density = float("nan")
    if not 0.0 < density <= 1.0:  # also rejects nan
        raise ValueError(f"density in {spec!r} must be a number in (0, 1], e.g. {method}:0.01. Accepted: {ACCEPTED_FORMS}")
    chunk = None
    if chunk_text:
        if method not in CHUNKED_METHODS:
            raise ValueError(f"a chunk applies to {' and '.join(CHUNKED_METHODS)} only; got {spec!r}. "
                             f"Accepted: {ACCEPTED_FORMS}")
        chunk = int(chunk_text) if chunk_text.isdigit() else 0
        if chunk < 2:
            raise ValueError(f"the chunk in {spec!r} must be a whole number of entries >= 2, e.g. "
                             f"{method}:{density:g}:4096. Accepted: {ACCEPTED_FORMS}")
    return CompressionSpec(method, density, value_format == "8bit", value_format == "2bit", chunk)


def parse_compression_spec(spec: str) -> CompressionSpec:
    """Parse a compression spec; raise ValueError naming the accepted forms on anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compression must be one of: {ACCEPTED_FORMS}; got {spec!r}")
    text = spec.strip().lower()
    value_format = None
    for suffix, name in VALUE_SUFFIXES.items():
        if text.endswith(suffix):
            text, value_format = text[: -len(suffix)], name
    method, sep, arguments = text.partition(":")
    if method in DENSE_METHODS and not sep:
        if value_format:
            raise ValueError(f"'+{value_format}' applies to sparse forms only; got {spec!r}. Accepted: {ACCEPTED_FORMS}")
        return CompressionSpec(method)
    if method in SPARSE_METHODS and sep:
        return _parse_sparse(spec, method, arguments, value_format or "fp16")
    raise ValueError(f"compression must be one of: {ACCEPTED_FORMS}; got {spec!r}")
