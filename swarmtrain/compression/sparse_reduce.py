"""The arithmetic of one sparse all-reduce round, as pure functions (no hivemind, no network).

For a group of n peers (senders = non-auxiliary peers, reducers = peers with a non-zero share from
hivemind's load balancing; the flat gradient index space is cut into one contiguous span per
reducer, as hivemind's butterfly all-reduce does)::

    sender i:   g_i = accumulated gradient + residual_i
                S_i = select(g_i, rho)                       (O(d), GaussianK by default)
                for each reducer r: send encode(S_i ∩ span_r, g_i[...])  -> r      (O(k) bytes in total)
    reducer r:  avg_r = Σ_i w_i · part_i / Σ_i w_i           (w_i self-reported, validated, clamped)
                keep the ~rho·|span_r| largest entries of avg_r (exact top-k over the <= n·k support)
                B_r = encode(kept entries)  -> sent back to every sender, and decoded by r itself too
    sender i:   applied = ⊕_r decode(B_r)      (bit-identical on every peer: same bytes, same decoder)
                residual_i = g_i − (own sent values at the kept positions)

so every contributor gets back, in its residual, whatever of its own contribution did not make it into
the applied average, and Σ_i w_i·g_i = (Σ_i w_i)·applied + Σ_i w_i·residual_i (with equal weights:
n·applied + Σ residuals = Σ raw gradients). The reducer's re-encoding of the average (fp16 / 8-bit
rounding) is absorbed into the reducer's own residual so the identity stays exact up to float32
arithmetic.

``sparse_round.SparseAllReduceRound`` runs these steps over the network; anything that needs the same
numbers without a network (tests, a simulator of the swarm) calls them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from swarmtrain.compression.robust import RobustPolicy, aggregate
from swarmtrain.compression.selection import target_count
from swarmtrain.compression.wire import SparsePart, decode_sparse, encode_sparse

Span = Tuple[int, int]  # [start, end) of the flat index space


def share_of(peer_fractions: Sequence[float], index: int) -> float:
    """Peer `index`'s share of the reduction, 0..1."""
    total = float(sum(peer_fractions))
    return float(peer_fractions[index]) / total if total > 0 else 0.0


def spans(total: int, peer_fractions: Sequence[float]) -> List[Span]:
    """Contiguous [start, end) of the flat index space per peer, proportional to its fraction."""
    total_fraction = float(sum(peer_fractions))
    bounds, acc = [0], 0.0
    for fraction in peer_fractions:
        acc += fraction
        bounds.append(int(round(acc / total_fraction * total)) if total_fraction > 0 else 0)
    bounds[-1] = total
    return [(bounds[i], bounds[i + 1]) for i in range(len(peer_fractions))]


def sender_payloads(corrected: torch.Tensor, selected: torch.Tensor, all_spans: Sequence[Span],
                    reducer_indices: Sequence[int], value_format: str) -> Dict[int, bytes]:
    """What a sender sends each reducer: its selected entries (``selected``, sorted flat indices into
    ``corrected``) that fall into that reducer's span, encoded."""
    payloads = {}
    positions = torch.searchsorted(selected, torch.tensor([start for start, _ in all_spans]))
    for reducer_index in reducer_indices:
        start, end = all_spans[reducer_index]
        lo = int(positions[reducer_index])
        hi = int(torch.searchsorted(selected, torch.tensor(end)))
        span_indices = selected[lo:hi]
        payloads[reducer_index] = encode_sparse(span_indices - start, corrected[span_indices], end - start, value_format)
    return payloads


@dataclass
class SpanReduction:
    """A reducer's result for its span.

    :param encoded: the answer every member decodes
    :param rejected: sender index -> why its part was left out
    :param total_weight: of the senders averaged
    :param requantization_error: (applied - exact average) at the kept entries, or None
    :param norms: sender index -> the norm its part was judged by (for the round's check)
    :param coefficients: sender index -> its coefficient in the average (for the round's check)
    :param kept_indices: the answer's support within the span
    """

    encoded: bytes  # the re-sparsified weighted average, as every member decodes it
    rejected: Dict[int, str]  # sender index -> why its part was left out of the average
    total_weight: float  # of the senders averaged
    requantization_error: Optional[SparsePart]  # (applied - exact average) at the kept entries
    # for the round's check (verify.py): sender index -> the float64 norm its part was judged by (valid
    # parts with a positive weight), and -> its coefficient in the average (the kept ones)
    norms: Dict[int, float] = field(default_factory=dict)
    coefficients: Dict[int, float] = field(default_factory=dict)
    kept_indices: Optional[torch.Tensor] = None  # the support of the answer (sorted, within the span)


