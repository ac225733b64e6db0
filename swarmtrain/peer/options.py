"""What a volunteer says about their machine: `swarmtrain peer`'s flags, as one object."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from swarmtrain.errors import UserError


@dataclass
class PeerOptions:
    """A peer's own settings (the run's settings come from the swarm's run config)."""

    initial_peers: List[str]
    run_id: Optional[str] = None  # when given, refuse to train any other run
    device: str = "auto"
    batch_size: Optional[int] = 8  # None: sized to memory (swarmtrain/peer/resources.py)
    max_memory: Optional[int] = None  # bytes this peer may use for training (with batch_size None)
    precision: str = "auto"  # auto (bf16 on GPUs that have it), fp32 or bf16
    data: Optional[str] = None
    identity: Optional[str] = None
    host_maddrs: List[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: List[str] = field(default_factory=list)
    client_mode: bool = False
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 10  # epochs
    max_epochs: Optional[int] = None
    eval_every: int = 10  # epochs
    status_file: Optional[str] = None
    show_progress: Optional[bool] = None  # None: a live bar when stderr is a terminal
    metrics_port: Optional[int] = None  # serve this peer's own /metrics here
    port: Optional[int] = None  # the fixed listen port, when given (for the reachability advice)
    upload_mbps: Optional[float] = None  # this machine's uplink, for averaging's load balancing
    role: str = "trainer"  # trainer, trunk or data-owner (split runs: swarmtrain/privacy/swarm.py)
    data_owner_data: Optional[str] = None  # data-owner: an .npz with x and y (default: embedded digits)
    max_steps: Optional[int] = None  # data-owner: leave after this many steps
    wait_for_peers: int = 1  # hold the first step until this many peers (this one included) train the run
    wait_for_peers_timeout: float = 300.0  # ...or until this many seconds have passed

    def check(self) -> None:
        """The combinations of flags that cannot work, as one-line UserErrors."""
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.batch_size is not None and self.max_memory is not None:
            raise UserError("--max-memory sizes the batch per step: use it with --batch-size auto, not a fixed size")


def resolve_device(name: str):
    """The torch device for --device (auto: a GPU when there is one); UserError when it is not here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this machine has no CUDA device (or torch was built without CUDA); "
                            "use --device cpu")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)
