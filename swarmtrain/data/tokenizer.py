"""Tokenizers: bytes (the demo's, no file at all), or a Hugging Face `tokenizers` file.

Every peer of a run must tokenize exactly alike. A real tokenizer is one file, `tokenizer.json` (the
format of the `tokenizers` library, which every transformers "fast" tokenizer has); the run config
carries its SHA-256 (`data.tokenizer_sha256`, filled in by the coordinator when it publishes the run),
a peer checks its copy against it and refuses to start on a different one, and a peer without a copy
gets the run's from the swarm (`swarmtrain.data.transfer`). The roles the training needs (end of a
document, mask, padding) are read from the file's special tokens by their conventional names, so
they follow from the file alone: the hash pins them too.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from swarmtrain.errors import UserError

# the byte tokenizer's ids: bytes are 0..255, then three specials (checkpoints depend on these)
PAD_ID, MASK_ID, DOC_SEP_ID = 256, 257, 258
VOCAB_SIZE = 259
BYTES = "bytes"
TOKENIZER_FILE = "tokenizer.json"

# special tokens by role, in order of preference (BERT, RoBERTa/SentencePiece, GPT, llama 3 spellings)
SEPARATOR_NAMES = ("</s>", "<|endoftext|>", "[SEP]", "<eos>", "<|end_of_text|>")
MASK_NAMES = ("<mask>", "[MASK]", "<|mask|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
BOS_NAMES = ("<s>", "[CLS]", "<bos>", "<|begin_of_text|>")

Piece = Union[str, bytes]


@dataclass(frozen=True)
class Vocabulary:
    """What a model and the masking need to know about a tokenizer's ids.

    :param size: number of token ids (the model's vocab_size)
    :param separator_id: the token put between documents (end of text), or None
    :param mask_id: the token masked LMs put in place of predicted ones, or None
    :param pad_id: the padding token, or None (training blocks are packed, never padded)
    :param bos_id: the beginning-of-text token, or None
    :param random_limit: masked LMs replace 10% of predicted tokens by a random id below this
    """

    size: int
    separator_id: Optional[int]
    mask_id: Optional[int]
    pad_id: Optional[int]
    bos_id: Optional[int] = None
    random_limit: Optional[int] = None

    @property
    def random_high(self) -> int:
        return self.random_limit if self.random_limit is not None else self.size


BYTE_VOCABULARY = Vocabulary(size=VOCAB_SIZE, separator_id=DOC_SEP_ID, mask_id=MASK_ID, pad_id=PAD_ID,
                             random_limit=256)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: no file, any language or code, and the demo's tiny model stays honest."""

    name = BYTES
    sha256: Optional[str] = None
    vocabulary = BYTE_VOCABULARY
    dtype = np.uint16

    def encode(self, pieces: Sequence[Piece]) -> List[np.ndarray]:
        return [np.frombuffer(piece if isinstance(piece, bytes) else piece.encode(), dtype=np.uint8).astype(np.uint16)
                for piece in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class TextTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from the bytes of its tokenizer.json.

    :param content: the file's bytes (hashed as they are: the run pins this exact file)
    :param name: where it came from, for messages
    """

    def __init__(self, content: bytes, name: str):
        # Said explicitly, so that tokenizers neither prints its fork warning in every process hivemind
        # forks after the loader has tokenized, nor turns its threads off; those processes never tokenize.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        from tokenizers import Tokenizer

        try:
            self.backend = Tokenizer.from_str(content.decode())
        except Exception as error:
            raise UserError(f"data.tokenizer {name}: not a tokenizers file ({str(error).splitlines()[0]}); "
                            f"give a tokenizer.json or a directory holding one") from None
        self.name, self.content = name, content
        self.sha256 = tokenizer_sha256(content)
        role = lambda names: next((self.backend.token_to_id(n) for n in names  # noqa: E731
                                   if self.backend.token_to_id(n) is not None), None)
        self.vocabulary = Vocabulary(size=self.backend.get_vocab_size(with_added_tokens=True),
                                     separator_id=role(SEPARATOR_NAMES), mask_id=role(MASK_NAMES),
                                     pad_id=role(PAD_NAMES), bos_id=role(BOS_NAMES))
        if self.vocabulary.separator_id is None:
            raise UserError(f"data.tokenizer {name}: it has no end-of-text token (one of {', '.join(SEPARATOR_NAMES[:4])}) "
                            f"to put between documents; add one as a special token")
        self.dtype = np.uint16 if self.vocabulary.size <= 65536 else np.int32

    def encode(self, pieces: Sequence[Piece]) -> List[np.ndarray]:
        texts = [piece.decode(errors="replace") if isinstance(piece, bytes) else piece for piece in pieces]
        # encode_batch_fast releases the GIL and uses all cores: the training thread keeps running
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=self.dtype) for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


Tokenizer = Union[ByteTokenizer, TextTokenizer]


def tokenizer_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _local_file(spec: str) -> Optional[Path]:
    """The tokenizer.json that ``spec`` names on this machine, or None if it names nothing here."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return path / TOKENIZER_FILE
        raise UserError(f"data.tokenizer {spec}: the directory has no {TOKENIZER_FILE}; point at a directory written "
                        f"by `swarmtrain tokenizer train` or by transformers' save_pretrained (a fast tokenizer)")
    return None


def _looks_like_hub_name(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec)) and not spec.endswith(".json")


def _from_hub(spec: str) -> Tuple[bytes, str]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=spec, filename=TOKENIZER_FILE)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"data.tokenizer {spec!r}: no such file or directory here, and fetching it from the "
                        f"Hugging Face hub failed ({reason[:160]}); give a local tokenizer.json or go online") from None
    return Path(path).read_bytes(), f"{spec} (hub)"


