"""The all-reduce of one round, in memory: what hivemind and the network do in the swarm, with the
arithmetic and the encoders the swarm itself uses, and the bytes counted from the encoded messages.

Groups split the flat vector into one contiguous span per member (equal shares: the simulator gives
every peer the same bandwidth, as hivemind's load balancing does for equal reports); member i reduces
span i.

* dense (``none`` / ``fp16``): each sender's part of a span is encoded with the hivemind codec the
  swarm uses (compression.factory), decoded by the reducer, averaged by ``robust.aggregate`` (the
  swarm's checked reducer); the reducer sends every other sender ``average − its part`` through the
  codec. Bytes: ``codec.compress(...).ByteSize()`` of those tensors. The average applied is the
  reducer's exact one (in the swarm each peer adds its own codec-rounded difference: fp16 leaves
  peers ~2^-11 of a delta apart, float32 ~1e-8).
* sparse: ``sparse_reduce``'s functions, exactly as ``sparse_round`` calls them (selection,
  ``sender_payloads``, ``reduce_span``, ``apply_averages``, ``absorb_requantization``): every peer
  applies the same decoded bytes, and error feedback keeps what was not applied. Bytes: the encoded
  payloads' lengths (``wire.encode_sparse``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch
from hivemind.compression import CompressionInfo, Float16Compression, NoCompression

from swarmtrain.compression.robust import RobustPolicy, aggregate
from swarmtrain.compression.sparse_reduce import (absorb_requantization, apply_averages, reduce_span,
                                                  sender_payloads, spans)
from swarmtrain.compression.spec import CompressionSpec
from swarmtrain.compression.wire import decode_sparse

DEFAULT_MAX_SAMPLE_WEIGHT = 2.0**20  # as compression.averager: a self-reported weight is clamped to it


@dataclass
class RoundTraffic:
    """Bytes each member sent and received in one round (index = position in the group)."""

    sent: List[int]
    received: List[int]
    sent_entries: List[int] = field(default_factory=list)  # sparse: entries each sender selected


@dataclass
class RoundResult:
    averaged: torch.Tensor  # the flat average every member applies
    residuals: List[torch.Tensor]  # sparse: each member's new error-feedback residual (dense: empty)
    traffic: RoundTraffic


def dense_round(parts: Sequence[torch.Tensor], weights: Sequence[float], spec: CompressionSpec,
                policy: RobustPolicy = RobustPolicy()) -> RoundResult:
    """Weighted average of flat float32 `parts` through hivemind's codec for `spec` (none / fp16)."""
    codec = Float16Compression() if spec.method == "fp16" else NoCompression()
    count, total = len(parts), parts[0].numel()
    sent, received = [0] * count, [0] * count
    averaged = torch.empty(total, dtype=torch.float32)

    def through_codec(tensor: torch.Tensor, sender: int, receiver: int) -> torch.Tensor:
        message = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
        sent[sender] += message.ByteSize()
        received[receiver] += message.ByteSize()
        return codec.extract(message)

    for reducer, (start, end) in enumerate(spans(total, [1.0] * count)):
        if end <= start:
            continue
        received_parts = [parts[i][start:end] if i == reducer else through_codec(parts[i][start:end], i, reducer)
                          for i in range(count)]
        average = aggregate(received_parts, list(weights), policy).average
        averaged[start:end] = average
        for sender in range(count):
            if sender != reducer:
                through_codec(average - received_parts[sender], reducer, sender)
    return RoundResult(averaged, [], RoundTraffic(sent, received))


def sparse_round(flats: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor], weights: Sequence[float],
                 spec: CompressionSpec, density: float, selector: Callable, policy: RobustPolicy = RobustPolicy(),
                 max_sample_weight: float = DEFAULT_MAX_SAMPLE_WEIGHT) -> RoundResult:
    """One sparse all-reduce round (sparse_round.SparseAllReduceRound.run for every member at once)."""
    count, total = len(flats), flats[0].numel()
    all_spans = spans(total, [1.0] * count)
    reducers = [i for i, (start, end) in enumerate(all_spans) if end > start]
    value_format = spec.value_format
    weights = [min(float(weight), max_sample_weight) for weight in weights]
    corrected, payloads = [], []
    for flat, residual in zip(flats, residuals):
        vector = flat + residual
        selected = torch.sort(selector(vector, density)).values
        corrected.append(vector)
        payloads.append(sender_payloads(vector, selected, all_spans, reducers, value_format))
    reductions: Dict[int, object] = {}
    for reducer in reducers:
        start, end = all_spans[reducer]
        received = {i: (weights[i], decode_sparse(payloads[i][reducer], end - start)) for i in range(count)}
        reductions[reducer] = reduce_span(received, end - start, density, value_format, policy, spec.average_format)
    averaged_payloads = [reductions[r].encoded for r in reducers]
    traffic = RoundTraffic([0] * count, [0] * count, [0] * count)
    new_residuals, applied = [], None
    for i in range(count):
        applied, residual, traffic.sent_entries[i] = apply_averages(
            corrected[i], all_spans, reducers, payloads[i], averaged_payloads, contributed=weights[i] > 0)
        if i in reductions:
            absorb_requantization(residual, reductions[i].requantization_error, all_spans[i][0],
                                  reductions[i].total_weight, weights[i])
        new_residuals.append(residual)
        for r in reducers:
            if r != i:  # the own share never touches the network
                traffic.sent[i] += len(payloads[i][r])
                traffic.received[r] += len(payloads[i][r])
                traffic.sent[r] += len(reductions[r].encoded)
                traffic.received[i] += len(reductions[r].encoded)
    return RoundResult(applied, new_residuals, traffic)
