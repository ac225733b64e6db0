"""averaging.overlap (sync mode): hivemind's delayed parameter updates. Peers compute the next epoch while
the last one's round and optimizer step run in the background; each update lands exactly once and the
peers end on the same parameters. Also: the utilization figure each peer reports."""
import urllib.request

import pytest
import yaml

from swarmtrain.averaging.rounds import NO_OTHER_PEERS, RoundRecord, reason_to_resync
from swarmtrain.monitoring.aggregate import SwarmAggregator
from swarmtrain.monitoring.records import PeerRecord
from swarmtrain.peer.utilization import UtilizationMeter
from swarmtrain.training.checkpoint import load_checkpoint
from swarmtrain.demo import free_port
from tests.support import TINY_CONFIG
from tests.support.swarm import LocalSwarm, assert_no_tracebacks, max_parameter_difference

EPOCHS = 12


@pytest.fixture
def overlap_swarm(tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["averaging"]["overlap"] = True
    # epochs of several seconds: longer than a round, so that rounds do overlap the next epoch's work,
    # and the run is still under way when the late joiner has started up
    config["target_batch_size"] *= 8
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics_port = free_port()
    swarm = LocalSwarm(tmp_path, path, metrics_port=metrics_port)
    swarm.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield swarm
    swarm.close()


# Quarantined in -m slow: failed 3 of the last 8 fresh-clone CI runs (2 in a row on 2026-11-28), in mode
# sync, which those runs did not change: rounds of two end partial ("received 44.9% results"), both peers
# re-synchronise, one runs an epoch's round twice (docs/notes/issue-19-g.md). Mode local's delayed outer
# step is still checked in make test (test_local_swarm's background rounds). Back once the cause is fixed.
@pytest.mark.slow
def test_delayed_updates_land_once_and_peers_end_identical(overlap_swarm):
    swarm = overlap_swarm
    flags = ("--max-epochs", str(EPOCHS), "--eval-every", "0", "--checkpoint-every", "0")
    for index in range(2):
        swarm.start_peer(index, *flags, "--wait-for-peers", "2")
    # a third joins a run under way: it downloads the state from a peer whose step may be in flight
    swarm.wait_until(lambda: swarm.status(0).get("epoch", 0) >= 2, timeout=300, what="epoch 2")
    swarm.start_peer(2, *flags)
    # the coordinator exports the trainers' mean utilization while they train
    exported = []

    def utilization_exported() -> bool:
        with urllib.request.urlopen(swarm.metrics_url, timeout=5) as response:
            lines = [line for line in response.read().decode().splitlines()
                     if line.startswith("swarmtrain_utilization_ratio ")]
        exported.extend(float(line.split()[-1]) for line in lines)
        return bool(lines)

    swarm.wait_until(utilization_exported, timeout=300, what="the coordinator to export utilization")
    assert 0.0 <= exported[-1] <= 1.0
    swarm.wait_for_exit([0, 1, 2], timeout=400)
    assert_no_tracebacks(swarm, [0, 1, 2])

    statuses = [swarm.status(i) for i in range(3)]
    assert statuses[2]["loaded_state_epoch"] >= 2
    # the rounds did run in the background: peers computed local steps while one was in flight
    assert all(status["overlapped_steps"] > 0 for status in statuses), [s["overlapped_steps"] for s in statuses]
    for status in statuses:
        rounds = status["rounds"]
        # one record per epoch (the background thread writes it with the epoch the round was for)
        epochs = [r["epoch"] for r in rounds]
        assert len(epochs) == len(set(epochs)), rounds
        # (the joiner's rounds begin at the epoch it downloaded)
        assert sum(r["ok"] and r["group_size"] >= 2 for r in rounds) >= (EPOCHS - min(epochs)) // 2, rounds
        assert 0.0 <= status["utilization"] <= 1.0

    for index in range(3):
        checkpoint = load_checkpoint(swarm.workdir / f"peer-{index}")
        state = checkpoint.optimizer_state["state"]
        assert state["local_epoch"] == EPOCHS
        # every epoch's delayed step ran exactly once (hivemind's one initial zero-gradient step aside):
        # a step applied twice or dropped shows in Adam's step counter
        steps = {float(entry["step"]) for key, entry in state.items() if isinstance(entry, dict)}
        assert steps == {EPOCHS + 1.0}, (index, steps)
    # the last update in flight reached every model before it was saved, and a peer whose late round
    # failed (its fingerprints would show it only two rounds on) took the swarm's state before it left
    difference = max_parameter_difference([swarm.final_parameters(i) for i in range(3)])
    assert difference <= 1e-6, (difference, [(s["rounds"][-3:], s.get("resyncs")) for s in statuses])


def test_utilization_is_a_share_of_wall_time():
    now = [100.0]
    meter = UtilizationMeter(clock=lambda: now[0])
    assert meter.share() is None  # training has not begun
    meter.start()
    now[0] += 10.0
    meter.add_computing(4.0)
    assert meter.share() == pytest.approx(0.4)
    meter.add_computing(-1.0)  # a negative interval (clock adjustment) counts as nothing
    assert meter.share() == pytest.approx(0.4)
    meter.add_computing(20.0)  # more computing than wall time (threads overlap): capped
    assert meter.share() == 1.0


def test_utilization_is_published_bounded_and_aggregated():
    base = dict(peer_id="p", role="trainer", step=1, epoch=1, loss=1.0, samples_per_second=1.0,
                samples_accumulated=0, bytes_sent=0, bytes_received=0, rounds_ok=0, rounds_failed=0,
                last_round_seconds=None, last_round_group_size=None, compression_density=None, leakage_dcor=None,
                device="cpu", client_mode=False, version="0", time=1000.0)
    with pytest.raises(Exception):
        PeerRecord.make(**base, utilization=1.5)
    assert PeerRecord.make(**base, utilization=float("nan")).utilization is None
    records = {f"[owner:ssh-rsa AAAA{name}]": PeerRecord.make(**dict(base, peer_id=name), utilization=value)
               for name, value in (("a", 0.9), ("b", 0.5), ("c", None))}
    status = SwarmAggregator("run").update(records, now=1000.0)
    assert status.mean_utilization == pytest.approx(0.7)
    assert sorted(row.utilization for row in status.peers if row.utilization is not None) == [0.5, 0.9]


def test_a_failed_round_followed_by_a_good_one_still_sends_the_peer_for_the_swarms_state():
    """With overlap the last two rounds of a run land after the peer's last look: the failed one must not
    hide behind the good one (its fingerprints would show the gap two rounds later, never at the end)."""
    failed, good = RoundRecord(10, 0, False, 3.0, note="TimeoutError"), RoundRecord(11, 3, True, 1.0)
    assert reason_to_resync([failed, good], diverged=False) == "its averaging round of epoch 10 failed (TimeoutError)"
    assert reason_to_resync([good], diverged=False) is None
    assert reason_to_resync([good], diverged=True) == "its parameters differ from the rest of its group"
    # stepping alone is no failure; mode local may judge a failed round harmless
    alone = RoundRecord(12, 0, False, 0.0, note=NO_OTHER_PEERS)
    assert reason_to_resync([alone, good], diverged=False) is None
    assert reason_to_resync([failed, good], diverged=False, failed_rounds_count=False) is None
    assert reason_to_resync([], diverged=True) is None
