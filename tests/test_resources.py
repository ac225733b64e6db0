"""A home machine's limits: --precision (bf16 autocast), --batch-size auto and --max-memory."""
import pytest
import torch
import yaml

from swarmtrain.config import parse_run_config
from swarmtrain.data import load_corpus
from swarmtrain.errors import UserError
from swarmtrain.models import build_model, compute_loss
from swarmtrain.peer.resources import (CPU_DEFAULT_BATCH, choose_batch_size, halved_after_out_of_memory,
                                       measure_step_bytes, optimizer_extra_bytes, pick_batch_size, resolve_precision)
from swarmtrain.units import parse_memory_size
from tests.support import TINY_CONFIG, run_cli

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    config = parse_run_config(yaml.safe_load(TINY_CONFIG.read_text()))
    corpus = load_corpus(config.data, None)
    return config, corpus


def _loss_of(model, corpus, precision):
    def loss_of(batch_size):
        with precision.autocast():
            return compute_loss(model, corpus.train[:batch_size].clone(), "gpt2")
    return loss_of


@pytest.mark.parametrize("text,size", [("6GB", 6 * 10**9), ("5.5GiB", int(5.5 * 2**30)), ("800MB", 800 * 10**6),
                                       ("2g", 2 * 2**30), ("1024", 1024), (" 3 GiB ", 3 * 2**30)])
def test_memory_sizes(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "6XB", "0", "six GB"])
def test_bad_memory_sizes_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="6GB|positive"):
        parse_memory_size(text)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_weights_and_gradients(tiny):
    config, corpus = tiny
    model = build_model(config.model, config.data.seq_len, 0)
    batch = corpus.train[:4].clone()
    assert resolve_precision("auto", CPU).name == "fp32"  # a CPU trains in fp32 unless asked
    bf16 = resolve_precision("bf16", CPU)
    with bf16.autocast():
        out = model(input_ids=batch, labels=batch)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    with resolve_precision("fp32", CPU).autocast():
        assert model(input_ids=batch).logits.dtype == torch.float32
    with pytest.raises(UserError, match="--precision"):
        resolve_precision("fp16", CPU)


def test_step_memory_grows_with_the_batch_and_bf16_saves_activations(tiny):
    config, corpus = tiny
    model = build_model(config.model, config.data.seq_len, 0)
    fp32, bf16 = (_loss_of(model, corpus, resolve_precision(name, CPU)) for name in ("fp32", "bf16"))
    sizes = {b: measure_step_bytes(model, fp32, b, CPU) for b in (2, 4, 8)}
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert sizes[2] > 2 * weights  # weights + gradients + activations
    # activations are linear in the batch: the 4 -> 8 step costs twice the 2 -> 4 step
    assert sizes[8] - sizes[4] == pytest.approx(2 * (sizes[4] - sizes[2]), rel=0.1)
    assert measure_step_bytes(model, bf16, 8, CPU) < 0.8 * sizes[8]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient behind


def test_auto_batch_size_is_the_largest_power_of_two_that_fits(tiny):
    config, corpus = tiny
    model = build_model(config.model, config.data.seq_len, 0)
    loss_of = _loss_of(model, corpus, resolve_precision("fp32", CPU))
    at = {b: measure_step_bytes(model, loss_of, b, CPU) for b in (1, 4, 8)}
    choice = choose_batch_size(model, loss_of, CPU, budget_bytes=(at[4] + at[8]) // 2, max_batch_size=64)
    assert choice.batch_size == 4 and all(peak <= choice.budget_bytes for b, peak in choice.probes if b <= 4)
    assert choose_batch_size(model, loss_of, CPU, budget_bytes=10**12, max_batch_size=16).batch_size == 16
    with pytest.raises(UserError, match="--max-memory"):
        choose_batch_size(model, loss_of, CPU, budget_bytes=at[1] - 1, max_batch_size=64)
    # --max-memory counts the optimizer hivemind adds later: the batch shrinks by that much
    extra = optimizer_extra_bytes(sum(p.numel() for p in model.parameters()), False, CPU)
    chosen = pick_batch_size(None, at[8] + extra, model, loss_of, CPU, eight_bit=False, target_batch_size=64,
                             log=lambda line: None)
    assert chosen == 8
    assert pick_batch_size(None, at[8] + extra // 2, model, loss_of, CPU, eight_bit=False, target_batch_size=64,
                           log=lambda line: None) == 4
    assert pick_batch_size(None, 10**12, model, loss_of, CPU, eight_bit=False, target_batch_size=16,
                           log=lambda line: None) == 16  # never more than the swarm's batch
    assert pick_batch_size(None, None, model, loss_of, CPU, eight_bit=False, target_batch_size=64) == CPU_DEFAULT_BATCH
    assert pick_batch_size(12, None, model, loss_of, CPU, eight_bit=False, target_batch_size=64) == 12
    with pytest.raises(UserError, match="does not even hold"):
        pick_batch_size(None, 1000, model, loss_of, CPU, eight_bit=False, target_batch_size=64)


class _GpuThatFillsUp(torch.nn.Module):
    """A model whose forward runs out of (CUDA) memory above a batch size, as a full GPU does."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.layer = torch.nn.Linear(4, 1)

    def forward(self, batch_size):
        if batch_size > self.capacity:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.layer(torch.ones(batch_size, 4)).sum()


def test_an_out_of_memory_probe_ends_the_search_and_training_halves_the_batch():
    model = _GpuThatFillsUp(capacity=6)
    choice = choose_batch_size(model, model, CPU, budget_bytes=10**12, max_batch_size=64)
    assert choice.batch_size == 4 and choice.probes[-1] == (8, None)
    assert halved_after_out_of_memory(8) == 4
    with pytest.raises(UserError, match="one sample"):
        halved_after_out_of_memory(1)
    other_error = _GpuThatFillsUp(capacity=6)
    other_error.forward = lambda batch_size: (_ for _ in ()).throw(ValueError("a bug, not memory"))
    with pytest.raises(ValueError):  # only memory errors are a size limit; a bug stays a bug
        choose_batch_size(other_error, other_error, CPU, budget_bytes=10**12, max_batch_size=64)


def test_fixed_batch_size_with_max_memory_is_a_clear_error():
    maddr = "/ip4/127.0.0.1/tcp/9/p2p/QmZ91vG83M6qeh2SkS1B9VoF2qVKbgEgDxPBx9vCjK4tKn"
    result = run_cli("peer", "--initial-peers", maddr, "--device", "cpu", "--batch-size", "8", "--max-memory", "2GB")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--batch-size auto" in result.stderr
    result = run_cli("peer", "--initial-peers", maddr, "--batch-size", "lots")
    assert result.returncode == 2 and "'auto'" in result.stderr and "Traceback" not in result.stderr
