"""The local-mode schedules and group-agreement rules (swarmtrain/peer/schedule.py), without a swarm."""
import math
import random

import pytest
import torch
import transformers

from swarmtrain.averaging.schedule import (FINGERPRINT_SIZE, SKETCH_SIZE, ControllerSettings, ControllerState,
                                           MemberRecord, count_sketch, decide_after_round, first_round_epoch,
                                           in_step_with, parse_records, plan_period, reference_member,
                                           sketch_divergence, state_after_failure)
from swarmtrain.config import parse_schedule
from swarmtrain.training.optimizers import lr_multiplier


def _settings(schedule="adaptive", total=48, budget=12, **kwargs):
    return ControllerSettings(parse_schedule(schedule), total_epochs=total, warmup_epochs=3, round_budget=budget,
                              **kwargs)


def _record(state: ControllerState, sketch=(0.0,) * SKETCH_SIZE, anchor=(0.0,) * FINGERPRINT_SIZE, weight=1.0,
            peers_seen=2, round_epoch=None, local_steps=0) -> MemberRecord:
    return MemberRecord(state.next_epoch if round_epoch is None else round_epoch, state.anchor_epoch,
                        state.rounds_done, state.fit, tuple(anchor), tuple(sketch), weight, peers_seen, local_steps)


def _simulate(settings, divergence_rate=lambda epoch: 1.0, seed=0, power=2.0):
    """Rounds of a two-peer swarm whose parameter variance grows at divergence_rate(e) * lr(e)^power."""
    rng = random.Random(seed)
    state = ControllerState(first_round_epoch(settings), 0, 0)
    points, decisions = [state.next_epoch], []
    while state.next_epoch < settings.total_epochs:
        variance = sum(divergence_rate(e) * settings.lr(e) ** power
                       for e in range(state.anchor_epoch, state.next_epoch))
        half = [math.sqrt(variance / SKETCH_SIZE) * rng.gauss(0, 1) for _ in range(SKETCH_SIZE)]
        members = [_record(state, sketch=half), _record(state, sketch=[-x for x in half])]
        decision = decide_after_round(settings, members[0], members, group_size=2)
        decisions.append(decision)
        state = decision.state
        points.append(state.next_epoch)
    return points, decisions


@pytest.mark.parametrize("text, expected", [("adaptive", ("adaptive", None)), ("constant:8", ("constant", 8)),
                                            (" Constant:1 ", ("constant", 1)), ("steps:25", ("steps", 25))])
def test_schedule_forms(text, expected):
    schedule = parse_schedule(text)
    assert (schedule.kind, schedule.period) == expected


@pytest.mark.parametrize("text", ["constant", "constant:0", "constant:-2", "constant:2.5", "every:4", "steps", "steps:0",
                                  "", None])
def test_bad_schedules_name_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"averaging.schedule must be steps:H .*constant:H .* or adaptive"):
        parse_schedule(text)


def test_steps_schedule_measures_the_local_steps_an_epoch_holds():
    """steps:H: the first round comes at the next epoch (it measures); then the period in epochs is H over
    the median member's local steps per epoch -- longer as the swarm grows and each peer's share of an
    epoch shrinks, never below 1 nor above max_period."""
    settings = _settings("steps:10", total=1000, max_period=32)
    assert first_round_epoch(settings, 0) == 1 and first_round_epoch(settings, 17) == 18
    state = ControllerState(1, 0, 0)

    def next_period(steps_per_member, epochs=1, state=state):
        round_epoch = state.anchor_epoch + epochs
        members = [_record(state, round_epoch=round_epoch, local_steps=s) for s in steps_per_member]
        decision = decide_after_round(settings, members[0], members, group_size=len(members))
        assert decision.state.next_epoch == round_epoch + decision.period and decision.state.anchor_epoch == round_epoch
        return decision.period

    assert next_period([5, 5]) == 2  # 5 local steps per epoch: 10 steps are 2 epochs
    assert next_period([10, 10, 10]) == 1
    assert next_period([40, 40]) == 1  # several epochs' worth per epoch: still every epoch
    assert next_period([2, 2, 2, 2]) == 5  # more peers share an epoch: fewer steps each, a longer period
    assert next_period([4, 4], epochs=4) == 10  # 1 step per epoch over the last 4 epochs
    assert next_period([1, 2, 100]) == 5  # the median member's rate: one fast peer does not set it
    assert next_period([0, 3, 3]) == 3  # a member tagging along (no steps) is not counted
    assert next_period([1, 1], epochs=50) == 32  # bounded by max_period
    assert next_period([0, 0], epochs=3) == 3  # nothing measured: the last period stands


