"""FrozenVarianceAdamW: AdamW until the freeze, then a fixed preconditioner on a linear momentum."""
import copy

import pytest
import torch

from swarmtrain.config import OptimizerConfig, parse_run_config
from swarmtrain.errors import UserError
from swarmtrain.training.frozen_adam import FrozenVarianceAdamW
from swarmtrain.training.optimizers import make_torch_optimizer_factory

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=generator)),
            torch.nn.Parameter(torch.randn(11, generator=generator))]


def _gradients(steps, seed=1, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(7, 5, generator=generator) * scale, torch.randn(11, generator=generator) * scale]
            for _ in range(steps)]


def _run(optimizer, params, gradients):
    for grads in gradients:
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()


def test_equals_torch_adamw_until_the_freeze():
    params, reference = _params(), _params()
    ours = FrozenVarianceAdamW(params, **HYPER, freeze_variance_after=12)
    adamw = torch.optim.AdamW(reference, **HYPER, foreach=False)
    for grads in _gradients(12):
        _run(ours, params, [grads])
        _run(adamw, reference, [grads])
        for mine, theirs in zip(params, reference):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        for mine, theirs in zip(params, reference):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[mine][key], adamw.state[theirs][key], rtol=1e-6, atol=1e-9)
            assert float(ours.state[mine]["step"]) == float(adamw.state[theirs]["step"])
    assert ours.variance_frozen()  # the next step is the first frozen one
    # ... and the state_dict has the layout of AdamW's: same keys per parameter
    assert set(ours.state_dict()["state"][0]) == set(adamw.state_dict()["state"][0])


def test_never_freezes_without_a_limit():
    params, reference = _params(), _params()
    ours = FrozenVarianceAdamW(params, **HYPER)
    adamw = torch.optim.AdamW(reference, **HYPER, foreach=False)
    gradients = _gradients(40)
    _run(ours, params, gradients)
    _run(adamw, reference, gradients)
    for mine, theirs in zip(params, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not ours.variance_frozen()


def test_after_the_freeze_the_variance_stops_and_the_rest_goes_on():
    params = _params()
    optimizer = FrozenVarianceAdamW(params, **HYPER, freeze_variance_after=5)
    gradients = _gradients(15)
    _run(optimizer, params, gradients[:5])
    frozen = [optimizer.state[p]["exp_avg_sq"].clone() for p in params]
    assert all(bool((v > 0).all()) for v in frozen)
    for step, grads in enumerate(gradients[5:], start=6):
        momentum = [optimizer.state[p]["exp_avg"].clone() for p in params]
        before = [p.detach().clone() for p in params]
        # much larger gradients: plain Adam's variance would jump
        _run(optimizer, params, [[10 * g for g in grads]])
        for param, v, m, old in zip(params, frozen, momentum, before):
            assert torch.equal(optimizer.state[param]["exp_avg_sq"], v)  # bit for bit
            assert not torch.equal(optimizer.state[param]["exp_avg"], m)
            assert not torch.equal(param.detach(), old)
            assert float(optimizer.state[param]["step"]) == step


WARM = 60  # steps before the freeze: 0.9 ** 60 < 0.002, the momentum's bias correction is ~1 by then


def _displacement(optimizer_state, gradients, frozen=True):
    """Where the parameters go from a common state under a gradient sequence (weight decay 0, so
    the update does not depend on the parameters themselves)."""
    params = _params()
    optimizer = FrozenVarianceAdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                                    freeze_variance_after=WARM if frozen else None)
    optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    start = [p.detach().clone() for p in params]
    _run(optimizer, params, gradients)
    return torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(params, start)])


def _warm_state(frozen=True):
    params = _params()
    optimizer = FrozenVarianceAdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                                    freeze_variance_after=WARM if frozen else None)
    _run(optimizer, params, _gradients(WARM, seed=7))
    return optimizer.state_dict()


