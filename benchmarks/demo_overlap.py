"""The demo with its rounds in the background (averaging.overlap) against the same run waiting for every round.

    python benchmarks/demo_overlap.py --repeats 3 --output benchmarks/results/demo_overlap.json

Runs `swarmtrain demo --peers 3 --epochs E` on the demo config (swarmtrain/configs/demo.yaml: local mode,
sparse rounds every epoch) with `averaging.overlap` false and true, alternating, `--repeats` times each,
on this machine's loopback. Reported per run, from the peers' status files: utilization (share of wall time
computing, mean over peers), held-out loss at the end (mean over peers), successful rounds, and the demo's
wall time; then the overlap runs' medians as ratios to the no-overlap runs' of the same invocation.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from swarmtrain.averaging.rounds import NO_OTHER_PEERS  # noqa: E402
DEMO_CONFIG = REPO / "swarmtrain" / "configs" / "demo.yaml"


def run_once(overlap: bool, epochs: int, peers: int, scratch: Path) -> dict:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["averaging"]["overlap"] = overlap
    workdir = Path(tempfile.mkdtemp(prefix=f"overlap-{str(overlap).lower()}-", dir=scratch))
    path = workdir.parent / f"{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "swarmtrain", "demo", "--peers", str(peers), "--epochs", str(epochs),
                    "--config", str(path), "--workdir", str(workdir)], check=True, stdout=subprocess.DEVNULL)
    return dict(overlap=overlap, wall_seconds=time.monotonic() - started, **read_run(workdir, peers))


def read_run(workdir: Path, peers: int) -> dict:
    """What the peers' status files say about a finished demo in `workdir`."""
    statuses = [json.loads((workdir / f"peer-{i}.json").read_text()) for i in range(peers)]
    attempted = [[r for r in s["rounds"] if r.get("note") != NO_OTHER_PEERS] for s in statuses]  # not: stepped alone
    return dict(
        utilization=statistics.mean(s["utilization"] for s in statuses),
        heldout_loss=statistics.mean(s["heldout_loss"][-1][1] for s in statuses),
        rounds_ok=min(sum(r["ok"] for r in rounds) for rounds in attempted),
        rounds_failed=max(sum(not r["ok"] for r in rounds) for rounds in attempted),
        resyncs=sum(s.get("resyncs") or 0 for s in statuses),
        workdir=str(workdir),
        overlapped_steps=statistics.mean(s.get("overlapped_steps") or 0 for s in statuses),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "demo_overlap.json")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep each run's logs and status files here (default: a temporary directory)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo-overlap-") as scratch:
        where = args.workdir or Path(scratch)
        where.mkdir(parents=True, exist_ok=True)
        for repeat in range(args.repeats):
            for overlap in (False, True):
                run = run_once(overlap, args.epochs, args.peers, where)
                runs.append(dict(run, repeat=repeat))
                print(f"repeat {repeat} overlap {str(overlap):5}: wall {run['wall_seconds']:.0f} s, utilization "
                      f"{run['utilization']:.2f}, held-out {run['heldout_loss']:.3f}, rounds ok {run['rounds_ok']}, "
                      f"failed {run['rounds_failed']}, resyncs {run['resyncs']}", flush=True)
    summary = {}
    for overlap in (False, True):
        mine = [r for r in runs if r["overlap"] == overlap]
        summary[f"overlap_{str(overlap).lower()}"] = {
            key: statistics.median(r[key] for r in mine) for key in ("wall_seconds", "utilization", "heldout_loss")}
    off, on = summary["overlap_false"], summary["overlap_true"]
    summary["ratios_on_to_off"] = {"wall_seconds": on["wall_seconds"] / off["wall_seconds"],
                                   "heldout_loss": on["heldout_loss"] / off["heldout_loss"]}
    args.output.write_text(json.dumps(dict(command=" ".join(sys.argv), epochs=args.epochs, peers=args.peers,
                                           config=str(DEMO_CONFIG.relative_to(REPO)), runs=runs, summary=summary),
                                      indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