def test_member_record_carries_its_local_steps_on_the_wire():
    state = ControllerState(4, 2, 1)
    record = _record(state, local_steps=37)
    assert MemberRecord.from_wire(record.to_wire()).local_steps == 37
    wire = record.to_wire()
    for bad in (-1, 2.5, True, "3"):
        assert MemberRecord.from_wire(wire[:-1] + [bad]) is None
    assert MemberRecord.from_wire(wire[:-1]) is None  # the previous version's record (no steps) is ignored


def test_lr_shape_is_hivemind_s_scheduler():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=20)
    for epoch in range(25):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_multiplier(epoch, 3, 20))
        optimizer.step()
        scheduler.step()


def test_count_sketch_is_linear_deterministic_and_keeps_norms():
    x, y = torch.randn(3000, generator=torch.Generator().manual_seed(1)), torch.randn(3000)
    assert torch.allclose(count_sketch(x + 2 * y), count_sketch(x) + 2 * count_sketch(y), atol=1e-4)
    assert torch.equal(count_sketch(x), count_sketch(x.clone()))
    ratios = [count_sketch(torch.randn(5000)).square().sum().item() / 5000 for _ in range(40)]
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, rel=0.1)  # E||Sx||^2 = ||x||^2


def test_member_records_survive_the_wire_and_garbage_is_ignored():
    state = ControllerState(7, 3, 4, (2.0, -1.0, 3.0, 4.0, -0.5))
    record = _record(state, sketch=[0.01 * i for i in range(SKETCH_SIZE)], anchor=[0.5] * FINGERPRINT_SIZE,
                     weight=96.0, peers_seen=4)
    back = MemberRecord.from_wire(record.to_wire())
    assert back.round_epoch == 7 and back.rounds_done == 3 and back.fit == state.fit and back.weight == 96.0
    assert back.sketch == pytest.approx(record.sketch, rel=1e-3, abs=1e-6)  # fp16 on the wire
    wire = record.to_wire()
    for broken in (None, [], wire[:5], ["other", *wire[1:]], [*wire[:7], float("nan"), *wire[8:]],
                   [*wire[:5], b"short", *wire[6:]], [*wire[:1], "7", *wire[2:]]):
        assert MemberRecord.from_wire(broken) is None
    assert set(parse_records({"a": wire, "b": [1, 2, 3]})) == {"a"}


def test_the_reference_is_the_majority_then_the_longer_history_on_every_member():
    state = ControllerState(8, 5, 4)
    fresh, stale = [1.0] * FINGERPRINT_SIZE, [0.9] * FINGERPRINT_SIZE
    records = {"p1": _record(state, anchor=fresh), "p2": _record(state, anchor=fresh),
               "p3": _record(ControllerState(8, 9, 4), anchor=stale)}
    assert reference_member(records, 1e-3) in ("p1", "p2")
    assert sorted(in_step_with(records, reference_member(records, 1e-3), 1e-3)) == ["p1", "p2"]
    # a tie of two: the newer averaged model wins, then the longer history, whatever the order the
    # members see the records in
    pair = {"missed_rounds": _record(ControllerState(8, 9, 2), anchor=stale), "veteran": _record(state, anchor=fresh)}
    assert reference_member(pair, 1e-3) == "veteran"
    assert reference_member(dict(reversed(list(pair.items()))), 1e-3) == "veteran"
    pair = {"joiner": _record(ControllerState(8, 2, 4), anchor=stale), "veteran": _record(state, anchor=fresh)}
    assert reference_member(pair, 1e-3) == "veteran"
    # float noise below the tolerance is the same model
    noisy = {"a": _record(state, anchor=fresh), "b": _record(state, anchor=[1.0 + 1e-7] * FINGERPRINT_SIZE)}
    assert len(in_step_with(noisy, reference_member(noisy, 1e-5), 1e-5)) == 2


def test_sketched_divergence_estimates_the_parameter_variance():
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(20000, generator=generator)
    deltas = [common + 0.5 * torch.randn(20000, generator=generator) for _ in range(4)]
    mean = torch.stack(deltas).mean(0)
    exact_variance = sum((d - mean).square().sum().item() for d in deltas) / 4
    state = ControllerState(4, 0, 0)
    estimate = sketch_divergence([_record(state, sketch=count_sketch(d).tolist()) for d in deltas])
    assert estimate[0] == pytest.approx(exact_variance, rel=0.35)
    assert estimate[1] == pytest.approx(mean.square().sum().item(), rel=0.35)
    assert sketch_divergence([_record(state, sketch=count_sketch(deltas[0]).tolist())]) is None  # one member


