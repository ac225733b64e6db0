"""Prometheus metrics for the swarm (coordinator) and for one peer, and the HTTP server for them.

Naming follows DESIGN.md §5: one prefix ``swarmtrain_``, base units (``_seconds``, ``_bytes``),
counters end in ``_total``, ratios in 0..1, metadata in ``swarmtrain_info``, and no per-peer labels
unless asked for (``per_peer=True``, capped at ``max_peers`` series per metric).

Metrics are produced by custom collectors from the latest ``SwarmStatus`` / ``PeerRecord`` at scrape
time, in a dedicated ``CollectorRegistry`` each: nothing is registered in prometheus_client's global
registry, so several servers (tests, a coordinator that is also a peer) can live in one process.
A value that is not known yet (no loss before the first step, no ETA without a target batch size) is
left out of the scrape rather than exported as NaN, so PromQL sees "no data" instead of a fake value.
"""

from __future__ import annotations

import json
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Callable, Iterable, Iterator, List, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

import swarmtrain
from swarmtrain.errors import UserError
from swarmtrain.monitoring.aggregate import PeerSummary, SwarmStatus
from swarmtrain.monitoring.records import PeerRecord, short_owner

PREFIX = "swarmtrain"
PEER_LABELS = ("peer", "peer_id", "role", "device")


def _gauge(name: str, documentation: str, value: Optional[float], **labels) -> Iterator[Metric]:
    if value is None:
        return
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    yield family


# swarm-level gauges: (metric name without the prefix, help text, SwarmStatus field); one left out of
# a scrape while its field is None
SWARM_GAUGES = (
    ("status_timestamp_seconds", "Unix time of the last poll of the peer records", "time"),
    ("epoch", "Swarm epoch (the highest one a majority of the alive peers reach)", "epoch"),
    ("throughput_samples_per_second", "Training samples per second, summed over alive peers", "samples_per_second"),
    ("epoch_accumulated_samples", "Samples accumulated toward the current epoch", "samples_accumulated"),
    ("target_batch_samples", "Samples per swarm epoch (target batch size)", "target_batch_size"),
    ("epoch_progress_ratio", "Progress of the current epoch, 0..1", "epoch_progress"),
    ("epoch_eta_seconds", "Estimated seconds to the next epoch", "eta_seconds"),
    ("loss", "Mean of the alive peers' last training loss", "mean_loss"),
    ("averaging_round_success_ratio", "Share of the alive peers' averaging rounds that succeeded, 0..1",
     "round_success_ratio"),
    ("averaging_round_duration_seconds", "Mean duration of the peers' last averaging round", "mean_round_seconds"),
    ("averaging_group_peers", "Mean size of the peers' last averaging group", "mean_group_size"),
    ("compression_density_ratio", "Mean fraction of gradient entries sent by compressing peers, 0..1",
     "compression_density"),
    ("privacy_leakage_dcor_max", "Highest distance correlation (0..1) at the cut layer among alive peers",
     "leakage_dcor_max"),
    ("utilization_ratio", "Mean share of wall time the alive trainers spent computing (not waiting for the "
     "swarm), 0..1", "mean_utilization"),
)
# metrics with one label: (name, help, label, ((label value, SwarmStatus field), ...)); a name ending in
# _total is a counter
SWARM_BY_LABEL = (
    ("averaging_rounds_total", "Averaging rounds reported by peers, by result", "result",
     (("ok", "rounds_ok_total"), ("failed", "rounds_failed_total"))),
    ("network_bytes_total", "Bytes on the wire reported by peers, by direction", "direction",
     (("sent", "bytes_sent_total"), ("received", "bytes_received_total"))),
    ("network_throughput_bytes_per_second",
     "Bytes per second on the wire, summed over alive peers (from their counters between records)", "direction",
     (("sent", "bytes_sent_per_second"), ("received", "bytes_received_per_second"))),
)


