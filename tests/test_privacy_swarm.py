"""Split contribution through a real local swarm (issue #5, acceptance 3).

A coordinator publishes a split run (privacy.split); two `swarmtrain peer --role trunk` processes
host the trunk, announce themselves in the DHT and average the trunk between them; one
`swarmtrain peer --role data-owner` process (wrapped by tests/support/recording_peer.py, which records every
message it and its DHT process hand to the p2p daemon) finds a trunk host and trains through it.

Asserts: the owner learns (held-out accuracy >= MIN_TEST_ACCURACY, chance is 0.10), and everything
that left the owner is either a split RPC carrying exactly a float32 [batch, CUT_WIDTH] Z (+ int64
labels for training) with no raw image row in it, or a DHT RPC that contains no raw image row.
"""
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from swarmtrain.demo import start_peer
from swarmtrain.privacy.config import DEFAULT_ALPHA, DEFAULT_CUT_NOISE
from swarmtrain.privacy.digits import load_digits_splits
from swarmtrain.privacy.split import SPLIT_PROTOCOL_VERSION, handler_names
from tests.support.swarm import LocalSwarm

CUT_WIDTH = 32  # != 64 input pixels: a Z-shaped message cannot be an X-shaped one
BATCH = 64
MAX_STEPS = 200  # ~14 passes over the 900 private samples
MIN_TEST_ACCURACY = 0.60  # chance is 0.10 on 10 balanced classes: a margin of 0.5
RUN_ID = "split-swarm-test"
RECORDER = Path(__file__).parent / "support" / "recording_peer.py"

CONFIG = {
    "run_id": RUN_ID,
    "seed": 0,
    "target_batch_size": BATCH,
    "averaging": {"matchmaking_time": 2.0, "request_timeout": 1.0},
    # no defence settings: the owner trains with PrivacyConfig's defaults, the chosen defence (issue #17)
    "privacy": {"enabled": True,
                "split": {"cut_width": CUT_WIDTH, "batch_size": BATCH, "average_every": 3.0,
                          "averaging_timeout": 10.0}},
}


def _recorded(record_dir: Path):
    for path in record_dir.glob("*.rec"):
        with open(path, "rb") as handle:
            while True:
                try:
                    yield pickle.load(handle)
                except EOFError:
                    break


def test_data_owner_trains_through_the_swarms_trunk_hosts(tmp_path, monkeypatch):
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(CONFIG))
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    monkeypatch.setenv("SWARMTRAIN_RECORD_DIR", str(record_dir))
    swarm = LocalSwarm(tmp_path, tmp_path / "split.yaml")
    try:
        for index in (0, 1):
            swarm.start_peer(index, "--role", "trunk")
        swarm.wait_until(lambda: all(swarm.status(i).get("phase") == "hosting trunk" for i in (0, 1)), 240,
                         "the trunk hosts")
        swarm.peers[2] = start_peer(
            tmp_path, 2, swarm.maddr, "--role", "data-owner", "--max-steps", str(MAX_STEPS),
            command=lambda *args: [sys.executable, str(RECORDER), *args])
        swarm.wait_for_exit([2], timeout=300)
        # the trunk hosts average with each other: wait for a round of both after the owner's last step
        ok_rounds = lambda i: sum(r["ok"] for r in swarm.rounds(i))  # noqa: E731
        before = [ok_rounds(i) for i in (0, 1)]
        swarm.wait_until(lambda: all(ok_rounds(i) > before[i] for i in (0, 1)), 60, "a trunk averaging round")
        for index in (0, 1):  # both at once (Ctrl+C), as a user would
            swarm.peers[index].send_signal(signal.SIGINT)
        for index in (0, 1):  # a second SIGINT (stop_process) could land in the interpreter's teardown
            assert swarm.peers[index].wait(30) == 0, swarm.log(index)[-3000:]
    finally:
        swarm.close()

    owner_status = swarm.status(2)
    trunk_status = [swarm.status(i) for i in (0, 1)]
    print(f"owner: {owner_status.get('step')} steps, test accuracy {owner_status.get('test_accuracy')}, "
          f"leakage {owner_status.get('test_leakage')}; trunks: "
          f"{[(s.get('step'), sum(r['ok'] for r in s.get('rounds', []))) for s in trunk_status]}")

    # 1) the owner learned through the swarm's trunk, and the trunk hosts did its steps
    assert owner_status["phase"] == "finished" and owner_status["step"] == MAX_STEPS
    assert owner_status["test_accuracy"] >= MIN_TEST_ACCURACY, owner_status["test_accuracy"]
    assert 0.0 <= owner_status["test_leakage"] <= 1.0
    assert sum(s.get("step", 0) for s in trunk_status) >= MAX_STEPS
    assert all(s.get("rejected", 0) == 0 for s in trunk_status)
    # a trunk host that served no step still moved: it took the trained trunk in by averaging
    for status in trunk_status:
        assert any(r["ok"] for r in status["rounds"])
        if status["step"] == 0:
            assert abs(status["trunk_norm"] - status["initial_trunk_norm"]) > 1e-3, status
    assert "Traceback" not in swarm.log(2), swarm.log(2)[-3000:]
    # ...with the chosen default defence (issue #17): NoPeek and noise calibrated at the cut
    assert f"privacy head at the cut: alpha {DEFAULT_ALPHA:g}, cut_noise {DEFAULT_CUT_NOISE:g}," in swarm.log(2)

    # 2) what left the owner (its main process and its DHT process): Z and labels, and DHT chatter
    splits = load_digits_splits(seed=0)
    raw_rows = torch.cat([splits.private_x, splits.test_x])
    raw_row_bytes = [row.numpy().tobytes() for row in raw_rows]
    train_name, eval_name = handler_names(RUN_ID)
    records = list(_recorded(record_dir))
    assert records, "the recorder saw no traffic"
    n_train = n_eval = 0
    for kind, name, payload in records:
        if name in (train_name, eval_name):
            assert kind == "unary"
            request = runtime_pb2.ExpertRequest.FromString(payload)
            assert request.uid == "" and MSGPackSerializer.loads(request.metadata) == {"version": SPLIT_PROTOCOL_VERSION}
            z_proto = request.tensors[0]
            assert z_proto.dtype == "float32" and len(z_proto.size) == 2 and z_proto.size[1] == CUT_WIDTH
            batch = z_proto.size[0]
            if name == train_name:
                n_train += 1
                assert len(request.tensors) == 2
                assert request.tensors[1].dtype == "int64" and list(request.tensors[1].size) == [batch]
            else:
                n_eval += 1
                assert len(request.tensors) == 1  # evaluation sends no labels
            z = torch.from_numpy(np.frombuffer(z_proto.buffer, dtype=np.float32).copy()).view(batch, CUT_WIDTH)
            assert torch.cdist(z.double(), raw_rows[:, :CUT_WIDTH].double()).min() > 1e-3
        else:
            # everything else is the DHT's own protocol (finding trunk hosts, publishing the peer record) and
            # the reachability check at joining (asking a peer to dial us back)
            assert kind == "unary" and name.startswith(("DHTProtocol.", "swarmtrain.ReachabilityCheck.")), (kind, name)
            assert not any(row in payload for row in raw_row_bytes), f"a raw data row in a {name} message"
    assert n_train == MAX_STEPS and n_eval >= 1


