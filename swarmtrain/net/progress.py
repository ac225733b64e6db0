"""The progress records hivemind's trackers publish (``{run_id}_progress``), read without dead peers',
and the swarm's progress summarised from them (the coordinator's log line)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import hivemind
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time

from swarmtrain.net.claims import plausible_time, quorum_epoch


def progress_records(dht: hivemind.DHT, run_id: str, max_age: float) -> List[LocalTrainingProgress]:
    """The progress records hivemind's trackers publish, without dead peers' (filtered by age) and
    without records dated ahead of our clock (they would look fresh for ever)."""
    found = dht.get(f"{run_id}_progress", latest=True)
    records: List[LocalTrainingProgress] = []
    if found is not None and isinstance(found.value, dict):
        for entry in found.value.values():
            try:
                records.append(LocalTrainingProgress.parse_obj(entry.value))
            except Exception:
                continue  # malformed or a goodbye (None): the schema validator lets goodbyes through
    now = get_dht_time()
    return [r for r in records if plausible_time(r.time, max_age, now)]


@dataclass
class SwarmProgress:
    epoch: int
    peers: int
    clients: int
    samples_accumulated: int
    samples_per_second: float
    eta_seconds: float


def read_swarm_progress(dht: hivemind.DHT, run_id: str, target_batch_size: int) -> SwarmProgress:
    """Summarise the progress records hivemind's trackers publish; the epoch is the one a majority of
    the full peers reach, not the largest any record claims."""
    records = progress_records(dht, run_id, max_age=60.0)
    if not records:
        return SwarmProgress(0, 0, 0, 0, 0.0, float("inf"))
    epoch = quorum_epoch(r.epoch for r in records if not r.client_mode)
    if epoch is None:
        epoch = quorum_epoch(r.epoch for r in records)
    current = [r for r in records if r.epoch == epoch]
    samples = sum(r.samples_accumulated for r in current)
    speed = sum(r.samples_per_second for r in records)
    eta = max(target_batch_size - samples, 0) / speed if speed > 0 else float("inf")
    return SwarmProgress(epoch, len(records), sum(r.client_mode for r in records), samples, speed, eta)
