"""Sync vs local averaging over home-internet links: 4 peers, each in its own network namespace with
its own address and a capped link (tc netem: 20 Mbit/s and 30 ms each way by default), training the
tiny config at an equal sample budget.

    sudo python benchmarks/wan.py                        # all five configurations, ~30 min
    python benchmarks/wan.py --loopback                  # no namespaces, no caps (also the fallback without root)
    python benchmarks/wan.py --configs sync_fp16,local_adaptive_gaussiank --epochs 20
    sudo python benchmarks/wan.py --configs sync_fp16,sync_fp16_overlap --model wide --batch-multiplier 1
                                                         # overlap: a model whose fp16 average takes 2.6 s to send
    sudo python benchmarks/wan.py --configs local_sparseloco,local_sparseloco_overlap --baseline local_sparseloco \
        --model wide --period 1 --epochs 12 --output benchmarks/results/wan_local_overlap.json

Configurations (all: swarmtrain/configs/tiny.yaml with target_batch_size x4, total_epochs = --epochs,
so the learning rate decays to 0 at the end of every run; --model wide: 4 layers of width 256, 3.2M
parameters, whose fp16 average is 6.5 MB, 2.6 s at 20 Mbit/s):

    sync_fp16                  mode sync, fp16 (hivemind's dense averaging: the DeDLOC baseline), no overlap
    sync_fp16_overlap          the same with averaging.overlap (delayed parameter updates)
    sync_gaussiank             mode sync, gaussiank:RHO, no overlap
    local_constant             mode local, constant:H, fp16
    local_constant_overlap     the same with averaging.overlap (rounds in the background, delayed outer step)
    local_adaptive             mode local, adaptive (round_budget = epochs / H), fp16
    local_adaptive_gaussiank   mode local, adaptive (same budget), gaussiank:RHO
    local_sparseloco           mode local, constant:H, gaussiank:RHO+2bit, feedback_decay 0.95, outer lr
                               --sparse-outer-lr (plain outer step, no momentum)
                               (the simulator's winning recipe, issue #14)
    local_sparseloco_overlap   the same with averaging.overlap (rounds in the background, delayed outer step)

Topology: a bridge namespace; the coordinator (uncapped: a server) and each peer in their own
namespace on 10.93.0.0/24, each peer's veth shaped in both directions (its upload on its side, its
download on the bridge side), so peer-to-peer traffic crosses two home links (RTT ~4x the delay).

Measured per configuration: wall time from the moment all peers start training (they wait at their
first step for each other) to the last peer's final epoch; bytes per peer (the averager's own count of
its messages, and everything that crossed the peer's interface: DHT, matchmaking, state downloads,
TCP/IP headers); averaging rounds; held-out loss of peer 0's averaged models over time (evaluated
afterwards, off the clock); and the time each configuration needed to reach the baseline's final
held-out loss. Results: benchmarks/results/wan.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
PYTHON = sys.executable
TINY = REPO / "swarmtrain" / "configs" / "tiny.yaml"
SUBNET = "10.93"
NETNS_PREFIX = "lsgdwan"  # namespaces this benchmark creates (and may clean up after a crash)
PORT = 4321
EVAL_BLOCKS = 1024  # held-out blocks (of 64 bytes) the benchmark evaluates each averaged model on


# ------------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------------


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


class Loopback:
    description = "loopback 127.0.0.1, no caps"
    shaped = False

    def __init__(self, nodes: int):
        self.nodes = nodes

    def build(self) -> None:
        pass

    def prefix(self, node: int) -> List[str]:
        return []

    def address(self, node: int) -> str:
        return "127.0.0.1"

    def interface_bytes(self, node: int) -> Optional[int]:
        return None

    def close(self) -> None:
        pass


class Namespaces:
    """Node 0: the coordinator (a server: no cap); nodes 1..: peers behind a home link each. Every
    node has its own namespace and subnet (10.93.K.2/24) on a veth to a router namespace. A peer's
    link is capped in both directions (its upload on its side, its download on the router's) and
    delayed: with `tc netem` when the kernel has it, otherwise rate with `tbf` and the delay by
    benchmarks/netdelay.py, a userspace delay line that the router sends every forwarded packet
    through (one DELAY per home link crossed: peer to peer = two)."""

    shaped = True

    def __init__(self, nodes: int, rate: str, delay: str, queue_ms: float = 100.0):
        self.nodes, self.rate, self.delay = nodes, rate, delay
        tag = os.getpid() % 10000
        self.router = f"{NETNS_PREFIX}{tag}r"
        self.names = [f"{NETNS_PREFIX}{tag}n{i}" for i in range(nodes)]
        self.rate_bits, self.delay_ms, self.queue_ms = _parse_rate(rate), _parse_ms(delay), queue_ms
        self.delay_line: Optional[subprocess.Popen] = None
        self.description = ""

    def _netem_available(self) -> bool:
        probe = subprocess.run(["ip", "netns", "exec", self.router, "tc", "qdisc", "add", "dev", "lo", "root",
                                "netem", "delay", "1ms"], capture_output=True, text=True)
        subprocess.run(["ip", "netns", "exec", self.router, "tc", "qdisc", "del", "dev", "lo", "root"],
                       capture_output=True)
        return probe.returncode == 0

    def build(self) -> None:
        _run("ip", "netns", "add", self.router)
        router = ("ip", "netns", "exec", self.router)
        _run(*router, "ip", "link", "set", "lo", "up")
        _run(*router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        netem = self._netem_available()
        for node, name in enumerate(self.names):
            _run("ip", "netns", "add", name)
            inside = ("ip", "netns", "exec", name)
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run("ip", "link", "add", f"v{node}", "netns", self.router, "type", "veth", "peer", "name", "eth0",
                 "netns", name)
            _run(*router, "ip", "addr", "add", f"{SUBNET}.{node}.1/24", "dev", f"v{node}")
            _run(*router, "ip", "link", "set", f"v{node}", "up")
            _run(*inside, "ip", "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "route", "add", "default", "via", f"{SUBNET}.{node}.1")
            if node == 0:
                continue
            if netem:  # rate and delay in one qdisc; the queue holds the delay line plus queue_ms
                limit = int(math.ceil(self.rate_bits * (self.delay_ms + self.queue_ms) / 1000 / 8 / 1500)) + 10
                shape = ("root", "netem", "rate", self.rate, "delay", self.delay, "limit", str(limit))
            else:  # rate only; the delay comes from the delay line below
                burst = max(16000, int(self.rate_bits / 8 / 250) * 2)
                shape = ("root", "tbf", "rate", self.rate, "burst", str(burst), "latency", f"{self.queue_ms:g}ms")
            _run(*inside, "tc", "qdisc", "add", "dev", "eth0", *shape)
            _run(*router, "tc", "qdisc", "add", "dev", f"v{node}", *shape)
        how = "tc netem (rate + delay)"
        if not netem and self.delay_ms > 0:
            self._start_delay_line()
            how = "tc tbf (rate; this kernel has no sch_netem) + benchmarks/netdelay.py (delay)"
        self.description = (f"network namespaces behind a router: each peer's link {self.rate} and {self.delay} each "
                            f"way (queue {self.queue_ms:g} ms), via {how}; coordinator uncapped")

    def _start_delay_line(self) -> None:
        router = ("ip", "netns", "exec", self.router)
        _run(*router, "ip", "tuntap", "add", "dev", "dly0", "mode", "tun")
        peers = [f"{SUBNET}.{node}." for node in range(1, self.nodes)]
        self.delay_line = subprocess.Popen([*router, PYTHON, str(HERE / "netdelay.py"), "dly0", str(self.delay_ms),
                                            *peers], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           start_new_session=True, text=True)
        if self.delay_line.stdout.readline().strip() != "ready":
            raise RuntimeError("the delay line did not start")
        _run(*router, "ip", "link", "set", "dly0", "up")
        for setting in ("net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                        "net.ipv4.conf.dly0.rp_filter=0"):
            _run(*router, "sysctl", "-qw", setting)
        # packets coming back from the delay line go to their destination; all others into it
        for node in range(self.nodes):
            _run(*router, "ip", "route", "add", f"{SUBNET}.{node}.0/24", "dev", f"v{node}", "table", "100")
            _run(*router, "ip", "rule", "add", "iif", f"v{node}", "lookup", "200", "priority", "200")
        _run(*router, "ip", "rule", "add", "iif", "dly0", "lookup", "100", "priority", "100")
        _run(*router, "ip", "route", "add", "default", "dev", "dly0", "table", "200")

    def prefix(self, node: int) -> List[str]:
        return ["ip", "netns", "exec", self.names[node]]

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node}.2"

    def interface_bytes(self, node: int) -> Optional[int]:
        total = 0
        for direction in ("tx", "rx"):
            out = subprocess.run([*self.prefix(node), "cat", f"/sys/class/net/eth0/statistics/{direction}_bytes"],
                                 capture_output=True, text=True, timeout=10)
            total += int(out.stdout.strip() or 0)
        return total

    def close(self) -> None:
        if self.delay_line is not None:
            try:
                os.killpg(self.delay_line.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.delay_line.wait()
        for name in [*self.names, self.router]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _parse_rate(text: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"rate {text!r}: use e.g. 20mbit")


def _parse_ms(text: str) -> float:
    if text.endswith("ms"):
        return float(text[:-2])
    if text.endswith("s"):
        return float(text[:-1]) * 1000
    raise ValueError(f"delay {text!r}: use e.g. 30ms")


def namespaces_unavailable() -> Optional[str]:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command"
    return None


def cleanup_stale_namespaces() -> None:
    """Namespaces a crashed earlier run of this benchmark left behind (only ours, by prefix)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(NETNS_PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------


def configurations(epochs: int, period: int, density: float, sparse_outer_lr: float = 2.0) -> Dict[str, dict]:
    budget = max(1, epochs // period)
    adaptive = dict(mode="local", schedule="adaptive", round_budget=budget, min_period=1,
                    max_period=max(2 * period, -(-epochs // budget)))
    return {
        "sync_fp16": dict(mode="sync", compression="fp16", overlap=False),
        "sync_fp16_overlap": dict(mode="sync", compression="fp16", overlap=True),
        "sync_gaussiank": dict(mode="sync", compression=f"gaussiank:{density:g}", overlap=False),
        "local_constant": dict(mode="local", schedule=f"constant:{period}", compression="fp16"),
        # dense DiLoCo with each round in the background: the case where rounds cost seconds
        "local_constant_overlap": dict(mode="local", schedule=f"constant:{period}", compression="fp16",
                                       overlap=True),
        "local_adaptive": dict(adaptive, compression="fp16"),
        "local_adaptive_gaussiank": dict(adaptive, compression=f"gaussiank:{density:g}"),
        # the simulator's winning sparse recipe (benchmarks/simulate_recipes.py, issue #14): SparseLoCo's
        # decayed error feedback and 2-bit values, a plain outer step of lr 2
        "local_sparseloco": dict(mode="local", schedule=f"constant:{period}", compression=f"gaussiank:{density:g}+2bit",
                                 feedback_decay=0.95, outer_lr=sparse_outer_lr),
        # the same with each round in the background (averaging.overlap: the delayed outer step, issue #19)
        "local_sparseloco_overlap": dict(mode="local", schedule=f"constant:{period}",
                                         compression=f"gaussiank:{density:g}+2bit", feedback_decay=0.95,
                                         outer_lr=sparse_outer_lr, overlap=True),
        # for benchmarks/adaptive.py: the schedules alone, dense float32
        "adaptive_dense": dict(adaptive, compression="none"),
        "constant_dense": dict(mode="local", schedule=f"constant:{period}", compression="none"),
    }


def parse_override(text: str, flag: str, example: str) -> tuple:
    """"KEY=VALUE" -> (KEY, VALUE read as YAML); a one-line exit naming `flag` otherwise."""
    key, sign, value = text.partition("=")
    if not sign or not key.strip():
        raise SystemExit(f"{flag} {text!r}: expected KEY=VALUE, e.g. {example}")
    return key.strip(), yaml.safe_load(value)


def parse_averaging_overrides(overrides: List[str]) -> dict:
    """["request_timeout=2", ...] -> {"request_timeout": 2, ...}"""
    return dict(parse_override(text, "--averaging", "request_timeout=2") for text in overrides)


MODELS = {"tiny": None, "wide": {"n_layer": 4, "n_embd": 256, "n_head": 4}}  # None: tiny.yaml's own


def run_config_dict(averaging: dict, epochs: int, seed: int, batch_multiplier: int, model: str = "tiny") -> dict:
    config = yaml.safe_load(TINY.read_text())
    if MODELS[model] is not None:
        config["model"]["config"] = dict(MODELS[model])
    config["seed"] = seed
    config["target_batch_size"] *= batch_multiplier
    config["optimizer"]["total_epochs"] = epochs
    config["averaging"].update(averaging)
    return config


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    averaging: dict
    wall_seconds: Optional[float] = None
    peers: List[dict] = field(default_factory=list)
    snapshots: List[dict] = field(default_factory=list)  # peer 0's averaged models: time (s from go), epoch, file
    ok: bool = True
    note: str = ""
    snapshot_dir: str = ""


def _start(prefix: List[str], command: List[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *command], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def _stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass


def run_once(name: str, averaging: dict, net, workdir: Path, *, epochs: int, seed: int, peers: int,
             batch_multiplier: int, identities: List[Path], timeout: float, progress_every: float = 0.0,
             log=print, model: str = "tiny") -> RunResult:
    from swarmtrain.net.identity import load_or_create_identity, peer_id_of

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "run.yaml"
    config = run_config_dict(averaging, epochs, seed, batch_multiplier, model)
    config["run_id"] = f"bench-{name.replace('_', '-')}-{seed}"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, HIVEMIND_LOGLEVEL="WARNING", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", SWARMTRAIN_BENCH_PROGRESS_EVERY=str(progress_every))
    result = RunResult(name, averaging)
    processes: List[subprocess.Popen] = []
    try:
        coordinator_id = identities[0]
        coordinator_peer = peer_id_of(load_or_create_identity(coordinator_id).get_public_key())
        coordinator_log = workdir / "coordinator.log"
        processes.append(_start(net.prefix(0), [PYTHON, "-m", "swarmtrain", "coordinator", "--config", str(config_path),
                                                "--identity", str(coordinator_id), "--host-maddrs",
                                                f"/ip4/{net.address(0)}/tcp/{PORT}", "--metrics-port", "0",
                                                "--log-every", "10"], coordinator_log, env))
        deadline = time.monotonic() + 120
        while "Volunteers join with" not in coordinator_log.read_text():
            if processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"coordinator did not start:\n{coordinator_log.read_text()[-2000:]}")
            time.sleep(0.3)
        maddr = f"/ip4/{net.address(0)}/tcp/{PORT}/p2p/{coordinator_peer}"
        bytes_before = [net.interface_bytes(node) for node in range(peers + 1)]
        for index in range(peers):
            peer_dir = workdir / f"peer-{index}"
            peer_dir.mkdir(exist_ok=True)
            peer_env = dict(env, SWARMTRAIN_BENCH_DIR=str(peer_dir), SWARMTRAIN_BENCH_SNAPSHOTS="1" if index == 0 else "0")
            host = f"/ip4/{net.address(index + 1)}/tcp/0" if net.shaped else "/ip4/127.0.0.1/tcp/0"
            processes.append(_start(net.prefix(index + 1), [
                PYTHON, str(HERE / "bench_peer.py"), "peer", "--initial-peers", maddr, "--host-maddrs", host,
                "--device", "cpu", "--max-epochs", str(epochs), "--eval-every", "0", "--checkpoint-every", "0",
                "--no-progress", "--identity", str(identities[index + 1]), "--status-file", str(peer_dir / "status.json"),
            ], workdir / f"peer-{index}.log", peer_env))
        deadline = time.monotonic() + 300
        while not all((workdir / f"peer-{i}" / "ready").exists() for i in range(peers)):
            for i, process in enumerate(processes[1:]):
                if process.poll() is not None:
                    raise RuntimeError(f"peer-{i} exited before training:\n{(workdir / f'peer-{i}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("peers did not all get ready in 300 s")
            time.sleep(0.2)
        go = time.time()
        (workdir / "go").write_text(str(go))
        log(f"  {name}: all {peers} peers training")
        deadline = time.monotonic() + timeout
        for i, process in enumerate(processes[1:]):
            try:
                code = process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                result.ok, result.note = False, f"peer-{i} did not finish in {timeout:.0f} s"
                break
            if code != 0:
                result.ok, result.note = False, f"peer-{i} exited with {code}"
        bytes_after = [net.interface_bytes(node) for node in range(peers + 1)]
        finals = []
        for index in range(peers):
            peer_dir = workdir / f"peer-{index}"
            status = _read_json(peer_dir / "status.json")
            bench = _read_json(peer_dir / "bench.json")
            traffic = bench.get("traffic") or {}
            rounds = status.get("rounds", [])
            epochs_seen = bench.get("epochs") or []
            final_time = next((t for e, t in epochs_seen if e >= epochs), None)
            if final_time is not None:
                finals.append(final_time)
            interface = None
            if bytes_before[index + 1] is not None and bytes_after[index + 1] is not None:
                interface = bytes_after[index + 1] - bytes_before[index + 1]
            result.peers.append(dict(
                rounds_ok=sum(r["ok"] for r in rounds), rounds_failed=sum(not r["ok"] for r in rounds),
                rounds_full=sum(r["ok"] and r["group_size"] == peers for r in rounds),
                resyncs=status.get("resyncs", 0), final_epoch=status.get("epoch"),
                averager_bytes=traffic.get("bytes_sent_total", 0) + traffic.get("bytes_received_total", 0)
                + traffic.get("control_bytes_total", 0),
                interface_bytes=interface, final_seconds=None if final_time is None else final_time - go,
                heldout_end=(status.get("heldout_loss") or [[None, None]])[-1][1],
                round_epochs=[r["epoch"] for r in rounds if r["ok"]], utilization=status.get("utilization"),
                periods=[r.get("period") for r in rounds if r["ok"] and "period" in r],
            ))
            if index == 0:
                result.snapshots = [dict(s, time=s["time"] - go) for s in bench.get("snapshots", [])]
                result.snapshot_dir = str(peer_dir)
        if finals:
            result.wall_seconds = max(finals) - go
        return result
    except Exception as error:
        result.ok, result.note = False, repr(error)[:500]
        return result
    finally:
        for process in reversed(processes):
            _stop(process)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------------------
# evaluation (off the clock)
# ------------------------------------------------------------------------------------------------


def evaluate(result: RunResult, epochs: int, seed: int, batch_multiplier: int, model: str = "tiny") -> None:
    """Held-out loss of each saved averaged model of peer 0."""
    import torch

    from swarmtrain.config import parse_run_config
    from swarmtrain.data import load_corpus
    from swarmtrain.models import build_model, heldout_loss

    import swarmtrain.data

    config = parse_run_config(run_config_dict(result.averaging, epochs, seed, batch_multiplier, model))
    # more held-out blocks than a peer's own 64: the benchmark compares runs, and 64 blocks of 64 bytes
    # leave the loss noisy at the +-0.03 level
    swarmtrain.data.HELDOUT_BLOCKS = EVAL_BLOCKS
    corpus = load_corpus(config.data, None)
    model = build_model(config.model, config.data.seq_len, config.seed)
    for snapshot in result.snapshots:
        path = Path(result.snapshot_dir) / snapshot.get("file", "")
        if not path.is_file():
            continue
        state = torch.load(path)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name])
        snapshot["heldout_loss"] = heldout_loss(model, corpus.heldout, config.model.kind)


def summarise(result: RunResult) -> dict:
    curve = [[round(s["time"], 2), s["epoch"], round(s["heldout_loss"], 5)] for s in result.snapshots
             if "heldout_loss" in s]
    peers = result.peers
    mean = lambda values: (sum(values) / len(values)) if values else None  # noqa: E731
    final = curve[-1][2] if curve and curve[-1][1] >= max(p.get("final_epoch") or 0 for p in peers or [{}]) else None
    return dict(
        averaging=result.averaging, ok=result.ok, note=result.note, wall_seconds=result.wall_seconds,
        final_heldout_loss=final if final is not None else (curve[-1][2] if curve else None),
        rounds_ok_per_peer=[p["rounds_ok"] for p in peers], rounds_full_per_peer=[p["rounds_full"] for p in peers],
        rounds_failed_per_peer=[p["rounds_failed"] for p in peers], resyncs_per_peer=[p["resyncs"] for p in peers],
        averager_bytes_per_peer=mean([p["averager_bytes"] for p in peers]),
        interface_bytes_per_peer=mean([p["interface_bytes"] for p in peers if p["interface_bytes"] is not None]),
        round_epochs_peer0=peers[0]["round_epochs"] if peers else [],
        utilization_per_peer=[p.get("utilization") for p in peers],
        periods_peer0=peers[0]["periods"] if peers else [],
        heldout_curve_peer0=curve,
    )


def time_to_reach(curve: List[list], target: float) -> Optional[float]:
    for seconds, _, loss in curve:
        if loss <= target:
            return seconds
    return None


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def make_network(args, nodes: int, log=print):
    reason = "--loopback" if args.loopback else namespaces_unavailable()
    if reason is None:
        cleanup_stale_namespaces()
        net = Namespaces(nodes, args.rate, args.delay)
        try:
            net.build()
            return net
        except subprocess.CalledProcessError as error:
            net.close()
            reason = f"cannot build namespaces: {(error.stderr or '').strip() or error}"
    net = Loopback(nodes)
    net.description += f" ({reason}: without root there are no namespaces and no caps)"
    log(f"NOTE: running on loopback without link caps ({reason})")
    return net


def install_signal_handlers() -> None:
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def run_suite(args, names: List[str], seeds: List[int], output: Path, log=print) -> dict:
    from swarmtrain.net.identity import load_or_create_identity

    all_configs = configurations(args.epochs, args.period, args.density, getattr(args, "sparse_outer_lr", 2.0))
    for averaging in all_configs.values():  # --averaging KEY=VALUE: the same change in every configuration
        averaging.update(parse_averaging_overrides(getattr(args, "averaging", [])))  # (checked in main)
    install_signal_handlers()
    net = make_network(args, args.peers + 1, log)
    workroot = Path(tempfile.mkdtemp(prefix="swarmtrain-wan-", dir=args.workdir))
    report = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]), network=net.description,
        peers=args.peers, epochs=args.epochs, period=args.period, density=args.density,
        target_batch_size=192 * args.batch_multiplier, samples_per_run=192 * args.batch_multiplier * args.epochs,
        progress_every=getattr(args, "progress_every", 0.0),
        model=getattr(args, "model", "tiny"), cpus=os.cpu_count(), load_average_start=os.getloadavg(), heldout_blocks=EVAL_BLOCKS, started=time.strftime("%Y-%m-%d %H:%M:%S"),
        workdir=str(workroot), runs={},
    )
    try:
        for seed in seeds:
            identities = [workroot / f"seed{seed}-node{i}.id" for i in range(args.peers + 1)]
            for path in identities:
                load_or_create_identity(path)
            for name in names:
                log(f"seed {seed}: {name} ({all_configs[name]})")
                started = time.monotonic()
                result = run_once(name, all_configs[name], net, workroot / f"seed{seed}" / name, epochs=args.epochs,
                                  seed=seed, peers=args.peers, batch_multiplier=args.batch_multiplier,
                                  identities=identities, timeout=args.timeout,
                                  progress_every=getattr(args, "progress_every", 0.0), log=log,
                                  model=getattr(args, "model", "tiny"))
                evaluate(result, args.epochs, seed, args.batch_multiplier, getattr(args, "model", "tiny"))
                summary = summarise(result)
                report["runs"].setdefault(str(seed), {})[name] = summary
                log(f"  {name}: ok={result.ok} {result.note} wall {summary['wall_seconds']} s, final loss "
                    f"{summary['final_heldout_loss']}, rounds {summary['rounds_ok_per_peer']}, averager bytes/peer "
                    f"{summary['averager_bytes_per_peer']}, interface bytes/peer {summary['interface_bytes_per_peer']} "
                    f"({time.monotonic() - started:.0f} s)")
                report["load_average_end"] = os.getloadavg()
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps(report, indent=1))
    finally:
        net.close()
    return report


def compare_to_baseline(report: dict, baseline: str = "sync_fp16") -> None:
    """Each run's time to the baseline run's final held-out loss (same seed), and its wall time and bytes as
    ratios to the baseline's."""
    for seed, runs in report["runs"].items():
        base = runs.get(baseline)
        if not base or base.get("final_heldout_loss") is None:
            continue
        target = base["final_heldout_loss"]
        for name, summary in runs.items():
            summary["time_to_baseline_final_loss"] = time_to_reach(summary["heldout_curve_peer0"], target)
            if base.get("wall_seconds") and summary.get("wall_seconds"):
                summary["wall_time_vs_baseline"] = summary["wall_seconds"] / base["wall_seconds"]
            reach = summary["time_to_baseline_final_loss"]
            summary["time_to_baseline_loss_vs_baseline_wall"] = (reach / base["wall_seconds"]
                                                                  if reach is not None and base.get("wall_seconds") else None)
            for kind in ("averager_bytes_per_peer", "interface_bytes_per_peer"):
                if base.get(kind) and summary.get(kind):
                    summary[kind.replace("_per_peer", "_reduction_vs_baseline")] = base[kind] / summary[kind]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="sync_fp16,sync_gaussiank,local_constant,local_adaptive,local_adaptive_gaussiank")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--baseline", default="sync_fp16", help="the configuration the others are compared to")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--period", type=int, default=4, help="H of constant:H; the adaptive budget is epochs / H")
    parser.add_argument("--density", type=float, default=0.05, help="gaussiank density")
    parser.add_argument("--sparse-outer-lr", type=float, default=2.0, help="local_sparseloco's outer learning rate")
    parser.add_argument("--batch-multiplier", type=int, default=4, help="target_batch_size = 192 x this")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="tiny: tiny.yaml's model; wide: 3.2M parameters (fp16 average 6.5 MB)")
    parser.add_argument("--averaging", action="append", default=[], metavar="KEY=VALUE",
                        help="set an averaging field in every configuration (e.g. request_timeout=2); repeatable")
    parser.add_argument("--rate", default="20mbit")
    parser.add_argument("--delay", default="30ms")
    parser.add_argument("--loopback", action="store_true", help="no namespaces, no caps")
    parser.add_argument("--progress-every", type=float, default=0.0,
                        help="diagnostic: peers publish their progress at most every this many seconds "
                             "(0: after every step, hivemind's behaviour)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "wan.json"))
    args = parser.parse_args()
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = set(names) - set(configurations(args.epochs, args.period, args.density))
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}")
    if args.baseline not in names:
        parser.error(f"--baseline {args.baseline} is not among --configs")
    from swarmtrain.config import parse_run_config
    from swarmtrain.errors import UserError

    overrides = parse_averaging_overrides(args.averaging)
    for name in names:  # a bad --averaging value: one line now, not a config error in every peer's log
        averaging = dict(configurations(args.epochs, args.period, args.density)[name], **overrides)
        try:
            parse_run_config(run_config_dict(averaging, args.epochs, 0, args.batch_multiplier, args.model))
        except UserError as error:
            parser.error(f"--averaging: {error}")
    output = Path(args.output)
    report = run_suite(args, names, [int(s) for s in args.seeds.split(",")], output)
    compare_to_baseline(report, args.baseline)
    output.write_text(json.dumps(report, indent=1))
    print(json.dumps({seed: {name: {k: v for k, v in s.items() if k not in ("heldout_curve_peer0", "averaging")}
                             for name, s in runs.items()} for seed, runs in report["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
