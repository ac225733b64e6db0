"""averaging.overlap (sync mode): hivemind's delayed parameter updates. Peers compute the next epoch while
the last one's round and optimizer step run in the background; each update lands exactly once and the
peers end on the same parameters. Also: the utilization figure each peer reports."""
import threading
import time
import urllib.request
from concurrent.futures import Future

import pytest
import torch
import yaml

from swarmtrain.averaging.rounds import NO_OTHER_PEERS, RoundRecord, reason_to_resync
from swarmtrain.averaging.sync import SwarmOptimizer
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

    # the joiner's first round was the swarm's round of the same epoch: the state it downloaded was the
    # start of a round it could still join (served labelled one epoch back, it joined the next round and
    # lacked the one before for good). A group is named by its members. (Only the first: later, a joiner
    # late for a round can still meet the others' next one under load -- mode sync's matchmaking key has
    # no epoch -- and re-synchronise; a run here saw that at its fourth round.)
    joiners_first = next(r for r in sorted(statuses[2]["rounds"], key=lambda r: r["epoch"]) if r["ok"])
    for first in statuses[:2]:
        groups = {r["epoch"]: r.get("group") for r in first["rounds"] if r["ok"]}
        assert joiners_first.get("group") == groups.get(joiners_first["epoch"]), (statuses[2]["rounds"], first["rounds"])

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


def test_a_donor_serves_the_state_after_its_round_lands_labelled_for_the_next_round(two_dhts):
    """SettledStateMixin with delayed updates: a state served while a round runs from the donor's
    parameters was the start of a round the joiner could no longer join (it then lacked that round's
    update for good). The donor waits for the round to land and serves what follows it."""
    model = torch.nn.Linear(4, 3)
    donor = SwarmOptimizer.state_averager_class(
        dht=two_dhts[0], prefix="settledtest_state_averager", optimizer=lambda params: torch.optim.AdamW(params),
        params=model.parameters(), min_matchmaking_time=1.0, request_timeout=0.5, start=True)
    try:
        donor.local_epoch = 6  # hivemind counts epoch 6 as soon as round 5 begins
        round_5 = Future()
        donor.pending_updates.add(round_5)
        donor.settle_wait = 5.0

        def land_round_5():
            time.sleep(0.3)
            with donor.lock_optimizer, torch.no_grad():  # the background step
                for param in donor.optimizer.param_groups[0]["params"]:
                    param.fill_(6.0)
            round_5.set_result(None)

        lander = threading.Thread(target=land_round_5)
        started = time.monotonic()
        lander.start()
        metadata, tensors, _ = donor.get_current_state()
        lander.join()
        assert time.monotonic() - started >= 0.25
        assert metadata["epoch"] == 6 and all(bool((tensor == 6.0).all()) for tensor in tensors[:2])

        # a round that does not land in time: the parameters before it, labelled the epoch before (a
        # joiner wanting 6 asks again)
        donor.pending_updates.add(Future())
        donor.settle_wait = 0.2
        assert donor.get_current_state()[0]["epoch"] == 5
        donor.pending_updates.clear()

        # a round scheduled with its group forming holds the state back too; dropped, it is served as is
        forming = [True]
        donor.round_forming = lambda: forming[0]
        donor.settle_wait = 5.0
        threading.Timer(0.3, forming.__setitem__, (0, False)).start()
        started = time.monotonic()
        assert donor.get_current_state()[0]["epoch"] == 6
        assert time.monotonic() - started >= 0.25
    finally:
        donor.shutdown()
