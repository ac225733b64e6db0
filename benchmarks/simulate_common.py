"""Shared by the simulator benchmarks (benchmarks/simulate_*.py): the tiny run config they start from,
a pool of worker processes running simulations, summaries and learning-curve plots."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TINY = HERE.parent / "swarmtrain" / "configs" / "tiny.yaml"


def base_overrides(peers: int, batch_size: int, steps: int, warmup: int) -> List[str]:
    """The tiny config with one tick = one epoch (each peer steps once per swarm epoch), the learning rate
    warming up over `warmup` epochs and decaying to zero at the end of the run."""
    return [f"target_batch_size={peers * batch_size}", f"optimizer.total_epochs={steps}",
            f"optimizer.warmup_epochs={warmup}"]


def _run_job(job: dict) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from swarmtrain.cli.simulate import apply_overrides
    from swarmtrain.config import load_run_config
    from swarmtrain.simulate import SimulationOptions, simulate

    config = apply_overrides(load_run_config(job.get("config", TINY)), tuple(job["overrides"]))
    options = SimulationOptions(**job["options"])
    started = time.time()
    result = simulate(config, options).to_dict()
    result.update(name=job["name"], overrides=job["overrides"], started=started)
    if config.averaging.mode == "sync":  # one round per epoch: keep the totals, not every round
        result["rounds"] = []
    print(f"[{time.strftime('%H:%M:%S')}] {job['name']} seed {options.seed}: loss {result['final_heldout_loss']:.4f}, "
          f"{result['bytes_sent_per_peer'] / 1e6:.3f} MB/peer, {result['wall_seconds']:.0f} s", flush=True)
    return result


def run_jobs(jobs: Sequence[dict], workers: int, output: Path, extra: Optional[dict] = None,
             resume: bool = False) -> List[dict]:
    """Run every job (name, overrides, options) in `workers` forked processes; the JSON at `output` is
    rewritten after each finished job, so an interrupted set keeps what it finished. With `resume`, the
    runs already in `output` (same name, seed and overrides) are kept and not run again."""
    results: List[dict] = []
    if resume and output.exists():
        results = json.loads(output.read_text())["runs"]
        done = {(r["name"], r["seed"], tuple(r["overrides"])) for r in results}
        jobs = [j for j in jobs if (j["name"], j["options"]["seed"], tuple(j["overrides"])) not in done]
        print(f"resuming: {len(results)} runs kept, {len(jobs)} to run", flush=True)
    context = mp.get_context("fork")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(_run_job, jobs):
            results.append(result)
            write(output, results, extra)
    return results


def write(output: Path, results: List[dict], extra: Optional[dict] = None) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    data = dict(extra or {}, machine=dict(cpus=os.cpu_count(), load_average=os.getloadavg()),
                summary=summarise(results), runs=sorted(results, key=lambda r: (r["name"], r["seed"])))
    output.write_text(json.dumps(data, indent=1))


def summarise(results: Sequence[dict]) -> Dict[str, dict]:
    by_name: Dict[str, List[dict]] = {}
    for result in results:
        by_name.setdefault(result["name"], []).append(result)
    summary = {}
    for name, runs in sorted(by_name.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        losses = [r["final_heldout_loss"] for r in runs]
        summary[name] = dict(
            seeds=[r["seed"] for r in runs], final_heldout_loss=losses,
            mean=statistics.mean(losses), stdev=statistics.stdev(losses) if len(losses) > 1 else 0.0,
            bytes_sent_per_peer=statistics.mean(r["bytes_sent_per_peer"] for r in runs),
            rounds=statistics.mean(r["rounds_done"] for r in runs),
            samples=runs[0]["samples"], steps_per_peer=runs[0]["steps_per_peer"],
            optimizer_steps_per_minute=statistics.mean(r["optimizer_steps_per_minute"] for r in runs),
        )
    return summary


def plot_curves(results: Sequence[dict], path: Path, title: str, names: Optional[Sequence[str]] = None) -> None:
    """Held-out loss against samples: every seed thin, the mean over seeds thick, one colour per name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or sorted({r["name"] for r in results})
    figure, axis = plt.subplots(figsize=(8, 5))
    for index, name in enumerate(names):
        runs = [r for r in results if r["name"] == name]
        colour = f"C{index}" if len(names) <= 10 else plt.get_cmap("tab20")(index % 20)  # 10 colours cycle
        for run in runs:
            axis.plot([p["samples"] for p in run["curve"]], [p["heldout_loss"] for p in run["curve"]], color=colour,
                      alpha=0.3, linewidth=0.8)
        mean = _mean_curve(runs)
        if mean:
            final = statistics.mean(r["final_heldout_loss"] for r in runs)
            axis.plot(*zip(*mean), color=colour, linewidth=2, label=f"{name} (final {final:.3f}, {len(runs)} seeds)")
    axis.set_xlabel("samples (whole swarm)")
    axis.set_ylabel("held-out loss")
    axis.set_title(title)
    losses = [p["heldout_loss"] for r in results if r["name"] in names for p in r["curve"][len(r["curve"]) // 5:]]
    if losses:
        axis.set_ylim(min(losses) - 0.05, min(max(losses), min(losses) + 1.5))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _mean_curve(runs: Sequence[dict]):
    """Mean held-out loss over the seeds, each seed's curve interpolated linearly at the sample counts
    of the seed with the most evaluations, within the range every seed covers (seeds whose evaluations
    fall on different sample counts -- uneven speeds, adaptive rounds -- share few exact points)."""
    import numpy as np

    curves = []
    for run in runs:
        points = sorted((p["samples"], p["heldout_loss"]) for p in run["curve"]
                        if p["heldout_loss"] is not None and math.isfinite(p["heldout_loss"]))
        if points:
            curves.append(points)
    if not curves:
        return []
    low, high = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    grid = [x for x, _ in max(curves, key=len) if low <= x <= high]
    return [(x, statistics.mean(float(np.interp(x, [a for a, _ in c], [b for _, b in c])) for c in curves))
            for x in grid]

