"""Monitoring a live swarm: a real Prometheus scrapes a coordinator with running peers."""
import json
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml

from swarmtrain.training.checkpoint import latest_checkpoint_path, load_checkpoint
from swarmtrain.demo import free_port, start_coordinator, stop_process
from swarmtrain.monitoring.dashboard import PANELS_EMPTY_WHILE_HEALTHY, dashboard_queries
from swarmtrain.monitoring.records import RECORD_TTL
from tests.support import TINY_CONFIG
from tests.support.swarm import LocalSwarm, max_parameter_difference



def _config_with_privacy_head(directory):
    """The tiny run with a NoPeek head after the first block, so leakage is reported too."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["privacy"] = {"enabled": True, "cut_layer": "transformer.h.0", "alpha": 0.1}
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _status(port: int) -> dict:
    return json.loads(_get(f"http://127.0.0.1:{port}/status"))


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


# slow while it is flaky: on 2026-11-27's main it failed in 3 of 5 runs at two different steps (a SIGKILLed
# peer still counted alive 35 s later; peers not one epoch further 5 s after the coordinator stopped, now a
# wait on the condition). Later the same day, twice in a row: right after the coordinator's restart both
# remaining peers' round of one epoch failed (one timed out, one found no group), both set out to download
# the swarm's state, and neither reached the next epoch within 60 s: each waited for a donor of the epoch
# it had stepped to alone, in turn (fixed in SwarmOptimizer._epoch_to_download). 80+ s: run it with -m slow.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_live_swarm_metrics_restart_and_resume(tmp_path, prometheus):  # noqa: F811
    metrics_port, dht_port = free_port(), free_port()
    checkpoints = tmp_path / "coordinator-checkpoints"
    coordinator_args = ("--checkpoint-dir", str(checkpoints), "--checkpoint-every", "10", "--per-peer-metrics")
    config_path = _config_with_privacy_head(tmp_path)
    swarm = LocalSwarm.__new__(LocalSwarm)
    swarm.workdir, swarm.config_path, swarm.peers = tmp_path, config_path, {}
    swarm.coordinator, swarm.maddr = start_coordinator(tmp_path, config_path, *coordinator_args, port=dht_port,
                                                       metrics_port=metrics_port)
    try:
        for index in range(3):
            swarm.start_peer(index, "--max-epochs", "1000", "--eval-every", "0", "--checkpoint-every", "0")
        _wait(lambda: _status(metrics_port)["peers_alive"]["trainer"] == 3 and _status(metrics_port)["epoch"] >= 3,
              240, "3 trainers and epoch 3 in /status")

        # 1. promtool finds nothing wrong in the live /metrics
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (deploy/install-prometheus.sh installs it)")
        exposition = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        check = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check

        # 2. every dashboard panel's query returns data through Prometheus' HTTP API
        server = prometheus([f"127.0.0.1:{metrics_port}"])
        assert server.wait_for_data("up == 1", timeout=30), server.targets_health()
        time.sleep(8)  # a few scrapes, so rates have two points
        empty = []
        for title, expr in dashboard_queries(substitutions={"$__rate_interval": "30s", "$job": "swarmtrain"}):
            if not server.query(expr) and title not in PANELS_EMPTY_WHILE_HEALTHY:
                empty.append((title, expr))
        assert not empty, f"panels without data: {empty}"

        # 3. round counters follow what the peers did
        status = _status(metrics_port)
        done = sum(sum(r["ok"] for r in swarm.rounds(i)) for i in range(3))
        assert 0 < status["rounds_ok_total"] <= done + 3 * 3, (status["rounds_ok_total"], done)

        # 4. a killed peer leaves the count within the record lifetime
        swarm.peers[2].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: _status(metrics_port)["peers_alive"]["trainer"] == 2, RECORD_TTL + 15, "peers alive to drop to 2")
        print(f"peers alive dropped {time.monotonic() - killed:.1f}s after the kill (record TTL {RECORD_TTL}s)")

        # 5. the coordinator restarts at the same address; peers train on; metrics resume
        _wait(lambda: latest_checkpoint_path(checkpoints) is not None, 60, "a coordinator checkpoint")
        stop_process(swarm.coordinator)
        epoch_while_down = max(swarm.status(i)["epoch"] for i in (0, 1))
        # an epoch of the two remaining peers, its round included, can take longer than a few seconds on a busy
        # machine (a fixed 5 s wait failed in CI with the peers still training): wait for the next epoch
        _wait(lambda: max(swarm.status(i)["epoch"] for i in (0, 1)) > epoch_while_down, 60,
              "the peers' next epoch without the coordinator (did they stop without it?)")
        swarm.coordinator, maddr = start_coordinator(tmp_path, config_path, *coordinator_args, port=dht_port,
                                                     metrics_port=metrics_port)
        assert maddr == swarm.maddr
        _wait(lambda: _status(metrics_port)["peers_alive"]["trainer"] == 2, 60, "metrics after the restart")
        # the epoch in /status comes from the peers' records, published every few seconds: the first ones
        # read after the restart may predate the peers' newest epoch (19 vs 20 once)
        _wait(lambda: _status(metrics_port)["epoch"] > epoch_while_down, 60,
              "the restarted coordinator's epoch past the one the peers reached while it was down")
    finally:
        swarm.close()

    # 6. a swarm resumed from the coordinator's checkpoint starts from exactly the saved parameters
    saved = load_checkpoint(checkpoints)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed = LocalSwarm.__new__(LocalSwarm)
    resumed.workdir, resumed.config_path, resumed.peers = resumed_dir, config_path, {}
    resumed.coordinator, resumed.maddr = start_coordinator(resumed_dir, config_path, "--resume", str(saved.path))
    try:
        # --max-epochs at the saved epoch: the peer downloads the state and leaves without a step
        resumed.start_peer(0, "--max-epochs", str(saved.epoch), "--eval-every", "0")
        resumed.wait_for_exit([0], timeout=180)
        assert resumed.status(0)["loaded_state_epoch"] == saved.epoch
        assert max_parameter_difference([saved.model_state, resumed.final_parameters(0)]) == 0.0
    finally:
        resumed.close()
