"""Optimizer-state memory of the realistic run (configs/pretrain-albert.yaml), measured.

    python benchmarks/memory.py                     # -> benchmarks/results/memory.json

The model is built exactly as peers build it (swarmtrain.models.build_model with the config's seed);
each optimizer comes from swarmtrain.training.optimizers.make_torch_optimizer_factory, the factory peers
use, with only `name` and `eight_bit` changed. After one step the bytes of every tensor in
`optimizer.state` are summed (element size x count, so 8-bit states count 1 byte per entry and
their per-block scales / quantization maps count too). The step uses random gradients: the state's
size does not depend on the values, and it keeps the run to seconds on a CPU. The figures are what
`swarmtrain doctor` budgets per parameter (8 bytes fp32, ~2 bytes 8-bit).

It also measures what one training step holds per sample, in fp32 and under bf16 autocast, the way
`swarmtrain peer --batch-size auto` probes it on a CPU (swarmtrain.peer.resources.measure_step_bytes:
weights, gradients and the tensors autograd saves for backward), and from that the batch per step
the probe would pick on 8 and 12 GB GPUs (an extrapolation: a GPU probe reads the allocator's peak,
which adds temporaries).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmtrain.config import load_run_config  # noqa: E402
from swarmtrain.models import build_model, compute_loss  # noqa: E402
from swarmtrain.peer.resources import (GPU_MEMORY_SHARE, MAX_AUTO_BATCH, Precision,  # noqa: E402
                                       measure_step_bytes, optimizer_extra_bytes)
from swarmtrain.training.optimizers import make_torch_optimizer_factory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = [("adamw", False), ("lamb", False), ("adamw", True), ("lamb", True)]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(value.numel() * value.element_size()
               for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value))


def measure(config_path: Path) -> dict:
    config = load_run_config(config_path)
    model = build_model(config.model, config.data.seq_len, config.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in parameters)
    results = []
    for name, eight_bit in VARIANTS:
        optimizer_config = config.optimizer.model_copy(update=dict(name=name, eight_bit=eight_bit))
        optimizer = make_torch_optimizer_factory(optimizer_config)(parameters)
        generator = torch.Generator().manual_seed(0)
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-3
        started = time.perf_counter()
        optimizer.step()
        seconds = time.perf_counter() - started
        size = state_bytes(optimizer)
        results.append(dict(optimizer=name, eight_bit=eight_bit, cls=type(optimizer).__name__, state_bytes=size,
                            bytes_per_param=round(size / num_params, 3), step_seconds=round(seconds, 3)))
        del optimizer
    activations = measure_activations(config, model, num_params)
    reference = results[0]["state_bytes"]
    for result in results:
        result["ratio_to_fp32_adamw"] = round(result["state_bytes"] / reference, 4)
    import bitsandbytes

    return dict(
        config=str(config_path.relative_to(REPO)) if config_path.is_relative_to(REPO) else str(config_path),
        model=config.model.kind, num_params=num_params, param_bytes_fp32=num_params * 4, results=results,
        activations=activations,
        torch=torch.__version__, bitsandbytes=bitsandbytes.__version__, python=platform.python_version(),
        machine=platform.machine(), command="python benchmarks/memory.py",
    )


def measure_activations(config, model: torch.nn.Module, num_params: int) -> dict:
    """Step bytes at batch 1 and 2 (seq_len tokens each), per precision; the auto batch on 8/12 GB GPUs."""
    model.train()
    cpu = torch.device("cpu")
    tokens = torch.randint(0, 256, (2, config.data.seq_len), generator=torch.Generator().manual_seed(0))
    out = dict(seq_len=config.data.seq_len, precisions={})
    for name in ("fp32", "bf16"):
        precision = Precision(name, "cpu")

        def loss_of(batch_size: int) -> torch.Tensor:
            with precision.autocast():
                return compute_loss(model, tokens[:batch_size].clone(), config.model.kind, torch.Generator().manual_seed(0))

        one, two = (measure_step_bytes(model, loss_of, b, cpu) for b in (1, 2))
        per_sample, fixed = two - one, 2 * one - two
        picks = {}
        for gib in (8, 12):
            for eight_bit in (False, True):
                budget = GPU_MEMORY_SHARE * gib * 2**30 - optimizer_extra_bytes(num_params, eight_bit, torch.device("cuda"))
                batch = 1
                while batch * 2 <= MAX_AUTO_BATCH and fixed + per_sample * batch * 2 <= budget:
                    batch *= 2
                picks[f"{gib}GB_{'8bit' if eight_bit else 'fp32'}_state"] = batch if fixed + per_sample <= budget else 0
        out["precisions"][name] = dict(step_bytes_batch1=one, step_bytes_batch2=two, bytes_per_sample=per_sample,
                                       fixed_bytes=fixed, auto_batch_size=picks)
    out["bf16_vs_fp32_bytes_per_sample"] = round(out["precisions"]["bf16"]["bytes_per_sample"]
                                                 / out["precisions"]["fp32"]["bytes_per_sample"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "pretrain-albert.yaml",
                        help="run config whose model and optimizer settings are measured")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "memory.json", help="where the JSON goes")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # a shared machine; memory does not depend on it
    report = measure(args.config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['model']} {report['num_params'] / 1e6:.2f}M parameters "
          f"({report['param_bytes_fp32'] / 2**20:.1f} MiB fp32)")
    for result in report["results"]:
        print(f"  {result['optimizer']:5s} {'8-bit' if result['eight_bit'] else 'fp32 '} {result['cls']:10s} "
              f"{result['state_bytes'] / 2**20:8.1f} MiB  {result['bytes_per_param']:6.3f} B/param  "
              f"x{result['ratio_to_fp32_adamw']:.3f}")
    activations = report["activations"]
    for name, row in activations["precisions"].items():
        print(f"  step {name}: {row['bytes_per_sample'] / 2**20:.1f} MiB per sample of {activations['seq_len']} tokens "
              f"(+{row['fixed_bytes'] / 2**20:.1f} MiB); --batch-size auto would pick {row['auto_batch_size']}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
