"""deploy/: the files fit together (names, ports, paths, uids) and the systemd unit stops cleanly."""

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from swarmtrain.monitoring.dashboard import DASHBOARD_UID, DATASOURCE_UID

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load(relative):
    return yaml.safe_load((DEPLOY / relative).read_text())


def test_compose_wires_coordinator_prometheus_and_grafana():
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"coordinator", "prometheus", "grafana"}
    coordinator = services["coordinator"]
    assert coordinator["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / coordinator["build"]["context"] / coordinator["build"]["dockerfile"]).is_file()
    assert "--metrics-port 9400" in coordinator["command"] and coordinator["command"].startswith("coordinator ")
    assert coordinator["stop_signal"] == "SIGINT"

    # every bind mount of a file or folder of this repository points at something that exists
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"

    grafana_mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    provider = load("grafana/provisioning/dashboards/swarmtrain.yml")["providers"][0]
    assert grafana_mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_prometheus_scrapes_the_coordinator_metrics_port():
    config = load("prometheus.yml")
    [coordinator_job] = [job for job in config["scrape_configs"] if job["job_name"] == "swarmtrain-coordinator"]
    assert coordinator_job["static_configs"][0]["targets"] == ["coordinator:9400"]


def test_grafana_datasource_is_the_one_the_dashboard_uses():
    [datasource] = load("grafana/provisioning/datasources/swarmtrain.yml")["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "swarmtrain.json").read_text())
    assert dashboard["uid"] == DASHBOARD_UID


def test_peer_unit_stops_like_ctrl_c_and_restarts_on_failure():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(DEPLOY / "swarmtrain-peer.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGINT"
    assert 10 <= int(service["TimeoutStopSec"]) <= 300
    assert service["ExecStart"].split()[1:4] == ["peer", "--initial-peers", "${SWARMTRAIN_INITIAL_PEERS}"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_peer_unit_passes_systemd_analyze():
    check = subprocess.run(
        ["systemd-analyze", "verify", str(DEPLOY / "swarmtrain-peer.service")], capture_output=True, text=True,
        timeout=60,
    )
    # the venv of the unit is not installed here; anything else systemd complains about is an error
    problems = [
        line for line in (check.stdout + check.stderr).splitlines()
        if line.strip() and "is not executable" not in line and "No such file" not in line
    ]
    assert not problems, problems


def test_install_script_is_idempotent_when_installed():
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("prometheus not installed: the script would install it")
    run = subprocess.run(["bash", str(DEPLOY / "install-prometheus.sh")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "", run.stdout + run.stderr
