"""A peer's status file (``swarmtrain peer --status-file``): a JSON summary of its progress, rewritten
atomically while it runs. The demo's live table, the tests and dashboards read it.

Every role writes the same :class:`PeerStatus`; a field a role has nothing to say about stays None
and is left out of the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from swarmtrain import __version__


@dataclass
class PeerStatus:
    """What a peer reports about itself. Fields set to None are not written."""

    # every role
    phase: str = "starting"  # starting, loading state, waiting for peers, training, hosting trunk, finished, stopped...
    step: int = 0  # local steps
    epoch: int = 0  # swarm epoch the peer is in
    loss: Optional[float] = None  # last training loss (written even while None)
    samples_per_second: float = 0.0
    rounds: List[dict] = field(default_factory=list)  # the averaging rounds (averaging.rounds.RoundRecord as dicts)
    heldout_loss: List[list] = field(default_factory=list)  # [epoch, held-out loss] measurements
    version: str = __version__
    run_id: Optional[str] = None
    peer_id: Optional[str] = None
    device: Optional[str] = None
    client_mode: Optional[bool] = None
    role: Optional[str] = None  # trunk or data-owner on split runs (None: a trainer)
    # trainers
    batch_size: Optional[int] = None  # samples per local step (as --batch-size auto picked it)
    precision: Optional[str] = None  # fp32 or bf16
    loaded_state_epoch: Optional[int] = None  # the epoch of the state downloaded at start
    traffic: Optional[Dict[str, float]] = None  # what the averager measured (compression.stats.AveragingTraffic)
    fingerprints: Optional[Dict[str, List[float]]] = None  # epoch -> parameter fingerprint at its start
    resynced_after: Optional[int] = None  # the round count at the last re-synchronisation
    resyncs: Optional[int] = None  # state downloads after drifting apart
    restores: Optional[int] = None  # returns to the last checkpoint (alone, with broken parameters)
    checkpoint: Optional[str] = None  # the checkpoint written at exit
    data_position_at_start: Optional[dict] = None  # where in the corpus it started (swarmtrain.data: a checkpoint's)
    utilization: Optional[float] = None  # share of the wall time since training began spent computing, 0..1
    overlapped_steps: Optional[int] = None  # local steps computed while a round was in flight (averaging.overlap)
    # trunk hosts (split runs)
    samples: Optional[int] = None
    rejected: Optional[int] = None  # requests refused as malformed
    unauthorized: Optional[int] = None  # requests refused for want of a token
    initial_trunk_norm: Optional[float] = None
    loaded_trunk: Optional[bool] = None  # the trunk came from another host at start
    loaded_trunk_norm: Optional[float] = None
    trunk_norm: Optional[float] = None
    sharing_trunk: Optional[bool] = None
    # data owners (split runs)
    trunk: Optional[str] = None  # the trunk host trained through
    batch_accuracy: Optional[float] = None
    leakage: Optional[float] = None  # dCor(X, Z) of the last batch
    dropped: Optional[int] = None  # steps the trunk host did not answer
    bytes_sent: Optional[int] = None
    test_accuracy: Optional[float] = None
    test_leakage: Optional[float] = None

    _ALWAYS_WRITTEN = ("phase", "step", "epoch", "loss", "samples_per_second", "rounds", "heldout_loss", "version")

    def update(self, **values: Any) -> None:
        """Set several fields at once (a misspelled field name raises AttributeError)."""
        for name, value in values.items():
            if not hasattr(self, name):
                raise AttributeError(f"PeerStatus has no field {name!r}")
            setattr(self, name, value)

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        return {name: value for name, value in data.items() if value is not None or name in self._ALWAYS_WRITTEN}

    def write(self, path: Optional[str]) -> None:
        """Write the status to `path` atomically (a reader never sees half a file); None: nowhere."""
        write_status(path, self.to_dict())


def write_status(path: Optional[str], status: dict) -> None:
    """Write a status mapping to `path` as JSON, atomically; None: nowhere."""
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(status, handle)
    os.replace(tmp, path)
