"""The swarm simulator's behaviour (its fidelity to the real swarm is test_simulate_fidelity.py's) and
`swarmtrain simulate` as a user runs it."""
import json

import pytest
import torch
import yaml

from swarmtrain.cli.simulate import apply_overrides
from swarmtrain.config import load_run_config
from swarmtrain.data import load_corpus
from swarmtrain.models import build_model
from swarmtrain.simulate import Simulation, SimulationOptions
from tests.support import TINY_CONFIG, assert_one_line_error, run_cli

SMALL = ("data.max_bytes=300000", "target_batch_size=6", "optimizer.warmup_epochs=0", "optimizer.total_epochs=40")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(load_run_config(TINY_CONFIG).data.model_copy(update=dict(max_bytes=300_000)))


def _config(*overrides):
    return apply_overrides(load_run_config(TINY_CONFIG), SMALL + overrides)


def test_heterogeneous_peers_joining_and_leaving(corpus):
    config = _config("averaging.mode=local", "averaging.schedule=constant:2", "averaging.compression=gaussiank:0.05+2bit",
                     "averaging.feedback_decay=0.9")
    options = SimulationOptions(peers=3, steps=16, batch_size=2, speeds=[1.0, 0.5, 1.0], joins={2: 6}, leaves={1: 12},
                                eval_every=4)
    simulation = Simulation(config, options, corpus)
    result = simulation.run().to_dict()
    json.dumps(result)
    assert result["steps_per_peer"] == [16, 6, 10]  # half speed until tick 12; from tick 6
    rounds = result["rounds"]
    assert all(entry["epoch"] % 2 == 0 for entry in rounds)
    first_with_joiner = next(entry for entry in rounds if 2 in entry["members"])
    assert first_with_joiner["weights"][first_with_joiner["members"].index(2)] == 0.0  # it tags along first
    later = [entry for entry in rounds if entry["tick"] > first_with_joiner["tick"] and 2 in entry["members"]]
    assert later and all(entry["weights"][entry["members"].index(2)] > 0 for entry in later)
    assert all(1 not in entry["members"] for entry in rounds if entry["tick"] > 12)
    assert all(sent > 0 for entry in rounds for sent in entry["bytes_sent"])
    # after every round the peers hold the averaged model
    anchor = simulation.averaging.flat_anchor()
    for index in (0, 2):
        assert (simulation.replicas[index].trainee.flat_parameters() - anchor).abs().max() == 0.0
    assert result["curve"][-1]["heldout_loss"] < result["curve"][0]["heldout_loss"]


def test_steps_schedule_keeps_the_local_steps_between_rounds_as_the_swarm_grows(corpus):
    """steps:4 with an epoch of 6 samples: 2 peers of batch 1 take 3 steps an epoch each, so rounds come
    every 1 epoch (4/3 rounds to 1); once 6 peers share the epoch (1 step each) every 4 epochs. The first
    round is at epoch 1, where the rate is first measured."""
    config = _config("averaging.mode=local", "averaging.schedule=steps:4", "averaging.compression=none")
    joins = {peer: 9 for peer in range(2, 6)}
    options = SimulationOptions(peers=6, steps=40, batch_size=1, joins=joins, eval_every=40)
    result = Simulation(config, options, corpus).run().to_dict()
    rounds = result["rounds"]
    assert rounds[0]["epoch"] == 1
    two = [entry for entry in rounds if len(entry["members"]) == 2]
    six = [entry for entry in rounds if len(entry["members"]) == 6]
    assert len(two) >= 3 and all(entry["period"] == 1 for entry in two[1:])
    assert len(six) >= 3 and all(entry["period"] == 4 for entry in six[1:])  # the first measured a mixed period
    epochs = [entry["epoch"] for entry in six[1:]]
    assert all(b - a == 4 for a, b in zip(epochs, epochs[1:]))


def test_overlap_delay_lands_rounds_later_on_the_peers_own_steps(corpus):
    """--overlap-delay: a round's members step on from their own parameters and take the new anchor plus
    those steps when it lands. The first round (nothing in flight before it) averages the same deltas as
    without the delay; later ones start from other parameters."""
    config = _config("averaging.mode=local", "averaging.schedule=constant:3", "averaging.compression=none")

    def run(delay):  # (the held-out loss of the anchor is measured after every round)
        simulation = Simulation(config, SimulationOptions(peers=3, steps=10, batch_size=2, eval_every=1,
                                                          overlap_delay=delay), corpus)
        result = simulation.run().to_dict()
        return simulation, result, [(entry["tick"], entry["heldout_loss"]) for entry in result["curve"]]

    at_once, at_once_result, at_once_curve = run(0)
    delayed, delayed_result, delayed_curve = run(1)
    assert len(at_once_result["rounds"]) == len(delayed_result["rounds"]) >= 3
    first_round = at_once_result["rounds"][0]["tick"]
    assert [loss for tick, loss in delayed_curve if tick <= first_round] == \
        [loss for tick, loss in at_once_curve if tick <= first_round]
    assert delayed_curve[-1][1] != at_once_curve[-1][1]
    # the last round (tick 9) landed at the run's last tick, on top of the step each peer took meanwhile:
    # not the bare anchor a round without delay leaves
    assert delayed.averaging.in_flight is None
    anchor = delayed.averaging.flat_anchor()
    assert all((r.trainee.flat_parameters() - anchor).abs().max() > 0 for r in delayed.replicas)


