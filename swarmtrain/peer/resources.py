"""What a home machine lets a peer use: the precision it computes in and the batch per local step
that fits the memory the volunteer gives it (`swarmtrain peer --precision`, `--batch-size auto`,
`--max-memory`).

Precision: bf16 autocast on GPUs that support it. The weights, gradients, the swarm's averaging and
the optimizer stay fp32; only the forward/backward matmuls run in bf16, so nothing about the run
changes for the other peers. fp16 autocast is not offered: its gradients need loss scaling, and a
scaler must see every accumulated micro-batch and the swarm's averaged gradient (hivemind's
GradScaler), which clashes with our per-step clipping and the sparse averagers; bf16 has fp32's
range and needs no scaling.

Batch size: probe forward+backward at 1, 2, 4, ... samples and keep the largest that stays within
the budget. The budget is what the volunteer gives (--max-memory, or on a GPU 90% of its memory)
minus what hivemind's optimizer will add later (gradient accumulators, averaged gradients,
optimizer state; the per-parameter figures below), since the probe runs before the
optimizer exists. On a GPU the probe reads the allocator's peak; on a CPU there is no allocator
peak to read (and RSS never goes down), so it counts what the step holds at its peak: weights,
gradients and every tensor autograd saves for the backward pass.
"""
from __future__ import annotations

import contextlib
import os
import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from swarmtrain.errors import UserError
from swarmtrain.units import format_bytes

logger = logging.getLogger("swarmtrain.peer")

PRECISIONS = ("auto", "fp32", "bf16")
GPU_MEMORY_SHARE = 0.9   # default budget on a GPU: this share of its total memory (the rest: CUDA context, fragmentation)
MAX_AUTO_BATCH = 256     # beyond this per step, more samples per step buy nothing on one device
CPU_DEFAULT_BATCH = 8    # --batch-size auto on a CPU without --max-memory: no probe, the old default

# Bytes per parameter that a peer holds, by where hivemind.Optimizer keeps them (offload_optimizer
# is on for swarmtrain's sync mode): the model and its .grad on the training device; gradient
# accumulators beside them; the averaged gradients (shared memory), the offloaded fp32 master
# parameters and the optimizer state on the host.
DEVICE_BYTES_PER_PARAM = 4 + 4 + 4  # weights, .grad, accumulated gradients
HOST_BYTES_PER_PARAM = 4 + 4  # averaged gradients, offloaded master parameters
FP32_STATE_BYTES_PER_PARAM = 2 * 4  # Adam/LAMB: two fp32 moments
EIGHT_BIT_STATE_BYTES_PER_PARAM = 2  # two 8-bit moments (+ small per-block scales), see benchmarks/memory.py

# ------------------------------------------------------------------------------------------------
# precision

@dataclass(frozen=True)
class Precision:
    name: str  # fp32 or bf16
    device_type: str

    def autocast(self):
        """Context for the forward pass (and the loss); backward follows autocast's choices by itself."""
        if self.name == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if name == "auto":
            if not bf16_ok:
                logger.info(f"{torch.cuda.get_device_name(device)} has no bfloat16: training in fp32")
            return Precision("bf16" if bf16_ok else "fp32", "cuda")
        if name == "bf16" and not bf16_ok:
            raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
                            "(it needs an Ampere-or-newer GPU); use --precision fp32")
        return Precision(name, "cuda")
    # on a CPU, bf16 autocast works but is slower than fp32 on most CPUs: only when asked for
    return Precision("fp32" if name == "auto" else name, device.type)


@dataclass(frozen=True)
class Machine:
    """Where and how this peer computes, resolved from --device and --precision."""

    device: torch.device
    precision: Precision


def resolve_machine(device: str, precision: str) -> Machine:
    """The device and precision for the flags; one-line UserErrors for what this machine lacks."""
    from swarmtrain.peer.options import resolve_device

    resolved = resolve_device(device)
    return Machine(resolved, resolve_precision(precision, resolved))


# ------------------------------------------------------------------------------------------------
# batch size

def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


@dataclass
class BatchSizeChoice:
    batch_size: int
    budget_bytes: int
    probes: List[Tuple[int, Optional[int]]] = field(default_factory=list)  # (batch, peak bytes or None = out of memory)

    def describe(self) -> str:
        peak = dict(self.probes).get(self.batch_size)
        used = f"{format_bytes(peak)} at peak" if peak else "fits"
        return f"batch size {self.batch_size} per step ({used}; budget {format_bytes(self.budget_bytes)})"


class _SavedTensorBytes:
    """Bytes of the distinct storages autograd keeps for the backward pass."""

    def __init__(self):
        self.storages = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure_step_bytes(model: torch.nn.Module, loss_of_batch: Callable[[int], torch.Tensor], batch_size: int,
                       device: torch.device) -> int:
    """Peak bytes one forward+backward on `batch_size` samples holds (see the module docstring)."""
    model.zero_grad(set_to_none=True)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            loss_of_batch(batch_size).backward()
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        saved = _SavedTensorBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            loss = loss_of_batch(batch_size)
        loss.backward()
        weights_and_grads = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        return weights_and_grads + frozen + saved.total
    finally:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def choose_batch_size(model: torch.nn.Module, loss_of_batch: Callable[[int], torch.Tensor], device: torch.device,
                      budget_bytes: int, max_batch_size: int) -> BatchSizeChoice:
    """The largest power of two <= max_batch_size whose step fits budget_bytes (at least 1, or UserError)."""
    choice = BatchSizeChoice(batch_size=0, budget_bytes=budget_bytes)
    batch_size = 1
    while batch_size <= max_batch_size:
        try:
            peak = measure_step_bytes(model, loss_of_batch, batch_size, device)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            choice.probes.append((batch_size, None))
            break
        choice.probes.append((batch_size, peak))
        if peak > budget_bytes:
            break
        choice.batch_size = batch_size
        if len(choice.probes) >= 2 and choice.probes[-2][1] is not None:
            # don't try a doubling that, growing as the last one did, would not fit (on a CPU an
            # oversized probe is not an exception but swapping)
            previous_batch, previous_peak = choice.probes[-2]
            per_sample = max(0.0, (peak - previous_peak) / (batch_size - previous_batch))
            if peak + per_sample * batch_size > budget_bytes:
                break
        batch_size *= 2
    if choice.batch_size == 0:
        needed = choice.probes[0][1]
        raise UserError(
            f"one sample per step needs {format_bytes(needed) if needed else 'more than the free memory'}, more "
            f"than the {format_bytes(budget_bytes)} this peer may use for it; raise --max-memory, free memory on "
            f"the device, or train on a machine with more memory")
    return choice


