"""What a reducer does with bad parts (robust.py, both averagers' reducers) and how a group decides
which parameters are the swarm's (fingerprints), without a network."""
import asyncio

import pytest
import torch

from swarmtrain.averaging.sync import FINGERPRINT_SIZE, reference_fingerprint
from swarmtrain.compression.averager import RobustTensorPartReducer
from swarmtrain.compression.robust import RobustPolicy, aggregate
from swarmtrain.compression.sparse_round import RejectedPart, SpanReducer
from swarmtrain.compression.wire import SparsePart, decode_sparse
from swarmtrain.training.fingerprint import fingerprints_match


def _honest(seed, size=1000):
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def test_non_finite_and_misshapen_parts_are_rejected_and_the_rest_averaged():
    parts = [_honest(0), _honest(1), torch.full((1000,), float("nan")), _honest(3)[:10]]
    parts[1][5] = 0.0
    result = aggregate(parts, [1.0, 1.0, 1.0, 1.0], RobustPolicy())
    assert set(result.rejected) == {2, 3}
    assert "non-finite" in result.rejected[2] and "shape" in result.rejected[3]
    torch.testing.assert_close(result.average, (parts[0] + parts[1]) / 2)
    inf_part = _honest(4)
    inf_part[7] = float("inf")
    assert 0 in aggregate([inf_part, _honest(5)], [1.0, 1.0], RobustPolicy()).rejected
    assert 1 in aggregate([_honest(6), _honest(7)], [1.0, float("nan")], RobustPolicy()).rejected


def test_outsized_part_is_rejected_with_a_majority_but_not_between_two():
    honest = [_honest(seed) for seed in range(3)]
    scaled = _honest(9) * 1e6
    result = aggregate([*honest, scaled], [1.0] * 4, RobustPolicy())
    assert list(result.rejected) == [3] and "median" in result.rejected[3]
    torch.testing.assert_close(result.average, sum(honest) / 3)
    # two senders: nobody can say which one is off, so nothing is rejected on norm
    assert aggregate([honest[0], scaled], [1.0, 1.0], RobustPolicy()).rejected == {}
    # honest gradients of different sizes (a factor of a few) all pass
    assert aggregate([honest[0], honest[1] * 4, honest[2] * 0.3], [1.0] * 3, RobustPolicy()).rejected == {}


def test_a_part_a_little_over_the_bound_is_scaled_down_to_it_not_rejected():
    """An honest mixed-precision peer's part at ~11x its groupmates' median (seen in a CI run) must not
    fail its round: it is scaled down to the bound, which bounds its pull exactly as a part just under the
    bound would; only a part far beyond (garbage) is rejected."""
    honest = [_honest(seed) for seed in range(3)]
    median = float(sorted(part.norm() for part in honest)[1])
    for ratio in (11.0, 60.0):
        loud = _honest(9) * (ratio * median / float(_honest(9).norm()))
        result = aggregate([*honest, loud], [1.0] * 4, RobustPolicy())
        assert result.rejected == {}, (ratio, result.rejected)
        group_median = float(torch.tensor([*(p.norm() for p in honest), loud.norm()]).median())
        scaled = loud * (10 * group_median / float(loud.norm()))
        torch.testing.assert_close(result.average, (sum(honest) + scaled) / 4)
    garbage = _honest(9) * 1e6
    assert list(aggregate([*honest, garbage], [1.0] * 4, RobustPolicy()).rejected) == [3]


def test_a_claimed_huge_batch_is_clamped_to_a_few_times_the_median_weight():
    parts = [torch.zeros(10), torch.zeros(10), torch.ones(10)]
    result = aggregate(parts, [1.0, 1.0, 1e9], RobustPolicy())
    assert result.total_weight == pytest.approx(6.0)
    torch.testing.assert_close(result.average, torch.full((10,), 4.0 / 6.0))


def test_clipping_and_centered_clip_bound_an_outlier_that_was_let_through():
    honest = [_honest(seed) + 1.0 for seed in range(4)]
    outlier = _honest(8) * 50.0
    parts, target = [*honest, outlier], sum(honest) / 4
    lenient = dict(max_norm_ratio=0.0)  # rejection off: only the aggregation rule protects
    errors = {
        rule: float((aggregate(parts, [1.0] * 5, RobustPolicy(aggregation=rule, **lenient)).average - target).norm())
        for rule in ("mean", "clip", "centered_clip")
    }
    assert errors["clip"] < errors["mean"] / 3
    assert errors["centered_clip"] < errors["mean"] / 3
    # without an outlier the robust rules stay close to the mean
    close = aggregate(honest, [1.0] * 4, RobustPolicy(aggregation="centered_clip")).average
    assert float((close - target).norm()) < 0.35 * float(target.norm())