class SwarmStatusCollector(Collector):
    """Swarm-level metrics from the latest ``SwarmStatus`` (as set by the coordinator's poll loop).

    :param get_status: returns the latest SwarmStatus (None before the first poll)
    :param per_peer: also export one series per peer
    :param max_peers: at most this many peers (and rejected senders) get series
    """

    def __init__(self, get_status: Callable[[], Optional[SwarmStatus]], per_peer: bool = False, max_peers: int = 200):
        self._get_status = get_status
        self.per_peer = per_peer
        self.max_peers = max_peers

    def collect(self) -> Iterable[Metric]:
        status = self._get_status()
        info = InfoMetricFamily(PREFIX, "swarmtrain version and run of this exporter", labels=["run_id"])
        info.add_metric([status.run_id if status else ""], {"version": swarmtrain.__version__})
        yield info
        if status is None:
            return
        alive = GaugeMetricFamily(f"{PREFIX}_peers_alive", "Peers with a fresh record, by role", labels=["role"])
        for role, count in sorted(status.peers_alive.items()):
            alive.add_metric([role], count)
        yield alive
        for name, documentation, field in SWARM_GAUGES:
            yield from _gauge(name, documentation, getattr(status, field))
        for name, documentation, label, fields in SWARM_BY_LABEL:
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            family = kind(f"{PREFIX}_{name.removesuffix('_total')}", documentation, labels=[label])
            for value, field in fields:
                family.add_metric([value], getattr(status, field))
            yield family
        rejected = CounterMetricFamily(
            f"{PREFIX}_averaging_rejected_parts",
            "Gradient parts that reducers left out of an average (non-finite, outsized or malformed)",
        )
        rejected.add_metric([], status.parts_rejected_total)
        yield rejected
        # labelled by peer on purpose: only misbehaving senders appear, so cardinality stays small,
        # and the operator needs the name to act (revoke its token, contact its owner)
        senders = GaugeMetricFamily(
            f"{PREFIX}_averaging_rejected_sender_reports",
            "Alive peers whose latest rejected parts came from this sender", labels=["peer"],
        )
        for peer, count in sorted(status.rejected_senders.items())[: self.max_peers]:
            senders.add_metric([peer], count)
        yield senders
        liars = GaugeMetricFamily(
            f"{PREFIX}_averaging_lying_peer_reports",
            "Alive peers that lately caught this peer lying in a round's check (e.g. a reducer answering "
            "something else than the average it received); such a peer is banned by those who caught it",
            labels=["peer"],
        )
        for peer, count in sorted(status.lying_peers.items())[: self.max_peers]:
            liars.add_metric([peer], count)
        yield liars
        if self.per_peer:
            yield from peer_families(status.peers[: self.max_peers])


def peer_families(rows: List[PeerSummary]) -> Iterator[Metric]:
    """``swarmtrain_peer_*`` metrics, one series per peer, labelled by ``PEER_LABELS``."""

    def family(kind, name, documentation, extra_labels=()):
        return kind(f"{PREFIX}_peer_{name}", documentation, labels=[*PEER_LABELS, *extra_labels])

    step = family(GaugeMetricFamily, "step", "Local optimizer steps of the peer")
    epoch = family(GaugeMetricFamily, "epoch", "Swarm epoch the peer is in")
    loss = family(GaugeMetricFamily, "loss", "Last training loss of the peer")
    throughput = family(GaugeMetricFamily, "throughput_samples_per_second", "Training samples per second of the peer")
    rounds = family(CounterMetricFamily, "averaging_rounds", "Averaging rounds of the peer, by result", ["result"])
    wire = family(CounterMetricFamily, "network_bytes", "Bytes on the wire of the peer, by direction", ["direction"])
    leakage = family(GaugeMetricFamily, "leakage_dcor", "Distance correlation (0..1) at the peer's cut layer")
    age = family(GaugeMetricFamily, "record_age_seconds", "Age of the peer's last record")
    utilization = family(GaugeMetricFamily, "utilization_ratio", "Share of wall time the peer spent computing, 0..1")
    for row in rows:
        labels = [row.owner, row.peer_id, row.role, row.device]
        step.add_metric(labels, row.step)
        epoch.add_metric(labels, row.epoch)
        if row.loss is not None:
            loss.add_metric(labels, row.loss)
        throughput.add_metric(labels, row.samples_per_second)
        rounds.add_metric([*labels, "ok"], row.rounds_ok)
        rounds.add_metric([*labels, "failed"], row.rounds_failed)
        wire.add_metric([*labels, "sent"], row.bytes_sent)
        wire.add_metric([*labels, "received"], row.bytes_received)
        if row.leakage_dcor is not None:
            leakage.add_metric(labels, row.leakage_dcor)
        age.add_metric(labels, row.age_seconds)
        if row.utilization is not None:
            utilization.add_metric(labels, row.utilization)
    for metric in (step, epoch, loss, throughput, rounds, wire, leakage, age, utilization):
        if metric.samples:
            yield metric


class SwarmMetrics:
    """The coordinator's exporter state: call ``update(status)`` after each poll, ``serve()`` once.

    :param per_peer: also export one series per peer
    :param max_peers: at most this many peers get series
    """

    def __init__(self, per_peer: bool = False, max_peers: int = 200):
        self.registry = CollectorRegistry(auto_describe=False)
        self._status: Optional[SwarmStatus] = None
        self.registry.register(SwarmStatusCollector(lambda: self._status, per_peer=per_peer, max_peers=max_peers))

    @property
    def status(self) -> Optional[SwarmStatus]:
        return self._status

    def update(self, status: SwarmStatus) -> None:
        self._status = status  # one reference swap: scrapes in the server thread see old or new, whole

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 9400) -> "MetricsServer":
        return MetricsServer(self.registry, lambda: self._status.to_dict() if self._status else None, host, port,
                             state=lambda: self._status).start()


