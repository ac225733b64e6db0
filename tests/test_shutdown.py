"""SIGINT / SIGTERM to a training peer or to the coordinator: out within 10 s, no traceback, state saved."""
import signal
import time

import pytest

from swarmtrain.training.checkpoint import latest_checkpoint_path, load_checkpoint
from tests.support import TINY_CONFIG
from tests.support.swarm import LocalSwarm

EXIT_BUDGET_SECONDS = 10.0


def _stop_and_time(process, signum) -> float:
    started = time.monotonic()
    process.send_signal(signum)
    try:
        code = process.wait(timeout=30)
    except Exception:
        process.kill()
        raise
    elapsed = time.monotonic() - started
    assert code == 0, f"exit code {code} after {signal.Signals(signum).name}"
    return elapsed


@pytest.mark.timeout(400)
def test_peers_and_coordinator_stop_cleanly_within_ten_seconds(tmp_path):
    swarm = LocalSwarm(tmp_path, TINY_CONFIG)
    try:
        for index in (0, 1):
            swarm.start_peer(index, "--eval-every", "0", "--checkpoint-every", "0")
        swarm.wait_until(lambda: all(sum(r["ok"] for r in swarm.rounds(i)) >= 2 for i in (0, 1)), 240,
                         "two averaging rounds on both peers")
        timings = {}
        # a peer mid-epoch (its next averaging round is being prepared or running)
        for index, signum in ((0, signal.SIGTERM), (1, signal.SIGINT)):
            timings[f"peer-{index} {signal.Signals(signum).name}"] = _stop_and_time(swarm.peers[index], signum)
            status = swarm.status(index)
            assert status["phase"] == "stopped", status
            checkpoint = latest_checkpoint_path(tmp_path / f"peer-{index}")
            assert checkpoint is not None, f"peer-{index} saved nothing"
            saved = load_checkpoint(tmp_path / f"peer-{index}")
            assert saved.epoch == status["epoch"], (saved.epoch, status["epoch"])
        timings["coordinator SIGTERM"] = _stop_and_time(swarm.coordinator, signal.SIGTERM)
    finally:
        swarm.close()
    print(timings)
    assert all(seconds <= EXIT_BUDGET_SECONDS for seconds in timings.values()), timings
    for name in ("peer-0", "peer-1", "coordinator"):
        log = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in log, f"{name}:\n{log[-3000:]}"
    assert "stopping" in (tmp_path / "coordinator.log").read_text()
    # the coordinator remembers who it knew, to find the swarm again after a restart
    assert (tmp_path / "coordinator.id.peers.json").exists()
