"""`averaging.mode: local` on a real loopback swarm: coordinator + peer processes.

- after every full averaging round (plain averaging) all peers hold the same parameters;
- a peer that joins mid-run starts from the swarm's current averaged model.

Rounds are matched across peers by ``round_index`` (the swarm's round count, which every member of a
round computes from the same gathered data), not by epoch label: a peer an epoch behind labels the
same round one lower.
"""
import datetime
import re
from collections import defaultdict

import pytest
import yaml

from swarmtrain.demo import stop_process
from tests.support import TINY_CONFIG
from tests.support.swarm import LocalSwarm, assert_no_tracebacks, max_parameter_difference


def _local_swarm(tmp_path, total_epochs=None, **averaging) -> LocalSwarm:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["averaging"].update(mode="local", **averaging)
    # 4x the tiny run's batch: a peer alone runs through tiny epochs in about a second, faster than
    # the peers' start-up times differ on a loaded machine; this way they meet early
    config["target_batch_size"] *= 4
    if total_epochs is not None:
        config["optimizer"]["total_epochs"] = total_epochs
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return LocalSwarm(tmp_path, path)


@pytest.fixture
def cleanup():
    swarms = []
    yield swarms.append
    for swarm in swarms:
        swarm.close()


def _rounds_by_index(swarm, peers):
    """round_index -> {peer: record} of the successful rounds."""
    rounds = defaultdict(dict)
    for index in peers:
        for record in swarm.rounds(index):
            if record["ok"]:
                rounds[record["round_index"]][index] = record
    return rounds


def _check_members_agree(swarm, peers, dense: bool) -> list:
    """In every round, the members that were in step hold the same model afterwards, and agree on
    the next averaging point. Returns the indices of the full rounds (all `peers`, all in step)."""
    full = []
    for index, records in sorted(_rounds_by_index(swarm, peers).items()):
        in_step = [r for r in records.values() if r["in_step"]]
        if dense:  # each peer adds its own float delta: ~1e-8 apart
            sums = [r["anchor_sum"] for r in in_step]
            assert max(sums) - min(sums) <= 1e-3, (index, records)
        else:  # sparse: every member decodes the same bytes: bit-identical
            assert len({r["anchor_digest"] for r in in_step}) == 1, (index, records)
        assert len({r["next_epoch"] for r in records.values()}) == 1, (index, records)
        if len(in_step) == len(peers) and all(r["group_size"] == len(peers) for r in in_step):
            full.append(index)
    return full


def _log_time(clock: str, near: float) -> float:
    """The Unix time of a log line's HH:MM:SS, on the day of `near` (a Unix time within hours of it)."""
    day = datetime.datetime.fromtimestamp(near)
    hours, minutes, seconds = map(int, clock.split(":"))
    stamp = day.replace(hour=hours, minute=minutes, second=seconds, microsecond=0).timestamp()
    return min((stamp + shift for shift in (-86400, 0, 86400)), key=lambda t: abs(t - near))


def test_one_averaged_model_after_every_round_and_a_joiner_starts_from_it(tmp_path, cleanup):
    swarm = _local_swarm(tmp_path, schedule="adaptive", compression="gaussiank:0.05", round_budget=30,
                         max_period=3, total_epochs=60)
    cleanup(swarm)
    common = ("--max-epochs", "60", "--eval-every", "0", "--checkpoint-every", "0")
    for index in range(2):
        swarm.start_peer(index, *common)
    swarm.wait_until(lambda: min(sum(r["ok"] and r["group_size"] == 2 for r in swarm.rounds(i)) for i in range(2)) >= 2,
                     300, "two averaging rounds of the first two peers")
    swarm.start_peer(2, *common)
    swarm.wait_until(lambda: sum(r["ok"] and r["in_step"] and r["group_size"] == 3 for r in swarm.rounds(2)) >= 2,
                     300, "two rounds of all three peers")
    for index in (2, 1, 0):  # Ctrl+C: each writes its final status
        stop_process(swarm.peers[index])

    # acceptance 4: every state the joiner took was the swarm's newest averaged model of that time --
    # the one the veterans' latest round produced (same bytes), not the initial model nor a donor's
    # half-trained local one. Matched by round_index: a veteran an epoch behind labels a round one
    # lower than the state's anchor epoch says (the CI once saw "model of epoch 11 at epoch 10")
    veteran = {r["round_index"]: r for i in (0, 1) for r in swarm.rounds(i) if r["ok"] and r["in_step"]}
    loads = re.findall(r"(\d\d:\d\d:\d\d) \S+ \S+: took the swarm's averaged model of epoch \d+ at epoch \d+ "
                       r"\((\d+) rounds so far; digest (\w+),", swarm.log(2))
    assert loads and swarm.status(2).get("loaded_state_epoch", 0) >= 2, swarm.log(2)[-3000:]
    for clock, rounds_done, digest in loads:
        assert int(rounds_done) in veteran and veteran[int(rounds_done)]["anchor_digest"] == digest, (loads, veteran)
        # newest: no later veteran round had landed well before the joiner logged the load (the log's
        # clock has 1 s steps, and the download takes a moment after the donor served it)
        loaded_at = _log_time(clock, veteran[int(rounds_done)]["finished_at"])
        landed_before = [index for index, r in veteran.items() if r["finished_at"] < loaded_at - 5]
        assert max(landed_before, default=-1) <= int(rounds_done), (clock, rounds_done, veteran)
    # acceptance 3: after every round its members in step hold one model (bit-identical: sparse),
    # before and after the joiner came; at least two full rounds of all three
    assert len(_check_members_agree(swarm, [0, 1, 2], dense=False)) >= 2, _rounds_by_index(swarm, [0, 1, 2])
    assert_no_tracebacks(swarm, [0, 1, 2])


