"""Adaptive vs constant averaging period at the same number of rounds, where the adaptive rule should
matter: heterogeneous peers, a long warm-up, non-identical data (issue #14, in the simulator).

    python benchmarks/simulate_adaptive.py                          # 3 seeds x 2 schedules
    python benchmarks/simulate_adaptive.py --seeds 0,1,2,3,4 --compression gaussiank:0.02+2bit --beta 0.95

Four peers train the tiny config in mode local with per-peer speeds --speeds (a share of the ticks each
steps in: a fast machine, two average ones, a slow one), each reading only its own contiguous quarter of
the training data (--shards disjoint: non-identical shards), AdamW warming up over --warmup of the
--epochs epochs (a long warm-up) and decaying to zero at the end. Schedules: constant:H (epochs / H
rounds) against adaptive with round_budget = epochs / H (min_period 1, max_period 4H). Averaging is
dense float32 by default, so only the schedule differs. Each seed fixes the model's initialisation and
the data orders for both. Reported per seed: final held-out loss of the averaged model for both, the
paired difference, rounds made; mean and sd. JSON: benchmarks/results/simulate_adaptive.json (+ PNG).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from simulate_common import RESULTS, plot_curves, run_jobs, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--speeds", default="1,0.6,0.6,0.3")
    parser.add_argument("--shards", choices=["shared", "disjoint"], default="disjoint")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=250)
    parser.add_argument("--period", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--beta", type=float, default=1.0, help="feedback_decay for sparse compression")
    parser.add_argument("--max-period-factor", type=float, default=4.0,
                        help="adaptive's max_period = this x --period (its min_period is 1)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "simulate_adaptive.json"))
    args = parser.parse_args()
    speeds = [float(s) for s in args.speeds.split(",")]
    budget = args.epochs // args.period
    # one epoch = peers x batch samples; the slower peers make it last longer than a tick
    ticks = int(1.2 * args.epochs * args.peers / sum(speeds))  # a bound: the runs stop at --epochs
    common = [f"target_batch_size={args.peers * args.batch_size}", f"optimizer.total_epochs={args.epochs}",
              f"optimizer.warmup_epochs={args.warmup}", "averaging.mode=local",
              f"averaging.compression={args.compression}"]
    if args.beta != 1.0:
        common.append(f"averaging.feedback_decay={args.beta:g}")
    schedules = {
        "constant": [f"averaging.schedule=constant:{args.period}"],
        "adaptive": ["averaging.schedule=adaptive", f"averaging.round_budget={budget}", "averaging.min_period=1",
                     f"averaging.max_period={int(args.max_period_factor * args.period)}"],
    }
    jobs = [dict(name=name, overrides=common + overrides,
                 options=dict(peers=args.peers, steps=ticks, batch_size=args.batch_size, seed=seed, speeds=speeds,
                              disjoint_shards=args.shards == "disjoint", eval_every=50,
                              max_epochs=args.epochs))
            for seed in (int(s) for s in args.seeds.split(",")) for name, overrides in schedules.items()]
    output = Path(args.output)
    extra = dict(arguments=vars(args), schedules=schedules, ticks=ticks)
    results = run_jobs(jobs, args.jobs, output, extra, resume=args.resume)
    # the runs stop at total_epochs, where both schedules end with a round: the final model is averaged
    for result in results:
        result["loss_at_total_epochs"] = result["final_heldout_loss"]
        result["rounds_until_total_epochs"] = result["rounds_done"]
    seeds = sorted({r["seed"] for r in results})
    table = []
    for seed in seeds:
        runs = {r["name"]: r for r in results if r["seed"] == seed}
        if set(runs) >= {"constant", "adaptive"}:
            table.append(dict(seed=seed, constant=runs["constant"]["loss_at_total_epochs"],
                              adaptive=runs["adaptive"]["loss_at_total_epochs"],
                              difference=runs["adaptive"]["loss_at_total_epochs"] - runs["constant"]["loss_at_total_epochs"],
                              rounds_constant=runs["constant"]["rounds_until_total_epochs"],
                              rounds_adaptive=runs["adaptive"]["rounds_until_total_epochs"],
                              periods_adaptive=[r["period"] for r in runs["adaptive"]["rounds"]
                                                if r["epoch"] <= args.epochs]))
            print(table[-1], flush=True)
    differences = [row["difference"] for row in table]
    verdict = dict(mean_difference=statistics.mean(differences) if differences else None,
                   sd_difference=statistics.stdev(differences) if len(differences) > 1 else None,
                   sd_constant=statistics.stdev([row["constant"] for row in table]) if len(table) > 1 else None)
    print(verdict)
    write(output, results, dict(extra, table=table, verdict=verdict))
    plot_curves(results, output.with_suffix(".png"), f"adaptive vs constant:{args.period}, speeds {args.speeds}, "
                f"{args.shards} shards, warm-up {args.warmup}/{args.epochs}", ["constant", "adaptive"])


if __name__ == "__main__":
    main()
