"""/metrics under concurrent scrapers, and under a flood of forged peer records (issue #20).

Part 1, the listen backlog: the coordinator's MetricsServer (a 2-peer SwarmStatus) in its own process,
scraped by 20 concurrent clients (a new connection per scrape, as urllib and HTTP/1.0 do) for
--seconds; with socketserver's default backlog of 5 (what main had) and with SCRAPER_BACKLOG.

Part 2, forged records: a real coordinator (`swarmtrain coordinator`) and one honest trainer on
127.0.0.1; /metrics latency under 20 clients and the coordinator's peers_alive, before and after one
node stores --records validly signed peer records under as many fresh keys (tests/support/forger.py).

    python benchmarks/trust.py                     # ~6 min on 2 cores; writes benchmarks/results/trust.json + .png
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from swarmtrain.demo import free_port, start_coordinator, start_peer, stop_process  # noqa: E402
from swarmtrain.monitoring import metrics as metrics_module  # noqa: E402
from swarmtrain.monitoring.aggregate import SwarmAggregator  # noqa: E402
from swarmtrain.monitoring.records import PeerRecord  # noqa: E402

CLIENTS = 20
# (getattr: part 2 also runs against a checkout from before issue #20, to compare)
SCRAPER_BACKLOG = getattr(metrics_module, "SCRAPER_BACKLOG", 5)


def scrape_under_load(port: int, seconds: float, clients: int = CLIENTS) -> dict:
    """``clients`` threads scraping /metrics back to back for ``seconds``: latency percentiles in ms."""
    latencies, errors, stop = [], [0], time.monotonic() + seconds
    lock = threading.Lock()

    def client():
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/metrics")
                connection.getresponse().read()
                connection.close()
            except OSError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()

    def percentile(q):
        return round(latencies[min(int(q * len(latencies)), len(latencies) - 1)], 2) if latencies else None

    return dict(clients=clients, scrapes=len(latencies), errors=errors[0], p50_ms=percentile(0.5),
                p90_ms=percentile(0.9), p99_ms=percentile(0.99), max_ms=round(latencies[-1], 2) if latencies else None,
                mean_ms=round(statistics.fmean(latencies), 2) if latencies else None,
                over_500ms=sum(1 for latency in latencies if latency > 500), latencies_ms=latencies)


def _two_peer_status():
    now = time.time()
    records = {f"[owner:ssh-rsa AAAA{i}]": PeerRecord.make(
        peer_id=f"peer-{i}", role="trainer", step=100, epoch=7, loss=2.5, samples_per_second=40.0,
        samples_accumulated=96, bytes_sent=10**6, bytes_received=10**6, rounds_ok=7, rounds_failed=0,
        last_round_seconds=2.0, last_round_group_size=2, compression_density=None, leakage_dcor=None,
        device="cpu", client_mode=False, version="0.1.0", time=now) for i in range(2)}
    return SwarmAggregator("bench", target_batch_size=192).update(records, now=now)


def _serve(backlog: int, port_queue, stop_event) -> None:  # a forked process: the server alone in it
    metrics_module._ThreadingWSGIServer.request_queue_size = backlog
    swarm_metrics = metrics_module.SwarmMetrics()
    swarm_metrics.update(_two_peer_status())
    server = swarm_metrics.serve("127.0.0.1", 0)
    port_queue.put(server.port)
    stop_event.wait()
    server.stop()


def backlog_comparison(seconds: float) -> dict:
    results = {}
    context = mp.get_context("fork")
    for name, backlog in (("backlog_5_before", 5), ("backlog_after", SCRAPER_BACKLOG)):
        ports, stop = context.Queue(), context.Event()
        server = context.Process(target=_serve, args=(backlog, ports, stop), daemon=True)
        server.start()
        port = ports.get(timeout=30)
        results[name] = dict(backlog=backlog, **scrape_under_load(port, seconds))
        stop.set()
        server.join(timeout=10)
        print(f"[trust] {name}: " + json.dumps({k: v for k, v in results[name].items() if k != "latencies_ms"}),
              flush=True)
    return results


def _status(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError:  # 503 until the coordinator's first poll
        return {}


def forged_records(seconds: float, count: int) -> dict:
    from tests.support import TINY_CONFIG
    from tests.support.forger import forge_peer_records, fresh_keys, start_forger

    started = time.monotonic()
    keys = fresh_keys(count)
    print(f"[trust] {count} keys made in {time.monotonic() - started:.0f} s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="swarmtrain-trust-"))
    port = free_port()
    coordinator, maddr = start_coordinator(workdir, TINY_CONFIG, metrics_port=port)
    env_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    peer = start_peer(workdir, 0, maddr, "--device", "cpu", "--eval-every", "0", "--checkpoint-every", "0",
                      threads=int(env_threads))
    forger = None
    try:
        deadline = time.monotonic() + 180
        while _status(port).get("peers_alive", {}).get("trainer", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the honest peer never showed up")
            time.sleep(1)
        before = dict(peers_alive=_status(port)["peers_alive"]["trainer"], **scrape_under_load(port, seconds))
        print(f"[trust] before: " + json.dumps({k: v for k, v in before.items() if k != "latencies_ms"}), flush=True)
        forger = start_forger([maddr], keys)
        honest = _status(port)["peers"][0]["peer_id"] if _status(port)["peers"] else "unknown"
        claimed = [f"QmForged{i:06d}" for i in range(50)] + [honest, str(forger.peer_id)]
        stored_at = time.monotonic()
        stored = forge_peer_records(forger, "tiny-code-lm", keys, claimed, ttl=120)
        store_seconds = time.monotonic() - stored_at
        # as an attacker would: keep storing them, fresh, while the scrapers measure
        stop, alive = threading.Event(), []

        def keep_forging():
            while not stop.is_set():
                forge_peer_records(forger, "tiny-code-lm", keys, claimed, ttl=120)

        def watch_alive():
            while not stop.wait(2.0):
                alive.append(_status(port)["peers_alive"]["trainer"])

        background = [threading.Thread(target=keep_forging, daemon=True), threading.Thread(target=watch_alive)]
        for thread in background:
            thread.start()
        time.sleep(5)  # two coordinator polls
        after = scrape_under_load(port, seconds)
        stop.set()
        for thread in background:
            thread.join(timeout=300)  # the round of stores under way finishes first
        after.update(peers_alive_max=max(alive), peers_alive_min=min(alive))
        print(f"[trust] after {stored} forged records: "
              + json.dumps({k: v for k, v in after.items() if k != "latencies_ms"}), flush=True)
        return dict(records=count, stored=stored, store_seconds=round(store_seconds, 1), truth=1,
                    forged_time_ahead_seconds=25.0, before=before, after=after)
    finally:
        if forger is not None:
            forger.shutdown()
        stop_process(peer)
        stop_process(coordinator)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = [] if "backlog" not in results else [
              (axes[0], "backlog 5 (before)", results["backlog"]["backlog_5_before"]),
              (axes[0], f"backlog {SCRAPER_BACKLOG}", results["backlog"]["backlog_after"])]
    if "forged" in results:
        series += [(axes[1], "coordinator, 1 honest peer", results["forged"]["before"]),
                   (axes[1], f"+ {results['forged']['stored']} forged records", results["forged"]["after"])]
    for axis, label, result in series:
        latencies = result["latencies_ms"]
        axis.plot(latencies, [i / len(latencies) for i in range(len(latencies))], label=label)
    for axis, title in zip(axes, ("/metrics, 20 concurrent scrapers", "coordinator /metrics under forged records")):
        if not axis.lines:
            axis.set_visible(False)
            continue
        axis.set_xscale("log")
        axis.set_xlabel("latency (ms)")
        axis.set_ylabel("fraction of scrapes")
        axis.set_title(title)
        axis.legend()
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="scraping time per measurement")
    parser.add_argument("--records", type=int, default=1000, help="forged peer records")
    parser.add_argument("--skip-forged", action="store_true", help="part 1 only")
    parser.add_argument("--skip-backlog", action="store_true", help="part 2 only")
    parser.add_argument("--output", type=Path, default=RESULTS / "trust.json")
    args = parser.parse_args()
    results = dict(command=" ".join(sys.argv), load_average=os.getloadavg())
    if not args.skip_backlog:
        results["backlog"] = backlog_comparison(args.seconds)
    if not args.skip_forged:
        results["forged"] = forged_records(args.seconds, args.records)
    plot(results, args.output.with_suffix(".png"))
    parts = list(results.get("backlog", {}).values())
    parts += [results["forged"]["before"], results["forged"]["after"]] if "forged" in results else []
    for part in parts:
        part.pop("latencies_ms")
    args.output.write_text(json.dumps(results, indent=2))
    print(f"[trust] wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
