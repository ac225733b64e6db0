"""Real tokenizers and streamed data through a real swarm (issue #15, phase 2).

The trainer reads through open_training_data and stores its position in its checkpoints, the
coordinator pins the tokenizer and publishes it in the DHT, peers without a copy get it from there.
The data layer they rest on is tested directly in tests/test_data_stream.py, tests/test_tokenizer.py
and tests/test_models.py.
"""
import re

import pytest
import yaml
from click.testing import CliRunner

from swarmtrain.cli.tokenizer import tokenizer as tokenizer_group
from tests.support import TINY_CONFIG, assert_one_line_error, run_cli
from swarmtrain.training.checkpoint import latest_checkpoint_path, read_meta
from tests.support.swarm import LocalSwarm, assert_no_tracebacks, max_parameter_difference



@pytest.fixture(autouse=True)
def own_swarmtrain_home(tmp_path, monkeypatch):
    """Peers cache a tokenizer fetched from the swarm in $SWARMTRAIN_HOME/tokenizers: one per test, or a
    copy cached by an earlier run would be found instead of fetched."""
    monkeypatch.setenv("SWARMTRAIN_HOME", str(tmp_path / "home"))

MODELS = {
    "llama": {"kind": "auto", "model_type": "llama",
              "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 2}},
    "bert": {"kind": "auto", "model_type": "bert",
             "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}},
}


def _run_config(tmp_path, model: dict) -> tuple:
    """A tiny run on a generated corpus with a tokenizer trained on it (the organiser's two commands)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the cat sat on a mat while the dog ran to its house and the bird flew over a tree".split()
    for i in range(40):
        (corpus / f"{i}.txt").write_text("".join(" ".join(words[(i * j + k) % len(words)] for k in range(12)) + ".\n"
                                                 for j in range(80)))
    result = CliRunner().invoke(tokenizer_group, ["train", "--data", str(corpus), "--vocab-size", "300",
                                                  "--out", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"] = model
    config["data"] = {"source": "text", "path": str(corpus), "tokenizer": str(tmp_path / "tok"), "seq_len": 32}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, corpus


# bert's swarm run (~50 s) adds only the masked-LM objective to llama's, and that is trained without a
# swarm in test_models.py: -m slow
@pytest.mark.parametrize("name", ["llama", pytest.param("bert", marks=pytest.mark.slow)])
def test_tiny_auto_models_train_through_the_swarm(tmp_path, name):
    path, _ = _run_config(tmp_path, MODELS[name])
    # These models step ~1000 samples/s: with the tiny config's 192-sample epochs a peer finished five
    # epochs alone in its first second, before its progress tracker had read the other's first report
    # (it publishes none before its first sample), and the two never met in a round. Epochs of a few
    # seconds leave the trackers time to find each other, as on any real run.
    config = yaml.safe_load(path.read_text())
    config["target_batch_size"] = 4096
    path.write_text(yaml.safe_dump(config))
    swarm = LocalSwarm(tmp_path, path)
    try:
        for index in range(2):
            swarm.start_peer(index, "--max-epochs", "6", "--eval-every", "3", "--wait-for-peers", "2")
        swarm.wait_for_exit([0, 1], timeout=400)
        assert_no_tracebacks(swarm, [0, 1, "coordinator"])
        heldout = swarm.status(0)["heldout_loss"]
        assert heldout[-1][1] < heldout[0][1]
        rounds = [swarm.rounds(0), swarm.rounds(1)]
        assert all(any(r["ok"] and r["group_size"] == 2 for r in mine) for mine in rounds), rounds
        # Peers whose last round (the same epoch) both went through hold the same model. One whose last
        # round failed or was partial (a reducer timed out: hivemind fills in the peer's own values) has
        # nothing left to re-synchronise against once the other is gone (seen once under heavy load).
        last = [mine[-1] for mine in rounds]
        if all(r["ok"] and r["group_size"] == 2 and r["epoch"] == last[0]["epoch"] for r in last):
            assert max_parameter_difference([swarm.final_parameters(0), swarm.final_parameters(1)]) < 1e-5, rounds
    finally:
        swarm.close()


def test_a_volunteer_gets_the_tokenizer_from_the_swarm_resumes_its_data_and_another_tokenizer_is_refused(tmp_path):
    path, corpus = _run_config(tmp_path, MODELS["llama"])
    swarm = LocalSwarm(tmp_path, path)
    try:
        (tmp_path / "tok").rename(tmp_path / "tok-moved")  # peers no longer find the organiser's copy...
        swarm.start_peer(0, "--max-epochs", "2")
        swarm.wait_for_exit([0], timeout=300)  # ...and get it from the swarm
        fetched = "got the run's tokenizer from the swarm"
        assert fetched in swarm.log(0)
        # a restart continues where its checkpoint says in the corpus, not from the start
        saved = read_meta(latest_checkpoint_path(tmp_path / "peer-0"))["data_position"]
        assert saved["open"] or saved["pass"] > 0  # it did read part of the corpus
        (tmp_path / "peer-0.json").unlink()  # (the first run's status says where that one started)
        swarm.start_peer(0, "--max-epochs", "3")
        swarm.wait_for_exit([0], timeout=300)
        assert swarm.status(0)["data_position_at_start"] == saved
        assert swarm.log(0).count(fetched) == 1  # the second time, from its cache
        # a volunteer holding another tokenizer file at the run's path is refused
        other = CliRunner().invoke(tokenizer_group, ["train", "--data", str(corpus), "--vocab-size", "280",
                                                     "--out", str(tmp_path / "tok")])
        assert other.exit_code == 0
        process = swarm.start_peer(1, "--max-epochs", "2")
        assert process.wait(120) != 0
        errors = [line for line in swarm.log(1).splitlines() if "Error" in line]
        assert len(errors) == 1 and "is not the run's" in errors[0]
        assert "Traceback" not in swarm.log(1)
    finally:
        swarm.close()


@pytest.mark.parametrize("problem", ["model vocab", "missing tokenizer"])
def test_a_coordinator_refuses_a_tokenizer_the_run_cannot_use_in_one_line(tmp_path, problem):
    model = dict(MODELS["llama"])
    if problem == "model vocab":  # a config.json made for another tokenizer
        model["config"] = {**model["config"], "vocab_size": 500}
    path, _ = _run_config(tmp_path, model)
    if problem == "missing tokenizer":
        config = yaml.safe_load(path.read_text())
        config["data"]["tokenizer"] = str(tmp_path / "no-such-tokenizer")
        path.write_text(yaml.safe_dump(config))
    identity = tmp_path / "coordinator.id"
    result = run_cli("coordinator", "--config", str(path), "--identity", str(identity),
                     "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
    if problem == "model vocab":
        assert_one_line_error(result, "vocab_size is 500", "300 tokens")
    else:
        assert_one_line_error(result, "data.tokenizer", "no such file or directory")
    assert not identity.exists()  # refused before anything was written or published


def test_a_peer_whose_data_is_empty_or_lacks_the_text_column_is_refused_in_one_line(tmp_path):
    """A volunteer's own --data (a dataset the organiser's run config describes) checked in the peer
    process: one Error line naming the flag and the fix, exit != 0, no traceback, no checkpoint."""
    import datasets

    datasets.Dataset.from_dict({"text": ["the organiser's text, long enough for blocks. " * 20] * 40}) \
        .save_to_disk(str(tmp_path / "organiser"))
    datasets.Dataset.from_dict({"content": ["text under another column name " * 20] * 40}) \
        .save_to_disk(str(tmp_path / "no-text-column"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["data"] = {"source": "datasets", "path": str(tmp_path / "organiser"), "seq_len": 32}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    swarm = LocalSwarm(tmp_path, path)
    try:
        cases = {0: ("empty", "--data .*empty: the corpus is empty"),
                 1: ("no-text-column", "--data .*no-text-column: the dataset has no column 'text' "
                                       r"\(it has content\); set data.text_column")}
        processes = {index: swarm.start_peer(index, "--data", str(tmp_path / name), "--max-epochs", "2")
                     for index, (name, _) in cases.items()}
        for index, (_, message) in cases.items():
            assert processes[index].wait(180) != 0
            log = swarm.log(index)
            errors = [line for line in log.splitlines() if "Error" in line]
            assert len(errors) == 1 and re.search(message, errors[0]), log[-2000:]
            assert "Traceback" not in log
            assert not latest_checkpoint_path(tmp_path / f"peer-{index}"), "nothing written for a peer that cannot train"
    finally:
        swarm.close()