def test_dense_bytes_are_hivemind_codec_sizes(corpus):
    config = _config("averaging.compression=fp16")
    simulation = Simulation(config, SimulationOptions(peers=4, steps=3, batch_size=2, eval_every=10), corpus)
    result = simulation.run().to_dict()
    numel = sum(p.numel() for p in simulation.shared.parameters)
    assert result["mode"] == "sync" and len(simulation.averaging.rounds) == 3  # 8 samples a tick >= 6 an epoch
    for entry in simulation.averaging.rounds:
        # each peer sends 3/4 of its gradient and, as a reducer, 3 answers of 1/4: 1.5 d values of 2 bytes
        for sent in entry.bytes_sent:
            assert 1.5 * numel * 2 <= sent <= 1.5 * numel * 2 * 1.001


@pytest.mark.parametrize("flags, fragment", [
    (("--speeds", "1,2"), "--speeds needs one number in (0, 1] per peer"),
    (("--set", "averaging.compression=gaussiank:2"), "averaging.compression"),
    (("--set", "nonsense"), "--set 'nonsense': use SECTION.FIELD=VALUE"),
])
def test_bad_input_is_one_line(flags, fragment):
    assert_one_line_error(run_cli("simulate", "--config", str(TINY_CONFIG), *flags), fragment)


def test_simulate_command_reports_and_writes_results(tmp_path):
    output = tmp_path / "results.json"
    sets = [arg for override in SMALL + ("averaging.mode=local", "averaging.schedule=constant:2",
                                          "averaging.compression=gaussiank:0.05")
            for arg in ("--set", override)]
    result = run_cli("simulate", "--config", str(TINY_CONFIG), "--peers", "2", "--steps", "6", "--batch-size", "3",
                     "--seeds", "0,1", "--eval-every", "3", "--output", str(output), *sets, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "held-out loss" in result.stdout and "mean held-out loss" in result.stdout
    written = json.loads(output.read_text())
    assert yaml.safe_dump(written["config"]) and [r["seed"] for r in written["results"]] == [0, 1]
    for run in written["results"]:
        assert run["rounds_done"] == 3 and run["bytes_sent_per_peer"] > 0 and len(run["curve"]) >= 2


@pytest.mark.parametrize("mode", ["sync", "local"])
def test_worker_processes_compute_the_same_floats(corpus, mode):
    """--workers splits the peers' backward passes between forked processes: the same floats as in one
    process (dropout on: every peer draws from its own generator wherever it runs), through uneven
    speeds, a join and a leave. One torch thread, as in the workers (torch's kernels at two threads
    round some sums differently)."""
    overrides = () if mode == "sync" else ("averaging.mode=local", "averaging.schedule=constant:2",
                                           "averaging.compression=gaussiank:0.05+2bit")
    config = _config(*overrides)
    assert config.model.config.get("resid_pdrop", 0.1) > 0  # GPT-2's default dropout: the draws matter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for workers in (1, 2):
            options = SimulationOptions(peers=3, steps=8, batch_size=2, speeds=[1.0, 0.5, 1.0], joins={2: 3},
                                        leaves={1: 6}, eval_every=4, workers=workers)
            simulation = Simulation(config, options, corpus)
            result = simulation.run().to_dict()
            trainees = [simulation.shared] if simulation.shared is not None else \
                [replica.trainee for replica in simulation.replicas]
            runs.append((result, [trainee.flat_parameters() for trainee in trainees]))
    finally:
        torch.set_num_threads(threads)
    (in_process, flats), (forked, forked_flats) = runs
    assert forked["steps_per_peer"] == in_process["steps_per_peer"] == [8, 3, 5]
    assert [c["train_loss"] for c in forked["curve"]] == [c["train_loss"] for c in in_process["curve"]]
    assert [c["heldout_loss"] for c in forked["curve"]] == [c["heldout_loss"] for c in in_process["curve"]]
    assert forked["rounds"] == in_process["rounds"]
    initial = torch.cat([p.detach().reshape(-1) for p in build_model(config.model, config.data.seq_len, config.seed).parameters()])
    assert (flats[0] - initial).abs().max() > 1e-3, "the parameters hardly moved: the comparison would prove nothing"
    for single, split in zip(flats, forked_flats):
        assert torch.equal(single, split)