@pytest.mark.parametrize("privacy, message", [
    ({"split": {"cut_widht": 8}}, "privacy.split.cut_widht: unknown field"),
    ({"split": {"batch_size": 1}}, "privacy.split.batch_size: Input should be greater than or equal to 2"),
    ({"split": {"task": "cifar"}}, "privacy.split.task: Input should be 'digits'"),
    ({"split": {}, "cut_layer": "features.3"}, "privacy.cut_layer: a split run cuts where privacy.split puts the cut"),
])
def test_split_config_errors_are_one_line_naming_the_field(privacy, message):
    from swarmtrain.config import parse_run_config
    from swarmtrain.errors import UserError

    with pytest.raises(UserError) as error:
        parse_run_config({**CONFIG, "privacy": privacy})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_split_run_config_round_trips_and_a_plain_one_publishes_without_split():
    from swarmtrain.config import dump_run_config, parse_run_config

    config = parse_run_config(CONFIG)  # no model section: a split run needs none
    assert config.privacy.split.cut_width == CUT_WIDTH and config.privacy.split.average_every == 3.0
    assert config.model is None and parse_run_config(yaml.safe_load(dump_run_config(config))) == config
    assert parse_run_config({**CONFIG, "model": {"kind": "gpt2"}}).model.kind == "gpt2"  # one given is ignored
    plain = parse_run_config({**{key: value for key, value in CONFIG.items() if key != "privacy"},
                              "model": {"kind": "gpt2"}})
    assert plain.privacy.split is None


@pytest.mark.parametrize("model", ["absent", None])
def test_a_run_that_is_not_split_still_needs_a_model(model):
    from swarmtrain.config import parse_run_config
    from swarmtrain.errors import UserError

    data = {key: value for key, value in CONFIG.items() if key != "privacy"}
    if model != "absent":
        data["model"] = model
    with pytest.raises(UserError) as error:
        parse_run_config(data)
    assert str(error.value) == "config: model: required field is missing"


def test_the_example_split_config_has_no_model_section():
    from swarmtrain.config import load_run_config

    path = Path(__file__).resolve().parent.parent / "swarmtrain" / "configs" / "split-digits.yaml"
    assert "model" not in yaml.safe_load(path.read_text())
    config = load_run_config(path)
    assert config.model is None and config.privacy.split is not None
    # it trains with the chosen default defence (issue #17), nothing overridden
    from swarmtrain.privacy.config import DEFAULT_WARMUP_STEPS

    assert (config.privacy.alpha, config.privacy.cut_noise, config.privacy.warmup_steps) == (
        DEFAULT_ALPHA, DEFAULT_CUT_NOISE, DEFAULT_WARMUP_STEPS)
    # the places that build the run's model say what a split run does instead of failing on the missing model
    from swarmtrain.coordinator.state import StateKeeper
    from swarmtrain.cli.doctor import OK, check_memory
    from swarmtrain.errors import UserError

    assert check_memory(config, "cpu").status == OK
    with pytest.raises(UserError, match="a split run .* has no coordinator checkpoints"):
        StateKeeper(config, dht=None)


def test_owner_data_file_is_checked(tmp_path):
    from swarmtrain.errors import UserError
    from swarmtrain.privacy.data_owner import load_owner_data

    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.rand(50, 8, 8), y=np.arange(50) % 10)
    train_x, train_y, test_x, test_y, _ = load_owner_data(str(good), seed=0)
    assert train_x.shape == (40, 64) and test_x.shape == (10, 64) and train_y.dtype == torch.int64
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.random.rand(50, 10), y=np.arange(50) % 10)
    with pytest.raises(UserError, match=r"x must be \[N, 64\]"):
        load_owner_data(str(bad), seed=0)
    np.savez(bad, x=np.random.rand(50, 64), y=np.arange(50))
    with pytest.raises(UserError, match="class ids"):
        load_owner_data(str(bad), seed=0)
