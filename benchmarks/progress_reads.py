"""How often a peer reads the swarm's progress records, and how many records a read returns, in swarms of
N peers: real hivemind DHT nodes and swarmtrain's SwarmProgressTracker, no training (each peer reports
synthetic samples at a fixed rate, and moves to the next epoch when its tracker says so).

The scale benchmark (benchmarks/scale.py) found the progress term growing linearly with N per peer
(x2.0 at 8 peers, x3.1 at 16), although the tracker stretches its refresh bounds by N / 4 so that bytes
per peer stay about constant. Its traffic meter counts bytes, not reads: this counts the reads.

    python benchmarks/progress_reads.py --epoch-seconds 2.7 --window 45   # N = 4, 8, 16, DHT cache on and off (~8 min)
    python benchmarks/progress_reads.py --peers 4,8 --cache off --window 30

It also counts the DHT nodes holding the progress key at the end: its replicas, and the nodes with a
cached copy (hivemind caches what a node reads, and a read with latest=True asks every node of a DHT
smaller than its beam, each answering with its copy of all N records).

Results: benchmarks/results/progress_reads.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import hivemind  # noqa: E402
from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from swarmtrain.averaging.progress import PROGRESS_READ_PEERS, SwarmProgressTracker  # noqa: E402

BATCH, STEP_SECONDS = 8, 0.1  # each peer reports 80 samples/s


async def _holds(key_id, _dht, node) -> tuple:
    """Runs in a DHT process: whether this node holds the key in its storage (a replica) and in its cache."""
    return node.protocol.storage.get(key_id) is not None, node.protocol.cache.get(key_id) is not None


class CountingDHT:
    """The tracker's DHT, counting its reads of the progress key and the records each returned."""

    def __init__(self, dht: hivemind.DHT, key: str):
        self._dht, self._key = dht, key
        self.reads = self.records = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._dht, name)

    def get(self, key, *args, **kwargs):
        result = self._dht.get(key, *args, **kwargs)
        if key != self._key:
            return result
        if kwargs.get("return_future"):
            result.add_done_callback(lambda future: self._count(future.result() if not future.exception() else None))
        else:
            self._count(result)
        return result

    def _count(self, found) -> None:
        value = getattr(found, "value", None)
        with self._lock:
            self.reads += 1
            self.records += len(value) if isinstance(value, dict) else 0

    def snapshot(self):
        with self._lock:
            return self.reads, self.records


def _peer_loop(tracker: SwarmProgressTracker, stop: threading.Event, epochs: list) -> None:
    epoch, samples = 0, 0
    while not stop.is_set():
        time.sleep(STEP_SECONDS)
        samples += BATCH
        tracker.report_local_progress(epoch, samples)
        if tracker.ready_to_update_epoch:
            with tracker.pause_updates():
                epoch = tracker.update_epoch(max(epoch + 1, tracker.global_epoch))
            samples = 0
            epochs.append(time.monotonic())


def measure(peers: int, epoch_seconds: float, warmup: float, window: float, cache: bool) -> dict:
    run_id = f"reads{os.getpid()}n{peers}{'c' if cache else ''}"
    key = f"{run_id}_progress"
    # cache: hivemind's defaults (every node keeps a copy of what it read); otherwise as swarmtrain's
    # make_dht builds its nodes (a key lives on its replicas only)
    options = {} if cache else dict(cache_locally=False, cache_nearest=0)
    first = hivemind.DHT(start=True, client_mode=False, **options)
    dhts = [first] + [hivemind.DHT(initial_peers=first.get_visible_maddrs(), start=True, client_mode=False, **options)
                      for _ in range(peers - 1)]
    counters = [CountingDHT(dht, key) for dht in dhts]
    # every peer reports BATCH / STEP_SECONDS samples per second: an epoch of the whole swarm lasts epoch_seconds
    target = int(peers * BATCH / STEP_SECONDS * epoch_seconds)
    trackers = [SwarmProgressTracker(dht=counter, prefix=run_id, target_batch_size=target, client_mode=False,
                                     private_key=RSAPrivateKey(), start=True) for counter in counters]
    stop, epochs = threading.Event(), [[] for _ in trackers]
    threads = [threading.Thread(target=_peer_loop, args=(tracker, stop, done), daemon=True)
               for tracker, done in zip(trackers, epochs)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(warmup)
        before, started = [counter.snapshot() for counter in counters], time.monotonic()
        time.sleep(window)
        after, ended = [counter.snapshot() for counter in counters], time.monotonic()
        held = [dht.run_coroutine(partial(_holds, DHTID.generate(source=key))) for dht in dhts]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        for tracker in trackers:
            tracker.shutdown(timeout=5)
        for dht in reversed(dhts):
            dht.shutdown()
    seconds = ended - started
    reads = [(a[0] - b[0]) / seconds for a, b in zip(after, before)]
    records = [(a[1] - b[1]) / max(1, a[0] - b[0]) for a, b in zip(after, before)]
    epochs_in_window = statistics.median(sum(started <= t <= ended for t in done) for done in epochs)
    return dict(peers=peers, cache=cache, replicas_holding_key=sum(stored for stored, _ in held),
                cached_copies_of_key=sum(cached for _, cached in held), epoch_seconds=epoch_seconds, target_batch_size=target, window_seconds=seconds,
                epochs_in_window=epochs_in_window, reads_per_second_per_peer=statistics.mean(reads),
                reads_per_epoch_per_peer=statistics.mean(reads) * seconds / max(1, epochs_in_window),
                records_per_read=statistics.mean(records),
                records_read_per_second_per_peer=statistics.mean(r * n for r, n in zip(reads, records)),
                expected_min_refresh_seconds=0.5 * max(1.0, peers / PROGRESS_READ_PEERS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="4,8,16", help="swarm sizes, comma-separated")
    parser.add_argument("--epoch-seconds", default="2.7", help="epoch lengths, comma-separated")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before the window")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--cache", default="on,off",
                        help="DHT nodes with hivemind's local caching (on), as swarmtrain builds them (off), or both")
    parser.add_argument("--output", default=str(HERE / "results" / "progress_reads.json"))
    args = parser.parse_args()
    sizes = [int(n) for n in args.peers.split(",")]
    lengths = [float(s) for s in args.epoch_seconds.split(",")]
    runs = []
    caches = [{"on": True, "off": False}[word] for word in args.cache.split(",")]
    for cache in caches:
        for epoch_seconds in lengths:
            for peers in sizes:
                print(f"N={peers}, epochs of {epoch_seconds} s, DHT cache {'on' if cache else 'off'} ...", flush=True)
                runs.append(measure(peers, epoch_seconds, args.warmup, args.window, cache))
            print(json.dumps(runs[-1]), flush=True)
    result = dict(command=" ".join(sys.argv), load_average_at_start=os.getloadavg(), runs=runs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
