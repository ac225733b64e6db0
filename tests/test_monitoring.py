"""Aggregation of peer records, the Prometheus exporter, and the generated dashboard."""

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmtrain.monitoring.aggregate import SwarmAggregator, SwarmStatus
from swarmtrain.monitoring.dashboard import build_dashboard, dashboard_queries, render_dashboard_json
from swarmtrain.monitoring.metrics import PeerMetrics, SwarmMetrics
from swarmtrain.monitoring.records import PeerRecord

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_FILE = REPO / "deploy" / "grafana" / "dashboards" / "swarmtrain.json"
T0 = 1_800_000_000.0

pytestmark = pytest.mark.timeout(120)


def record(peer_id, at, **overrides) -> PeerRecord:
    fields = dict(
        peer_id=peer_id, role="trainer", step=10, epoch=2, loss=1.0, samples_per_second=10.0,
        samples_accumulated=100, bytes_sent=0, bytes_received=0, rounds_ok=0, rounds_failed=0,
        last_round_seconds=2.0, last_round_group_size=3, compression_density=None, leakage_dcor=None,
        device="cpu", client_mode=False, version="0.1.0", time=at,
    )
    fields.update(overrides)
    return PeerRecord.make(**fields)


def owner(name):
    return f"[owner:ssh-rsa AAAA{name}]"


# ---------------------------------------------------------------- aggregation


def test_status_from_records():
    aggregator = SwarmAggregator("run", target_batch_size=1000, max_age=30)
    records = {
        owner("a"): record("a", T0, loss=1.0, samples_accumulated=300, samples_per_second=20.0, leakage_dcor=0.2,
                          compression_density=0.01),
        owner("b"): record("b", T0, loss=3.0, samples_accumulated=100, samples_per_second=30.0, leakage_dcor=0.4),
        # behind by an epoch: its samples belong to an epoch that is over
        owner("c"): record("c", T0, epoch=1, loss=None, samples_accumulated=999, samples_per_second=50.0),
        owner("d"): record("d", T0, role="coordinator", samples_per_second=0.0, samples_accumulated=0, loss=None),
        # its record is older than max_age: the peer is gone
        owner("e"): record("e", T0 - 100, samples_per_second=1000.0),
    }
    status = aggregator.update(records, now=T0 + 1)
    assert status.peers_alive == {"trainer": 3, "coordinator": 1, "data-owner": 0, "trunk": 0}
    assert status.peers_alive_total == 4
    assert status.epoch == 2
    assert status.samples_per_second == pytest.approx(100.0)
    assert status.samples_accumulated == 400  # a + b only: c is in the previous epoch, d has none
    assert status.epoch_progress == pytest.approx(0.4)
    assert status.eta_seconds == pytest.approx(600 / 100.0)
    assert status.mean_loss == pytest.approx(2.0)  # peers without a loss yet are not counted as 0
    assert status.leakage_dcor_max == pytest.approx(0.4)
    assert status.compression_density == pytest.approx(0.01)
    assert {row.peer_id for row in status.peers} == {"a", "b", "c", "d"}
    decoded = json.loads(status.to_json())
    assert decoded["peers_alive_total"] == 4 and decoded["eta_seconds"] == pytest.approx(6.0)


def test_rates_and_counters_across_polls():
    aggregator = SwarmAggregator("run", max_age=60)
    first = aggregator.update(
        {owner("a"): record("a", T0, bytes_sent=1000, bytes_received=500, rounds_ok=4, rounds_failed=1),
         owner("b"): record("b", T0, bytes_sent=2000, rounds_ok=1)},
        now=T0,
    )
    assert first.bytes_sent_total == 3000  # counts seen for the first time are all new
    assert first.bytes_sent_per_second == 0.0  # no rate before a second record
    assert first.rounds_ok_total == 5 and first.round_success_ratio == pytest.approx(5 / 6)

    second = aggregator.update(
        {owner("a"): record("a", T0 + 10, bytes_sent=6000, bytes_received=1500, rounds_ok=6, rounds_failed=1),
         owner("b"): record("b", T0, bytes_sent=2000, rounds_ok=1)},  # b has not published again
        now=T0 + 11,
    )
    assert second.bytes_sent_per_second == pytest.approx(500.0)
    assert second.bytes_received_per_second == pytest.approx(100.0)
    assert second.bytes_sent_total == 8000
    assert second.rounds_ok_total == 7

    # b leaves, a restarts (its counters start again from zero): swarm counters never go down
    third = aggregator.update({owner("a"): record("a", T0 + 20, bytes_sent=100, rounds_ok=1)}, now=T0 + 21)
    assert third.bytes_sent_total == 8100
    assert third.rounds_ok_total == 8
    assert third.bytes_sent_per_second == 0.0  # a reset gives no rate, not a negative one
    assert third.peers_alive["trainer"] == 1


