"""A peer's signed progress record in the DHT, published every few seconds, and its optional own
/metrics endpoint."""
from __future__ import annotations

import logging
import time
from typing import Optional

import hivemind
from hivemind.dht.crypto import RSASignatureValidator

from swarmtrain import __version__
from swarmtrain.averaging.rounds import NO_OTHER_PEERS
from swarmtrain.monitoring.metrics import PeerMetrics, serve_metrics
from swarmtrain.monitoring.records import RECORD_PERIOD, RECORD_TTL, PeerRecord, publish_record, record_validators

logger = logging.getLogger("swarmtrain.peer")


class PeerReporter:
    """Publishes this peer's PeerRecord (at most every RECORD_PERIOD seconds) and serves it on /metrics.

    :param dht: this peer's DHT (the record validators are added to it)
    :param run_id: the run
    :param signer: this peer's RSASignatureValidator: the record goes under its ``[owner:...]`` subkey
    :param role: trainer, trunk or data-owner
    :param device: what the peer computes on (shown in the per-peer table)
    :param client_mode: whether other peers can dial it
    :param metrics_host: interface for its own /metrics
    :param metrics_port: port for its own /metrics (None: not served)
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, signer: RSASignatureValidator, *, role: str, device: str,
                 client_mode: bool, metrics_host: str = "0.0.0.0", metrics_port: Optional[int] = None):
        self.dht, self.run_id, self.signer = dht, run_id, signer
        self.role, self.device, self.client_mode = role, device, client_mode
        dht.add_validators(record_validators(run_id, signer))  # the same on every node of the run
        self.metrics = PeerMetrics(owner=signer.local_public_key.decode())
        self.server = serve_metrics(self.metrics, metrics_host, metrics_port) if metrics_port is not None else None
        self._last_publish = 0.0
        self._pending = None  # keep the store's future alive until the DHT process has read it

    def maybe_publish(self, *, step: int, epoch: int, loss: Optional[float], samples_per_second: float,
                      samples_accumulated: int, rounds: list, traffic=None,
                      leakage=None, utilization: Optional[float] = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_publish < RECORD_PERIOD:
            return
        self._last_publish = now
        last = rounds[-1] if rounds else None
        record = PeerRecord.make(
            peer_id=str(self.dht.peer_id), role=self.role, step=step, epoch=epoch, loss=loss,
            samples_per_second=samples_per_second, samples_accumulated=samples_accumulated,
            bytes_sent=int(traffic.bytes_sent_total) if traffic else 0,
            bytes_received=int(traffic.bytes_received_total) if traffic else 0,
            rounds_ok=sum(1 for r in rounds if r.ok), rounds_failed=count_failed_rounds(rounds),
            last_round_seconds=last.seconds if last is not None else None,
            last_round_group_size=last.group_size if last is not None and last.ok else None,
            # dense averaging sends every entry (the averager only measures density when sparse)
            compression_density=(traffic.last_density or 1.0) if traffic else None,
            leakage_dcor=leakage,
            parts_rejected=int(traffic.parts_rejected_total) if traffic else 0,
            rejected_peers=sorted(set(traffic.rejected_peers)) if traffic else [],
            utilization=utilization,
            lying_peers=sorted(set(traffic.lying_peers)) if traffic else [],
            device=self.device, client_mode=self.client_mode, version=__version__,
        )
        self.metrics.update(record)
        self._pending = publish_record(self.dht, self.run_id, self.signer, record, ttl=RECORD_TTL, wait=False)

    def close(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result(timeout=5)
            except Exception:
                pass
        if self.server is not None:
            self.server.stop()


def count_failed_rounds(rounds: list) -> int:
    """Rounds that were tried and failed. A peer alone in the swarm steps without a round (its
    record's note is NO_OTHER_PEERS): nothing failed, and the coordinator must not count it."""
    return sum(1 for record in rounds if not record.ok and record.note != NO_OTHER_PEERS)
