"""Training data: byte-level sequences from local sources, sharded so that peers see different samples.

Tokenization is byte-level (256 byte values + special tokens): it needs no download, works for
any language or code, and keeps the tiny demo model honest. Sources:
- stdlib: the Python standard library's own .py files (every Python install has them; offline);
- text: local text files (a file, a directory searched recursively, or a glob pattern);
- datasets: a Hugging Face dataset directory written by `save_to_disk`, or a hub name when online.
"""
from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

import torch

from swarmtrain.config import DataConfig
from swarmtrain.errors import UserError

PAD_ID, MASK_ID, DOC_SEP_ID = 256, 257, 258
VOCAB_SIZE = 259
HELDOUT_BLOCKS = 64  # held-out loss is always measured on the same blocks, so runs are comparable


@dataclass
class Corpus:
    train: torch.Tensor  # [num_blocks, seq_len] int64 token ids
    heldout: torch.Tensor
    description: str


def _documents(config: DataConfig, data_path: str | None) -> Tuple[List[Tuple[str, bytes]], str]:
    """(name, bytes) pairs in a deterministic order, and a one-line description of the source."""
    path = data_path or config.path
    if config.source == "stdlib" and data_path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
        return [(str(p.relative_to(root)), p.read_bytes()) for p in files], f"Python stdlib sources in {root}"
    if config.source == "datasets" and data_path is None:
        return _dataset_documents(path, config.text_column), f"dataset {path}"
    files = _text_files(path)
    return [(str(p), p.read_bytes()) for p in files], f"{len(files)} text file(s) from {path}"


def _text_files(path: str) -> List[Path]:
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return [candidate]
    if candidate.is_dir():
        files = sorted(p for p in candidate.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(candidate), recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"no text files found at {path}; give a file, a directory or a glob like 'corpus/*.txt'")
    return files


def _dataset_documents(path: str, text_column: str) -> List[Tuple[str, bytes]]:
    import datasets

    try:
        if Path(path).expanduser().is_dir():
            dataset = datasets.load_from_disk(str(Path(path).expanduser()))
        else:
            dataset = datasets.load_dataset(path, split="train")
    except Exception as error:
        raise UserError(f"could not load dataset {path!r}: {error}") from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if text_column not in dataset.column_names:
        raise UserError(f"dataset {path!r} has no column {text_column!r} (it has {dataset.column_names}); set data.text_column")
    return [(f"{path}#{i}", str(text).encode()) for i, text in enumerate(dataset[text_column])]


def _is_heldout(name: str, fraction: float) -> bool:
    # by document name, so that every peer agrees on the split without talking
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return digest % 100_000 < fraction * 100_000


def _to_blocks(documents: List[bytes], seq_len: int) -> torch.Tensor:
    separator = torch.tensor([DOC_SEP_ID])
    pieces = []
    for document in documents:
        if document:
            pieces.append(torch.frombuffer(bytearray(document), dtype=torch.uint8).to(torch.int64))
        pieces.append(separator)
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    usable = (ids.numel() // seq_len) * seq_len
    return ids[:usable].view(-1, seq_len)


def load_corpus(config: DataConfig, data_path: str | None = None) -> Corpus:
    """Read the configured source (or a peer's own --data path, same formats) into blocks."""
    documents, description = _documents(config, data_path)
    train_docs, heldout_docs, total = [], [], 0
    for name, content in documents:
        if config.max_bytes is not None and total >= config.max_bytes:
            break
        total += len(content)
        (heldout_docs if _is_heldout(name, config.heldout_fraction) else train_docs).append(content)
    train = _to_blocks(train_docs, config.seq_len)
    heldout = _to_blocks(heldout_docs, config.seq_len)[:HELDOUT_BLOCKS]
    if train.shape[0] < 2 or heldout.shape[0] < 1:
        raise UserError(f"the data at {data_path or config.path or 'stdlib'} is too small for seq_len={config.seq_len}")
    return Corpus(train, heldout, f"{description}: {train.shape[0]} train / {heldout.shape[0]} held-out blocks of {config.seq_len} bytes")


def peer_batches(corpus: Corpus, num_shards: int, batch_size: int, peer_seed: int) -> Iterator[torch.Tensor]:
    """Endless batches for one peer: the train blocks are cut into shards; each peer walks the
    shards in its own random order (seeded by its identity), so concurrent peers mostly read
    different shards without knowing how many peers there are."""
    generator = torch.Generator().manual_seed(peer_seed)
    num_blocks = corpus.train.shape[0]
    num_shards = max(1, min(num_shards, num_blocks // max(batch_size, 1)))
    shards = torch.arange(num_blocks).chunk(num_shards)
    while True:
        for shard_index in torch.randperm(len(shards), generator=generator).tolist():
            shard = shards[shard_index]
            order = shard[torch.randperm(len(shard), generator=generator)]
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield corpus.train[order[start : start + batch_size]]


def mask_tokens(input_ids: torch.Tensor, generator: torch.Generator, probability: float = 0.15) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for masked LMs: 15% of tokens predicted; of those 80% [MASK], 10% random
    byte, 10% unchanged. Returns (inputs, labels) with labels -100 where nothing is predicted."""
    labels = input_ids.clone()
    selected = torch.rand(input_ids.shape, generator=generator) < probability
    labels[~selected] = -100
    inputs = input_ids.clone()
    draw = torch.rand(input_ids.shape, generator=generator)
    inputs[selected & (draw < 0.8)] = MASK_ID
    random_positions = selected & (draw >= 0.8) & (draw < 0.9)
    inputs[random_positions] = torch.randint(0, 256, input_ids.shape, generator=generator)[random_positions]
    return inputs, labels
