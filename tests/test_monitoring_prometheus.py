"""A real Prometheus scrapes the exporter, and every dashboard panel's query returns data."""

import time
from pathlib import Path

import pytest

from swarmtrain.monitoring.aggregate import MIN_REJECTION_REPORTERS, SwarmAggregator
from swarmtrain.monitoring.dashboard import dashboard_queries
from swarmtrain.monitoring.metrics import SwarmMetrics
from swarmtrain.monitoring.records import PeerRecord

pytestmark = pytest.mark.timeout(120)
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def synthetic_records(now: float, tick: int) -> dict:
    """Three trainers and a data owner whose counters grow with ``tick``, every optional field set (the
    first MIN_REJECTION_REPORTERS, reducers, left out parts sent by peer9: fewer reporters name nobody)."""
    records = {}
    for index, role in enumerate(["trainer", "trainer", "trainer", "data-owner"]):
        records[f"[owner:ssh-rsa AAAAkey{index}]"] = PeerRecord.make(
            peer_id=f"peer{index}", role=role, step=10 + tick, epoch=3, loss=1.5 + 0.1 * index,
            samples_per_second=8.0, samples_accumulated=100 + 10 * tick, bytes_sent=1000 * tick,
            bytes_received=900 * tick, rounds_ok=2 * tick, rounds_failed=tick // 3, last_round_seconds=1.2,
            last_round_group_size=4, compression_density=0.01, leakage_dcor=0.2 + 0.05 * index, device="cpu",
            utilization=0.7 + 0.05 * index, client_mode=False, version="0.1.0", time=now,
            parts_rejected=tick if index < MIN_REJECTION_REPORTERS else 0,
            rejected_peers=["peer9"] if index < MIN_REJECTION_REPORTERS else [],
        )
    return records


def test_every_dashboard_query_has_data(prometheus):  # noqa: F811
    aggregator = SwarmAggregator("e2e", target_batch_size=2048, max_age=60)
    metrics = SwarmMetrics(per_peer=True)
    metrics.update(aggregator.update(synthetic_records(time.time(), 0)))
    with metrics.serve("127.0.0.1", 0) as exporter:
        server = prometheus([f"127.0.0.1:{exporter.port}"])
        up = server.wait_for_data("up == 1", timeout=20)
        assert up, f"the exporter was never scraped: {server.targets_health()}"

        # keep the swarm moving while Prometheus scrapes, so counters and rates have real deltas
        for tick in range(1, 4):
            metrics.update(aggregator.update(synthetic_records(time.time(), tick)))
            time.sleep(1.1)

        empty = []
        for title, expr in dashboard_queries(substitutions={"$__rate_interval": "30s", "$job": "swarmtrain"}):
            result = server.wait_for_data(expr, timeout=10)
            if not result:
                empty.append((title, expr))
        assert not empty, f"dashboard queries without data: {empty}"

        # values came through, not just series: spot-check a few against the status
        status = metrics.status
        assert float(server.query("sum(swarmtrain_peers_alive)")[0]["value"][1]) == 4
        assert float(server.query("swarmtrain_epoch")[0]["value"][1]) == 3
        sent = server.query('swarmtrain_network_bytes_total{direction="sent"}')
        assert float(sent[0]["value"][1]) == status.bytes_sent_total == 12000
        rounds = server.query(f'sum(increase(swarmtrain_averaging_rounds_total{{result="ok"}}[30s]))')
        assert float(rounds[0]["value"][1]) > 0
        assert len(server.query("swarmtrain_peer_step")) == 4


def test_fixture_reports_a_bad_query(prometheus):  # noqa: F811
    server = prometheus(["127.0.0.1:1"])  # nothing listens there: the target is just down
    with pytest.raises(ValueError, match="bad_data"):
        server.query("sum(")
    assert server.wait_for_data("up", timeout=10)[0]["value"][1] == "0"


def _compose_coordinator_flags() -> dict:
    """The parameters deploy/docker-compose.yml starts the coordinator with, as click parses them."""
    import shlex

    import yaml

    from swarmtrain.cli.coordinator import coordinator

    command = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["coordinator"]["command"]
    args = shlex.split(command.replace("${COORDINATOR_ARGS:-}", ""))
    assert args[0] == "coordinator"
    return coordinator.make_context("coordinator", args[1:]).params