def load_tokenizer(spec: str) -> Tokenizer:
    """``bytes``, a tokenizer.json, a directory holding one, or a hub name (online only)."""
    if spec == BYTES:
        return ByteTokenizer()
    local = _local_file(spec)
    if local is not None:
        return TextTokenizer(local.read_bytes(), str(local))
    if not _looks_like_hub_name(spec):
        raise UserError(f"data.tokenizer {spec}: no such file or directory; give `bytes`, a tokenizer.json, a "
                        f"directory holding one (`swarmtrain tokenizer train --out DIR` writes one) or a hub name")
    return TextTokenizer(*_from_hub(spec))


def check_tokenizer(data_config, tokenizer: Tokenizer) -> None:
    """Refuse, in one line, a tokenizer that is not the run's (``data_config.tokenizer_sha256``)."""
    expected = data_config.tokenizer_sha256
    if expected is None or tokenizer.sha256 == expected:
        return
    if tokenizer.sha256 is None:
        raise UserError(f"the run uses the tokenizer with sha256 {expected[:16]}..., not bytes")
    raise UserError(f"data.tokenizer {tokenizer.name}: this copy (sha256 {tokenizer.sha256[:16]}...) is not the "
                    f"run's (sha256 {expected[:16]}...): this peer would tokenize differently from the swarm; "
                    f"remove or replace it (a peer without a copy gets the run's from the swarm)")


def cached_tokenizer_path(sha256: str, cache_dir: Optional[Path] = None) -> Path:
    """Where a tokenizer fetched from a swarm is kept: ``cache_dir``, by default tokenizers/ in
    $SWARMTRAIN_HOME (~/.swarmtrain, where the peer's identity lives too)."""
    home = Path(os.environ.get("SWARMTRAIN_HOME", Path.home() / ".swarmtrain"))
    return Path(cache_dir or home / "tokenizers").expanduser() / f"{sha256}.json"


def _write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def resolve_tokenizer(data_config, fetch: Optional[Callable[[str], bytes]] = None,
                      cache_dir: Optional[Path] = None) -> Tokenizer:
    """The tokenizer a peer trains with: its own copy at ``data.tokenizer`` if it has one (refused if
    it differs from the run's), else the copy cached from an earlier run, else the run's from the
    swarm through ``fetch(sha256) -> bytes`` (then cached), else ``data.tokenizer`` from the hub."""
    spec, expected = data_config.tokenizer, data_config.tokenizer_sha256
    if spec == BYTES:
        return ByteTokenizer()
    local = _local_file(spec)
    if local is not None or expected is None:
        tokenizer = load_tokenizer(spec)
        check_tokenizer(data_config, tokenizer)
        return tokenizer
    cached = cached_tokenizer_path(expected, cache_dir)
    if cached.is_file() and tokenizer_sha256(cached.read_bytes()) == expected:
        return TextTokenizer(cached.read_bytes(), str(cached))
    if fetch is None:
        raise UserError(f"data.tokenizer {spec}: not on this machine, and the swarm was not asked for it")
    content = fetch(expected)
    if tokenizer_sha256(content) != expected:
        raise UserError(f"the tokenizer received from the swarm does not match the run's sha256 {expected[:16]}...")
    _write_atomically(cached, content)
    return TextTokenizer(content, f"{spec} (from the swarm, cached in {cached})")


def pinned_vocabulary(data_config) -> Vocabulary:
    """The vocabulary as far as the run config alone tells it (``data.vocab_size``, pinned by the
    coordinator): enough to size a model (e.g. `swarmtrain doctor`'s memory check), whose special
    ids here are stand-ins; a peer trains with its tokenizer's own vocabulary."""
    if data_config.tokenizer == BYTES or data_config.vocab_size is None:
        return BYTE_VOCABULARY
    return Vocabulary(size=data_config.vocab_size, separator_id=0, mask_id=0, pad_id=None)


def pin_tokenizer(run_config) -> Tuple["object", Tokenizer]:
    """For the coordinator: load the run's tokenizer and return the config with its sha256 and vocab
    size filled in (what peers check theirs against), and the tokenizer (whose bytes it publishes)."""
    data = run_config.data
    tokenizer = load_tokenizer(data.tokenizer)
    check_tokenizer(data, tokenizer)
    if data.vocab_size is not None and data.vocab_size != tokenizer.vocabulary.size:
        raise UserError(f"data.vocab_size is {data.vocab_size} but the tokenizer {tokenizer.name} has "
                        f"{tokenizer.vocabulary.size} tokens; remove data.vocab_size (it is taken from the tokenizer)")
    if tokenizer.sha256 is None:
        return run_config, tokenizer
    pinned = data.model_copy(update={"tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocabulary.size})
    return run_config.model_copy(update={"data": pinned}), tokenizer