def test_empty_swarm_has_no_eta_and_no_ratio():
    status = SwarmStatus.empty("run", target_batch_size=100, now=T0)
    assert status.peers_alive_total == 0
    assert status.eta_seconds is None and status.round_success_ratio is None and status.mean_loss is None
    assert status.epoch_progress == 0.0


# ---------------------------------------------------------------- exporter


def synthetic_status() -> SwarmStatus:
    """A status with every field populated, so that every metric and dashboard query has data."""
    aggregator = SwarmAggregator("demo-run", target_batch_size=4096, max_age=60)
    base = dict(samples_accumulated=512, compression_density=0.01, leakage_dcor=0.25, rounds_ok=3, rounds_failed=1,
                utilization=0.8)
    aggregator.update({owner(name): record(name, T0, **base) for name in ("a", "b", "c")}, now=T0)
    later = dict(base, bytes_sent=4000, bytes_received=3000, rounds_ok=5)
    return aggregator.update({owner(name): record(name, T0 + 4, **later) for name in ("a", "b", "c")}, now=T0 + 5)


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers.get("Content-Type"), response.read()


def test_metrics_server_serves_metrics_and_status():
    metrics = SwarmMetrics(per_peer=True)
    with metrics.serve("127.0.0.1", 0) as server:
        # before the first poll: metadata only, and /status says so
        status_code, _, body = fetch(f"{server.url}/metrics")
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        assert names == {"swarmtrain_info"}
        with pytest.raises(urllib.error.HTTPError) as error:
            fetch(f"{server.url}/status")
        assert error.value.code == 503

        status = synthetic_status()
        metrics.update(status)
        _, content_type, body = fetch(f"{server.url}/metrics")
        assert content_type.startswith("text/plain")
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        assert samples[("swarmtrain_peers_alive", (("role", "trainer"),))] == 3
        assert samples[("swarmtrain_network_bytes_total", (("direction", "sent"),))] == 12000
        assert samples[("swarmtrain_averaging_rounds_total", (("result", "ok"),))] == 15
        assert samples[("swarmtrain_epoch_progress_ratio", ())] == pytest.approx(1536 / 4096)
        assert samples[("swarmtrain_info", (("run_id", "demo-run"), ("version", "0.1.0")))] == 1
        assert sum(1 for name, _ in samples if name == "swarmtrain_peer_step") == 3

        _, content_type, body = fetch(f"{server.url}/status")
        assert content_type == "application/json"
        assert json.loads(body)["samples_per_second"] == pytest.approx(30.0)
        with pytest.raises(urllib.error.HTTPError):
            fetch(f"{server.url}/nope")
    with pytest.raises(urllib.error.URLError):  # stopped: the port is closed
        fetch(f"{server.url}/metrics")


def test_no_per_peer_series_by_default():
    metrics = SwarmMetrics()
    metrics.update(synthetic_status())
    text = metrics.render().decode()
    assert "swarmtrain_peer_" not in text
    assert "peer_id=" not in text


def test_unknown_values_are_absent_not_nan():
    metrics = SwarmMetrics()
    metrics.update(SwarmStatus.empty("run", now=T0))
    text = metrics.render().decode()
    assert "NaN" not in text
    assert "swarmtrain_loss " not in text and "swarmtrain_epoch_eta_seconds" not in text
    assert 'swarmtrain_peers_alive{role="trainer"} 0.0' in text


