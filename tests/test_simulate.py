"""The swarm simulator's behaviour (its fidelity to the real swarm is test_simulate_fidelity.py's) and
`swarmtrain simulate` as a user runs it."""
import json

import pytest
import yaml

from swarmtrain.cli.simulate import apply_overrides
from swarmtrain.config import load_run_config
from swarmtrain.data import load_corpus
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