def test_dense_part_reducer_drops_the_poisoner_and_completes_for_the_others():
    rejected = []

    async def scenario():
        reducer = RobustTensorPartReducer([torch.Size([100])] * 2, 4, RobustPolicy(), max_weight=1e6,
                                          on_rejected=lambda index, reason: rejected.append(index))
        honest = [[_honest(10 * sender + part, 100) for part in range(2)] for sender in range(3)]
        poison = [torch.full((100,), float("nan")), _honest(99, 100) * 1e6]

        async def sender(index, parts):
            return [await reducer.accumulate_part(index, position, part) for position, part in enumerate(parts)]

        results = await asyncio.gather(*(sender(i, honest[i]) for i in range(3)), sender(3, poison),
                                       return_exceptions=True)
        assert isinstance(results[3], RejectedPart)
        for part in range(2):
            expected = sum(honest[i][part] for i in range(3)) / 3
            for i in range(3):
                torch.testing.assert_close(results[i][part], expected)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert rejected == [3]


def test_sparse_span_reducer_rejects_an_outsized_sender():
    async def scenario():
        reducer = SpanReducer(100, 3, density=1.0, value_format="fp32", max_weight=10.0)
        reducer.add(0, 1.0, SparsePart(100, torch.tensor([1, 2]), torch.tensor([1.0, -1.0])))
        reducer.add(1, 1.0, SparsePart(100, torch.tensor([2, 3]), torch.tensor([-3.0, 1.0])))
        reducer.add(2, 1.0, SparsePart(100, torch.tensor([1, 3]), torch.tensor([1e6, -1e6])))
        applied = decode_sparse(await reducer.result, 100)
        assert set(reducer.rejected) == {2}
        assert dict(zip(applied.indices.tolist(), applied.values.tolist())) == {1: 0.5, 2: -2.0, 3: 0.5}

    asyncio.run(scenario())


class _Peer(bytes):
    def to_bytes(self):
        return bytes(self)


def _fingerprint(value):
    return [value] * FINGERPRINT_SIZE


def test_fingerprints_tolerate_rounding_and_majority_or_seniority_decides():
    tolerance = 1e-4
    assert fingerprints_match(_fingerprint(0.5), _fingerprint(0.5 + 1e-8), tolerance)
    assert not fingerprints_match(_fingerprint(0.5), _fingerprint(0.5 + 1e-3), tolerance)
    a, b, c = _Peer(b"a"), _Peer(b"b"), _Peer(b"c")
    # a majority (rounding differences included) wins, even against the most senior member
    members = {a: [5, _fingerprint(1.0), 2], b: [5, _fingerprint(1.0 + 1e-9), 3], c: [5, _fingerprint(2.0), 50]}
    assert fingerprints_match(reference_fingerprint(members, tolerance), _fingerprint(1.0), tolerance)
    # two that disagree: the one with the longer unbroken run of rounds is the reference
    veteran_and_joiner = {a: [9, _fingerprint(1.0), 30], c: [9, _fingerprint(2.0), 1]}
    assert reference_fingerprint(veteran_and_joiner, tolerance) == _fingerprint(1.0)
    # equal seniority: the larger peer ID, so both sides reach the same answer
    assert reference_fingerprint({a: [9, _fingerprint(1.0), 3], c: [9, _fingerprint(2.0), 3]}, tolerance) \
        == _fingerprint(2.0)


def test_own_rejected_part_is_left_out_but_the_reducer_keeps_serving():
    async def scenario():
        reducer = RobustTensorPartReducer([torch.Size([50])] * 2, 3, RobustPolicy(), max_weight=1e6,
                                          local_sender_index=2)
        honest = [[_honest(10 * sender + part, 50) for part in range(2)] for sender in range(2)]
        own = [torch.full((50,), float("nan")), torch.full((50,), float("nan"))]

        async def sender(index, parts):
            return [await reducer.accumulate_part(index, position, part) for position, part in enumerate(parts)]

        results = await asyncio.gather(*(sender(i, honest[i]) for i in range(2)), sender(2, own))
        for part in range(2):
            expected = (honest[0][part] + honest[1][part]) / 2
            for result in results:
                torch.testing.assert_close(result[part], expected)

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_zero_weight_parts_are_neither_judged_nor_averaged():
    honest = [_honest(seed) for seed in range(3)]
    stale = _honest(7) * 100  # whatever a peer tagging along with weight 0 has in its buffer
    result = aggregate([*honest, stale], [1.0, 1.0, 1.0, 0.0], RobustPolicy())
    assert result.rejected == {}
    torch.testing.assert_close(result.average, sum(honest) / 3)
