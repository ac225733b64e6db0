"""`swarmtrain demo`: a coordinator and N peers as separate processes on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from swarmtrain.errors import UserError

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"  # the tiny model, local mode, rounds overlapped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def swarmtrain_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "swarmtrain", *args]


@dataclass
class Swarm:
    """Handles to a local swarm's processes (used by the demo and the integration tests)."""

    workdir: Path
    coordinator_maddr: str
    coordinator: subprocess.Popen
    peers: List[subprocess.Popen]

    def status_file(self, index: int) -> Path:
        return self.workdir / f"peer-{index}.json"

    def read_status(self, index: int) -> dict:
        try:
            return json.loads(self.status_file(index).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


def start_coordinator(workdir: Path, config_path: Path, *extra: str, port: Optional[int] = None,
                      identity: Optional[Path] = None, metrics_port: int = 0) -> tuple[subprocess.Popen, str]:
    """Start `swarmtrain coordinator` and wait until it has published the run; returns its maddr."""
    from swarmtrain.net.identity import load_or_create_identity, peer_id_of

    identity = identity or workdir / "coordinator.id"
    peer_id = peer_id_of(load_or_create_identity(identity).get_public_key())
    port = port or free_port()
    log_path = workdir / "coordinator.log"
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    log = open(log_path, "a")
    process = subprocess.Popen(
        swarmtrain_command("coordinator", "--config", str(config_path), "--identity", str(identity),
                           "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--log-every", "5",
                           "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), *extra),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while "Volunteers join with" not in log_path.read_text()[start_offset:]:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise UserError(f"the coordinator did not start; its log:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"


def threads_per_peer(num_peers: int) -> int:
    """CPU threads for each of ``num_peers`` peers sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, num_peers))


def start_peer(workdir: Path, index: int, coordinator_maddr: str, *extra: str,
               command=swarmtrain_command, threads: Optional[int] = None) -> subprocess.Popen:
    """``threads``: the peer's torch/OpenMP threads. Peers that share a machine must split its cores:
    each would otherwise start one spinning thread per core, and the oversubscribed ones crawl (on
    2 cores, 3 peers: one at 100 samples/s while the others manage 5, so it trains alone)."""
    log = open(workdir / f"peer-{index}.log", "a")
    env = None
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:  # the user's own setting wins
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(
        command("peer", "--initial-peers", coordinator_maddr, "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                           "--status-file", str(workdir / f"peer-{index}.json"),
                           "--checkpoint-dir", str(workdir / f"peer-{index}"), "--no-progress", *extra),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGINT (the clean way out), SIGKILL if that takes too long, then sweep the process group
    (each swarm process was started in its own session) so no helper process outlives it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _table(swarm: Swarm, started: float, epochs: int) -> Table:
    table = Table(title=f"swarmtrain demo: {len(swarm.peers)} peers, {time.monotonic() - started:.0f}s, "
                        f"training to epoch {epochs}")
    for column in ("peer", "phase", "epoch", "step", "loss", "samples/s", "last round"):
        table.add_column(column, justify="right" if column not in ("peer", "phase", "last round") else "left")
    for index, process in enumerate(swarm.peers):
        status = swarm.read_status(index)
        rounds = status.get("rounds") or []
        last = rounds[-1] if rounds else None
        last_text = "-" if last is None else (f"{last['group_size']} peers" if last["ok"] else "failed")
        phase = status.get("phase", "starting")
        if process.poll() not in (None, 0):
            phase = f"exited {process.returncode}"
        loss = status.get("loss")
        table.add_row(f"peer-{index}", phase, str(status.get("epoch", 0)), str(status.get("step", 0)),
                      f"{loss:.3f}" if loss is not None else "-", f"{status.get('samples_per_second', 0):.1f}", last_text)
    return table


def parameter_spread(checkpoint_dirs: List[Path]) -> Optional[float]:
    """Largest absolute difference of any parameter between the peers' final checkpoints."""
    from swarmtrain.training.checkpoint import latest_checkpoint_path, load_checkpoint

    states = [load_checkpoint(d).model_state for d in checkpoint_dirs if latest_checkpoint_path(d) is not None]
    if len(states) < 2:
        return None
    return max((other[name] - states[0][name]).abs().max().item() for other in states[1:] for name in states[0])


def run_demo(num_peers: int, config_path: Optional[str], epochs: int, batch_size: int,
             workdir: Optional[str]) -> int:
    from swarmtrain.config import load_run_config

    console = Console()
    config_path = Path(config_path) if config_path else DEMO_CONFIG
    config = load_run_config(config_path)  # fail here, in one line, rather than in N processes
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="swarmtrain-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]swarmtrain demo[/]: run {config.run_id!r}, {num_peers} peers, logs in {workdir}")
    started = time.monotonic()
    metrics_port = free_port()
    coordinator, maddr = start_coordinator(workdir, config_path, metrics_port=metrics_port)
    swarm = Swarm(workdir, maddr, coordinator, [])
    interrupted = False
    try:
        console.print(f"coordinator up at {maddr}")
        console.print(f"swarm metrics: http://127.0.0.1:{metrics_port}/metrics and /status")
        # --wait-for-peers: the demo's epochs last a second or two; without it, the peer that finishes
        # its set-up first would train alone for the first few
        swarm.peers = [start_peer(workdir, i, maddr, "--batch-size", str(batch_size), "--max-epochs", str(epochs),
                                  "--eval-every", "0", "--checkpoint-every", "0", "--wait-for-peers", str(num_peers),
                                  "--wait-timeout", "120", threads=threads_per_peer(num_peers))
                       for i in range(num_peers)]
        with Live(_table(swarm, started, epochs), console=console, refresh_per_second=2) as live:
            while any(p.poll() is None for p in swarm.peers):
                time.sleep(0.5)
                live.update(_table(swarm, started, epochs))
            live.update(_table(swarm, started, epochs))
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: stopping the peers (they save their state)...")
    finally:
        # signal every peer at once: stopped one by one, the last ones would train on alone
        for process in swarm.peers:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in swarm.peers:
            stop_process(process)
        stop_process(coordinator)
    return _summary(console, swarm, config, started, interrupted)


def _summary(console: Console, swarm: Swarm, config, started: float, interrupted: bool) -> int:
    from swarmtrain.averaging.rounds import NO_OTHER_PEERS

    statuses = [swarm.read_status(i) for i in range(len(swarm.peers))]
    failed = [i for i, p in enumerate(swarm.peers) if p.returncode not in (0, -signal.SIGINT)]
    rounds = [r for s in statuses for r in s.get("rounds", [])]
    by_epoch, alone = {}, set()
    for record in rounds:
        if record.get("note") == NO_OTHER_PEERS:
            alone.add(record["epoch"])  # a peer stepped alone: no averaging round was attempted
            continue
        by_epoch.setdefault(record["epoch"], []).append(record)
    ok_rounds = [e for e, records in by_epoch.items() if any(r["ok"] for r in records)]
    sizes = [max(r["group_size"] for r in records) for records in by_epoch.values() if any(r["ok"] for r in records)]
    heldout = [s["heldout_loss"] for s in statuses if s.get("heldout_loss")]
    table = Table(title="summary", show_header=False)
    table.add_row("epochs reached", str(max((s.get("epoch", 0) for s in statuses), default=0)))
    table.add_row("averaging rounds", f"{len(ok_rounds)} succeeded of {len(by_epoch)} attempted")
    if alone - set(by_epoch):
        table.add_row("epochs stepped alone", f"{len(alone - set(by_epoch))} (no other peer in the swarm yet)")
    if sizes:
        table.add_row("peers per round", f"min {min(sizes)}, mean {sum(sizes) / len(sizes):.2f}, max {max(sizes)}")
    if heldout:
        start = sum(h[0][1] for h in heldout) / len(heldout)
        end = sum(h[-1][1] for h in heldout) / len(heldout)
        table.add_row("held-out loss", f"{start:.3f} -> {end:.3f} (nats/byte)")
    utilization = [s["utilization"] for s in statuses if s.get("utilization") is not None]
    if utilization:
        table.add_row("utilization", f"{sum(utilization) / len(utilization):.2f} of wall time computing "
                                     f"(min {min(utilization):.2f}, max {max(utilization):.2f} over peers)")
    spread = parameter_spread([swarm.workdir / f"peer-{i}" for i in range(len(swarm.peers))])
    if spread is not None:
        table.add_row("parameter spread", f"max |difference| between peers {spread:.2e}")
    table.add_row("wall time", f"{time.monotonic() - started:.0f} s")
    table.add_row("logs", str(swarm.workdir))
    console.print(table)
    if failed:
        console.print(f"[red]peer(s) {failed} failed; see their logs in {swarm.workdir}[/]")
        return 1
    return 130 if interrupted else 0
