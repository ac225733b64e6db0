"""Sparse updates against dense averaging, over thousands of steps, in the simulator (issue #14).

    python benchmarks/simulate_recipes.py                                  # the acceptance set (see below)
    python benchmarks/simulate_recipes.py --recipes diloco,sparseloco --seeds 0 --steps 1000   # a screen

Four peers train the tiny config (configs/tiny.yaml: 2-layer GPT-2, byte-level, stdlib sources) in
`swarmtrain.simulate`, one local step per peer per swarm epoch (target_batch_size = peers x batch), AdamW
lr 3e-3 warming up over --warmup epochs then decaying linearly to zero at --steps. Every recipe sees the
same samples (peers x steps x batch). Recipes (each a list of `swarmtrain simulate --set` overrides):

  dedloc_sync_fp16   mode sync, fp16 gradients every epoch (the realistic config's baseline: the bytes anchor)
  sync_gaussiank     mode sync, gaussiank:0.01, --warmup dense epochs, then frozen-variance AdamW (1-bit Adam route)
  diloco             mode local, constant:H, dense float32 deltas, outer Nesterov lr 0.7, momentum 0.9
                     (the quality anchor)
  sparseloco         mode local, constant:H, gaussiank:RHO(:CHUNK)+2bit, error feedback decayed by beta,
                     plain averaged outer step (outer lr 1, no momentum)
  (and variants: --recipes accepts NAME=override;override... for a screen)

Reported per recipe: final held-out loss of the swarm's model (the last averaged model in local mode)
per seed, mean and sd; averaging bytes sent per peer (counted from the encoded messages); the ratio of
each to the anchors; a learning curve per recipe (PNG) and one of all of them. JSON:
benchmarks/results/simulate_recipes.json (or --output).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from simulate_common import RESULTS, base_overrides, plot_curves, run_jobs


def recipes(period: int, density: float, chunk: int, beta: float, sparse_outer_lr: float, warmup: int) -> dict:
    chunk_text = f":{chunk}" if chunk else ""
    return {
        "dedloc_sync_fp16": ["averaging.mode=sync", "averaging.compression=fp16"],
        "sync_gaussiank": ["averaging.mode=sync", "averaging.compression=gaussiank:0.01",
                           f"averaging.dense_warmup_epochs={warmup}", "optimizer.name=adamw_frozen",
                           f"optimizer.freeze_variance_after={warmup}"],
        "diloco": ["averaging.mode=local", f"averaging.schedule=constant:{period}", "averaging.compression=none",
                   "averaging.outer_lr=0.7", "averaging.outer_momentum=0.9"],
        "sparseloco": ["averaging.mode=local", f"averaging.schedule=constant:{period}",
                       f"averaging.compression=gaussiank:{density:g}{chunk_text}+2bit",
                       f"averaging.feedback_decay={beta:g}", f"averaging.outer_lr={sparse_outer_lr:g}"],
    }


def _selected(args, known: dict) -> dict:
    chosen = {}
    for item in args.recipes.split(","):
        name, _, overrides = item.partition("=")
        if overrides:  # NAME=BASE;override;override: a variant of a known recipe
            base, *extra = overrides.split(";")
            chosen[name] = known[base] + extra
        else:
            chosen[name] = known[name]
    return chosen


def _report(results, chosen) -> dict:
    summary = {}
    for name in chosen:
        runs = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        losses = [r["final_heldout_loss"] for r in runs]
        summary[name] = dict(mean=statistics.mean(losses), stdev=statistics.stdev(losses) if len(losses) > 1 else 0.0,
                             bytes_sent_per_peer=statistics.mean(r["bytes_sent_per_peer"] for r in runs))
    for name, entry in summary.items():
        if "diloco" in summary:
            entry["loss_vs_diloco"] = entry["mean"] / summary["diloco"]["mean"]
        if "dedloc_sync_fp16" in summary and entry["bytes_sent_per_peer"] > 0:
            entry["bytes_reduction_vs_sync_fp16"] = summary["dedloc_sync_fp16"]["bytes_sent_per_peer"] / \
                entry["bytes_sent_per_peer"]
        print(f"{name:>24}: loss {entry['mean']:.4f} ± {entry['stdev']:.4f}"
              + (f" ({entry['loss_vs_diloco']:.4f} x diloco)" if "loss_vs_diloco" in entry else "")
              + f", {entry['bytes_sent_per_peer'] / 1e6:.3f} MB/peer"
              + (f" ({entry['bytes_reduction_vs_sync_fp16']:.0f}x fewer than sync fp16)"
                 if "bytes_reduction_vs_sync_fp16" in entry else ""))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="dedloc_sync_fp16,sync_gaussiank,diloco,sparseloco")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000, help="local steps per peer (= swarm epochs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--period", type=int, default=25, help="H, local steps between rounds (local mode)")
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--chunk", type=int, default=0, help="sparseloco's selection chunk (0: whole vector)")
    parser.add_argument("--beta", type=float, default=0.95, help="sparseloco's error-feedback decay")
    parser.add_argument("--sparse-outer-lr", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--output", default=str(RESULTS / "simulate_recipes.json"))
    parser.add_argument("--plots", default=None, help="PNG prefix (default: the output's, minus .json)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --output, run the rest")
    args = parser.parse_args()
    chosen = _selected(args, recipes(args.period, args.density, args.chunk, args.beta, args.sparse_outer_lr,
                                      args.warmup))
    common = base_overrides(args.peers, args.batch_size, args.steps, args.warmup)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    jobs = [dict(name=name, overrides=common + overrides,
                 options=dict(peers=args.peers, steps=args.steps, batch_size=args.batch_size, seed=seed,
                              eval_every=args.eval_every))
            for seed in seeds for name, overrides in chosen.items()]
    output = Path(args.output)
    extra = dict(arguments=vars(args), recipes=chosen)
    results = run_jobs(jobs, args.jobs, output, extra, resume=args.resume)
    results = [r for r in results if r["name"] in chosen]
    extra["report"] = _report(results, chosen)
    from simulate_common import write

    write(output, results, extra)
    prefix = args.plots or str(output.with_suffix(""))
    for name in chosen:
        plot_curves(results, Path(f"{prefix}_{name}.png"), f"{name}: {args.peers} peers x {args.steps} steps", [name])
    plot_curves(results, Path(f"{prefix}_all.png"), f"{args.peers} peers x {args.steps} steps, batch {args.batch_size}",
                list(chosen))


if __name__ == "__main__":
    main()
