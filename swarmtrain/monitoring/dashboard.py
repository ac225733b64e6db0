"""The Grafana dashboard, generated from code (plain dicts in Grafana's dashboard JSON model).

The committed ``deploy/grafana/dashboards/swarmtrain.json`` must equal ``render_dashboard_json()``
(a test checks it). Regenerate it after editing this file::

    python -m swarmtrain.monitoring.dashboard --write deploy/grafana/dashboards/swarmtrain.json

Every query uses only metrics from ``swarmtrain.monitoring.metrics``, from the coordinator's scrape job
(the ``$job`` variable, ``swarmtrain-coordinator`` in deploy/prometheus.yml): volunteers' own exporters
(``swarmtrain peer --metrics-port``, job ``swarmtrain-peers``) export the same ``swarmtrain_peer_*``
names, and counting them too would list every such peer twice. The per-peer panels need the
coordinator's per-peer metrics (``--per-peer-metrics``, which deploy/docker-compose.yml passes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

DATASOURCE_UID = "swarmtrain-prometheus"  # the uid given in deploy/grafana/provisioning/datasources
DASHBOARD_UID = "swarmtrain-swarm"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
GRID_WIDTH = 24  # Grafana's grid is 24 columns wide

# Grafana substitutes these before sending a query; tests evaluating the queries directly must too.
RATE_INTERVAL = "$__rate_interval"
JOB_VARIABLE = "$job"
COORDINATOR_JOB = "swarmtrain-coordinator"  # the job of deploy/prometheus.yml that scrapes the coordinator
ON = f'job="{JOB_VARIABLE}"'  # every selector: only the coordinator's series
PANELS_EMPTY_WHILE_HEALTHY = ("Senders of rejected parts",)  # "no data" is the good news there

PEER_TABLE_LABELS = "peer, peer_id, role, device"


def _target(ref_id: str, expr: str, legend: str = "", instant: bool = False, table: bool = False) -> dict:
    target = {"refId": ref_id, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": not instant}
    if instant:
        target["instant"] = True
    if table:
        target["format"] = "table"
    return target


def _panel(kind: str, title: str, targets: List[dict], unit: str = "none", description: str = "", **extra) -> dict:
    defaults = {"unit": unit}
    for key in ("min", "max", "decimals", "thresholds", "custom", "noValue"):
        if key in extra:
            defaults[key] = extra.pop(key)
    panel = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": extra.pop("overrides", [])},
        "options": extra.pop("options", {}),
    }
    panel.update(extra)
    return panel


def _thresholds(*steps: Tuple[Optional[float], str]) -> dict:
    return {"mode": "absolute", "steps": [{"value": value, "color": color} for value, color in steps]}


def _stat(title, expr, unit="none", description="", **extra) -> dict:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"}
    return _panel("stat", title, [_target("A", expr)], unit, description, options=options, **extra)


def _series(title, targets, unit="none", description="", **extra) -> dict:
    options = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return _panel("timeseries", title, targets, unit, description, options=options, **extra)


Row = List[Tuple[int, int, dict]]  # (width, height, panel) in reading order


def _swarm_row() -> Row:
    return [
        (4, 5, _stat("Peers alive", f"sum(swarmtrain_peers_alive{{{ON}}})",
                     description="Peers with a fresh DHT record")),
        (4, 5, _stat("Epoch", f"swarmtrain_epoch{{{ON}}}")),
        (
            4,
            5,
            _panel(
                "gauge",
                "Epoch progress",
                [_target("A", f"swarmtrain_epoch_progress_ratio{{{ON}}}")],
                "percentunit",
                "Samples accumulated toward the target batch size",
                min=0,
                max=1,
            ),
        ),
        (4, 5, _stat("ETA to next epoch", f"swarmtrain_epoch_eta_seconds{{{ON}}}", "s")),
        (
            4,
            5,
            _stat(
                "Exporter staleness",
                f"time() - swarmtrain_status_timestamp_seconds{{{ON}}}",
                "s",
                "Seconds since the coordinator last polled the peer records",
                thresholds=_thresholds((None, "green"), (60, "red")),
            ),
        ),
        (4, 5, _stat("Round success", f"swarmtrain_averaging_round_success_ratio{{{ON}}}", "percentunit", min=0, max=1)),
        (12, 8, _series("Peers alive by role", [_target("A", f"swarmtrain_peers_alive{{{ON}}}", "{{role}}")])),
        (
            12,
            8,
            _series(
                "Epoch progress (samples)",
                [
                    _target("A", f"swarmtrain_epoch_accumulated_samples{{{ON}}}", "accumulated"),
                    _target("B", f"swarmtrain_target_batch_samples{{{ON}}}", "target batch"),
                ],
            ),
        ),
    ]


def _training_row() -> Row:
    return [
        (12, 8, _series("Throughput", [_target("A", f"swarmtrain_throughput_samples_per_second{{{ON}}}", "samples/s")])),
        (12, 8, _series("Mean training loss", [_target("A", f"swarmtrain_loss{{{ON}}}", "loss")])),
        (24, 6, _series("Utilization", [_target("A", f"swarmtrain_utilization_ratio{{{ON}}}", "mean")], "percentunit",
                        "Share of wall time the trainers spent computing rather than waiting for the swarm",
                        min=0, max=1)),
    ]


def _communication_row() -> Row:
    return [
        (
            12,
            8,
            _series(
                "Averaging rounds",
                [
                    _target(
                        "A",
                        f"sum by (result) (increase(swarmtrain_averaging_rounds_total{{{ON}}}[{RATE_INTERVAL}]))",
                        "{{result}}",
                    )
                ],
                description="Rounds reported by peers per interval, by result",
            ),
        ),
        (
            12,
            8,
            _series(
                "Bytes on the wire",
                [_target("A", f"sum by (direction) (rate(swarmtrain_network_bytes_total{{{ON}}}[{RATE_INTERVAL}]))",
                         "{{direction}}")],
                "Bps",
                "Bytes per second the peers sent and received, from the swarm's byte counters",
            ),
        ),
        (8, 8, _series("Round duration", [_target("A", f"swarmtrain_averaging_round_duration_seconds{{{ON}}}", "mean")], "s")),
        (8, 8, _series("Averaging group size", [_target("A", f"swarmtrain_averaging_group_peers{{{ON}}}", "peers")])),
        (
            8,
            8,
            _series(
                "Compression density",
                [_target("A", f"swarmtrain_compression_density_ratio{{{ON}}}", "density")],
                "percentunit",
                "Fraction of gradient entries sent (1 = dense)",
                min=0,
            ),
        ),
    ]


def _privacy_row() -> Row:
    leakage = "Distance correlation between raw data and shared activations; lower is better"
    worst = _series("Leakage (max dCor)", [_target("A", f"swarmtrain_privacy_leakage_dcor_max{{{ON}}}", "max dCor")],
                    description=leakage, min=0, max=1,
                    thresholds=_thresholds((None, "green"), (0.3, "orange"), (0.6, "red")))
    by_peer = _series("Leakage by peer", [_target("A", f"swarmtrain_peer_leakage_dcor{{{ON}}}", "{{peer_id}}")],
                      description="Needs the coordinator's per-peer metrics", min=0, max=1)
    return [(12, 8, worst), (12, 8, by_peer)]


def _robustness_row() -> Row:
    rejected = _series(
        "Rejected gradient parts",
        [_target("A", f"sum(increase(swarmtrain_averaging_rejected_parts_total{{{ON}}}[{RATE_INTERVAL}]))",
                 "parts rejected")],
        description="Parts that reducers left out of an average (non-finite, outsized or malformed) per interval",
        min=0,
    )
    senders = _panel(
        "table",
        PANELS_EMPTY_WHILE_HEALTHY[0],
        [_target("A", f"max by (peer) (swarmtrain_averaging_rejected_sender_reports{{{ON}}})", instant=True,
                 table=True)],
        description="Who sent the parts that were left out, and how many alive peers reported it: revoke its "
                    "token or contact its owner. Empty while nobody misbehaves.",
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                        "renameByName": {"Value": "peers reporting"}}}],
        noValue="no part rejected",
    )
    return [(12, 8, rejected), (12, 8, senders)]


def peer_table_queries() -> List[Tuple[str, str, str]]:
    """(refId, column, PromQL) of the per-peer table. Grafana's merge joins the rows of its queries
    on their common labels, so every query keeps exactly the peer's labels (job, instance and
    component would differ from query to query otherwise)."""
    def per_peer(selector: str) -> str:
        return f"max by ({PEER_TABLE_LABELS}) ({selector})"

    return [
        ("A", "step", per_peer(f"swarmtrain_peer_step{{{ON}}}")),
        ("B", "epoch", per_peer(f"swarmtrain_peer_epoch{{{ON}}}")),
        ("C", "loss", per_peer(f"swarmtrain_peer_loss{{{ON}}}")),
        ("D", "samples/s", per_peer(f"swarmtrain_peer_throughput_samples_per_second{{{ON}}}")),
        ("E", "failed rounds", per_peer(f'swarmtrain_peer_averaging_rounds_total{{{ON}, result="failed"}}')),
        ("F", "record age (s)", per_peer(f"swarmtrain_peer_record_age_seconds{{{ON}}}")),
    ]


def _peers_row() -> Row:
    queries = peer_table_queries()
    table = _panel(
        "table",
        "Peers",
        [_target(ref, expr, instant=True, table=True) for ref, _, expr in queries],
        description="One row per peer. Needs the coordinator's --per-peer-metrics (docker-compose.yml passes it)",
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {f"Value #{ref}": column for ref, column, _ in queries},
                },
            },
        ],
    )
    return [(24, 10, table)]


def _rows() -> List[Tuple[str, Row]]:
    """(row title, panels) in reading order."""
    return [("Swarm", _swarm_row()), ("Training", _training_row()), ("Communication", _communication_row()),
            ("Robustness", _robustness_row()), ("Privacy", _privacy_row()), ("Peers", _peers_row())]


def build_dashboard() -> dict:
    panels = []
    panel_id = 0
    y = 0
    for row_title, row_panels in _rows():
        panel_id += 1
        panels.append(
            {
                "type": "row",
                "title": row_title,
                "id": panel_id,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        line_height = 0
        for width, height, panel in row_panels:
            if x + width > GRID_WIDTH:  # wrap to the next line of the grid
                x, y, line_height = 0, y + line_height, 0
            panel_id += 1
            panels.append({**panel, "id": panel_id, "gridPos": {"h": height, "w": width, "x": x, "y": y}})
            x += width
            line_height = max(line_height, height)
        y += line_height
    return {
        "uid": DASHBOARD_UID,
        "title": "swarmtrain",
        "description": "Collaborative training swarm: peers, progress, averaging, wire, privacy",
        "tags": ["swarmtrain"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "annotations": {"list": []},
        "templating": {"list": [_job_variable()]},
        "panels": panels,
    }


def _job_variable() -> dict:
    """$job: the Prometheus job that scrapes the coordinator (coordinators alone export swarmtrain_epoch)."""
    query = "label_values(swarmtrain_epoch, job)"
    return {
        "name": JOB_VARIABLE.lstrip("$"), "label": "coordinator job", "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": "job"}, "definition": query, "refresh": 1,
        "current": {"text": COORDINATOR_JOB, "value": COORDINATOR_JOB}, "includeAll": False, "multi": False,
        "hide": 0, "sort": 1,
    }


def render_dashboard_json(dashboard: Optional[dict] = None) -> str:
    return json.dumps(build_dashboard() if dashboard is None else dashboard, indent=2, sort_keys=True) + "\n"


def dashboard_queries(dashboard: Optional[dict] = None, substitutions: Optional[Dict[str, str]] = None) -> Iterator[Tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, with Grafana variables substituted."""
    substitutions = {RATE_INTERVAL: "1m", JOB_VARIABLE: COORDINATOR_JOB} if substitutions is None else substitutions
    dashboard = build_dashboard() if dashboard is None else dashboard
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            yield panel["title"], expr


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print or write the swarmtrain Grafana dashboard JSON")
    parser.add_argument("--write", type=Path, help="write the dashboard to this file instead of printing it")
    args = parser.parse_args(argv)
    text = render_dashboard_json()
    if args.write is None:
        print(text, end="")
    else:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