def reduce_span(parts: Mapping[int, Tuple[float, SparsePart]], span_length: int, density: float,
                value_format: str, policy: RobustPolicy = RobustPolicy(),
                average_format: Optional[str] = None) -> SpanReduction:
    """Weighted average over the union of the received supports, re-sparsified, encoded (in
    `average_format`, by default `value_format`).

    ``parts`` maps each sender index to (weight, its part of the span). Works on the <= n·k support
    only (never allocates the dense span), so the reducer's cost is O(n·k·log(n·k)) and it stays
    cheap even when the span is large."""
    senders = [index for index, (weight, _) in parts.items() if weight > 0]
    value_format = average_format or value_format  # everything this function encodes is the average
    empty = encode_sparse(torch.zeros(0, dtype=torch.long), torch.zeros(0), span_length, value_format)
    if not senders:
        return SpanReduction(empty, {}, 0.0, None)
    support = torch.unique(torch.cat([parts[index][1].indices for index in senders]))  # sorted
    # each part as a vector over the union support: the checks and robust rules see exactly the
    # mass each sender contributed, and nothing dense is allocated
    vectors = []
    for index in senders:
        part = parts[index][1]
        vector = torch.zeros(len(support), dtype=torch.float32)
        vector[torch.searchsorted(support, part.indices)] = part.values
        vectors.append(vector)
    result = aggregate(vectors, [parts[index][0] for index in senders], policy)
    rejected = {senders[position]: reason for position, reason in result.rejected.items()}
    norms = {senders[position]: norm for position, norm in result.norms.items()}
    coefficients = {senders[position]: alpha for position, alpha in result.coefficients.items()}
    if result.total_weight <= 0:
        return SpanReduction(empty, rejected, result.total_weight, None, norms, coefficients,
                             torch.zeros(0, dtype=torch.long))
    average = result.average
    keep = min(len(support), target_count(span_length, density))
    # exact top-k is affordable here: it runs over the <= n·k support, not over the span
    chosen = torch.sort(torch.topk(average.abs(), keep, sorted=False).indices).values
    kept, exact_values = support[chosen], average[chosen]
    encoded = encode_sparse(kept, exact_values, span_length, value_format)
    applied = decode_sparse(encoded, span_length)
    return SpanReduction(encoded, rejected, result.total_weight,
                         SparsePart(span_length, kept, applied.values - exact_values), norms, coefficients, kept)


def apply_averages(corrected: torch.Tensor, all_spans: Sequence[Span], reducer_indices: Sequence[int],
                   payloads: Mapping[int, bytes], averaged_payloads: Sequence[bytes],
                   contributed: bool) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(applied, new residual, entries this sender sent) from the reducers' answers.

    Uses decoded bytes only, so every peer computes bit-identical results. A zero-weight contribution
    (``contributed`` False) is not part of any average: all of it stays in the residual."""
    applied = torch.zeros_like(corrected)
    new_residual = corrected.clone()
    sent_nonzeros = 0
    for reducer_index, averaged_payload in zip(reducer_indices, averaged_payloads):
        start, end = all_spans[reducer_index]
        average = decode_sparse(averaged_payload, end - start)
        applied[start + average.indices] = average.values
        mine = decode_sparse(payloads[reducer_index], end - start)  # what the reducer saw from us
        sent_nonzeros += len(mine.indices)
        if not contributed:
            continue
        kept = torch.isin(mine.indices, average.indices)
        new_residual.index_add_(0, start + mine.indices[kept], mine.values[kept], alpha=-1.0)
    return applied, new_residual, sent_nonzeros


def absorb_requantization(new_residual: torch.Tensor, error: Optional[SparsePart], span_start: int,
                          total_weight: float, own_weight: float) -> None:
    """Keep Σw·applied + Σ w_i·residual_i exact: the rounding of the broadcast average goes into the
    reducer's own residual (in place), scaled from "average" units to "one peer" units."""
    if error is None or own_weight <= 0 or not len(error.indices):
        return
    new_residual.index_add_(0, span_start + error.indices, error.values, alpha=-total_weight / own_weight)
