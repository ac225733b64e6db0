"""Sparse gradient averaging over a real hivemind swarm on 127.0.0.1 (forked peers, real DHT, real
butterfly groups): error-feedback conservation, bit-identical results, rejection of a corrupt sender."""
import multiprocessing as mp
import queue

import numpy as np
import pytest
import torch

import hivemind
from swarmtrain.compression.averager import SparseAllReduceRound, make_grad_averager_factory
from swarmtrain.compression.wire import decode_sparse, encode_sparse

NUMEL = 60_000


def _start_dht(rank, address_queue, num_peers):
    options = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False, start=True)
    if rank == 0:
        dht = hivemind.DHT(**options)
        addresses = [str(address) for address in dht.get_visible_maddrs()]
        for _ in range(num_peers - 1):
            address_queue.put(addresses)
        return dht
    return hivemind.DHT(initial_peers=address_queue.get(timeout=60), **options)


def _make_averager(spec, dht, *, prefix, num_peers, min_group_size, numel=NUMEL):
    """Two parameters (a matrix and a vector) and an averager over them, with loopback timeouts."""
    parameters = [torch.nn.Parameter(torch.zeros(numel // 3, 3)), torch.nn.Parameter(torch.zeros(numel // 2))]
    averager = make_grad_averager_factory(spec)(
        parameters=parameters, dht=dht, prefix=prefix, min_matchmaking_time=2.0, request_timeout=1.0,
        target_group_size=num_peers, min_group_size=min_group_size, client_mode=False, next_chunk_timeout=3.0,
        start=True,
    )
    return parameters, averager


def _accumulate_random_gradients(averager, parameters, generator, rank) -> torch.Tensor:
    """Heavy-tailed, peer-specific gradients of different scales, accumulated once; returned flat."""
    raw = []
    for parameter in parameters:
        grad = torch.randn(parameter.shape, generator=generator) ** 3 * (1 + rank)
        parameter.grad = grad.clone()
        raw.append(grad.reshape(-1))
    averager.accumulate_grads_(batch_size=4)
    return torch.cat(raw)


def _peer(rank, num_peers, spec, rounds, corrupt_rank, address_queue, result_queue, done_event):
    # one torch thread in forked peers: OpenMP pools inherited from a parent that already ran parallel
    # ops (earlier tests) are not fork-safe, and 2 shared cores gain nothing from more threads
    torch.set_num_threads(1)
    dht = averager = None
    try:
        if rank == corrupt_rank:
            # this peer sends parts with a NaN to the other reducers (its own span stays honest)
            honest_exchange = SparseAllReduceRound._exchange_with_reducer

            async def corrupt_exchange(self, reducer_peer, payload):
                part = decode_sparse(payload)
                values = part.values.clone()
                values[:1] = float("nan")
                return await honest_exchange(self, reducer_peer, encode_sparse(part.indices, values, part.numel, "fp32"))

            SparseAllReduceRound._exchange_with_reducer = corrupt_exchange
        dht = _start_dht(rank, address_queue, num_peers)
        parameters, averager = _make_averager(spec, dht, prefix="compression_test", num_peers=num_peers,
                                              min_group_size=num_peers)
        generator = torch.Generator().manual_seed(100 + rank)
        rounds_log = []
        for _ in range(rounds):
            raw = _accumulate_random_gradients(averager, parameters, generator, rank)
            try:
                # the corrupt peer's step fails and hivemind retries it until the timeout, long after
                # the honest peers are done: a short one keeps this test short
                averager.step(timeout=10 if rank == corrupt_rank else 40)
                ok = True
            except Exception:
                ok = False
            with averager.use_averaged_gradients() as grads:
                applied = torch.cat([grad.reshape(-1) for grad in grads]).clone()
            averager.reset_accumulated_grads_()
            rounds_log.append((raw.numpy(), applied.numpy(), ok))
        result_queue.put((rank, rounds_log, averager.residual.numpy().copy(), averager.stats.snapshot()))
        done_event.wait(30)  # keep serving until every peer has its results
    except BaseException as e:
        result_queue.put((rank, repr(e), None, None))
    finally:
        if averager is not None:
            averager.shutdown()
        if dht is not None:
            dht.shutdown()


def _run_swarm(num_peers, spec, rounds, corrupt_rank=-1):
    context = mp.get_context("fork")
    address_queue, result_queue, done_event = context.Queue(), context.Queue(), context.Event()
    processes = [
        context.Process(target=_peer, args=(rank, num_peers, spec, rounds, corrupt_rank, address_queue,
                                            result_queue, done_event))
        for rank in range(num_peers)
    ]
    for process in processes:
        process.start()
    try:
        results = [result_queue.get(timeout=60 + 15 * rounds) for _ in range(num_peers)]
    except queue.Empty:
        results = []
    finally:
        done_event.set()
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
    assert len(results) == num_peers, "a peer did not report"
    for rank, log, _, _ in results:
        assert not isinstance(log, str), f"peer {rank} crashed: {log}"
    return sorted(results, key=lambda result: result[0])


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
