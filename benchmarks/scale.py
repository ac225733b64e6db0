"""What one peer pays to be in a swarm of N, for N = 4, 8, 16, 24: control traffic by kind, rounds, and the
coordinator's CPU, memory and /metrics time.

    sudo python benchmarks/scale.py                          # N = 4,8,16,24 in network namespaces, ~40 min
    python benchmarks/scale.py --peers 4,8 --loopback         # no namespaces (also the fallback without root)

Each N: a coordinator and N peers of the tiny config, with the realistic configs' timeouts (matchmaking
5 s, requests 2 s), as the real `swarmtrain` programs, instrumented (benchmarks/bench_peer.py), each in
its own network namespace behind a capped link (benchmarks/wan.py's topology; see "Links" below for
--delay), on a token-gated run (access.mode: token) so that the access records' cost shows. The peers
train for --warmup seconds, then everything is measured over a --window of seconds:

- per peer, bytes/s by kind, counted at hivemind's RPC layer (benchmarks/traffic_meter.py: progress
  records, peer records, matchmaking, access, averaging, state downloads, other DHT), and what crossed
  its interface (namespaces only: the counted kinds plus libp2p/TCP framing);
- rounds: success ratio, group sizes, round seconds (from the peers' status files, the epochs of the
  window);
- the coordinator: CPU (its process tree, utime+stime), memory (PSS of the tree), its own traffic, and
  the time /metrics (per-peer metrics on) takes to answer, sampled every 5 s.

target_batch_size is the same for every N (tiny.yaml's x4): on one machine the swarm's throughput is
the machine's, so epochs last about as long whatever N, and per-peer figures compare like for like.
That stops at N = 16 on 2 cores (load 9-21; 24 peers do not start). With --step-seconds S --batch-per-peer B
each peer steps at a fixed pace instead (benchmarks/bench_peer.py sleeps what its compute leaves of S) and
target_batch_size is B x N: as in a real swarm, every volunteer brings its own accelerator and the same
share of an epoch, so epochs last as long whatever N, and the machine is not the bottleneck at N = 24:

    sudo python benchmarks/scale.py --step-seconds 0.6 --batch-per-peer 160 --start-wave 4 --delay 0ms
Links: 20 Mbit/s and 30 ms each way with tc netem; on a kernel without netem the delay comes from a
Python delay line that every packet crosses, which with 24 peers on 2 cores would measure itself: pass
--delay 0ms there. Results: benchmarks/results/scale.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import traffic_meter  # noqa: E402
from wan import (PORT, PYTHON, TINY, _read_json, _start, _stop, cleanup_stale_namespaces,  # noqa: E402
                 install_signal_handlers, make_network, parse_override)

METRICS_PORT = 9400
# the swarm's steady running costs; "state" (downloads after a resync or by a joiner) comes in events
CONTROL_KINDS = ["progress", "peer_records", "matchmaking", "access", "dht_other"]


# ------------------------------------------------------------------------------------------------
# the coordinator's process tree
# ------------------------------------------------------------------------------------------------


def _children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def process_tree(pid: int) -> List[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def cpu_seconds(pids: List[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def pss_bytes(pids: List[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def time_metrics(net, address: str) -> Optional[float]:
    """Seconds /metrics takes to answer, from the coordinator's own namespace."""
    probe = ("import time, urllib.request\nstart = time.perf_counter()\n"
             f"urllib.request.urlopen('http://{address}:{METRICS_PORT}/metrics', timeout=30).read()\n"
             "print(time.perf_counter() - start)")
    out = subprocess.run([*net.prefix(0), PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    try:
        return float(out.stdout.strip())
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------
# one swarm size
# ------------------------------------------------------------------------------------------------


def run_config(args, run_id: str, peers: int) -> dict:
    config = yaml.safe_load(TINY.read_text())
    config["run_id"] = run_id
    if args.batch_per_peer:
        config["target_batch_size"] = args.batch_per_peer * peers
    else:
        config["target_batch_size"] *= args.batch_multiplier
    config["optimizer"]["total_epochs"] = 10_000
    config["averaging"]["overlap"] = not args.no_overlap
    # the realistic configs' matchmaking window and request timeout: the tiny config's (2 s / 1 s) are for
    # loopback. Behind 20 Mbit/s links, hivemind's chunk timeout (= the matchmaking time) dropped slow
    # senders and groups split: at N = 8, mean group 5.5 and 41 resyncs in 90 s, against 7.7 and 5 with
    # these (issue #19's fifth note)
    config["averaging"].update(matchmaking_time=5.0, request_timeout=2.0)
    if args.access == "token":
        config["access"] = {"mode": "token"}
    for override in args.set:
        dotted, value = parse_override(override, "--set", "averaging.overlap=false")
        section, _, key = dotted.partition(".")
        config.setdefault(section, {})[key] = value
    return config


class Swarm:
    """The coordinator and N peers of one measurement, and their files."""

    def __init__(self, args, net, workdir: Path, peers: int, log=print):
        self.args, self.net, self.workdir, self.peers, self.log = args, net, workdir, peers, log
        self.run_id = f"scale-{peers}"
        self.processes: List[subprocess.Popen] = []
        self.env = dict(os.environ, HIVEMIND_LOGLEVEL="WARNING", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                        MKL_NUM_THREADS="1", SWARMTRAIN_BENCH_TRAFFIC=self.run_id,
                        SWARMTRAIN_BENCH_STEP_SECONDS=str(args.step_seconds))

    def node_dir(self, node: int) -> Path:
        return self.workdir / ("coordinator" if node == 0 else f"peer-{node - 1}")

    def start(self) -> None:
        from swarmtrain.access.tokens import issue_token
        from swarmtrain.net.identity import load_or_create_identity, peer_id_of

        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "run.yaml"
        config_path.write_text(yaml.safe_dump(run_config(self.args, self.run_id, self.peers)))
        keys = [load_or_create_identity(self.workdir / f"node{i}.id") for i in range(self.peers + 1)]
        ids = [peer_id_of(key.get_public_key()) for key in keys]
        for node in range(self.peers + 1):
            self.node_dir(node).mkdir(exist_ok=True)
        self.processes.append(_start(self.net.prefix(0), [
            PYTHON, str(HERE / "bench_peer.py"), "coordinator", "--config", str(config_path), "--identity",
            str(self.workdir / "node0.id"), "--host-maddrs", f"/ip4/{self.net.address(0)}/tcp/{PORT}",
            "--metrics-host", "0.0.0.0", "--metrics-port", str(METRICS_PORT), "--per-peer-metrics", "--log-every", "10",
        ], self.workdir / "coordinator.log", dict(self.env, SWARMTRAIN_BENCH_DIR=str(self.node_dir(0)))))
        self._wait_for(lambda: "Volunteers join with" in (self.workdir / "coordinator.log").read_text(), 180,
                       "the coordinator to start")
        maddr = f"/ip4/{self.net.address(0)}/tcp/{PORT}/p2p/{ids[0]}"
        for index in range(self.peers):
            node = index + 1
            wave = self.args.start_wave
            if wave and index and index % wave == 0:  # start-up is CPU-heavy: let the last wave settle first
                self._wait_for(lambda: all((self.node_dir(n) / "ready").exists() for n in range(node - wave, node)),
                               60 + 30 * wave, f"peers {index - wave}-{index - 1} to be ready")
            extra = []
            if self.args.access == "token":
                token = issue_token(keys[0], f"peer{index}", ids[node], time.time() + 86400)
                extra = ["--token", token.to_text()]
            host = f"/ip4/{self.net.address(node)}/tcp/0" if self.net.shaped else "/ip4/127.0.0.1/tcp/0"
            self.processes.append(_start(self.net.prefix(node), [
                PYTHON, str(HERE / "bench_peer.py"), "peer", "--initial-peers", maddr, "--host-maddrs", host,
                "--device", "cpu", "--eval-every", "0", "--checkpoint-every", "0", "--no-progress",
                "--identity", str(self.workdir / f"node{node}.id"), "--status-file",
                str(self.node_dir(node) / "status.json"), *extra,
            ], self.workdir / f"peer-{index}.log", dict(self.env, SWARMTRAIN_BENCH_DIR=str(self.node_dir(node)))))
        self._wait_for(lambda: all((self.node_dir(n) / "ready").exists() for n in range(1, self.peers + 1)),
                       60 + 30 * self.peers, "every peer to be ready")
        (self.workdir / "go").write_text(str(time.time()))

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for node, process in enumerate(self.processes):
                if process.poll() is not None:
                    name = "coordinator" if node == 0 else f"peer-{node - 1}"
                    raise RuntimeError(f"{name} exited while waiting for {what}:\n"
                                       f"{(self.workdir / f'{name}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def snapshot(self) -> dict:
        nodes = range(self.peers + 1)
        coordinator_tree = process_tree(self.processes[0].pid)
        return dict(
            time=time.time(),
            traffic=[_read_json(self.node_dir(n) / "traffic.json").get("bytes", {}) for n in nodes],
            interface=[self.net.interface_bytes(n) for n in nodes],
            epochs=[_read_json(self.node_dir(n) / "status.json").get("epoch") for n in range(1, self.peers + 1)],
            coordinator_cpu=cpu_seconds(coordinator_tree), coordinator_pss=pss_bytes(coordinator_tree),
        )

    def close(self) -> None:
        for process in reversed(self.processes):
            _stop(process)


def measure(args, net, workdir: Path, peers: int, log=print) -> dict:
    swarm = Swarm(args, net, workdir, peers, log)
    try:
        swarm.start()
        log(f"  N={peers}: all peers training; warm-up {args.warmup:.0f} s")
        time.sleep(args.warmup)
        before = swarm.snapshot()
        metrics_times = []
        end = time.monotonic() + args.window
        while time.monotonic() < end:
            sample = time_metrics(net, net.address(0) if net.shaped else "127.0.0.1")
            if sample is not None:
                metrics_times.append(sample)
            time.sleep(max(0.0, min(5.0, end - time.monotonic())))
        after = swarm.snapshot()
        statuses = [_read_json(swarm.node_dir(n) / "status.json") for n in range(1, peers + 1)]
        return summarise(peers, before, after, statuses, metrics_times)
    finally:
        swarm.close()


def _rate(after: dict, before: dict, kind: str, seconds: float) -> float:
    return (after.get(kind, 0.0) - before.get(kind, 0.0)) / seconds


def summarise(peers: int, before: dict, after: dict, statuses: List[dict], metrics_times: List[float]) -> dict:
    seconds = after["time"] - before["time"]
    per_peer = []
    for node in range(1, peers + 1):
        rates = {kind: _rate(after["traffic"][node], before["traffic"][node], kind, seconds)
                 for kind in traffic_meter.KINDS + traffic_meter.DETAILS}
        interface = None
        if after["interface"][node] is not None and before["interface"][node] is not None:
            interface = (after["interface"][node] - before["interface"][node]) / seconds
        per_peer.append(dict(rates, control=sum(rates[k] for k in CONTROL_KINDS), interface=interface))
    first = min((e for e in before["epochs"] if e is not None), default=0)
    last = max((e for e in after["epochs"] if e is not None), default=0)
    rounds = [r for s in statuses for r in s.get("rounds", []) if first <= r["epoch"] < last]
    attempted = [r for r in rounds if r.get("note") != "no other peers"]
    ok = [r for r in attempted if r["ok"]]
    mean = lambda values: statistics.fmean(values) if values else None  # noqa: E731
    coordinator_rates = {kind: _rate(after["traffic"][0], before["traffic"][0], kind, seconds)
                         for kind in traffic_meter.KINDS}
    return dict(
        peers=peers, window_seconds=seconds, epochs=[first, last],
        # control: the steady kinds (CONTROL_KINDS); interface: all that crossed the peer's link
        per_peer_bytes_per_second={key: mean([p[key] for p in per_peer if p[key] is not None])
                                   for key in [*traffic_meter.KINDS, "control", "interface"]},
        per_peer_dht_bytes_per_second={key: mean([p[key] for p in per_peer]) for key in traffic_meter.DETAILS},
        per_peer_control_max=max(p["control"] for p in per_peer),
        rounds_attempted=len(attempted), rounds_ok=len(ok),
        round_success_ratio=len(ok) / len(attempted) if attempted else None,
        group_size_mean=mean([r["group_size"] for r in ok]), group_size_min=min((r["group_size"] for r in ok), default=None),
        round_seconds_mean=mean([r["seconds"] for r in ok]),
        resyncs=sum(s.get("resyncs") or 0 for s in statuses),
        utilization_mean=mean([s["utilization"] for s in statuses if s.get("utilization") is not None]),
        coordinator=dict(
            cpu_share=(after["coordinator_cpu"] - before["coordinator_cpu"]) / seconds,
            pss_bytes=after["coordinator_pss"], bytes_per_second=coordinator_rates,
            metrics_seconds_median=statistics.median(metrics_times) if metrics_times else None,
            metrics_seconds_max=max(metrics_times) if metrics_times else None, metrics_samples=len(metrics_times),
        ),
    )


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def growth(results: List[dict]) -> dict:
    """Per-peer control traffic at each N relative to the smallest N."""
    base = results[0]["per_peer_bytes_per_second"]
    return {str(r["peers"]): {kind: (r["per_peer_bytes_per_second"][kind] / base[kind] if base[kind] else None)
                              for kind in [*CONTROL_KINDS, "control"]} for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="4,8,16,24", help="swarm sizes, comma-separated")
    parser.add_argument("--warmup", type=float, default=40.0, help="seconds of training before the window")
    parser.add_argument("--window", type=float, default=90.0, help="seconds measured")
    parser.add_argument("--batch-multiplier", type=int, default=4, help="target_batch_size = 192 x this")
    parser.add_argument("--step-seconds", type=float, default=0.0,
                        help="each local step lasts at least this long (a fixed accelerator's pace; 0: as fast as it runs)")
    parser.add_argument("--batch-per-peer", type=int, default=0,
                        help="target_batch_size = this x N (instead of --batch-multiplier): epochs as long whatever N")
    parser.add_argument("--start-wave", type=int, default=0,
                        help="start the peers this many at a time, each wave once the last is ready (0: all at once)")
    parser.add_argument("--access", choices=["token", "open"], default="token")
    parser.add_argument("--no-overlap", action="store_true", help="averaging.overlap: false")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a run config field, e.g. averaging.matchmaking_time=5 (repeatable)")
    parser.add_argument("--rate", default="20mbit")
    parser.add_argument("--delay", default="30ms")
    parser.add_argument("--loopback", action="store_true", help="no namespaces, no caps")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "scale.json"))
    args = parser.parse_args()
    sizes = [int(n) for n in args.peers.split(",")]
    install_signal_handlers()
    output = Path(args.output)
    workroot = Path(tempfile.mkdtemp(prefix="swarmtrain-scale-", dir=args.workdir))
    report = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), cpus=os.cpu_count(),
                  started=time.strftime("%Y-%m-%d %H:%M:%S"), workdir=str(workroot), warmup=args.warmup,
                  window=args.window, step_seconds=args.step_seconds, batch_per_peer=args.batch_per_peer,
                  access=args.access, overlap=not args.no_overlap, overrides=args.set, runs=[])
    for peers in sizes:
        net = make_network(args, peers + 1)
        report["network"] = net.description
        print(f"N={peers}: {net.description}; load average {os.getloadavg()[0]:.1f}")
        try:
            result = measure(args, net, workroot / f"n{peers}", peers)
            result["load_average"] = os.getloadavg()
        except Exception as error:  # one size failing must not lose the others
            result = dict(peers=peers, error=repr(error)[:1000])
        finally:
            net.close()
            if not args.loopback:
                cleanup_stale_namespaces()
        report["runs"].append(result)
        print(json.dumps(result, indent=1))
        good = [r for r in report["runs"] if "error" not in r]
        if good:
            report["growth_vs_smallest"] = growth(good)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
