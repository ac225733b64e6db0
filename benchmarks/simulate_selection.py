"""What chunking does to GaussianK: count band and speed of chunk-wise selection (SparseLoCo selects
top-k per chunk) against whole-vector GaussianK and exact top-k.

    python benchmarks/simulate_selection.py            # ~2-5 min

Inputs: synthetic vectors (gaussian, laplace, student-t with 3 degrees of freedom; 1M and 10M entries)
and a real error-feedback buffer (the tiny model's, captured after 20 SparseLoCo rounds of a 4-peer
simulation: 120,768 entries). Densities 0.01, 0.02, 0.03; chunk 4096 (and 1024, 16384 on the real
buffer). Reported per case (median of --repeats, one torch thread):
  time of chunked gaussiank / chunked exact top-k (torch.topk per row) / whole-vector gaussiank / torch.topk,
  the share of chunks whose Gaussian threshold missed the band and took the exact k-th magnitude,
  per-chunk count / k (min, max) and total count / k.
JSON: benchmarks/results/simulate_selection.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from swarmtrain.compression.selection import chunked_gaussiank, chunked_topk, gaussiank, target_count, topk

HERE = Path(__file__).resolve().parent


def synthetic(kind: str, numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        return torch.randn(numel, generator=generator)
    if kind == "laplace":
        signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
        return torch.empty(numel).exponential_(generator=generator) * signs
    normal = torch.randn(numel, generator=generator)
    return normal / torch.sqrt(torch.randn(3, numel, generator=generator).pow(2).sum(0) / 3)


def error_feedback_buffer() -> torch.Tensor:
    """A SparseLoCo error-feedback residual of the tiny model after 20 rounds (peer 0's)."""
    from swarmtrain.cli.simulate import apply_overrides
    from swarmtrain.config import load_run_config
    from swarmtrain.simulate import Simulation, SimulationOptions

    config = apply_overrides(load_run_config(HERE.parent / "swarmtrain" / "configs" / "tiny.yaml"), (
        "target_batch_size=32", "optimizer.warmup_epochs=20", "optimizer.total_epochs=2000", "averaging.mode=local",
        "averaging.schedule=constant:10", "averaging.compression=gaussiank:0.02+2bit", "averaging.feedback_decay=0.95"))
    simulation = Simulation(config, SimulationOptions(peers=4, steps=200, batch_size=8, eval_every=10**9))
    simulation.run()
    return simulation.replicas[0].residual.clone()


def timed(function, repeats: int) -> tuple:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def measure(x: torch.Tensor, density: float, chunk: int, repeats: int) -> dict:
    report = {}
    t_chunked, selected = timed(lambda: chunked_gaussiank(x, density, chunk, report), repeats)
    t_chunked_topk, _ = timed(lambda: chunked_topk(x, density, chunk), repeats)
    t_global, global_selected = timed(lambda: gaussiank(x, density), repeats)
    t_topk, _ = timed(lambda: topk(x, density), repeats)
    k = target_count(chunk, density)
    full_chunks = x.numel() // chunk
    counts = torch.bincount(selected // chunk, minlength=full_chunks + 1)[:full_chunks].float() / k
    return dict(numel=x.numel(), density=density, chunk=chunk, k_per_chunk=k,
                chunked_gaussiank_ms=1e3 * t_chunked, chunked_topk_ms=1e3 * t_chunked_topk,
                gaussiank_ms=1e3 * t_global, topk_ms=1e3 * t_topk,
                chunked_gaussiank_vs_chunked_topk=t_chunked / t_chunked_topk,
                fallback_share=report["fallback_chunks"] / report["chunks"],
                chunk_count_over_k_min=float(counts.min()), chunk_count_over_k_max=float(counts.max()),
                total_count_over_k=len(selected) / target_count(x.numel(), density),
                global_gaussiank_count_over_k=len(global_selected) / target_count(x.numel(), density))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--output", default=str(HERE / "results" / "simulate_selection.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = []
    residual = error_feedback_buffer()
    for chunk in (1024, 4096, 16384):
        for density in (0.01, 0.02, 0.03):
            cases.append(dict(data="sparseloco_residual", **measure(residual, density, chunk, args.repeats)))
            print(cases[-1], flush=True)
    for numel in (int(n) for n in args.sizes.split(",")):
        for kind in ("gaussian", "laplace", "student_t3"):
            x = synthetic(kind, numel)
            for density in (0.01, 0.02, 0.03):
                cases.append(dict(data=kind, **measure(x, density, 4096, args.repeats)))
                print(cases[-1], flush=True)
    output = Path(args.output)
    output.write_text(json.dumps(dict(cpus=os.cpu_count(), load_average=os.getloadavg(), torch_threads=1,
                                      repeats=args.repeats, cases=cases), indent=1))


if __name__ == "__main__":
    main()