def test_after_the_freeze_the_update_is_linear_in_the_gradients():
    state = _warm_state()
    a, b = _gradients(10, seed=2), _gradients(10, seed=3, scale=5.0)
    zero = [[torch.zeros_like(g) for g in grads] for grads in a]
    summed = [[x + y for x, y in zip(ga, gb)] for ga, gb in zip(a, b)]
    # affine: d(A + B) = d(A) + d(B) - d(0) (d(0) is the decay of the momentum left from the warm-up)
    expected = _displacement(state, a) + _displacement(state, b) - _displacement(state, zero)
    torch.testing.assert_close(_displacement(state, summed), expected, rtol=1e-4, atol=1e-6)
    # plain Adam is not: the contrast shows the check has teeth
    unfrozen = _warm_state(frozen=False)
    expected = (_displacement(unfrozen, a, False) + _displacement(unfrozen, b, False)
                - _displacement(unfrozen, zero, False))
    assert (_displacement(unfrozen, summed, False) - expected).abs().max() > 1e-3


def test_late_delivery_of_error_feedback_mass_is_not_lost():
    """What sparse averaging with error feedback does to a coordinate: instead of g at each of 50
    steps, 0 for 49 steps and 50 g at once. After the momentum has played out, a frozen-variance
    Adam has moved the same distance either way; plain Adam moves far less on the late delivery
    (the reason gaussiank lost to fp16 under Adam, BENCHMARKS.md (c'))."""
    steady = _gradients(1, seed=4)[0]
    every_step = [steady] * 50 + [[torch.zeros_like(g) for g in steady]] * 250
    late = [[torch.zeros_like(g) for g in steady]] * 49 + [[50 * g for g in steady]] + \
        [[torch.zeros_like(g) for g in steady]] * 250
    frozen = _warm_state()
    spread, lumped = _displacement(frozen, every_step), _displacement(frozen, late)
    # equal up to the momentum's bias correction, 1 - 0.9 ** step, which is not yet exactly 1
    torch.testing.assert_close(lumped, spread, rtol=5e-3, atol=1e-5)
    unfrozen = _warm_state(frozen=False)
    spread, lumped = _displacement(unfrozen, every_step, False), _displacement(unfrozen, late, False)
    assert lumped.norm() < 0.5 * spread.norm()


def test_state_dict_round_trip_continues_identically():
    gradients = _gradients(20)
    params = _params()
    optimizer = FrozenVarianceAdamW(params, **HYPER, freeze_variance_after=6)
    _run(optimizer, params, gradients[:10])  # past the freeze
    saved_optimizer, saved_params = copy.deepcopy(optimizer.state_dict()), [p.detach().clone() for p in params]
    _run(optimizer, params, gradients[10:])

    restored = [torch.nn.Parameter(p.clone()) for p in saved_params]
    # constructed without the limit: the saved param groups bring freeze_variance_after back
    resumed = FrozenVarianceAdamW(restored, **HYPER)
    resumed.load_state_dict(saved_optimizer)
    assert resumed.param_groups[0]["freeze_variance_after"] == 6
    _run(resumed, restored, gradients[10:])
    for a, b in zip(params, restored):
        assert torch.equal(a, b)


def test_loads_a_torch_adamw_state():
    reference = _params()
    adamw = torch.optim.AdamW(reference, **HYPER, foreach=False)
    _run(adamw, reference, _gradients(3))
    ours = FrozenVarianceAdamW([torch.nn.Parameter(p.detach().clone()) for p in reference], **HYPER,
                               freeze_variance_after=4)
    ours.load_state_dict(adamw.state_dict())
    assert ours.param_groups[0]["freeze_variance_after"] == 4  # kept from the constructor
    assert float(ours.state[ours.param_groups[0]["params"][0]]["step"]) == 3


def test_hivemind_dump_and_load_of_the_state():
    from hivemind.optim.state_averager import dump_optimizer_state, initialize_optimizer_state_, load_optimizer_state

    params = _params()
    optimizer = FrozenVarianceAdamW(params, **HYPER, freeze_variance_after=3)
    initialize_optimizer_state_(optimizer)  # what hivemind does first: one zero-gradient step
    assert all(float(optimizer.state[p]["step"]) == 1 for p in params)
    _run(optimizer, params, _gradients(5))
    metadata, tensors = dump_optimizer_state(optimizer)
    assert len(tensors) == 3 * len(params)  # step, exp_avg, exp_avg_sq per parameter, as AdamW
    other = FrozenVarianceAdamW(_params(seed=5), **HYPER, freeze_variance_after=3)
    initialize_optimizer_state_(other)
    load_optimizer_state(other, metadata, tensors)
    for p, q in zip(params, other.param_groups[0]["params"]):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], other.state[q][key])


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_freeze_values_are_refused(value):
    with pytest.raises(ValueError, match="freeze_variance_after"):
        FrozenVarianceAdamW(_params(), freeze_variance_after=value)


