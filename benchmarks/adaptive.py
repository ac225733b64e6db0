"""Adaptive vs constant averaging period at the same number of averaging rounds (local mode).

    python benchmarks/adaptive.py                      # 3 seeds x 2 schedules on loopback, ~15 min
    python benchmarks/adaptive.py --seeds 0,1,2,3,4 --epochs 60 --period 6
    sudo python benchmarks/adaptive.py --wan           # the same on the capped links of benchmarks/wan.py

Four peers train the tiny config (target_batch_size x4, total_epochs = --epochs) in `averaging.mode:
local` with dense float32 averaging (compression none, so that only the schedule differs):
`constant:H` (epochs / H rounds) against `adaptive` with `round_budget` = epochs / H. Each seed fixes
the model's initialisation and the peers' identities (hence their data order) for both schedules.
Reported: final held-out loss of the averaged model (peer 0) per run, mean and standard deviation
per schedule, the paired difference per seed, and the rounds each run actually made. Results:
benchmarks/results/adaptive.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import wan  # noqa: E402  (benchmarks/wan.py: the swarm runner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--batch-multiplier", type=int, default=4)
    parser.add_argument("--wan", action="store_true", help="namespaces with capped links (root), as wan.py")
    parser.add_argument("--rate", default="20mbit")
    parser.add_argument("--delay", default="30ms")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "adaptive.json"))
    args = parser.parse_args()
    args.loopback, args.density = not args.wan, 0.05
    output = Path(args.output)
    seeds = [int(s) for s in args.seeds.split(",")]
    report = wan.run_suite(args, ["constant_dense", "adaptive_dense"], seeds, output)

    summary = {}
    for name in ("constant_dense", "adaptive_dense"):
        losses = [runs[name]["final_heldout_loss"] for runs in report["runs"].values()
                  if runs.get(name, {}).get("final_heldout_loss") is not None]
        summary[name] = dict(
            final_heldout_loss=losses,
            mean=statistics.mean(losses) if losses else None,
            stdev=statistics.stdev(losses) if len(losses) > 1 else None,
            rounds_peer0=[runs[name]["rounds_ok_per_peer"][0] for runs in report["runs"].values()
                          if runs.get(name, {}).get("rounds_ok_per_peer")],
            wall_seconds=[runs[name]["wall_seconds"] for runs in report["runs"].values() if name in runs],
        )
    differences = [runs["adaptive_dense"]["final_heldout_loss"] - runs["constant_dense"]["final_heldout_loss"]
                   for runs in report["runs"].values()
                   if runs.get("adaptive_dense", {}).get("final_heldout_loss") is not None
                   and runs.get("constant_dense", {}).get("final_heldout_loss") is not None]
    summary["adaptive_minus_constant"] = dict(
        per_seed=differences, mean=statistics.mean(differences) if differences else None,
        stdev=statistics.stdev(differences) if len(differences) > 1 else None,
        adaptive_better_or_equal=sum(d <= 0 for d in differences))
    report["summary"] = summary
    output.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
