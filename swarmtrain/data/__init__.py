"""Training data: a corpus larger than memory, read as a stream, tokenized on the fly, sharded per peer.

- ``open_training_data(data_config, data_path, peer_id, start_position)`` -> ``TrainingData``: a peer's
  endless batches, the run's held-out blocks, and a position to store in its checkpoint
  (swarmtrain/data/stream.py; sources in swarmtrain/data/sources.py).
- Tokenizers (swarmtrain/data/tokenizer.py): ``bytes`` (the demo's: ids 0..255 plus PAD_ID, MASK_ID,
  DOC_SEP_ID), or a Hugging Face tokenizer.json pinned by its sha256 in the run config;
  ``swarmtrain tokenizer train`` makes one from a corpus (swarmtrain/data/training.py).
- Getting the run's tokenizer from the swarm: swarmtrain/data/transfer.py.
- ``load_corpus`` / ``peer_batches``: the older in-memory interface, for small corpora.
"""
from swarmtrain.data.legacy import Corpus, load_corpus, peer_batches
from swarmtrain.data.masking import mask_tokens
from swarmtrain.data.stream import TrainingData, open_training_data
from swarmtrain.data.tokenizer import (BYTE_VOCABULARY, DOC_SEP_ID, MASK_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer,
                                       TextTokenizer, Vocabulary, check_tokenizer, load_tokenizer, pin_tokenizer,
                                       pinned_vocabulary, resolve_tokenizer)

HELDOUT_BLOCKS = 64  # the default data.heldout_blocks; load_corpus honours a reassignment (benchmarks/wan.py)

__all__ = [
    "BYTE_VOCABULARY", "DOC_SEP_ID", "HELDOUT_BLOCKS", "MASK_ID", "PAD_ID", "VOCAB_SIZE", "ByteTokenizer", "Corpus",
    "TextTokenizer", "TrainingData", "Vocabulary", "check_tokenizer", "load_corpus", "load_tokenizer", "mask_tokens",
    "open_training_data", "peer_batches", "pin_tokenizer", "pinned_vocabulary", "resolve_tokenizer",
]
