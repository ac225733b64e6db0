"""`swarmtrain tokenizer ...`: make the run's tokenizer from the organiser's corpus, and inspect one.

Registered in swarmtrain/cli/main.py; the work is done in swarmtrain/data (training.py, tokenizer.py).
"""
from __future__ import annotations

from typing import Optional

import click

from swarmtrain.cli.options import ParsedValue
from swarmtrain.units import parse_memory_size


def parse_text_size(text: str) -> Optional[int]:
    """A size such as 500MB, 2GB or 1GiB, or `all` (None: no limit)."""
    return None if str(text).strip().lower() == "all" else parse_memory_size(text)


TEXT_SIZE = ParsedValue("SIZE|all", parse_text_size, (int, type(None)))


@click.group("tokenizer")
def tokenizer() -> None:
    """Make and inspect the run's tokenizer (data.tokenizer in the run config)."""


@tokenizer.command("train")
@click.option("--data", required=True,
              help="The organiser's corpus: a text file, a directory of text files (searched recursively), a glob "
                   "such as 'corpus/*.txt', or a directory written by datasets' save_to_disk.")
@click.option("--vocab-size", type=click.IntRange(min=8), required=True,
              help="Tokens in the vocabulary, special tokens included (e.g. 32000 for a base-size model).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="A new directory to write tokenizer.json (and transformers' tokenizer_config.json) into.")
@click.option("--kind", type=click.Choice(["bpe", "unigram"]), default="bpe", show_default=True,
              help="bpe: byte-level BPE (GPT-2 / llama style; any text round-trips). unigram: SentencePiece's "
                   "unigram model (ALBERT / T5 style).")
@click.option("--text-column", default="text", show_default=True, help="For a saved dataset: the column with the text.")
@click.option("--max-bytes", type=TEXT_SIZE, default="1GB", show_default=True,
              help="Learn from at most this much text, taken from shards spread over the corpus; 'all' reads it all.")
@click.option("--min-frequency", type=click.IntRange(min=1), default=2, show_default=True,
              help="bpe: a pair must occur this often to be merged.")
def train(data, vocab_size, out, kind, text_column, max_bytes, min_frequency) -> None:
    """Train a tokenizer on your corpus, offline, and write it to a new directory.

    Then set `data.tokenizer: DIR` in the run config; the coordinator pins its sha256 in the config it
    publishes and serves the file to volunteers, who need nothing but the join line."""
    from swarmtrain.data.training import train_tokenizer

    train_tokenizer(data, vocab_size, out, kind=kind, text_column=text_column, max_bytes=max_bytes,
                    min_frequency=min_frequency, log=lambda line: click.echo(line, err=True))


@tokenizer.command("info")
@click.argument("spec")
def info(spec) -> None:
    """Show a tokenizer's sha256, vocabulary size and special tokens (SPEC: bytes, a tokenizer.json or a
    directory holding one)."""
    from swarmtrain.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(spec)
    vocabulary = loaded.vocabulary
    click.echo(f"tokenizer  {loaded.name}")
    click.echo(f"sha256     {loaded.sha256 or '-'}")
    click.echo(f"vocab size {vocabulary.size}")
    click.echo(f"ids        end of text {vocabulary.separator_id}, mask {vocabulary.mask_id}, pad {vocabulary.pad_id}, "
               f"begin of text {vocabulary.bos_id}")