def test_peer_exporter():
    peer_metrics = PeerMetrics(owner=owner("me"))
    assert "swarmtrain_peer_step" not in peer_metrics.render().decode()
    peer_metrics.update(record("me", T0, step=42, bytes_sent=7, leakage_dcor=0.1))
    with peer_metrics.serve("127.0.0.1", 0) as server:
        _, _, body = fetch(f"{server.url}/metrics")
        text = body.decode()
        assert 'swarmtrain_peer_step{device="cpu",peer="sshrsaAAAAme",peer_id="me",role="trainer"} 42.0' in text
        assert "swarmtrain_peer_network_bytes_total" in text
        _, _, body = fetch(f"{server.url}/status")
        assert json.loads(body)["step"] == 42


promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool not installed: run deploy/install-prometheus.sh")
@pytest.mark.parametrize("per_peer", [False, True])
def test_promtool_accepts_swarm_metrics(per_peer):
    metrics = SwarmMetrics(per_peer=per_peer)
    metrics.update(synthetic_status())
    with metrics.serve("127.0.0.1", 0) as server:
        _, _, body = fetch(f"{server.url}/metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr
    ).decode()


@pytest.mark.skipif(promtool is None, reason="promtool not installed: run deploy/install-prometheus.sh")
def test_promtool_accepts_peer_metrics():
    peer_metrics = PeerMetrics(owner=owner("me"))
    peer_metrics.update(record("me", T0, leakage_dcor=0.1))
    check = subprocess.run([promtool, "check", "metrics"], input=peer_metrics.render(), capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr
    ).decode()


@pytest.mark.skipif(promtool is None, reason="promtool not installed: run deploy/install-prometheus.sh")
def test_promtool_accepts_deploy_prometheus_config(tmp_path):
    # a full check also reads the file_sd target files: point their glob at the repository's folder
    config = (REPO / "deploy" / "prometheus.yml").read_text()
    assert "/etc/prometheus/targets/" in config
    config = config.replace("/etc/prometheus/targets/", f"{REPO / 'deploy' / 'prometheus-targets'}/")
    (tmp_path / "prometheus.yml").write_text(config)
    check = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                           timeout=30)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


def test_promtool_catches_a_bad_metric_name():
    """The promtool tests above can fail: promtool does flag a counter without ``_total``."""
    if promtool is None:
        pytest.skip("promtool not installed: run deploy/install-prometheus.sh")
    bad = b"# HELP bytes_sent Bytes.\n# TYPE bytes_sent counter\nbytes_sent 1\n"
    check = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, timeout=30)
    assert check.returncode != 0 or check.stdout.strip() or check.stderr.strip()


# ---------------------------------------------------------------- dashboard


def test_committed_dashboard_is_the_generated_one():
    assert DASHBOARD_FILE.read_text() == render_dashboard_json(), (
        "deploy/grafana/dashboards/swarmtrain.json is stale: run "
        "python -m swarmtrain.monitoring.dashboard --write deploy/grafana/dashboards/swarmtrain.json"
    )


def test_dashboard_layout():
    dashboard = build_dashboard()
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Swarm", "Training", "Communication", "Robustness", "Privacy", "Peers"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "swarmtrain-prometheus"
    assert any(panel["type"] == "table" for panel in dashboard["panels"])


def test_dashboard_queries_only_exported_metrics():
    metrics = SwarmMetrics(per_peer=True)
    metrics.update(synthetic_status())
    families = list(text_string_to_metric_families(metrics.render().decode()))
    # a family without samples (no rejected sender in this status) is still exported, with its HELP and TYPE
    exported = {sample.name for family in families for sample in family.samples} | {family.name for family in families}
    for title, expr in dashboard_queries():
        used = {token for token in _identifiers(expr) if token.startswith("swarmtrain_")}
        assert used and used <= exported, f"panel {title!r} queries unknown metrics {used - exported}"


def _identifiers(expr):
    import re

    return re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
