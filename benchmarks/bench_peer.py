"""`swarmtrain peer`, instrumented for benchmarks/wan.py and benchmarks/adaptive.py.

Same program and arguments as `swarmtrain peer`; the optimizer is wrapped (nothing of training
changes) to
- wait at its first step until the benchmark says go (``$SWARMTRAIN_BENCH_DIR/../go``), so that all
  peers start training together whatever their start-up times;
- save the model whenever it is the swarm's averaged model (sync: after every epoch's step; local:
  after every round this peer was in step in), with the wall time, when
  ``SWARMTRAIN_BENCH_SNAPSHOTS=1`` (the benchmark evaluates them afterwards, off the clock);
- write ``bench.json`` at shutdown: start time, per-epoch times, snapshots, and the averager's
  byte counters (``optimizer.traffic``);
- with ``SWARMTRAIN_BENCH_PROGRESS_EVERY=S`` (diagnostic), publish its progress to the DHT at most
  every S seconds instead of after every step (see _ThrottledEvent);
- with ``SWARMTRAIN_BENCH_STEP_SECONDS=S``, make every local step last at least S seconds (it sleeps the
  rest): a volunteer's accelerator at a fixed pace, so that 24 peers fit on 2 cores and each computes as
  fast whatever N (benchmarks/scale.py --step-seconds). The sleep counts as computing in utilization;
- with ``SWARMTRAIN_BENCH_TRAFFIC=RUN_ID``, count the bytes it moves by kind (benchmarks/traffic_meter.py)
  into ``traffic.json``; this works for ``coordinator`` too.

Usage: python benchmarks/bench_peer.py peer --initial-peers ... (same arguments as swarmtrain).
"""
import json
import os
import threading
import time
from pathlib import Path

import torch

from swarmtrain.cli import main
from swarmtrain.peer import trainer

BENCH_DIR = Path(os.environ.get("SWARMTRAIN_BENCH_DIR", "."))
SNAPSHOTS = os.environ.get("SWARMTRAIN_BENCH_SNAPSHOTS") == "1"
PROGRESS_EVERY = float(os.environ.get("SWARMTRAIN_BENCH_PROGRESS_EVERY", "0"))
STEP_SECONDS = float(os.environ.get("SWARMTRAIN_BENCH_STEP_SECONDS", "0"))
_make_optimizer = trainer.make_optimizer


class _ThrottledEvent(threading.Event):
    """hivemind's tracker publishes this peer's progress to the DHT (a signed record, stored on
    several nodes) every time the event is set, i.e. after every local step; with the tiny model's
    ~20 ms steps that was most of what crossed a peer's link, so swarmtrain's tracker now publishes
    at most once per second (swarmtrain.averaging.progress.PROGRESS_REPORT_PERIOD). Diagnostic
    (``--progress-every``): replace that with this event, which drops the reports within `period`."""

    def __init__(self, period: float):
        super().__init__()
        self.period, self.last = period, 0.0

    def set(self) -> None:
        if time.monotonic() - self.last >= self.period:
            self.last = time.monotonic()
            super().set()


def _instrumented(config, model, *args, **kwargs):
    optimizer = _make_optimizer(config, model, *args, **kwargs)
    local = config.averaging.mode == "local"
    record = {"started": None, "epochs": [], "snapshots": [], "traffic": None}
    seen = {"epoch": optimizer.local_epoch, "rounds": 0, "step_ended": None}
    honest_step, honest_shutdown = optimizer.step, optimizer.shutdown
    if PROGRESS_EVERY > 0:
        optimizer.tracker.should_report_progress = _ThrottledEvent(PROGRESS_EVERY)

    def snapshot(tag: str) -> None:
        entry = {"time": time.time(), "epoch": optimizer.local_epoch, "tag": tag}
        if SNAPSHOTS:
            path = BENCH_DIR / f"snapshot-{len(record['snapshots']):04d}.pt"
            torch.save({name: p.detach().cpu().clone() for name, p in model.named_parameters()}, path)
            entry["file"] = path.name
        record["snapshots"].append(entry)

    def step(*step_args, **step_kwargs):
        if record["started"] is None:
            (BENCH_DIR / "ready").write_text(str(time.time()))
            while not (BENCH_DIR.parent / "go").exists():
                time.sleep(0.05)
            record["started"] = time.time()
            snapshot("start")
        elif STEP_SECONDS > 0:  # the pace of a fixed accelerator: sleep what this step's compute left over
            time.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - seen["step_ended"])))
        result = honest_step(*step_args, **step_kwargs)
        seen["step_ended"] = time.monotonic()
        if optimizer.local_epoch != seen["epoch"]:
            seen["epoch"] = optimizer.local_epoch
            record["epochs"].append([optimizer.local_epoch, time.time()])
            if local:
                new_rounds = optimizer.rounds[seen["rounds"]:]
                seen["rounds"] = len(optimizer.rounds)
                if any(r.ok and getattr(r, "in_step", True) for r in new_rounds):
                    snapshot("round")
            else:
                snapshot("epoch")
        return result

    def shutdown(*shutdown_args, **shutdown_kwargs):
        try:
            record["traffic"] = optimizer.traffic.to_dict()
            (BENCH_DIR / "bench.json").write_text(json.dumps(record))
        finally:
            return honest_shutdown(*shutdown_args, **shutdown_kwargs)

    optimizer.step, optimizer.shutdown = step, shutdown
    return optimizer


trainer.make_optimizer = _instrumented
if os.environ.get("SWARMTRAIN_BENCH_TRAFFIC"):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import traffic_meter

    traffic_meter.install(os.environ["SWARMTRAIN_BENCH_TRAFFIC"], BENCH_DIR)

if __name__ == "__main__":
    torch.set_num_threads(1)  # four peers on a small machine: no thread oversubscription
    main(prog_name="swarmtrain")