def count_parameters(config) -> int:
    """Parameters of the run's model, built on the meta device: no memory, no weight init."""
    from swarmtrain.data import pinned_vocabulary
    from swarmtrain.models import build_model

    with torch.device("meta"):  # (the published config carries the tokenizer's vocab size)
        model = build_model(config.model, config.data.seq_len, config.seed, pinned_vocabulary(config.data))
    return sum(parameter.numel() for parameter in model.parameters())


def memory_needed(num_params: int, eight_bit: bool, device: str) -> Tuple[int, int]:
    """(bytes on the training device, bytes in host RAM); on the CPU both are RAM."""
    state = EIGHT_BIT_STATE_BYTES_PER_PARAM if eight_bit else FP32_STATE_BYTES_PER_PARAM
    on_device = num_params * DEVICE_BYTES_PER_PARAM
    on_host = num_params * (HOST_BYTES_PER_PARAM + state)
    if device == "cpu":
        return 0, on_device + on_host
    return on_device, on_host


def optimizer_extra_bytes(num_params: int, eight_bit: bool, device: torch.device) -> int:
    """What hivemind's optimizer adds, on the probed device, beyond the weights and .grad the probe saw."""
    on_device, on_host = memory_needed(num_params, eight_bit, device.type)
    if device.type == "cpu":  # one memory: the accumulators, averaged gradients, master weights and state
        return on_host - num_params * 8  # memory_needed's CPU figure counts weights and .grad too
    return on_device - num_params * (DEVICE_BYTES_PER_PARAM - 4)  # the accumulators


def memory_budget(max_memory: Optional[int], device: torch.device, num_params: int, eight_bit: bool) -> Optional[int]:
    """Bytes the probed step may peak at; None when there is nothing to probe against (CPU, no limit)."""
    if max_memory is None:
        if device.type != "cuda":
            return None
        max_memory = int(GPU_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return max_memory - optimizer_extra_bytes(num_params, eight_bit, device)


def pick_batch_size(requested: Optional[int], max_memory: Optional[int], model: torch.nn.Module,
                    loss_of_batch: Callable[[int], torch.Tensor], device: torch.device, *, eight_bit: bool,
                    target_batch_size: int, log=logger.info) -> int:
    """--batch-size N: N. --batch-size auto: the probe's choice (or 8 on a CPU without --max-memory)."""
    if requested is not None:
        return requested
    num_params = sum(p.numel() for p in model.parameters())
    budget = memory_budget(max_memory, device, num_params, eight_bit)
    if budget is None:
        return CPU_DEFAULT_BATCH
    if budget <= 0:
        raise UserError(f"--max-memory {format_bytes(max_memory)} does not even hold the model's optimizer "
                        f"({format_bytes(optimizer_extra_bytes(num_params, eight_bit, device))} beside the weights); "
                        "raise it, or use a run with optimizer.eight_bit")
    choice = choose_batch_size(model, loss_of_batch, device, budget, min(MAX_AUTO_BATCH, target_batch_size))
    log(f"memory: {choice.describe()}")
    return choice.batch_size


def halved_after_out_of_memory(batch_size: int) -> int:
    """A step ran out of GPU memory (another program took some): go on with half the batch."""
    if batch_size <= 1:
        raise UserError("out of GPU memory even at one sample per step; close other programs using the GPU, "
                        "or train on a bigger one")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.warning(f"out of GPU memory at batch size {batch_size}: going on with {batch_size // 2} per step")
    return batch_size // 2


COMPUTE_NICENESS = 5  # with overlap: how far below its own swarm processes a peer's computation runs


def yield_to_communication(increment: int = COMPUTE_NICENESS) -> bool:
    """Run this process's threads (the training computation) `increment` nice levels below the
    processes it already started (its averagers, DHT and p2p daemon); threads started later inherit
    it. With overlap a peer computes while its averager sends and reduces: on a machine whose cores
    the computation fills, an averager starved of CPU answers its group late and is dropped from
    the round (seen on loopback: groups split and peers drifted apart). A peer may only lower its
    own priority, so this is the lever. True when it was applied."""
    if not hasattr(os, "setpriority"):
        return False  # Windows: no nice levels
    # Linux keeps a nice level per thread (each task in /proc/self/task); elsewhere it is per process
    tasks = [int(task) for task in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    applied = False
    for task in tasks:
        try:
            current = os.getpriority(os.PRIO_PROCESS, task)
            os.setpriority(os.PRIO_PROCESS, task, min(19, current + increment))
            applied = True
        except OSError:  # the thread ended meanwhile
            continue
    return applied
