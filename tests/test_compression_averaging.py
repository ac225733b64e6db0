"""Sparse gradient averaging over a real hivemind swarm on 127.0.0.1 (forked peers, real DHT, real
butterfly groups): error-feedback conservation, bit-identical results, rejection of a corrupt sender."""
import dataclasses

import numpy as np
import pytest
import torch

from swarmtrain.compression.sparse_round import SparseAllReduceRound
from swarmtrain.compression.wire import decode_sparse, encode_sparse
from tests.support.forked import ForkedPeers, accumulate_random_gradients, make_test_averager, step_and_take_applied

NUMEL = 60_000


def _peer(peers, rank, spec, rounds, corrupt_rank):
    if rank == corrupt_rank:
        # this peer sends parts with a NaN to the other reducers (its own span stays honest)
        honest_exchange = SparseAllReduceRound._exchange_with_reducer

        async def corrupt_exchange(self, reducer_peer, payload):
            part = decode_sparse(payload)
            values = part.values.clone()
            values[:1] = float("nan")
            return await honest_exchange(self, reducer_peer, encode_sparse(part.indices, values, part.numel, "fp32"))

        SparseAllReduceRound._exchange_with_reducer = corrupt_exchange
    dht = averager = None
    try:
        dht = peers.start_dht(rank)
        parameters, averager = make_test_averager(spec, dht, prefix="compression_test", num_peers=peers.num_peers,
                                                  min_group_size=peers.num_peers, numel=NUMEL)
        generator = torch.Generator().manual_seed(100 + rank)
        rounds_log = []
        for _ in range(rounds):
            raw = accumulate_random_gradients(averager, parameters, generator, rank)
            # the corrupt peer's step fails and hivemind retries it until the timeout, long after
            # the honest peers are done: a short one keeps this test short
            ok, applied = step_and_take_applied(averager, timeout=10 if rank == corrupt_rank else 40)
            rounds_log.append((raw.numpy(), applied.numpy(), ok))
        peers.report(rank, (rounds_log, averager.residual.numpy().copy(),
                            dataclasses.asdict(averager.stats.snapshot())))
        peers.wait_until_done(30)  # keep serving until every peer has its results
    finally:
        if averager is not None:
            averager.shutdown()
        if dht is not None:
            dht.shutdown()


def _run_swarm(num_peers, spec, rounds, corrupt_rank=-1):
    results = ForkedPeers(num_peers).run(_peer, spec, rounds, corrupt_rank, timeout=60 + 15 * rounds, join_timeout=20)
    return [(rank, *results[rank]) for rank in sorted(results)]


def test_sparse_rounds_conserve_mass_and_agree_bitwise():
    num_peers, rounds = 3, 5
    results = _run_swarm(num_peers, "gaussiank:0.01", rounds)
    for round_index in range(rounds):
        assert all(log[round_index][2] for _, log, _, _ in results), f"round {round_index} failed somewhere"
        reference = results[0][1][round_index][1]
        for _, log, _, _ in results[1:]:
            assert np.array_equal(log[round_index][1], reference), "peers applied different averages"
        assert 0.5 * 0.01 * NUMEL <= np.count_nonzero(reference) <= 1.5 * 0.01 * NUMEL  # O(k), re-sparsified

    # over the swarm: n * Σ applied + Σ residuals == Σ raw gradients (equal weights)
    raw_total = sum(log[r][0].astype(np.float64) for _, log, _, _ in results for r in range(rounds))
    applied_total = sum(results[0][1][r][1].astype(np.float64) for r in range(rounds))
    residual_total = sum(residual.astype(np.float64) for _, _, residual, _ in results)
    scale = np.abs(raw_total).max()
    np.testing.assert_allclose(num_peers * applied_total + residual_total, raw_total, atol=1e-5 * scale, rtol=0)
    # ... and the residuals really hold something (the test would pass trivially with dense averaging)
    assert np.abs(residual_total).max() > 0.1 * scale

    for _, _, _, stats in results:
        assert stats["rounds_ok"] == rounds and stats["rounds_failed"] == 0
        assert stats["bytes_sent_total"] > 0 and stats["bytes_received_total"] > 0
        assert 0.005 <= stats["last_density"] <= 0.015
        assert stats["last_group_size"] == num_peers
        assert 0 < stats["last_reduce_share"] < 1
        # O(k) traffic: well below one fp16 copy of the gradient per round
        assert stats["bytes_sent_total"] / rounds < 0.1 * 2 * NUMEL
    # the reducers' spans cover the gradient exactly once
    assert sum(stats["last_reduce_share"] for _, _, _, stats in results) == pytest.approx(1.0)


def test_corrupt_sender_is_dropped_and_honest_peers_agree():
    results = _run_swarm(3, "topk:0.02", rounds=1, corrupt_rank=2)
    honest = [log[0] for rank, log, _, _ in results if rank != 2]
    assert all(ok for _, _, ok in honest), "honest peers must complete the round"
    assert np.array_equal(honest[0][1], honest[1][1])
    assert np.all(np.isfinite(honest[0][1]))
    assert not results[2][1][0][2], "the corrupt sender is told its parts were rejected"
    assert results[2][3]["rounds_failed"] >= 1  # counts attempts: hivemind may retry within the step
