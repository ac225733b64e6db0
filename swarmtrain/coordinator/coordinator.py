"""The coordinator: the swarm's bootstrap node, publisher of the run, and its tracker.

It is not in the data path: peers train on while it is down, and it catches up from the DHT when
it comes back (with the same identity, hence the same multiaddr).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.utils import get_dht_time

from swarmtrain.config import RunConfig
from swarmtrain.identity import load_or_create_identity
from swarmtrain.network import RUN_CONFIG_TTL, make_dht, publish_run_config
from swarmtrain.signals import children_ignore_interrupts

logger = logging.getLogger("swarmtrain.coordinator")


@dataclass
class SwarmProgress:
    epoch: int
    peers: int
    clients: int
    samples_accumulated: int
    samples_per_second: float
    eta_seconds: float


def read_swarm_progress(dht: hivemind.DHT, run_id: str, target_batch_size: int) -> SwarmProgress:
    """Summarise the progress records hivemind's trackers publish (dead peers filtered by age)."""
    found = dht.get(f"{run_id}_progress", latest=True)
    records: List[LocalTrainingProgress] = []
    if found is not None and isinstance(found.value, dict):
        for entry in found.value.values():
            try:
                records.append(LocalTrainingProgress.parse_obj(entry.value))
            except Exception:
                continue  # malformed: the schema validator should have dropped it already
    now = get_dht_time()
    records = [r for r in records if now - r.time < 60.0]
    if not records:
        return SwarmProgress(0, 0, 0, 0, 0.0, float("inf"))
    epoch = max(r.epoch for r in records)
    current = [r for r in records if r.epoch == epoch]
    samples = sum(r.samples_accumulated for r in current)
    speed = sum(r.samples_per_second for r in records)
    eta = max(target_batch_size - samples, 0) / speed if speed > 0 else float("inf")
    return SwarmProgress(epoch, len(records), sum(r.client_mode for r in records), samples, speed, eta)


def join_command(maddrs: Sequence[str]) -> str:
    return "swarmtrain peer --initial-peers " + " ".join(maddrs)


class Coordinator:
    def __init__(self, config: RunConfig, *, identity: str, host_maddrs: Sequence[str],
                 announce_maddrs: Sequence[str] = ()):
        self.config = config
        self.private_key = load_or_create_identity(identity)
        self.signature_validator = RSASignatureValidator(self.private_key)
        with children_ignore_interrupts():
            self.dht = make_dht(
                host_maddrs=host_maddrs,
                announce_maddrs=announce_maddrs,
                identity_path=identity,
                client_mode=False,
                signature_validator=self.signature_validator,
            )
        # the same validators as the peers' trackers, or reading their records fails
        self.dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=config.run_id)])
        self._published_at = 0.0

    @property
    def maddrs(self) -> List[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def publish(self) -> None:
        if not publish_run_config(self.dht, self.config, self.signature_validator):
            logger.warning("could not store the run config in the DHT; will retry")
            return
        self._published_at = time.monotonic()

    def progress(self) -> SwarmProgress:
        return read_swarm_progress(self.dht, self.config.run_id, self.config.target_batch_size)

    def run(self, log_every: float = 10.0, stop_after: Optional[float] = None) -> None:
        """Publish the run and log progress until Ctrl+C/SIGTERM (or stop_after seconds)."""
        started = time.monotonic()
        last_log = 0.0
        while stop_after is None or time.monotonic() - started < stop_after:
            if time.monotonic() - self._published_at > RUN_CONFIG_TTL / 4:
                self.publish()
            if time.monotonic() - last_log >= log_every:
                p = self.progress()
                eta = f"{p.eta_seconds:.0f}s" if p.eta_seconds != float("inf") else "?"
                logger.info(
                    f"epoch {p.epoch}: {p.peers} peers ({p.clients} clients), "
                    f"{p.samples_accumulated}/{self.config.target_batch_size} samples, "
                    f"{p.samples_per_second:.1f} samples/s, next epoch in {eta}"
                )
                last_log = time.monotonic()
            time.sleep(0.5)

    def shutdown(self) -> None:
        self.dht.shutdown()
