import math

import pytest
import torch

from swarmtrain.compression.feedback import DensitySchedule, ErrorFeedbackSparsifier
from swarmtrain.compression.selection import (
    COUNT_HIGH,
    COUNT_LOW,
    chunked_gaussiank,
    chunked_topk,
    gather_into_dense,
    gaussiank,
    selector_for,
    randomk,
    target_count,
    topk,
)

NUMEL = 400_000


def _sample(distribution: str, numel: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if distribution == "gaussian":
        return torch.randn(numel, generator=generator)
    if distribution == "laplace":
        # sign times an exponential; the inverse-CDF form log1p(-2|u|) hits -inf when rand() returns 0
        signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
        return torch.empty(numel).exponential_(generator=generator) * signs
    if distribution == "student_t3":
        normal = torch.randn(numel, generator=generator)
        chi2 = torch.randn(3, numel, generator=generator).pow(2).sum(0)
        return normal / torch.sqrt(chi2 / 3)
    if distribution == "shifted":
        return torch.randn(numel, generator=generator) + 3.0
    raise ValueError(distribution)


@pytest.mark.parametrize("density", [0.1, 0.01, 0.001])
@pytest.mark.parametrize("distribution", ["gaussian", "laplace", "student_t3", "shifted"])
def test_gaussiank_count_in_band(distribution, density):
    x = _sample(distribution, NUMEL)
    k = target_count(NUMEL, density)
    for seed in range(3):  # the sampled-quantile step is random: check it is not lucky once
        torch.manual_seed(seed)
        indices = gaussiank(x, density)
        assert COUNT_LOW * k <= len(indices) <= COUNT_HIGH * k, (len(indices), k)
        assert torch.all(indices[1:] > indices[:-1]), "indices must be sorted and distinct"
        # a threshold selection: every selected magnitude beats every unselected one
        mask = torch.zeros(NUMEL, dtype=torch.bool)
        mask[indices] = True
        assert x[mask].abs().min() >= x[~mask].abs().max()


def test_gaussiank_on_error_feedback_residuals_heavy_tail():
    # what the averager really feeds it: gradient + accumulated residual (very heavy tailed)
    sparsifier = ErrorFeedbackSparsifier(NUMEL, "gaussiank", density=0.004)
    generator = torch.Generator().manual_seed(1)
    k = target_count(NUMEL, 0.004)
    for _ in range(10):
        indices, _ = sparsifier.compress(torch.randn(NUMEL, generator=generator))
        assert COUNT_LOW * k <= len(indices) <= COUNT_HIGH * k


def test_gaussiank_degenerate_inputs():
    ties = torch.ones(10_000)  # no threshold separates equal magnitudes: exact top-k fallback
    assert len(gaussiank(ties, 0.01)) == 100
    few = torch.zeros(10_000)
    few[[3, 70, 900]] = torch.tensor([1.0, -2.0, 3.0])  # fewer non-zeros than asked: all of them
    assert gaussiank(few, 0.01).tolist() == [3, 70, 900]
    assert len(gaussiank(torch.randn(10), 1.0)) == 10


def test_topk_is_exact_and_randomk_is_uniform_sized():
    x = _sample("laplace", 100_000)
    k = target_count(100_000, 0.01)
    indices = topk(x, 0.01)
    assert len(indices) == k
    assert set(indices.tolist()) == set(torch.sort(x.abs(), descending=True).indices[:k].tolist())
    random_indices = randomk(x, 0.01, generator=torch.Generator().manual_seed(0))
    assert 0.99 * k <= len(random_indices) <= k
    assert len(torch.unique(random_indices)) == len(random_indices)


def test_invalid_density_is_rejected():
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            target_count(100, bad)


def test_gather_keeps_duplicate_indices():
    dense = gather_into_dense(5, torch.tensor([1, 1, 3]), torch.tensor([2.0, 3.0, 1.0]))
    assert dense.tolist() == [0.0, 5.0, 0.0, 1.0, 0.0]  # `dense[idx] += v` would give 3.0 at index 1


def test_density_schedule_geometric_warmup():
    schedule = DensitySchedule(target=0.001, initial=1 / 64, warmup_epochs=4)
    densities = [schedule(epoch) for epoch in range(6)]
    assert densities[0] == pytest.approx(1 / 64)
    assert densities[4] == densities[5] == 0.001
    ratios = [densities[i] / densities[i + 1] for i in range(4)]
    assert all(r == pytest.approx(ratios[0]) for r in ratios)  # constant factor per epoch
    assert DensitySchedule(0.01)(0) == 0.01
    with pytest.raises(ValueError):
        DensitySchedule(target=2.0)


def test_error_feedback_keeps_all_mass():
    numel = 50_000
    sparsifier = ErrorFeedbackSparsifier(numel, "gaussiank", density=0.01)
    generator = torch.Generator().manual_seed(0)
    total_in = torch.zeros(numel, dtype=torch.float64)
    total_out = torch.zeros(numel, dtype=torch.float64)
    for _ in range(20):
        grad = torch.randn(numel, generator=generator)
        total_in += grad.double()
        indices, values = sparsifier.compress(grad)
        total_out.index_add_(0, indices, values.double())
    torch.testing.assert_close(total_out + sparsifier.residual.double(), total_in, atol=1e-4, rtol=0)


@pytest.mark.parametrize("distribution", ["gaussian", "laplace", "student_t3", "shifted"])
def test_chunked_gaussiank_lands_in_every_chunks_band(distribution):
    chunk, density = 4096, 0.02
    x = _sample(distribution, 50 * chunk + 1000)  # a partial last chunk
    x[: 3 * chunk] *= 100.0  # one region with far larger values: a global selection would take only it
    selected = chunked_gaussiank(x, density, chunk)
    assert torch.equal(selected, torch.unique(selected)) and int(selected.max()) < x.numel()
    k = target_count(chunk, density)
    counts = torch.bincount(selected // chunk, minlength=51)
    assert all(COUNT_LOW * k <= int(c) <= COUNT_HIGH * k for c in counts[:50]), counts
    assert int(counts[50]) <= COUNT_HIGH * k
    # the global selection spends almost the whole budget on the large region
    assert int((gaussiank(x, density) < 3 * chunk).sum()) > 0.9 * target_count(x.numel(), density)


def test_chunked_topk_is_exact_per_chunk_and_skips_zeros():
    chunk = 100
    x = torch.randn(1050, generator=torch.Generator().manual_seed(1))
    x[200:300] = 0.0
    x[300:303] = torch.tensor([5.0, -6.0, 7.0])
    x[303:400] = 0.0
    selected = chunked_topk(x, 0.05, chunk)
    for row in range(11):
        mine = selected[(selected >= row * chunk) & (selected < (row + 1) * chunk)]
        values = x[row * chunk : (row + 1) * chunk]
        if row == 2:
            assert len(mine) == 0
        elif row == 3:
            assert mine.tolist() == [300, 301, 302]
        else:
            assert len(mine) == min(5, len(values))
            assert x[mine].abs().min() >= values.abs().topk(min(5, len(values))).values.min()


def test_selection_depends_on_its_input_only():
    x = _sample("laplace", 100_000)
    torch.manual_seed(1)
    first = gaussiank(x, 0.01)
    torch.manual_seed(2)
    torch.rand(1000)
    assert torch.equal(first, gaussiank(x, 0.01))
    assert torch.equal(chunked_gaussiank(x, 0.01, 4096), chunked_gaussiank(x.clone(), 0.01, 4096))


def test_selector_for_spec():
    from swarmtrain.compression.spec import parse_compression_spec

    x = _sample("gaussian", 20_000)
    assert selector_for(parse_compression_spec("topk:0.01")) is topk
    chunked = selector_for(parse_compression_spec("gaussiank:0.01:1000+2bit"))
    assert torch.equal(chunked(x, 0.01), chunked_gaussiank(x, 0.01, 1000))
