"""PrivacyConfig validation and the NoPeek privacy head (hooks, penalty, leakage stats)."""
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from swarmtrain.privacy import PrivacyConfig, PrivacyHead, attach_privacy_head, distance_correlation
from swarmtrain.privacy.config import (DEFAULT_ADVERSARY_WEIGHT, DEFAULT_ALPHA, DEFAULT_CUT_NOISE,
                                       DEFAULT_WARMUP_STEPS)
from swarmtrain.privacy.head import calibrated_release, owner_head_config

# NoPeek alone, at full weight from the first step: the head's original mechanics
NOPEEK_ONLY = {"cut_noise": 0.0, "adversary_weight": 0.0, "warmup_steps": 0}


class ToyTransformerLike(nn.Module):
    """Nested module paths like transformers' `transformer.h.0`, called with keyword input."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2)])
        self.lm_head = nn.Linear(6, 3)

    def forward(self, inputs_embeds):
        hidden = inputs_embeds
        for block in self.transformer.h:
            hidden = block(hidden)
        return self.lm_head(hidden)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3))


def test_config_defaults_and_validation_messages():
    # the defaults are the defence chosen by benchmarks/privacy_defences.py (off until enabled)
    assert PrivacyConfig() == PrivacyConfig(enabled=False, cut_layer=None, alpha=DEFAULT_ALPHA,
                                            cut_noise=DEFAULT_CUT_NOISE, adversary_weight=DEFAULT_ADVERSARY_WEIGHT,
                                            warmup_steps=DEFAULT_WARMUP_STEPS, leakage_statistic="u")
    for field, value in (("cut_noise", -0.1), ("cut_noise", 101.0), ("adversary_weight", -1.0),
                         ("warmup_steps", -1), ("cut_noise", float("nan"))):
        with pytest.raises(ValidationError, match=field):
            PrivacyConfig(**{field: value})
    with pytest.raises(ValidationError, match="cut_layer is required"):
        PrivacyConfig(enabled=True, alpha=1.0)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        PrivacyConfig(alpha=-0.1)
    with pytest.raises(ValidationError):
        PrivacyConfig(alpha=float("inf"))
    with pytest.raises(ValidationError, match="leakage_statistic"):
        PrivacyConfig(leakage_statistic="w")
    with pytest.raises(ValidationError, match="dotted module path"):
        PrivacyConfig(enabled=True, cut_layer="features..2")
    with pytest.raises(ValidationError, match="Extra inputs"):
        PrivacyConfig(alpa=1.0)
    # round-trips through plain data, as the run config embeds it
    config = PrivacyConfig.model_validate({"enabled": True, "cut_layer": "features.2", "alpha": 0.5})
    assert PrivacyConfig.model_validate(config.model_dump()) == config


def test_attach_is_noop_when_disabled():
    assert attach_privacy_head(_mlp(), PrivacyConfig()) is None


def test_head_leaves_model_outputs_and_parameters_untouched():
    model = _mlp()
    x = torch.randn(10, 8)
    before = model(x)
    keys = list(model.state_dict())
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=1.0, **NOPEEK_ONLY))
    assert torch.equal(model(x), before)
    assert list(model.state_dict()) == keys
    head.remove()
    model(torch.randn(10, 8))
    assert head.last_input is not None and head.last_input.shape == (10, 8)  # old capture, not refreshed
    assert not model._forward_hooks and not model._forward_pre_hooks and not model[3]._forward_hooks


def test_penalty_is_alpha_times_dcor_and_only_reaches_layers_before_the_cut():
    model = _mlp()
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=2.0, leakage_statistic="v",
                                            **NOPEEK_ONLY))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    logits = model(x)
    z = model[:4](x)
    task = F.cross_entropy(logits, y)
    total = head.add_penalty(task)
    expected = task + 2.0 * distance_correlation(x, z)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert head.last_leakage == pytest.approx(float(distance_correlation(x, z.detach())), rel=1e-5)
    assert head.stats.step == 1 and head.stats.batch_size == 32 and head.stats.alpha == 2.0

    model.zero_grad()
    head.penalty().backward()
    assert model[4].weight.grad is None  # the trunk gets nothing from the privacy term
    assert model[0].weight.grad.abs().sum() > 0


def test_leakage_reported_with_u_statistic_by_default():
    model = _mlp()
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=0.0, **NOPEEK_ONLY))
    x = torch.randn(40, 8)
    model(x)
    head.measure()
    z = model[:4](x).detach()
    assert head.last_leakage == pytest.approx(float(distance_correlation(x, z, unbiased=True)), rel=1e-5)
    assert head.stats.dcor_v == pytest.approx(float(distance_correlation(x, z)), rel=1e-5)


def test_nested_cut_layer_and_keyword_input():
    model = ToyTransformerLike()
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="transformer.h.0", alpha=1.0))
    embeds = torch.randn(12, 6)
    model(inputs_embeds=embeds)
    assert head.last_input is embeds
    assert head.shared_activation.shape == (12, 6)
    assert torch.isfinite(head.penalty())


def test_unknown_cut_layer_names_the_available_modules():
    with pytest.raises(ValueError, match=r"'features\.9' not found.*modules: 0, 1, 2"):
        PrivacyHead(_mlp(), PrivacyConfig(enabled=True, cut_layer="features.9", alpha=1.0))


def test_penalty_before_forward_is_a_clear_error():
    head = PrivacyHead(_mlp(), PrivacyConfig(enabled=True, cut_layer="3", alpha=1.0))
    with pytest.raises(RuntimeError, match="run a forward pass"):
        head.penalty()


def test_descending_the_penalty_lowers_leakage():
    """The head's gradient points the right way: steps on α·dCor alone reduce dCor(X, Z) on fresh data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 3))
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=1.0, **NOPEEK_ONLY))
    held_out = torch.randn(200, 8)

    def leakage():
        with torch.no_grad():
            return float(distance_correlation(held_out, model[:4](held_out), unbiased=True))

    before = leakage()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(torch.randn(64, 8))
        optimizer.zero_grad()
        head.penalty().backward()
        optimizer.step()
    after = leakage()
    assert before > 0.5 and after < before - 0.15, (before, after)


