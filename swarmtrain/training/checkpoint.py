"""Checkpoints of a training state: weights as safetensors, optimizer state with torch.save.

Each checkpoint is a directory ``epoch-<N>`` (``epoch-<N>-<k>`` when that name is taken) written under a
hidden staging name and renamed into place (rename is atomic on POSIX), so a crash mid-write never
leaves a half checkpoint that looks whole. ``meta.json``, written last, holds the SHA-256 of every file:
a checkpoint whose files do not match (truncated, overwritten with garbage, missing) is *damaged*, and
readers fall back to the newest intact one.

Nothing the user has on disk is lost: saving never replaces or deletes a checkpoint of another run, a
damaged one, or one it cannot read; pruning removes only this run's own intact checkpoints beyond the
newest ``keep_last``. Staging directories left by a process killed mid-save are removed (once their
process is gone).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from safetensors.torch import load_file, save_file

from swarmtrain.errors import UserError

MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.pt", "meta.json"
_NAME_RE = re.compile(r"epoch-(\d+)(?:-(\d+))?")
# a staging directory: .epoch-<N>-<pid>-<random> (older versions: .epoch-<N>-<random>, no pid)
_STAGING_RE = re.compile(r"\.epoch-\d+-(?:(\d+)-)?\w+")
LEGACY_STAGING_AGE = 600.0  # seconds after which a staging directory without a pid is a left-over
_HASH_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A checkpoint that cannot be used (damaged, unreadable, missing files), with a one-line reason."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_staging_leftovers(directory: str | Path) -> List[Path]:
    """Remove the staging directories of saves that never finished (their process is gone); returns them."""
    removed = []
    for path in Path(directory).glob(".epoch-*"):
        match = _STAGING_RE.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        if match.group(1) is not None:
            if int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
                continue  # a save under way
        elif time.time() - path.stat().st_mtime < LEGACY_STAGING_AGE:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def check_checkpoint_dir(directory: str | Path, flag: str = "--checkpoint-dir") -> Path:
    """Make sure checkpoints can be written to ``directory`` (created if missing) before any work is done:
    a UserError naming ``flag`` otherwise. Also removes staging left-overs of interrupted saves."""
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"swarmtrain")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"{flag} {directory}: checkpoints cannot be written there ({reason}); choose a directory "
                        "this user can write to") from None
    remove_staging_leftovers(directory)
    return directory


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json (CheckpointError if missing or not a JSON object with an integer epoch)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{META_FILE} is missing") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{META_FILE} is unreadable ({type(error).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("epoch"), int) or isinstance(meta.get("epoch"), bool):
        raise CheckpointError(f"{META_FILE} is not a checkpoint's (no integer epoch)")
    return meta


def verify_checkpoint(path: str | Path) -> dict:
    """The meta of an intact checkpoint; CheckpointError (one-line reason) for a damaged one. A checkpoint
    written before hashes were recorded passes when its model file is there."""
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files")
    if files is None:  # an older swarmtrain's checkpoint: no hashes to check
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"{MODEL_FILE} is missing")
        return meta
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{META_FILE} lists no {MODEL_FILE}")
    for name, expected in files.items():
        file = path / str(name)
        if "/" in str(name) or not file.is_file():
            raise CheckpointError(f"{name} is missing")
        try:
            actual = _sha256(file)
        except OSError as error:
            raise CheckpointError(f"{name} is unreadable ({error.strerror})") from None
        if actual != expected:
            raise CheckpointError(f"{name} does not match its hash (damaged or altered)")
    return meta


def _order(path: Path):
    """Newest first: by the epoch and save time in meta.json, falling back on the name for unreadable ones."""
    try:
        meta = read_meta(path)
        return meta["epoch"], float(meta.get("time", 0.0)), path.name
    except (CheckpointError, TypeError, ValueError):
        match = _NAME_RE.fullmatch(path.name)
        return (int(match.group(1)) if match else -1), 0.0, path.name


def checkpoint_paths(directory: str | Path) -> List[Path]:
    """The checkpoint directories (``epoch-*``) in ``directory``, newest first, intact or not."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)]
    return sorted(found, key=_order, reverse=True)


