"""Chaos run: a swarm training the tiny config while peers are SIGKILLed and restarted and links are cut.

Topology (with root): every process in its own network namespace, joined by a bridge in a hub
namespace; a partition takes one node's link down (`ip link set ... down` on the hub side) and
brings it back later. Without root it runs on loopback and a "partition" freezes the peer
(SIGSTOP / SIGCONT), which its groupmates see the same way (silence, then a stale peer), and the
JSON says so.

    python benchmarks/churn.py                      # churn run + the same run without churn
    python benchmarks/churn.py --duration 240 --peers 5 --seed 1

For each run: rounds attempted / succeeded per peer, state downloads (resyncs), whether the peers
that finished an epoch together held the same parameters at its start (fingerprints from their
status files), and the held-out loss at the end. Results: benchmarks/results/churn.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from swarmtrain.demo import stop_process  # noqa: E402
from swarmtrain.net.identity import load_or_create_identity, peer_id_of  # noqa: E402

HUB, SUBNET, PORT = "chaos-hub", "10.78.0", 4300
EVAL_EVERY = 5  # epochs between held-out measurements: the runs are compared at equal epochs too
FINGERPRINT_TOLERANCE = 1e-5  # dense averaging: peers in sync differ by float rounding (~1e-8)


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


class Lab:
    """Namespaces on a bridge (root), or plain loopback."""

    def __init__(self, nodes: list[str], use_namespaces: bool):
        self.nodes, self.use_namespaces = nodes, use_namespaces
        self.address = {node: (f"{SUBNET}.{10 + i}" if use_namespaces else "127.0.0.1") for i, node in enumerate(nodes)}

    def __enter__(self):
        if self.use_namespaces:
            self.close()
            _run("ip", "netns", "add", HUB)
            _run("ip", "netns", "exec", HUB, "ip", "link", "add", "br0", "type", "bridge")
            _run("ip", "netns", "exec", HUB, "ip", "link", "set", "br0", "up")
            for node in self.nodes:
                namespace = f"chaos-{node}"
                _run("ip", "netns", "add", namespace)
                _run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
                _run("ip", "link", "add", f"h-{node}", "netns", HUB, "type", "veth", "peer", "name", "eth0",
                     "netns", namespace)
                _run("ip", "netns", "exec", HUB, "ip", "link", "set", f"h-{node}", "master", "br0")
                _run("ip", "netns", "exec", HUB, "ip", "link", "set", f"h-{node}", "up")
                _run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{self.address[node]}/24", "dev", "eth0")
                _run("ip", "netns", "exec", namespace, "ip", "link", "set", "eth0", "up")
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if not self.use_namespaces:
            return
        for namespace in [f"chaos-{node}" for node in self.nodes] + [HUB]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def command(self, node: str, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", f"chaos-{node}"] if self.use_namespaces else []
        return [*prefix, sys.executable, "-m", "swarmtrain", *args]

    def cut(self, node: str, process: subprocess.Popen):
        if self.use_namespaces:
            _run("ip", "netns", "exec", HUB, "ip", "link", "set", f"h-{node}", "down")
        else:
            os.killpg(process.pid, signal.SIGSTOP)

    def heal(self, node: str, process: subprocess.Popen):
        if self.use_namespaces:
            _run("ip", "netns", "exec", HUB, "ip", "link", "set", f"h-{node}", "up")
        else:
            os.killpg(process.pid, signal.SIGCONT)


class ChaosSwarm:
    def __init__(self, lab: Lab, workdir: Path, config: Path, num_peers: int):
        self.lab, self.workdir, self.config = lab, workdir, config
        self.peer_names = [f"p{i}" for i in range(num_peers)]
        self.processes: dict[str, subprocess.Popen] = {}
        identity = workdir / "coordinator.id"
        self.coordinator_maddr = (f"/ip4/{lab.address['c']}/tcp/{PORT}/p2p/"
                                  f"{peer_id_of(load_or_create_identity(identity).get_public_key())}")
        self._start("c", "coordinator", "--config", str(config), "--identity", str(identity),
                    "--host-maddrs", f"/ip4/{lab.address['c']}/tcp/{PORT}", "--metrics-port", "0", "--log-every", "10")
        deadline = time.monotonic() + 90
        while "Volunteers join with" not in (workdir / "c.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start:\n" + (workdir / "c.log").read_text()[-2000:])
            time.sleep(0.5)

    def _start(self, node: str, *args: str):
        log = open(self.workdir / f"{node}.log", "a")
        self.processes[node] = subprocess.Popen(self.lab.command(node, *args), stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start_peer(self, node: str):
        self._start(node, "peer", "--initial-peers", self.coordinator_maddr,
                    "--host-maddrs", f"/ip4/{self.lab.address[node]}/tcp/0", "--device", "cpu", "--no-progress",
                    "--identity", str(self.workdir / f"{node}.id"), "--checkpoint-dir", str(self.workdir / node),
                    "--checkpoint-every", "5", "--eval-every", str(EVAL_EVERY), "--status-file", str(self.status_path(node)))

    def status_path(self, node: str) -> Path:
        return self.workdir / f"{node}.json"

    def status(self, node: str) -> dict:
        try:
            return json.loads(self.status_path(node).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def kill(self, node: str):
        process = self.processes[node]
        process.send_signal(signal.SIGKILL)
        process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # a restart starts a new status file: keep the old one's record of rounds
        if self.status_path(node).exists():
            previous = self.workdir / f"{node}.{int(time.time())}.json"
            self.status_path(node).rename(previous)

    def stop_all(self):
        for node in self.peer_names:
            if node in self.processes:
                stop_process(self.processes[node], timeout=20)
        stop_process(self.processes["c"])


def _fingerprints_agree(a, b) -> bool:
    return all(abs(x - y) <= FINGERPRINT_TOLERANCE for x, y in zip(a, b))


def summarize(swarm: ChaosSwarm) -> dict:
    """Per peer: rounds, state downloads, restarts, held-out loss. Sync, two ways:

    - within rounds (the acceptance criterion): the members of each successful round -- the same
      epoch and the same group id (a hash of the members' peer IDs, RoundRecord.group) -- must hold
      the same parameters at the start of the next epoch (their status files' fingerprints);
    - across the swarm: the epochs where successful rounds of *different* groups ended with different
      parameters (the swarm was split in two, e.g. by a partition, until one side re-downloads).
    """
    peers = {}
    groups: dict[tuple, dict[str, list]] = {}  # (epoch, group) -> node -> fingerprint after the round
    by_epoch: dict[int, dict[str, list]] = {}
    curves = {}
    for node in swarm.peer_names:
        statuses = [json.loads(p.read_text()) for p in sorted(swarm.workdir.glob(f"{node}.*.json"))]
        statuses.append(swarm.status(node))
        rounds = [r for s in statuses for r in s.get("rounds", [])]
        heldout = [entry for s in statuses for entry in s.get("heldout_loss", [])]
        curves[node] = sorted((int(e), float(l)) for e, l in heldout)
        peers[node] = dict(
            rounds_attempted=len(rounds), rounds_ok=sum(r["ok"] for r in rounds),
            rounds_failed_alone=sum((not r["ok"]) and r["note"] == "no other peers" for r in rounds),
            state_downloads=sum(s.get("resyncs", 0) + (1 if s.get("loaded_state_epoch") else 0) for s in statuses),
            restarts=len(statuses) - 1, final_epoch=swarm.status(node).get("epoch"),
            final_heldout_loss=heldout[-1][1] if heldout else None,
        )
        for status in statuses:
            group_of = {r["epoch"]: r.get("group", "") for r in status.get("rounds", []) if r["ok"] and r["group_size"] >= 2}
            for epoch, fingerprint in status.get("fingerprints", {}).items():
                # the parameters at the start of an epoch are the result of the previous epoch's round
                previous = int(epoch) - 1
                if previous in group_of:
                    groups.setdefault((previous, group_of[previous]), {})[node] = fingerprint
                    by_epoch.setdefault(int(epoch), {})[node] = fingerprint
    rounds_compared, rounds_in_sync, rounds_apart = 0, 0, []
    for (epoch, group), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        rounds_compared += 1
        if all(_fingerprints_agree(members[a], members[b]) for a, b in combinations(sorted(members), 2)):
            rounds_in_sync += 1
        else:
            rounds_apart.append(dict(epoch=epoch, members=sorted(members)))
    split_epochs = [epoch for epoch, members in sorted(by_epoch.items()) if len(members) >= 2 and not all(
        _fingerprints_agree(members[a], members[b]) for a, b in combinations(sorted(members), 2))]
    # peers at the swarm's final epoch (one restarted in the last seconds has not caught up yet)
    last_epoch = max((p["final_epoch"] or 0) for p in peers.values())
    losses = [p["final_heldout_loss"] for p in peers.values()
              if p["final_heldout_loss"] is not None and (p["final_epoch"] or 0) >= last_epoch - 1]
    return dict(peers=peers, rounds_compared=rounds_compared, rounds_members_in_sync=rounds_in_sync,
                rounds_members_apart=rounds_apart[:50], epochs_compared=len(by_epoch),
                epochs_swarm_split=split_epochs[:80],
                rounds_attempted=sum(p["rounds_attempted"] for p in peers.values()),
                rounds_ok=sum(p["rounds_ok"] for p in peers.values()),
                mean_final_heldout_loss=sum(losses) / len(losses) if losses else None,
                final_epoch=last_epoch, heldout_curves=curves)


def loss_at_epoch(curves: dict, epoch: int) -> Optional[float]:
    """Mean over peers of the held-out loss at `epoch` (linear between a peer's measurements)."""
    values = []
    for curve in curves.values():
        below = [(e, l) for e, l in curve if e <= epoch]
        above = [(e, l) for e, l in curve if e >= epoch]
        if below and above:
            (e0, l0), (e1, l1) = below[-1], above[0]
            values.append(l0 if e1 == e0 else l0 + (l1 - l0) * (epoch - e0) / (e1 - e0))
    return sum(values) / len(values) if values else None


def run(args, churn: bool, use_namespaces: bool, workdir: Path) -> dict:
    config = yaml.safe_load((REPO / "swarmtrain" / "configs" / "tiny.yaml").read_text())
    config["run_id"] = "chaos" if churn else "calm"
    config_path = workdir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    nodes = ["c"] + [f"p{i}" for i in range(args.peers)]
    rng = random.Random(args.seed)
    events = []
    with Lab(nodes, use_namespaces) as lab:
        swarm = ChaosSwarm(lab, workdir, config_path, args.peers)
        try:
            for node in swarm.peer_names:
                swarm.start_peer(node)
            started = time.monotonic()
            pending: list[tuple[float, str, str]] = []  # (when, action, node) to undo a disturbance
            next_event = started + args.warmup
            while time.monotonic() - started < args.duration:
                now = time.monotonic()
                for item in [p for p in pending if p[0] <= now]:
                    pending.remove(item)
                    _, action, node = item
                    if action == "restart":
                        swarm.start_peer(node)
                    else:
                        lab.heal(node, swarm.processes[node])
                    events.append(dict(t=round(now - started, 1), event=action, peer=node))
                disturbed = {node for _, _, node in pending}
                if churn and now >= next_event and len(disturbed) < min(2, args.peers - 2):
                    node = rng.choice([n for n in swarm.peer_names if n not in disturbed])
                    if rng.random() < 0.5:
                        swarm.kill(node)
                        pending.append((now + rng.uniform(10, 25), "restart", node))
                        events.append(dict(t=round(now - started, 1), event="SIGKILL", peer=node))
                    else:
                        lab.cut(node, swarm.processes[node])
                        pending.append((now + rng.uniform(15, 30), "heal", node))
                        events.append(dict(t=round(now - started, 1), event="partition", peer=node))
                    next_event = now + rng.uniform(12, 25)
                time.sleep(0.5)
            for when, action, node in pending:  # end every disturbance, then a calm minute
                swarm.start_peer(node) if action == "restart" else lab.heal(node, swarm.processes[node])
            time.sleep(args.settle)
        finally:
            swarm.stop_all()
        result = summarize(swarm)
    result.update(churn=churn, events=events, duration_seconds=args.duration)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4, help="peers in the swarm (4-6 in the issue)")
    parser.add_argument("--duration", type=float, default=200.0, help="seconds of training under churn")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the first event")
    parser.add_argument("--settle", type=float, default=45.0, help="calm seconds after the last event")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true", help="only the churn run")
    parser.add_argument("--output", type=Path, default=RESULTS / "churn.json")
    args = parser.parse_args()
    use_namespaces = os.geteuid() == 0 and shutil.which("ip") is not None
    if not use_namespaces:
        print("not root (or no `ip`): loopback, and partitions are SIGSTOP/SIGCONT freezes", flush=True)
    results = dict(command=" ".join(["python", "benchmarks/churn.py", *sys.argv[1:]]),
                   network="namespaces on a bridge" if use_namespaces else "loopback (partitions = SIGSTOP)",
                   peers=args.peers, seed=args.seed, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    runs = [("churn", True)] + ([] if args.skip_baseline else [("no_churn", False)])
    for name, churn in runs:
        with tempfile.TemporaryDirectory(prefix=f"swarmtrain-{name}-") as workdir:
            print(f"[churn] {name}: {args.peers} peers for {args.duration:.0f} s ...", flush=True)
            results[name] = run(args, churn, use_namespaces, Path(workdir))
            summary = {k: v for k, v in results[name].items() if k not in ("peers", "events", "heldout_curves")}
            print(f"[churn] {name}: {json.dumps(summary)}", flush=True)
    if "no_churn" in results:
        # the same number of optimizer steps: churn costs wall time (restarts, downloads) and, if it
        # hurts the model, loss at an equal epoch
        epoch = results["churn"]["final_epoch"]
        results["equal_epochs"] = dict(epoch=epoch, churn=loss_at_epoch(results["churn"]["heldout_curves"], epoch),
                                       no_churn=loss_at_epoch(results["no_churn"]["heldout_curves"], epoch))
        print(f"[churn] at epoch {epoch}: {json.dumps(results['equal_epochs'])}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
