"""A real Prometheus scrapes the exporter, and every dashboard panel's query returns data."""

import time

import pytest

from swarmtrain.monitoring.aggregate import SwarmAggregator
from swarmtrain.monitoring.dashboard import dashboard_queries
from swarmtrain.monitoring.metrics import SwarmMetrics
from swarmtrain.monitoring.records import PeerRecord

pytestmark = pytest.mark.timeout(120)


def synthetic_records(now: float, tick: int) -> dict:
    """Three trainers and a data owner whose counters grow with ``tick``, every optional field set."""
    records = {}
    for index, role in enumerate(["trainer", "trainer", "trainer", "data-owner"]):
        records[f"[owner:ssh-rsa AAAAkey{index}]"] = PeerRecord.make(
            peer_id=f"peer{index}", role=role, step=10 + tick, epoch=3, loss=1.5 + 0.1 * index,
            samples_per_second=8.0, samples_accumulated=100 + 10 * tick, bytes_sent=1000 * tick,
            bytes_received=900 * tick, rounds_ok=2 * tick, rounds_failed=tick // 3, last_round_seconds=1.2,
            last_round_group_size=4, compression_density=0.01, leakage_dcor=0.2 + 0.05 * index, device="cpu",
            utilization=0.7 + 0.05 * index, client_mode=False, version="0.1.0", time=now,
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
        for title, expr in dashboard_queries(substitutions={"$__rate_interval": "30s"}):
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
