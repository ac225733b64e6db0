"""Training a tokenizer on the organiser's corpus, offline, with Hugging Face `tokenizers`.

bpe: byte-level BPE (GPT-2 / llama style): any text round-trips exactly, nothing is ever unknown.
unigram: SentencePiece's unigram model (ALBERT / T5 style), whitespace marked with "▁".
Both get the special tokens the training uses: <pad>, <unk>, <s>, </s> (between documents), <mask>.
The output directory holds tokenizer.json (what the run pins and shares) and transformers'
tokenizer_config.json, so ``AutoTokenizer.from_pretrained(DIR)`` loads it too.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from swarmtrain.errors import UserError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
BYTE_ALPHABET = 256


def corpus_texts(source, max_bytes: Optional[int]) -> Iterator[str]:
    """The corpus's text, or up to ``max_bytes`` of it from shards spread evenly over it (a tokenizer
    learns from a sample as well as from the whole, and a 50 GB pass would take hours)."""
    units = range(source.num_units)
    if max_bytes and source.total_bytes and source.total_bytes > max_bytes:
        wanted = max(1, math.ceil(source.num_units * max_bytes / source.total_bytes))
        units = sorted({int(i * source.num_units / wanted) for i in range(wanted)})
    read = 0
    for unit in units:
        for segment in source.read(unit):
            content = segment.content
            yield content.decode(errors="replace") if isinstance(content, bytes) else content
            read += len(content)
            if max_bytes and read >= max_bytes:
                return


def _new_tokenizer(kind: str, vocab_size: int, min_frequency: int, show_progress: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                      special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=show_progress,
                                          special_tokens=SPECIAL_TOKENS, unk_token="<unk>")
    return tokenizer, trainer


def _train_interruptibly(tokenizer, texts: Iterator[str], trainer) -> None:
    """train_from_iterator in a worker thread. In the calling thread, Ctrl+C would reach the iterator
    as an error that tokenizers takes for its end, and the tokenizer would be trained on part of the
    corpus; nor could the Rust training loop be interrupted. Here the main thread only waits, so Ctrl+C
    is a KeyboardInterrupt at once (before anything is written), and the iterator is told to stop."""
    stop, failure = threading.Event(), []

    def until_stopped():
        for text in texts:
            if stop.is_set():
                return
            yield text

    def work():
        try:
            tokenizer.train_from_iterator(until_stopped(), trainer)
        except BaseException as error:  # handed to the main thread
            failure.append(error)

    worker = threading.Thread(target=work, daemon=True, name="swarmtrain-tokenizer-training")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        raise
    if failure:
        raise failure[0]


def _save(tokenizer, out: Path) -> None:
    """Write into a staging directory beside ``out`` and rename it into place: never half a directory."""
    from transformers import PreTrainedTokenizerFast

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                          bos_token="<s>", eos_token="</s>", mask_token="<mask>")
        wrapped.save_pretrained(str(staging))
        if out.is_dir():
            out.rmdir()  # empty (checked before training)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def train_tokenizer(data: str, vocab_size: int, out: str, kind: str = "bpe", text_column: str = "text",
                    max_bytes: Optional[int] = 1 << 30, min_frequency: int = 2, show_progress: bool = True,
                    log: Callable[[str], None] = print):
    """Train a tokenizer on ``data`` (text files, a directory or glob of them, or a save_to_disk
    directory) and write it to the new directory ``out``; returns the loaded TextTokenizer."""
    from swarmtrain.config import DataConfig
    from swarmtrain.data.sources import open_source
    from swarmtrain.data.tokenizer import TOKENIZER_FILE, TextTokenizer

    target = Path(out).expanduser()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(f"--out {out}: it exists; give a new directory (nothing is overwritten)")
    if not target.parent.is_dir():
        raise UserError(f"--out {out}: the directory {target.parent} does not exist")
    least = len(SPECIAL_TOKENS) + (BYTE_ALPHABET if kind == "bpe" else 1)
    if vocab_size < least:
        raise UserError(f"--vocab-size {vocab_size}: a {kind} tokenizer needs at least {least} tokens "
                        f"({'256 bytes and ' if kind == 'bpe' else ''}{len(SPECIAL_TOKENS)} special tokens)")
    source = open_source(DataConfig(source="text", path=data, text_column=text_column), data_path=data)
    sample = (f"up to {max_bytes / 1e6:.0f} MB spread over" if max_bytes and (source.total_bytes or 0) > max_bytes
              else "all of")
    log(f"training a {kind} tokenizer of {vocab_size} tokens on {sample} {source.description}")
    tokenizer, trainer = _new_tokenizer(kind, vocab_size, min_frequency, show_progress)
    _train_interruptibly(tokenizer, corpus_texts(source, max_bytes), trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserError(f"--data {data}: the tokenizer learned nothing from it (is it text?)")
    _save(tokenizer, target)
    trained = TextTokenizer((target / TOKENIZER_FILE).read_bytes(), str(target / TOKENIZER_FILE))
    log(f"wrote {target / TOKENIZER_FILE}: {trained.vocabulary.size} tokens, sha256 {trained.sha256[:16]}...; "
        f"set data.tokenizer: {target} in the run config")
    return trained
