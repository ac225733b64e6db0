"""The whole-corpus-in-memory interface of swarmtrain.data before streaming (issue #15).

Kept so that callers move over one at a time; both read the corpus through the same sources,
tokenizer and held-out choice as ``open_training_data``, so their held-out blocks are identical.
For small corpora only: ``load_corpus`` materialises one pass of the training blocks in memory.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from swarmtrain.data.tokenizer import BYTE_VOCABULARY, Vocabulary

DEFAULT_HELDOUT_BLOCKS = 64


@dataclass
class Corpus:
    train: torch.Tensor  # [num_blocks, seq_len] int64 token ids
    heldout: torch.Tensor
    description: str
    vocabulary: Vocabulary = BYTE_VOCABULARY  # the tokenizer's: models are built for it, masking uses it


def load_corpus(config, data_path: Optional[str] = None) -> Corpus:
    """One pass of the configured source (or a peer's own --data path) as blocks in memory."""
    from swarmtrain.data.stream import open_training_data

    # benchmarks/wan.py sets swarmtrain.data.HELDOUT_BLOCKS for a larger evaluation set
    package_value = getattr(sys.modules.get("swarmtrain.data"), "HELDOUT_BLOCKS", DEFAULT_HELDOUT_BLOCKS)
    if package_value != DEFAULT_HELDOUT_BLOCKS and config.heldout_blocks == DEFAULT_HELDOUT_BLOCKS:
        config = config.model_copy(update={"heldout_blocks": package_value})
    with open_training_data(config, data_path, peer_id=b"load_corpus", max_passes=1) as data:
        blocks = list(data.batches(1))
        train = torch.cat(blocks) if blocks else torch.zeros((0, config.seq_len), dtype=torch.int64)
        return Corpus(train, data.heldout, f"{data.description}: {train.shape[0]} train blocks in memory",
                      data.vocabulary)


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



