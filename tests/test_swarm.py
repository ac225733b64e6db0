"""A real swarm on loopback: coordinator + peer processes training the tiny config together."""
import signal

import pytest
import yaml

from tests.support import TINY_CONFIG
from tests.support.swarm import LocalSwarm, assert_no_tracebacks, max_parameter_difference



@pytest.fixture
def swarm(tmp_path):
    swarm = LocalSwarm(tmp_path, TINY_CONFIG)
    yield swarm
    swarm.close()


# GaussianK's swarm run in mode sync is in `make test-all` (-m slow, ~53 s): no shipped config pairs the two
# (the realistic configs and the demo run GaussianK in mode local: test_local_swarm), and sync-mode sparse
# rounds are checked bit for bit at the averager level (test_lying_reducer, test_compression_*). Its minute
# went to test_overlap's delayed-update swarm test, back in make test.
@pytest.fixture(params=["none", pytest.param("gaussiank:0.01", marks=pytest.mark.slow)])
def swarm_with_compression(request, tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["averaging"]["compression"] = request.param
    # 2x the tiny run's batch: alone, a peer runs through a tiny epoch in half a second, faster than
    # peer start-up times differ on a loaded machine; this way all three meet in the first epochs
    config["target_batch_size"] *= 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    swarm = LocalSwarm(tmp_path, path)
    swarm.compression = request.param
    yield swarm
    swarm.close()


def test_three_peers_average_every_round_and_stay_identical(swarm_with_compression):
    swarm = swarm_with_compression
    epochs = 16
    for index in range(3):
        # peer 2 has a slow uplink: load balancing gives it a small share of the reduction; peer 1
        # computes in bf16 with its batch sized to a memory limit (volunteers' machines differ)
        limits = {1: ("--precision", "bf16", "--batch-size", "auto", "--max-memory", "24MB"),
                  2: ("--max-upload-mbps", "2")}.get(index, ())
        swarm.start_peer(index, "--max-epochs", str(epochs), "--eval-every", "0", "--checkpoint-every", "0",
                         "--wait-for-peers", "3", *limits)
    swarm.wait_for_exit([0, 1, 2], timeout=400)
    for index in range(3):
        assert "3 peers here: training" in swarm.log(index) or "waiting for peers" not in swarm.log(index)

    # warm-up: until the first round that all three took part in (peers that start together may
    # step alone once or twice before their trackers see each other)
    full = [{r["epoch"] for r in swarm.rounds(i) if r["ok"] and r["group_size"] == 3} for i in range(3)]
    common = set.intersection(*full)
    assert common, [swarm.rounds(i) for i in range(3)]
    warmup = min(common)
    # (on a loaded machine one peer can be ready several epochs before the others)
    assert warmup <= epochs - 6, f"warm-up lasted {warmup} epochs: {[swarm.rounds(i) for i in range(3)]}"
    # after it, every round is a round of all three, but for at most one incident of a loaded machine:
    # hivemind's matchmaking can count a member into a group it has already given up on (a CI run saw
    # it at epoch 9 of 16: that round failed at all three, and the swarm re-formed over two epochs).
    # So: the rounds short of all three lie within 3 epochs of each other, and the last 4 epochs' rounds
    # are all rounds of three again
    after_warmup = {index: [r for r in swarm.rounds(index) if r["epoch"] >= warmup] for index in range(3)}
    short = sorted({r["epoch"] for records in after_warmup.values() for r in records
                    if not (r["ok"] and r["group_size"] == 3)})
    assert not short or short[-1] - short[0] <= 3, swarm.why_apart(range(3))
    assert all(epoch < epochs - 4 for epoch in short), swarm.why_apart(range(3))
    for index, records in after_warmup.items():
        # a peer one epoch behind catches up by skipping an epoch number, never by stepping alone
        assert len(records) >= epochs - warmup - 2, records

    states = [swarm.final_parameters(i) for i in range(3)]
    assert max_parameter_difference(states) <= 1e-6, swarm.why_apart(range(3))
    # load balancing gives the slow uplink almost no span to reduce (2 of 202 Mbit/s announced)...
    shares = [swarm.status(i)["traffic"]["last_reduce_share"] for i in range(3)]
    assert shares[2] < 0.05 and min(shares[:2]) > 0.4, shares
    if swarm.compression == "none":
        # ...so it sends its own gradient every round but answers for almost no span: about 1 vector
        # per round instead of 1.5 for its groupmates. (With sparse parts the bytes depend on where
        # the selected entries lie: when most fall into one peer's span, that peer also sends about
        # one part's worth, so there the share is the thing to check.)
        sent = [swarm.status(i)["traffic"]["bytes_sent_total"] / swarm.status(i)["traffic"]["rounds_ok"]
                for i in range(3)]
        assert sent[2] < 0.85 * min(sent[:2]), sent

    # the bf16 peer's averaged model is the same model; its batch is the probe's choice, not the default 8
    assert swarm.status(1)["precision"] == "bf16" and swarm.status(0)["precision"] == "fp32"
    assert swarm.status(1)["batch_size"] != swarm.status(0)["batch_size"] == 8
    assert f"memory: batch size {swarm.status(1)['batch_size']} per step" in swarm.log(1)

    heldout = swarm.status(0)["heldout_loss"]
    start, end = heldout[0][1], heldout[-1][1]
    print(f"{swarm.compression}: held-out loss {start:.3f} -> {end:.3f} after {epochs} epochs")
    assert end < start - 0.4  # 16 epochs: ~5.4 -> ~3.8 dense, ~4.6 with gaussiank:0.01
    assert_no_tracebacks(swarm, [0, 1, 2, "coordinator"])


def test_a_lone_peer_waits_then_trains_and_resumes_what_fits_of_its_checkpoint(swarm):
    """A volunteer's restart: the checkpoint in its directory holds this run's weights but another
    optimizer's state (say from an 8-bit run), and nobody else shows up."""
    import torch

    from swarmtrain.training.checkpoint import save_checkpoint
    from swarmtrain.config import load_run_config
    from swarmtrain.data import load_corpus
    from swarmtrain.models import build_model, heldout_loss

    config = load_run_config(TINY_CONFIG)
    model = build_model(config.model, config.data.seq_len, config.seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    adamw = torch.optim.AdamW(model.parameters())
    eight_bit_state = {"state": {i: {"step": torch.tensor(3.0), "state1": torch.zeros_like(p), "state2": torch.zeros_like(p)}
                                 for i, p in enumerate(model.parameters())},
                       "param_groups": adamw.state_dict()["param_groups"]}
    saved_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    save_checkpoint(swarm.workdir / "peer-0", 3, saved_weights, eight_bit_state, meta={"run_id": config.run_id})

    swarm.start_peer(0, "--max-epochs", "4", "--eval-every", "0", "--checkpoint-every", "0",
                     "--wait-for-peers", "2", "--wait-timeout", "2")
    swarm.wait_for_exit([0], timeout=180)
    log = swarm.log(0)
    assert "resuming from" in log and "resuming its weights with a fresh optimizer state" in log, log
    assert "only 1 of 2 peers after 2 s of waiting: training with them" in log, log
    status = swarm.status(0)
    assert status["phase"] == "finished" and status["epoch"] == 4, status
    # it started from the saved weights, and its steps work (a wrongly loaded optimizer state failed
    # every step inside hivemind: the weights never moved)
    heldout = status["heldout_loss"]
    reference = build_model(config.model, config.data.seq_len, config.seed)
    reference.load_state_dict(saved_weights)
    assert heldout[0][1] == pytest.approx(heldout_loss(reference, load_corpus(config.data, None).heldout,
                                                       config.model.kind), abs=1e-4)
    assert heldout[-1][1] < heldout[0][1] - 0.1, heldout
    assert max_parameter_difference([saved_weights, swarm.final_parameters(0)]) > 1e-3
    assert_no_tracebacks(swarm, [0])


@pytest.mark.slow  # flaky: see the note on the end-to-end issue (a late joiner can end up one step off)
def test_late_joiner_and_killed_peer(swarm):
    epochs = 30
    common = ("--max-epochs", str(epochs), "--eval-every", "0", "--checkpoint-every", "1")
    for index in range(3):
        swarm.start_peer(index, *common)
    swarm.wait_until(lambda: min(swarm.status(i).get("epoch", 0) for i in range(3)) >= 5, 300, "epoch 5")

    # SIGKILL: no goodbye, no checkpoint on exit; its DHT record lingers until it expires
    swarm.peers[2].send_signal(signal.SIGKILL)
    swarm.peers[2].wait()
    killed_at = max(swarm.status(i).get("epoch", 0) for i in (0, 1))
    swarm.wait_until(lambda: min(swarm.status(i).get("epoch", 0) for i in (0, 1)) >= killed_at + 3, 300,
                     "three epochs after the kill")
    for index in (0, 1):
        # the round under way at the kill may still have had it: judge the rounds after that one
        after_kill = [r for r in swarm.rounds(index) if killed_at + 1 <= r["epoch"] < killed_at + 3]
        assert after_kill and all(r["ok"] and r["group_size"] == 2 for r in after_kill), after_kill

    # a newcomer joins mid-run, and the killed peer comes back (resuming from its checkpoint)
    swarm.start_peer(3, *common)
    swarm.start_peer(2, *common)
    swarm.wait_for_exit([0, 1, 2, 3], timeout=400)

    for index in (2, 3):
        status = swarm.status(index)
        assert status.get("loaded_state_epoch", 0) > killed_at, f"peer-{index} did not download the state: {status}"
    # from then on they train with the others: once both are in, the rounds succeed and include all
    # four (how many such rounds remain depends on how long the restarts took on a loaded machine),
    # and the parameters agree
    joined = max(swarm.status(index)["loaded_state_epoch"] for index in (2, 3))
    for index in range(4):
        late_rounds = [r for r in swarm.rounds(index) if r["epoch"] > joined]
        assert late_rounds and all(r["ok"] for r in late_rounds), (index, late_rounds)
        assert sum(r["group_size"] == 4 for r in late_rounds) >= 2, (index, late_rounds)
    states = [swarm.final_parameters(i) for i in range(4)]
    assert max_parameter_difference(states) <= 1e-6, swarm.why_apart(range(4))
    # (no check for tracebacks here: hivemind logs one, for instance, when it first tries to
    # download the state from the killed peer, whose offer lingers in the DHT)


def test_progress_reports_are_throttled_but_never_lost():
    """hivemind's tracker publishes a peer's progress after every step; ours at most once per period,
    deferring (not dropping) what comes sooner, and an epoch change at once."""
    from swarmtrain.averaging.progress import AtMostEvery

    event = AtMostEvery(0.3)
    event.set()
    assert event.is_set()
    event.clear()
    for _ in range(50):  # 50 steps within the period: one deferred report, not 50 and not none
        event.set()
    assert not event.is_set()
    assert event.wait(1.0)
    event.clear()
    assert not event.wait(0.5)  # nothing new: nothing sent
    event.set_now()
    assert event.is_set()