def test_constant_schedule_keeps_its_grid():
    settings = _settings("constant:4")
    assert first_round_epoch(settings) == 4 and first_round_epoch(settings, 9) == 12
    state = ControllerState(8, 2, 4)
    decision = decide_after_round(settings, _record(state), [_record(state)], group_size=1)
    assert decision.state.next_epoch == 12 and decision.state.rounds_done == 3 and decision.state.anchor_epoch == 8
    late = decide_after_round(settings, _record(state, round_epoch=9), [_record(state, round_epoch=9)], group_size=1)
    assert late.state.next_epoch == 12  # back on the grid after a retry


@pytest.mark.parametrize("total, budget", [(48, 12), (48, 6), (200, 25), (30, 10)])
def test_adaptive_spends_exactly_its_budget_and_ends_averaged(total, budget):
    settings = _settings(total=total, budget=budget, max_period=32)
    points, _ = _simulate(settings)
    assert len(points) == budget and points[-1] == total
    periods = [b - a for a, b in zip([0] + points, points)]
    assert min(periods) >= 1 and max(periods) <= 32
    # ADPSGD's shape: more rounds in the first half than in the second
    assert sum(p <= total / 2 for p in points) >= sum(p > total / 2 for p in points)


def test_adaptive_shortens_when_divergence_grows_and_lengthens_when_it_falls():
    settings = _settings(total=200, budget=25)

    def first_measured_after(decisions, epoch):
        # the first round whose measured period lies wholly after `epoch`
        return next(d for before, d in zip(decisions, decisions[1:]) if before.state.anchor_epoch >= epoch)

    _, steady = _simulate(settings)
    assert all(0.7 < d.correction < 1.4 for d in steady[1:])  # sketch noise only
    _, jumped = _simulate(settings, lambda e: 8.0 if e >= 40 else 1.0)
    assert first_measured_after(jumped, 40).correction < 0.7  # averages sooner
    _, fell = _simulate(settings, lambda e: 0.125 if e >= 40 else 1.0)
    assert first_measured_after(fell, 40).correction > 1.4  # averages later
    # and whatever happens, the budget holds
    for decisions in (jumped, fell):
        assert decisions[-1].state.rounds_done <= settings.round_budget


def test_a_partial_group_is_noted_and_a_failure_retries_at_the_next_epoch():
    settings = _settings(min_period=2)
    state = ControllerState(10, 4, 6)
    members = [_record(state, sketch=[1.0] * SKETCH_SIZE, peers_seen=4), _record(state, peers_seen=3)]
    decision = decide_after_round(settings, members[0], members, group_size=2)
    assert "group of 2 < 4 peers seen" in decision.reason and decision.state.rounds_done == 5
    assert state_after_failure(settings, state, 10) == ControllerState(11, 4, 6)


def test_plan_never_leaves_later_rounds_without_room():
    settings = _settings(total=20, budget=10, min_period=2, max_period=8)
    assert plan_period(settings, 4, 2)[0] == 2  # 8 rounds left in 16 epochs: exactly min_period each
    assert plan_period(settings, 19, 9)[0] == 1  # the last round of the budget lands on total_epochs
    assert plan_period(settings, 25, 12)[0] == 8  # past the horizon: the longest period
    # the tail guard: with 10 rounds for 40 epochs, the rounds kept for the end average <= 1.25 x 4
    guarded = _settings(total=40, budget=10, max_period=8)
    assert plan_period(guarded, 30, 8, correction=0.5)[0] >= 5  # 2 rounds left: spend at most 5 now


def test_controller_state_round_trips_and_rejects_junk():
    state = ControllerState(12, 3, 8, (1.0, 0.5, -0.25, 0.25, -0.125))
    assert ControllerState.from_dict(state.to_dict()) == state
    assert ControllerState.from_dict({"next_epoch": "x"}) is None and ControllerState.from_dict(None) is None


@pytest.mark.parametrize("power, expected", [(2.0, 1.0), (1.0, 0.5), (0.0, 0.0)])
def test_the_divergence_model_is_fitted_to_the_measurements(power, expected):
    settings = _settings(total=200, budget=40)
    points, decisions = _simulate(settings, power=power)
    assert decisions[-2].exponent == pytest.approx(expected, abs=0.2)  # v ∝ (lr²)^s
    periods = [b - a for a, b in zip(points, points[1:])]
    first, last = periods[: len(periods) // 3], periods[-len(periods) // 3:]
    if power == 0.0:  # divergence that does not fall with the learning rate: about even periods
        assert max(periods[:-1]) <= 2 * min(periods[1:-1]) + 1, periods
    else:  # it falls with it: average often early, rarely late (ADPSGD's shape)
        assert sum(first) < sum(last), periods
