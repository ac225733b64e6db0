"""A real swarm on loopback: coordinator + peer processes training the tiny config together."""
import os
import signal

import pytest

from tests.conftest import TINY_CONFIG
from tests.swarm_helpers import LocalSwarm, assert_no_tracebacks, max_parameter_difference



def joined_epoch(swarm, index) -> int:
    """The epoch from which a peer takes part: 0, or where it downloaded the state when it started
    after the others (on a loaded machine a peer's start-up can take several epochs)."""
    return swarm.status(index).get("loaded_state_epoch", 0)


@pytest.fixture
def swarm(tmp_path):
    swarm = LocalSwarm(tmp_path, TINY_CONFIG)
    yield swarm
    swarm.close()


def test_three_peers_average_every_round_and_stay_identical(swarm):
    epochs = 14
    for index in range(3):
        swarm.start_peer(index, "--max-epochs", str(epochs), "--eval-every", "0", "--checkpoint-every", "0")
    swarm.wait_for_exit([0, 1, 2], timeout=400)

    # warm-up: until the last peer is in (the first round after its start may still form without it)
    warmup = max(joined_epoch(swarm, i) for i in range(3)) + 1
    assert warmup <= epochs - 5, f"a peer started too late to judge: warm-up lasted {warmup} epochs"
    for index in range(3):
        after_warmup = [r for r in swarm.rounds(index) if r["epoch"] >= warmup]
        assert len(after_warmup) == epochs - warmup, swarm.rounds(index)
        assert all(r["ok"] and r["group_size"] == 3 for r in after_warmup), after_warmup

    states = [swarm.final_parameters(i) for i in range(3)]
    assert max_parameter_difference(states) <= 1e-6

    heldout = swarm.status(0)["heldout_loss"]
    start, end = heldout[0][1], heldout[-1][1]
    print(f"held-out loss {start:.3f} -> {end:.3f} after {epochs} epochs")
    assert end < start - 0.5  # 12 epochs of the tiny config take ~5.4 to ~3.9 nats/byte
    assert_no_tracebacks(swarm, [0, 1, 2, "coordinator"])


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
    # from then on they match the others: the last rounds include all four, parameters agree
    for index in range(4):
        late_rounds = [r for r in swarm.rounds(index) if r["epoch"] >= epochs - 5]
        assert late_rounds and all(r["ok"] and r["group_size"] == 4 for r in late_rounds), (index, late_rounds)
    states = [swarm.final_parameters(i) for i in range(4)]
    assert max_parameter_difference(states) <= 1e-6
    assert_no_tracebacks(swarm, [0, 1, 3, "coordinator"])