class PeerMetrics:
    """A volunteer peer's own exporter (``swarmtrain peer --metrics-port``): its latest record."""

    def __init__(self, owner: str = ""):
        """:param owner: the peer's ``[owner:...]`` public key (``signature_validator.local_public_key``)."""
        self.registry = CollectorRegistry(auto_describe=False)
        self._owner = owner.decode() if isinstance(owner, bytes) else owner
        self._record: Optional[PeerRecord] = None
        self.registry.register(_PeerRecordCollector(self))

    @property
    def record(self) -> Optional[PeerRecord]:
        return self._record

    def update(self, record: PeerRecord) -> None:
        self._record = record

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 9401) -> "MetricsServer":
        return MetricsServer(self.registry, lambda: self._record.dict() if self._record else None, host, port,
                             state=lambda: self._record).start()

    def _row(self) -> Optional[PeerSummary]:
        record = self._record
        if record is None:
            return None
        # rates stay 0 here: Prometheus computes them from this exporter's counters
        return PeerSummary.from_record(short_owner(self._owner) if self._owner else "", record)


class _PeerRecordCollector(Collector):
    def __init__(self, owner: PeerMetrics):
        self._metrics = owner

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily(PREFIX, "swarmtrain version of this exporter")
        info.add_metric([], {"version": swarmtrain.__version__})
        yield info
        row = self._metrics._row()
        if row is not None:
            yield from peer_families([row])


SCRAPER_BACKLOG = 128  # connections the kernel queues for the server (socketserver's default: 5)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape must not keep the process alive at exit
    allow_reuse_address = True
    # with socketserver's 5, the sixth of a burst of simultaneous scrapers (Prometheus, Grafana, a few
    # dashboards) had its SYN dropped and retried after a second: p99 ~1 s under 20 clients
    request_queue_size = SCRAPER_BACKLOG


class _IPv6ThreadingWSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every second would flood the peer's console
        pass


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/status`` (JSON) on host:port in a daemon thread.

    ``port=0`` picks a free port (see ``.port``). ``stop()`` (or leaving the ``with`` block) closes the
    socket and joins the thread.

    With ``state`` (the object the collectors render, replaced whole on each update), a scrape between
    two updates gets the bytes rendered for the first one (per exposition format): the coordinator
    polls every 2 s, and a burst of scrapers then costs one rendering, not one each.

    :param registry: the collectors /metrics renders
    :param get_status: returns the JSON-able status /status answers (None: 503 until there is one)
    :param host: interface to listen on
    :param port: port to listen on (0: a free one)
    :param state: returns what the registry's collectors render (None: render every scrape)
    """

    def __init__(self, registry: CollectorRegistry, get_status: Callable[[], Optional[dict]], host: str, port: int,
                 state: Optional[Callable[[], object]] = None):
        self.host = host
        self._registry = registry
        self._metrics_app = make_wsgi_app(registry)
        self._get_status = get_status
        self._state = state
        self._rendered = {}  # content type -> (state object, body)
        self._render_lock = threading.Lock()
        server_class = _IPv6ThreadingWSGIServer if ":" in host else _ThreadingWSGIServer
        self._server = make_server(host, port, self._app, server_class=server_class, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="swarmtrain-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            if self._state is None or environ.get("REQUEST_METHOD") != "GET" or environ.get("QUERY_STRING"):
                return self._metrics_app(environ, start_response)
            content_type, body = self._render(environ.get("HTTP_ACCEPT"))
            start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/status":
            status = self._get_status()
            body = json.dumps(status if status is not None else {"error": "no status yet"}).encode()
            code = "200 OK" if status is not None else "503 Service Unavailable"
            start_response(code, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/":
            body = b"swarmtrain exporter: /metrics (Prometheus), /status (JSON)\n"
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]


    def _render(self, accept: Optional[str]):
        encoder, content_type = choose_encoder(accept)
        state = self._state()
        with self._render_lock:
            cached = self._rendered.get(content_type)
            if cached is None or cached[0] is not state:
                cached = self._rendered[content_type] = (state, encoder(self._registry))
        return content_type, cached[1]


def serve_metrics(metrics, host: str, port: int) -> MetricsServer:
    """Start a /metrics server for SwarmMetrics or PeerMetrics; a port that is taken is the user's to
    change, not a traceback."""
    try:
        return metrics.serve(host, port)
    except OSError as error:
        raise UserError(f"cannot serve metrics on {host}:{port} ({error.strerror}); choose another --metrics-port") from None
