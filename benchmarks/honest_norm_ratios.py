"""How far apart two *honest* peers' gradient parts are in norm: the data behind the outlier rule's ratios.

    python benchmarks/honest_norm_ratios.py                       # ~2 min on one core
    python benchmarks/honest_norm_ratios.py --micro-batches 1,2,8 --phases 6

In a group of two there is no median, so a reducer (and a member checking the round) compares each part
with its *own* part on the same unit (swarmtrain/compression/robust.py). A unit of hivemind's dense
all-reduce is one parameter tensor (or a 2**19-byte piece of a big one), so the rule compares per-tensor
gradient norms of two peers computed on different batches. This measures that ratio for honest peers:
the tiny config's model (configs/tiny.yaml) with and without the privacy head the live-swarm test uses
(alpha 0.1 at transformer.h.0, the default cut noise), at the same parameters, each peer's part being the
mean of --micro-batches clipped micro-batch gradients of 8 sequences (as the trainer accumulates them;
a slow volunteer contributes few micro-batches to a round). --phases times: --samples gradients at the
current parameters, every ordered pair of them compared per tensor and whole, then 30 AdamW steps.
Reported per setting: quantiles and the maximum of the per-tensor ratio over all pairs and tensors, the
same for the whole gradient, and the tensors with the largest ratios. JSON:
benchmarks/results/honest_norm_ratios.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
BATCH = 8  # sequences per micro-batch: the trainer's CPU default


def _setting(config, privacy: bool, micro_batches: int, phases: int, samples: int, seed: int) -> dict:
    from swarmtrain.data import load_corpus
    from swarmtrain.models import build_model, compute_loss, embedded_input_layer
    from swarmtrain.privacy import attach_privacy_head

    if privacy:
        config = config.model_copy(update={"privacy": config.privacy.model_copy(
            update=dict(enabled=True, cut_layer="transformer.h.0", alpha=0.1))})
    torch.manual_seed(seed)
    corpus = load_corpus(config.data)
    model = build_model(config.model, config.data.seq_len, config.seed)
    head = attach_privacy_head(model, config.privacy, input_layer=embedded_input_layer(model, config.model.kind))
    parameters = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.optimizer.lr)
    generator = torch.Generator().manual_seed(seed)

    def part(count: int, train: bool = False):
        total = [torch.zeros_like(p) for p in parameters]
        for _ in range(count):
            batch = corpus.train[torch.randint(0, corpus.train.shape[0], (BATCH,), generator=generator)]
            loss = compute_loss(model, batch, config.model.kind, generator)
            (head.add_penalty(loss) if head is not None else loss).backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.optimizer.max_grad_norm)
            for accumulated, p in zip(total, parameters):
                if p.grad is not None:
                    accumulated += p.grad
            if train:
                optimizer.step()
            optimizer.zero_grad()
        return [t / count for t in total]

    per_tensor, whole, largest = [], [], {}
    for _ in range(phases):
        grads = [part(micro_batches) for _ in range(samples)]
        norms = np.array([[float(g.norm()) for g in sample] for sample in grads])  # samples x tensors
        wholes = np.sqrt((norms**2).sum(axis=1))
        for a, b in itertools.permutations(range(samples), 2):
            ratios = norms[a] / np.maximum(norms[b], 1e-30)
            per_tensor.extend(ratios.tolist())
            whole.append(float(wholes[a] / wholes[b]))
            for name, ratio in zip(names, ratios):
                largest[name] = max(largest.get(name, 0.0), float(ratio))
        part(30, train=True)
    quantiles = lambda values: {f"p{q:g}": float(np.quantile(values, q / 100)) for q in (50, 90, 99, 99.9)} | \
        {"max": float(np.max(values)), "pairs": len(values)}
    top = sorted(largest.items(), key=lambda item: -item[1])[:5]
    sizes = dict(zip(names, (p.numel() for p in parameters)))
    return dict(privacy=privacy, micro_batches=micro_batches, per_tensor=quantiles(per_tensor),
                whole=quantiles(whole), largest=[dict(tensor=name, entries=sizes[name], ratio=ratio) for name, ratio in top])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE.parent / "configs" / "tiny.yaml"))
    parser.add_argument("--micro-batches", default="1,4", help="micro-batches per part, comma-separated")
    parser.add_argument("--phases", type=int, default=8)
    parser.add_argument("--samples", type=int, default=12, help="gradients per phase (every ordered pair compared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(HERE / "results" / "honest_norm_ratios.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from swarmtrain.config import load_run_config

    config = load_run_config(args.config)
    results, started = [], time.time()
    for privacy in (False, True):
        for micro in (int(value) for value in args.micro_batches.split(",")):
            result = _setting(config, privacy, micro, args.phases, args.samples, args.seed)
            results.append(result)
            print(f"privacy {'on ' if privacy else 'off'} micro-batches {micro}: per tensor p99 "
                  f"{result['per_tensor']['p99']:.2f} max {result['per_tensor']['max']:.1f}, whole max "
                  f"{result['whole']['max']:.1f}; largest {result['largest'][0]}", flush=True)
    output = dict(command="python benchmarks/honest_norm_ratios.py " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key != "output"),
        seconds=time.time() - started, load_average=os.getloadavg(), results=results)
    Path(args.output).write_text(json.dumps(output, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