def _compose_prometheus_config(coordinator_target: str, peer_targets_dir) -> dict:
    """deploy/prometheus.yml with only the addresses changed (and 1 s scrapes, for a short test):
    its jobs, labels and file-based peer targets stay as the compose set-up runs them."""
    import yaml

    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        job["scrape_interval"] = job["scrape_timeout"] = "1s"
        for static in job.get("static_configs", []):
            static["targets"] = [coordinator_target if t == "coordinator:9400" else t for t in static["targets"]]
        for file_sd in job.get("file_sd_configs", []):
            file_sd["files"] = [str(peer_targets_dir / "*.yml")]
            file_sd["refresh_interval"] = "1s"
    return config


def test_every_panel_has_data_in_the_compose_setup(prometheus, tmp_path):  # noqa: F811
    """The coordinator with the flags docker-compose.yml gives it, Prometheus with deploy/prometheus.yml,
    and a volunteer's own exporter listed in prometheus-targets/ (same swarmtrain_peer_* names): every
    panel shows data, the per-peer table's queries merge row by row, and no peer is counted twice."""
    import json as json_module

    from swarmtrain.monitoring.dashboard import COORDINATOR_JOB, peer_table_queries
    from swarmtrain.monitoring.metrics import PeerMetrics

    flags = _compose_coordinator_flags()
    assert flags["metrics_port"] == 9400 and str(flags["identity"]).startswith("/data/"), flags
    aggregator = SwarmAggregator("compose", target_batch_size=2048, max_age=60)
    metrics = SwarmMetrics(per_peer=flags["per_peer_metrics"])
    records = synthetic_records(time.time(), 0)
    metrics.update(aggregator.update(records))
    volunteer = PeerMetrics(owner="ssh-rsa AAAAkey0")
    volunteer.update(next(iter(records.values())))
    with metrics.serve("127.0.0.1", 0) as exporter, volunteer.serve("127.0.0.1", 0) as volunteer_exporter:
        targets_dir = tmp_path / "targets"
        targets_dir.mkdir()
        (targets_dir / "peers.yml").write_text(json_module.dumps(
            [{"targets": [f"127.0.0.1:{volunteer_exporter.port}"], "labels": {"component": "peer"}}]))
        server = prometheus([], config=_compose_prometheus_config(f"127.0.0.1:{exporter.port}", targets_dir))
        assert server.wait_for_data("count(up == 1) == 2", timeout=30), server.targets_health()
        for tick in range(1, 4):
            metrics.update(aggregator.update(synthetic_records(time.time(), tick)))
            time.sleep(1.1)

        substitutions = {"$__rate_interval": "30s", "$job": COORDINATOR_JOB}
        empty = [(title, expr) for title, expr in dashboard_queries(substitutions=substitutions)
                 if not server.wait_for_data(expr, timeout=10)]
        assert not empty, f"dashboard queries without data in the compose set-up: {empty}"

        # the volunteer's exporter has the same series names; the dashboard reads the coordinator's only
        assert len(server.query("swarmtrain_peer_step")) == 5
        label_sets = []
        for _, _, expr in peer_table_queries():
            expr = expr.replace("$job", COORDINATOR_JOB)
            label_sets.append(sorted(tuple(sorted(row["metric"].items())) for row in server.query(expr)))
        assert len(label_sets[0]) == 4 and all(rows == label_sets[0] for rows in label_sets), label_sets
        assert {key for key, _ in label_sets[0][0]} == {"peer", "peer_id", "role", "device"}

        # bytes on the wire: the rate of the swarm's byte counter, steady while the peers send steadily
        rate = server.query(f'sum by (direction) (rate(swarmtrain_network_bytes_total{{job="{COORDINATOR_JOB}", '
                            f'direction="sent"}}[30s]))')
        assert float(rate[0]["value"][1]) > 0
        senders = server.query(f'max by (peer) (swarmtrain_averaging_rejected_sender_reports{{job="{COORDINATOR_JOB}"}})')
        assert {row["metric"]["peer"] for row in senders} == {"peer9"}
