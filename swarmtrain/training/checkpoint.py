"""Checkpoints of a training state: weights as safetensors, optimizer state with torch.save.

Each checkpoint is a directory `epoch-<N>` written under a temporary name and renamed into place
(rename is atomic on POSIX), so a crash mid-write never leaves a half checkpoint that looks whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.pt", "meta.json"


@dataclass
class Checkpoint:
    path: Path
    epoch: int
    model_state: Dict[str, torch.Tensor]
    optimizer_state: Optional[dict]
    meta: dict


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, epoch: int, model_state: Dict[str, torch.Tensor],
                    optimizer_state: Optional[dict] = None, meta: Optional[dict] = None, keep_last: int = 3) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"epoch-{epoch:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".epoch-{epoch:08d}-", dir=directory))
    try:
        # safetensors refuses shared or non-contiguous storage: store plain contiguous copies
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model_state.items()}
        save_file(tensors, str(staging / MODEL_FILE))
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        (staging / META_FILE).write_text(json.dumps({"epoch": epoch, "time": time.time(), **(meta or {})}))
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # same epoch saved again (e.g. on exit): replace it
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(directory.glob("epoch-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint_path(directory: str | Path) -> Optional[Path]:
    candidates = sorted(p for p in Path(directory).glob("epoch-*") if (p / META_FILE).exists())
    return candidates[-1] if candidates else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint directory, or the newest one inside a directory of checkpoints."""
    path = Path(path)
    if not (path / META_FILE).exists():
        newest = latest_checkpoint_path(path)
        if newest is None:
            raise FileNotFoundError(f"no checkpoint in {path}")
        path = newest
    meta = json.loads((path / META_FILE).read_text())
    optimizer_path = path / OPTIMIZER_FILE
    optimizer_state = torch.load(optimizer_path, weights_only=False) if optimizer_path.exists() else None
    return Checkpoint(path, int(meta["epoch"]), load_file(str(path / MODEL_FILE)), optimizer_state, meta)


def model_state_mismatch(current: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``saved`` weights cannot be loaded into a model whose state is ``current`` (None: they can)."""
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        return (f"its weights are of another model ({len(missing)} tensors missing, e.g. {missing[:1]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    for name, tensor in current.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            return f"its weights are of another model size ({name}: {tuple(saved[name].shape)}, here {tuple(tensor.shape)})"
    return None


def optimizer_state_mismatch(current: dict, saved: dict) -> Optional[str]:
    """Why ``saved`` (a torch optimizer state_dict) does not fit an optimizer whose state_dict is
    ``current`` (None: it fits). torch's own load_state_dict only checks the parameter groups; state of
    another optimizer (say 8-bit Adam's state1/state2 where AdamW keeps exp_avg/exp_avg_sq) would load
    and then break the first step."""
    try:
        current_groups = [len(group["params"]) for group in current["param_groups"]]
        saved_groups = [len(group["params"]) for group in saved["param_groups"]]
        if current_groups != saved_groups:
            return f"its optimizer has other parameter groups ({saved_groups} parameters, here {current_groups})"
        for key, state in current["state"].items():
            if not isinstance(state, dict):  # e.g. hivemind's local_epoch
                continue
            saved_state = saved["state"].get(key)
            if not isinstance(saved_state, dict):
                return f"its optimizer state lacks parameter {key}"
            if set(saved_state) != set(state):
                return (f"its optimizer state is another optimizer's ({sorted(map(str, saved_state))}, "
                        f"here {sorted(map(str, state))})")
            for name, value in state.items():
                other = saved_state[name]
                if isinstance(value, torch.Tensor) and (not isinstance(other, torch.Tensor) or other.shape != value.shape):
                    return f"its optimizer state has another shape ({key}.{name})"
    except (KeyError, TypeError, AttributeError) as error:
        return f"its optimizer state is not readable ({error!r})"
    return None