def _run_config(optimizer):
    return dict(run_id="r", model=dict(kind="gpt2"), target_batch_size=64, optimizer=optimizer)


def test_run_config_builds_the_optimizer():
    config = parse_run_config(_run_config(dict(name="adamw_frozen", freeze_variance_after=20, lr=0.01)))
    optimizer = make_torch_optimizer_factory(config.optimizer)(_params())
    assert isinstance(optimizer, FrozenVarianceAdamW)
    # +1 for hivemind's zero-gradient initialisation step: 20 epochs of real gradients reach the variance
    assert optimizer.param_groups[0]["freeze_variance_after"] == 21
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert OptimizerConfig().freeze_variance_after is None


@pytest.mark.parametrize("optimizer, message", [
    (dict(name="adamw_frozen"), "optimizer: name adamw_frozen needs optimizer.freeze_variance_after"),
    (dict(name="adamw", freeze_variance_after=10), "optimizer: freeze_variance_after applies to name adamw_frozen"),
    (dict(name="adamw_frozen", freeze_variance_after=0), "optimizer.freeze_variance_after: Input should be greater"),
    (dict(name="adamw_frozen", freeze_variance_after="soon"),
     "optimizer.freeze_variance_after: Input should be a valid integer"),
    (dict(name="adamw_frozen", freeze_variance_after=2000), "must be below total_epochs"),
    (dict(name="adamw_frozen", freeze_variance_after=20, eight_bit=True), "no 8-bit variant"),
])
def test_bad_run_config_is_one_clear_line(optimizer, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as error:
        parse_run_config(_run_config(optimizer))
    assert "\n" not in str(error.value)


def test_a_coordinate_without_variance_at_the_freeze_gets_one_from_its_first_gradient():
    """Sparse averaging during the warm-up leaves most coordinates' variance at exactly 0; the first
    gradient they get after the freeze must not be divided by eps."""
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = FrozenVarianceAdamW([param], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                                    freeze_variance_after=3)
    for _ in range(3):  # coordinates 2 and 3 never get a gradient before the freeze
        param.grad = torch.tensor([1.0, -1.0, 0.0, 0.0])
        optimizer.step()
    before = optimizer.state[param]["exp_avg_sq"].clone()
    param.grad = torch.tensor([1.0, -1.0, 50.0, 0.0])  # a late error-feedback delivery on coordinate 2
    optimizer.step()
    variance = optimizer.state[param]["exp_avg_sq"]
    assert torch.equal(variance[:2], before[:2]) and variance[3] == 0  # frozen / still unseen
    assert variance[2] > 0
    assert param.detach().abs().max() < 0.1  # about one Adam step (1e-2), not 50 * 0.1 / 1e-8
    for _ in range(5):
        param.grad = torch.tensor([1.0, -1.0, 3.0, 0.0])
        optimizer.step()
    assert float(optimizer.state[param]["exp_avg_sq"][2]) == float(variance[2])  # frozen from then on


def test_sparse_averaging_with_a_frozen_variance_needs_a_dense_warm_up():
    """A variance frozen from sparse rounds trains worse than plain Adam (BENCHMARKS.md (c'')): the
    config asks for the dense warm-up, and the averager's density schedule provides it."""
    from swarmtrain.compression.feedback import DensitySchedule

    frozen = dict(name="adamw_frozen", freeze_variance_after=20)
    config = _run_config(frozen)
    config["averaging"] = dict(compression="gaussiank:0.01")
    with pytest.raises(UserError, match="set averaging.dense_warmup_epochs: 20") as error:
        parse_run_config(config)
    assert "\n" not in str(error.value)
    config["averaging"]["dense_warmup_epochs"] = 20
    assert parse_run_config(config).averaging.dense_warmup_epochs == 20
    config["averaging"] = dict(compression="fp16")  # dense averaging: nothing to warm up
    parse_run_config(config)

    schedule = DensitySchedule(0.01, initial=1 / 64, dense_epochs=20, warmup_epochs=10)
    assert [schedule(e) for e in (0, 19)] == [1.0, 1.0]
    assert schedule(20) == pytest.approx(1 / 64) and schedule(30) == 0.01 and schedule(500) == 0.01
    assert DensitySchedule(0.01, dense_epochs=5)(5) == 0.01
