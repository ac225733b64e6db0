"""The sparse reducer's rules, without a network: weighting, clamping, validation, re-sparsification."""
import asyncio
import dataclasses

import pytest
import torch

from hivemind.averaging.partition import AllreduceException
from swarmtrain.compression.crosscheck import CHECK_PROTOCOL_VERSION
from swarmtrain.compression.sparse_reduce import spans
from swarmtrain.compression.sparse_round import SpanReducer
from swarmtrain.compression.wire import SparsePart, WireFormatError, decode_sparse
from tests.support.forked import ForkedPeers


def _part(numel, indices, values):
    return SparsePart(numel, torch.tensor(indices, dtype=torch.long), torch.tensor(values, dtype=torch.float32))


def _run(coroutine_function):
    return asyncio.run(coroutine_function())


def test_weighted_average_resparsified_to_density():
    async def scenario():
        reducer = SpanReducer(span_length=100, num_senders=2, density=0.02, value_format="fp32", max_weight=10.0)
        reducer.add(0, 1.0, _part(100, [1, 5, 9], [4.0, -1.0, 0.5]))
        assert not reducer.result.done()
        reducer.add(1, 3.0, _part(100, [5, 9, 50], [2.0, 8.0, -0.1]))
        applied = decode_sparse(await reducer.result, 100)
        # averages: 1 -> 1.0, 5 -> 1.25, 9 -> 6.125, 50 -> -0.075 ; density 0.02 keeps the 2 largest
        assert applied.indices.tolist() == [5, 9]
        assert applied.values.tolist() == [1.25, 6.125]
        assert reducer.total_weight == 4.0

    _run(scenario)


def test_weights_are_clamped_and_invalid_ones_rejected():
    async def scenario():
        reducer = SpanReducer(10, 3, density=1.0, value_format="fp32", max_weight=2.0)
        for bad_weight in (float("nan"), float("inf"), -1.0):
            with pytest.raises(AllreduceException):
                reducer.add(0, bad_weight, _part(10, [0], [1.0]))
        with pytest.raises(WireFormatError):
            reducer.add(0, 1.0, _part(11, [0], [1.0]))  # part of another span
        reducer.add(0, 1e9, _part(10, [0], [3.0]))  # claims a huge batch: counted as 2
        with pytest.raises(AllreduceException):
            reducer.add(0, 1.0, _part(10, [0], [3.0]))  # second part from the same sender
        reducer.add(1, 2.0, _part(10, [0], [0.0]))
        reducer.ban(2)  # a silent sender: the span completes without it
        applied = decode_sparse(await reducer.result, 10)
        assert applied.values.tolist() == [1.5]  # (2*3 + 2*0) / 4, not ~3.0
        with pytest.raises(AllreduceException):
            reducer.add(2, 1.0, _part(10, [1], [1.0]))  # too late

    _run(scenario)


def test_requantization_error_is_recorded_for_the_reducer_residual():
    async def scenario():
        reducer = SpanReducer(1000, 1, density=0.01, value_format="fp16", max_weight=10.0)
        reducer.add(0, 1.0, _part(1000, [3, 400], [0.1, 1 / 3]))
        applied = decode_sparse(await reducer.result, 1000)
        error = reducer.requantization_error
        assert error.indices.tolist() == applied.indices.tolist() == [3, 400]
        torch.testing.assert_close(error.values, applied.values - torch.tensor([0.1, 1 / 3]), rtol=0, atol=0)
        assert error.values.abs().max() > 0  # fp16 cannot hold 0.1 or 1/3 exactly

    _run(scenario)


def test_spans_cover_the_vector_in_proportion():
    cut = spans(1000, [1.0, 0.0, 3.0])
    assert cut == [(0, 250), (250, 250), (250, 1000)]  # a client-mode peer (0 share) reduces nothing


def _construct_averager_in_child(peers, rank):

    from swarmtrain.compression.averager import SparseGradientAverager
    from swarmtrain.compression.feedback import DensitySchedule
    from swarmtrain.compression.spec import parse_compression_spec

    dht = peers.start_dht(rank)
    try:
        parameters = [torch.nn.Parameter(torch.zeros(10, 10))]
        averager = SparseGradientAverager(
            parameters, dht=dht, prefix="unit", spec=parse_compression_spec("gaussiank:0.001"),
            density_schedule=DensitySchedule(target=0.001, initial=1 / 64, warmup_epochs=3), client_mode=False,
            start=False,
        )
        densities = [averager.current_density()]
        averager.set_schedule_epoch(3)
        densities.append(averager.current_density())
        try:
            SparseGradientAverager(parameters, dht=dht, prefix="unit2", spec=parse_compression_spec("fp16"))
            dense_refused = False
        except ValueError:
            dense_refused = True
        peers.report(rank, dict(
            prefix=averager.prefix, densities=densities, shared=averager.residual.is_shared(),
            residual_numel=averager.residual.numel(), snapshot=dataclasses.asdict(averager.stats.snapshot()),
            dense_refused=dense_refused,
        ))
    finally:
        dht.shutdown()


def test_sparse_averager_schedule_prefix_and_stats():
    # in a forked child: a DHT in the pytest process would leave hivemind threads behind, and a later
    # test forking swarm peers from a threaded process can deadlock in the child
    from swarmtrain.compression.wire import SPARSE_WIRE_VERSION

    result = ForkedPeers(1).run(_construct_averager_in_child, timeout=60)[0]
    assert f"_sparsewire{SPARSE_WIRE_VERSION}" in result["prefix"]  # other wire versions never match
    assert f"_checked{CHECK_PROTOCOL_VERSION}" in result["prefix"]  # nor peers without the round check
    assert result["densities"][0] == pytest.approx(1 / 64) and result["densities"][1] == 0.001
    assert result["shared"] and result["residual_numel"] == 100
    assert result["snapshot"]["rounds_ok"] == 0 and "bytes_sent_total" in result["snapshot"]
    assert result["dense_refused"]
