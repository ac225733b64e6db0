"""Monitoring: signed peer records in the DHT, swarm aggregation, Prometheus exporter, Grafana dashboard.

    validators = record_validators(run_id, signer)          # DHT(record_validators=validators) on every node
    publish_record(dht, run_id, signer, PeerRecord.make(...), ttl=60)   # peers, periodically
    status = SwarmAggregator(run_id, target_batch_size).poll(dht)       # coordinator, periodically
    metrics = SwarmMetrics(); server = metrics.serve("0.0.0.0", 9400); metrics.update(status)
"""

from swarmtrain.monitoring.aggregate import PeerSummary, SwarmAggregator, SwarmStatus
from swarmtrain.monitoring.metrics import MetricsServer, PeerMetrics, SwarmMetrics
from swarmtrain.monitoring.records import (
    PEER_ROLES,
    PeerRecord,
    fetch_records,
    publish_record,
    record_validators,
    records_key,
)

__all__ = [
    "PEER_ROLES",
    "MetricsServer",
    "PeerMetrics",
    "PeerRecord",
    "PeerSummary",
    "SwarmAggregator",
    "SwarmMetrics",
    "SwarmStatus",
    "fetch_records",
    "publish_record",
    "record_validators",
    "records_key",
]