def test_cut_noise_replaces_what_leaves_the_cut_with_a_calibrated_release():
    """Everything after the cut (the trunk, the wire) sees Z/rms(Z) + σ·N(0,1), in eval mode too,
    with fresh noise per forward; scaling up the layers before the cut cannot drown the noise."""
    model = _mlp()
    x = torch.randn(64, 8)
    clean = model[:4](x).detach()
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", cut_noise=0.5), seed=7)
    model.eval()
    logits = model(x)
    released = head.shared_activation
    expected = calibrated_release(clean, 0.5, torch.Generator().manual_seed(7))
    assert torch.allclose(released, expected, atol=1e-6)
    assert torch.allclose(logits, model[4](released), atol=1e-6)  # the trunk computed on the released Z
    again = model(x)
    assert not torch.allclose(again, logits)  # a new draw of noise per forward
    # per sample, the signal part has unit power whatever the scale of Z (a row the ReLU zeroed stays 0)
    active = clean.abs().sum(dim=1) > 0
    assert 0 < int(active.sum()) < 64
    noise = 0.5 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose((released - noise).pow(2).mean(dim=1), active.float(), atol=1e-4)
    with torch.no_grad():
        model[2].weight.mul_(1000.0)
        model[2].bias.mul_(1000.0)
    model(x)
    clean_now = torch.relu(model[:3](x)).detach()  # model[:3] stops before the hooked cut layer
    head_noise = head.shared_activation.detach() - calibrated_release(clean_now, 0.0)
    assert float(head_noise.std()) == pytest.approx(0.5, rel=0.15)  # the noise did not shrink relative to Z


def test_cut_noise_on_a_tuple_output_and_a_clear_error_otherwise():
    model = ToyTransformerLike()

    class TupleBlock(nn.Module):
        def forward(self, hidden):
            return hidden, "cache"

    model.transformer.h[0].append(TupleBlock())
    model.forward = lambda inputs_embeds: model.lm_head(model.transformer.h[1](model.transformer.h[0](inputs_embeds)[0]))
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="transformer.h.0", cut_noise=1.0))
    model(inputs_embeds=torch.randn(4, 6))
    assert head.shared_activation.shape == (4, 6)

    class DictBlock(nn.Module):
        def forward(self, hidden):
            return {"hidden": hidden}

    other = nn.Sequential(nn.Linear(3, 3), DictBlock())
    PrivacyHead(other, PrivacyConfig(enabled=True, cut_layer="1", cut_noise=1.0))
    with pytest.raises(RuntimeError, match="cut_noise needs a cut layer whose output is a tensor"):
        other(torch.randn(2, 3))


def test_the_warmup_ramps_the_terms_up_linearly():
    model = _mlp()
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=2.0, cut_noise=0.0, warmup_steps=4))
    x = torch.randn(32, 8)
    for step in range(1, 7):
        model(x)
        penalty = float(head.penalty().detach())
        assert penalty == pytest.approx(min(1.0, step / 4) * 2.0 * head.stats.dcor_v, rel=1e-5)
        assert head.stats.penalty == pytest.approx(penalty)
    # an add_penalty on the first step already adds something: leakage is always pushed on, a little
    fresh = PrivacyHead(_mlp(), PrivacyConfig(enabled=True, cut_layer="3", alpha=2.0, warmup_steps=1000))
    fresh.model(x)
    task = torch.tensor(1.0)
    assert float(fresh.add_penalty(task).detach()) > 1.0


def test_the_adversary_learns_to_reconstruct_and_pushes_only_the_layers_before_the_cut():
    """The adversary's decoder (refit every step, given the label) explains X better and better from a
    fixed Z; its R² term is differentiable in the layers up to the cut and never touches the trunk or
    the decoder's own weights through the owner's loss."""
    torch.manual_seed(0)
    model = _mlp()
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=0.0, cut_noise=0.0,
                                            adversary_weight=1.0, warmup_steps=0), num_classes=3, seed=0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    r2 = []
    for _ in range(40):
        model(x)
        head.penalty(labels=y)
        r2.append(head.stats.adversary_r2)
    assert head.adversary.num_classes == 3
    assert r2[-1] > r2[0] + 0.1, (r2[0], r2[-1])
    model.zero_grad()
    model(x)
    decoder_before = [p.detach().clone() for p in head.adversary.parameters()]
    head.penalty(labels=y).backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[4].weight.grad is None
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, head.adversary.parameters()))  # refit
    with pytest.raises(ValueError, match="pass labels"):
        model(x)
        head.penalty()


def test_owner_head_config_passes_every_defence_through():
    run = PrivacyConfig(enabled=True, alpha=1.5, cut_noise=0.3, adversary_weight=2.0, warmup_steps=7,
                        leakage_statistic="v", split={"cut_width": 16})
    owner = owner_head_config(run, "3")
    assert owner.cut_layer == "3" and owner.enabled and owner.split is None
    assert (owner.alpha, owner.cut_noise, owner.adversary_weight, owner.warmup_steps, owner.leakage_statistic) == \
        (1.5, 0.3, 2.0, 7, "v")
    off = owner_head_config(PrivacyConfig(enabled=False, split={}), "3")
    assert off.enabled and (off.alpha, off.cut_noise, off.adversary_weight) == (0.0, 0.0, 0.0)
