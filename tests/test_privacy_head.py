"""PrivacyConfig validation and the NoPeek privacy head (hooks, penalty, leakage stats)."""
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from swarmtrain.privacy import PrivacyConfig, PrivacyHead, attach_privacy_head, distance_correlation


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
    assert PrivacyConfig() == PrivacyConfig(enabled=False, cut_layer=None, alpha=0.0, leakage_statistic="u")
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
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=1.0))
    assert torch.equal(model(x), before)
    assert list(model.state_dict()) == keys
    head.remove()
    model(torch.randn(10, 8))
    assert head.last_input is not None and head.last_input.shape == (10, 8)  # old capture, not refreshed
    assert not model._forward_hooks and not model._forward_pre_hooks and not model[3]._forward_hooks


def test_penalty_is_alpha_times_dcor_and_only_reaches_layers_before_the_cut():
    model = _mlp()
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=2.0, leakage_statistic="v"))
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
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=0.0))
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
    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="3", alpha=1.0))
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