@pytest.mark.slow
@pytest.mark.parametrize("compression, schedule", [("none", "steps:40"), ("gaussiank:0.05", "constant:2")])
def test_three_peers_hold_the_same_model_after_every_full_round(tmp_path, cleanup, compression, schedule):
    swarm = _local_swarm(tmp_path, schedule=schedule, compression=compression)
    cleanup(swarm)
    epochs = 16
    for index in range(3):
        swarm.start_peer(index, "--max-epochs", str(epochs), "--eval-every", "0", "--checkpoint-every", "0")
    swarm.wait_for_exit([0, 1, 2], timeout=600)

    full = _check_members_agree(swarm, [0, 1, 2], dense=compression == "none")
    print(compression, "full rounds", full)
    assert len(full) >= 3, _rounds_by_index(swarm, [0, 1, 2])
    heldout = swarm.status(0)["heldout_loss"]
    assert heldout[-1][1] < heldout[0][1] - 0.3
    if schedule.startswith("steps:"):  # its last round need not fall on the last epoch
        _check_periods_from_local_steps(swarm, [0, 1, 2], int(schedule.partition(":")[2]))
        return
    # the peers whose last round (at the last epoch) succeeded end with the same parameters
    finished = [i for i in range(3) if swarm.rounds(i)[-1]["ok"] and swarm.rounds(i)[-1]["epoch"] == epochs]
    assert len(finished) >= 2, [swarm.rounds(i)[-1] for i in range(3)]
    states = [swarm.final_parameters(i) for i in finished]
    assert max_parameter_difference(states) <= (1e-6 if compression == "none" else 0.0), swarm.why_apart(finished)


def _check_periods_from_local_steps(swarm, peers, steps: int) -> None:
    """steps:H on real peers: every successful round's period is H over the local steps per epoch the
    group measured from its members' own step counts (swarmtrain/averaging/schedule.py)."""
    checked = 0
    for index in peers:
        for record in swarm.rounds(index):
            match = re.fullmatch(rf"steps:{steps} at ([0-9.]+) local steps per epoch", record["note"])
            if record["ok"] and record["in_step"] and match:
                rate = float(match.group(1))
                assert rate > 0 and record["period"] == max(1, min(32, round(steps / rate))), record
                checked += 1
    assert checked >= 3, [swarm.rounds(i) for i in peers]


def test_background_rounds_land_once_each_and_members_keep_one_anchor(tmp_path, cleanup):
    """averaging.overlap in mode local: each round runs while the peers take the next period's local
    steps, and lands with the delayed outer step. Every member of every round holds the same averaged
    model afterwards (bit-identical: sparse), so none applied a round twice or skipped one; the swarm's
    round count goes up by one per round on every peer; the peers did compute while rounds ran.

    A third peer joins once the first two have averaged. With overlap their state is mid-round almost
    always: the joiner must get the model their next round starts from (the donor waits for its round
    to land), and be in step from its first round on, not chase the swarm's rounds for the rest of the run."""
    swarm = _local_swarm(tmp_path, schedule="constant:1", compression="gaussiank:0.05", overlap=True)
    cleanup(swarm)
    # the run ends once the joiner has been in enough rounds (a peer's start-up takes 5-30 s here)
    common = ("--max-epochs", "200", "--eval-every", "4", "--checkpoint-every", "0")
    for index in range(2):
        swarm.start_peer(index, *common, "--wait-for-peers", "2")
    swarm.wait_until(lambda: min(sum(r["ok"] for r in swarm.rounds(i)) for i in range(2)) >= 1, 300,
                     "an averaging round of the first two peers")
    swarm.start_peer(2, *common)
    swarm.wait_until(lambda: sum(r["ok"] and r["group_size"] == 3 for r in swarm.rounds(2)) >= 6, 300,
                     "six rounds of all three peers")
    for index in (2, 1, 0):  # Ctrl+C: each writes its final status
        stop_process(swarm.peers[index])
    assert_no_tracebacks(swarm, [0, 1, 2])

    assert re.search(r"took the swarm's averaged model of epoch \d+ at epoch \d+", swarm.log(2)), swarm.log(2)[-3000:]
    # in step from its first round on: not one round missed and one re-downloaded in turn (a chase seen
    # when the joiner got the anchor just as the others' pre-scheduled group closed); one hiccup allowed
    first = swarm.rounds(2)[:4]
    assert sum(r["ok"] and r["in_step"] for r in first) >= 3, first
    full = _check_members_agree(swarm, [0, 1, 2], dense=False)
    assert len(full) >= 5, _rounds_by_index(swarm, [0, 1, 2])
    for index in range(3):
        status = swarm.status(index)
        assert status["overlapped_steps"] > 0, status
        counts = [r["round_index"] for r in swarm.rounds(index) if r["ok"] and r["in_step"]]
        assert counts == sorted(set(counts)), counts  # one landing per round, in order
    for index in range(2):
        heldout = swarm.status(index)["heldout_loss"]
        assert heldout[-1][1] < heldout[0][1] - 0.3, heldout
