"""What does a round that lands late cost? averaging.overlap in mode local, in the simulator (issue #19).

    python benchmarks/simulate_overlap.py                      # 4 delays x 3 seeds, ~6 min on 2 cores

The demo's run (swarmtrain/configs/demo.yaml: the tiny model, local mode, gaussiank:0.03+2bit every epoch)
with 3 peers of batch 8 and an epoch of --period local steps per peer, for --epochs epochs. With overlap a
round's members step on from their own parameters while it runs and take the new anchor plus those steps
when it lands (`swarmtrain simulate --overlap-delay`, the swarm's own land_delayed_outer_step). The delay is
given as a share of the period: 0 is overlap off (the round lands at once); the demo on this machine lands
its rounds about half an epoch after they begin (~2.5 s of a ~5 s epoch). Reported per delay: final held-out
loss (mean, sd over seeds) and its ratio to delay 0, measured in the same invocation; a learning-curve PNG.
JSON: benchmarks/results/simulate_overlap.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from simulate_common import RESULTS, plot_curves, run_jobs, summarise, write

DEMO = Path(__file__).resolve().parent.parent / "swarmtrain" / "configs" / "demo.yaml"
PEERS, BATCH = 3, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,0.25,0.5,0.75", help="shares of a period a round takes to land")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--period", type=int, default=32, help="local steps per peer between rounds (one epoch)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "simulate_overlap.json")
    args = parser.parse_args()
    shares = [float(share) for share in args.delays.split(",")]
    overrides = [f"target_batch_size={PEERS * BATCH * args.period}"]
    jobs = [dict(name=f"delay {share:g}", config=str(DEMO), overrides=overrides,
                 options=dict(peers=PEERS, steps=args.epochs * args.period, batch_size=BATCH, seed=int(seed),
                              eval_every=args.period, overlap_delay=round(share * args.period)))
            for share in shares for seed in args.seeds.split(",")]
    extra = dict(command="python benchmarks/simulate_overlap.py " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key != "output"),
        config=str(DEMO.name), peers=PEERS, batch_size=BATCH, period=args.period, epochs=args.epochs)
    results = run_jobs(jobs, args.workers, args.output, extra)
    summary = summarise(results)
    base = summary["delay 0"]["mean"] if "delay 0" in summary else None
    for name, entry in summary.items():
        entry["ratio_to_delay_0"] = entry["mean"] / base if base else None
    write(args.output, results, dict(extra, ratios={name: entry["ratio_to_delay_0"] for name, entry in summary.items()}))
    plot_curves(results, args.output.with_suffix(".png"), f"demo config in the simulator: {PEERS} peers, "
                f"rounds landing a share of a {args.period}-step period late")
    for name, entry in summary.items():
        ratio = f"{entry['ratio_to_delay_0']:.3f}x" if entry["ratio_to_delay_0"] else "-"
        print(f"{name:12} final held-out {entry['mean']:.4f} +- {entry['stdev']:.4f} ({ratio} delay 0; "
              f"seeds {entry['seeds']})")


if __name__ == "__main__":
    main()