def intact_checkpoints(directory: str | Path, run_id: Optional[str] = None) -> Iterator[tuple]:
    """(path, meta) of the intact checkpoints in ``directory``, newest first; with ``run_id``, that run's only."""
    for path in checkpoint_paths(directory):
        try:
            meta = verify_checkpoint(path)
        except CheckpointError:
            continue
        if run_id is None or meta.get("run_id") in (None, run_id):
            yield path, meta


def latest_checkpoint_path(directory: str | Path, run_id: Optional[str] = None) -> Optional[Path]:
    """The newest intact checkpoint in ``directory`` (of ``run_id`` if given), or None."""
    return next((path for path, _ in intact_checkpoints(directory, run_id)), None)


def _free_name(directory: Path, epoch: int) -> Path:
    final = directory / f"epoch-{epoch:08d}"
    suffix = 2
    while final.exists():
        final = directory / f"epoch-{epoch:08d}-{suffix}"
        suffix += 1
    return final


def save_checkpoint(directory: str | Path, epoch: int, model_state: Dict[str, torch.Tensor],
                    optimizer_state: Optional[dict] = None, meta: Optional[dict] = None, keep_last: int = 3) -> Path:
    """Write a checkpoint of ``epoch`` into ``directory`` and prune this run's older ones (see the module
    docstring); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_staging_leftovers(directory)
    staging = directory / f".epoch-{epoch:08d}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        # safetensors refuses shared or non-contiguous storage: store plain contiguous copies
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model_state.items()}
        save_file(tensors, str(staging / MODEL_FILE))
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        files = {file.name: _sha256(file) for file in staging.iterdir()}
        (staging / META_FILE).write_text(json.dumps({**(meta or {}), "epoch": epoch, "time": time.time(),
                                                     "files": files}))
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        final = _free_name(directory, epoch)  # never onto an existing directory: it may be anyone's
        os.rename(staging, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune_checkpoints(directory, (meta or {}).get("run_id"), keep_last)
    return final


def prune_checkpoints(directory: str | Path, run_id: Optional[str], keep_last: int) -> List[Path]:
    """Remove ``run_id``'s intact checkpoints beyond the newest ``keep_last`` (and an older save of an epoch
    saved again); another run's, damaged or unreadable ones are never touched. Returns what was removed."""
    kept, removed, epochs = 0, [], set()
    for path in checkpoint_paths(directory):
        try:
            meta = verify_checkpoint(path)
        except CheckpointError:
            continue
        if meta.get("run_id") != run_id:
            continue
        if kept >= keep_last or meta["epoch"] in epochs:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            continue
        kept += 1
        epochs.add(meta["epoch"])
    return removed


def load_checkpoint(path: str | Path, run_id: Optional[str] = None) -> Checkpoint:
    """Load a checkpoint directory (CheckpointError if damaged), or the newest intact one inside a
    directory of checkpoints (of ``run_id`` if given; FileNotFoundError if there is none)."""
    path = Path(path)
    if not (path / META_FILE).exists():
        newest = latest_checkpoint_path(path, run_id)
        if newest is None:
            raise FileNotFoundError(f"no intact checkpoint in {path}")
        path = newest
    meta = verify_checkpoint(path)
    try:
        model_state = load_file(str(path / MODEL_FILE))
        optimizer_path = path / OPTIMIZER_FILE
        # weights_only: an optimizer state is tensors, numbers and containers; a pickle that wants more
        # (code to run) is not one
        optimizer_state = torch.load(optimizer_path, weights_only=True) if optimizer_path.exists() else None
    except Exception as error:  # safetensors, torch and pickle each raise their own kinds
        raise CheckpointError(f"cannot be loaded ({type(error).__name__}: {str(error)[:120]})") from None
    return Checkpoint(path, meta["epoch"], model_state, optimizer_state, meta)


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
