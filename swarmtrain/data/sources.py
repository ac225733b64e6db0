"""Corpus sources, cut into shards that can each be read on their own without reading the others.

A source plans its shards from metadata only (file sizes, Arrow row counts, a streaming dataset's
files): planning never reads the text, so it costs the same at 100 MB and at 100 GB. A shard is
read as a sequence of segments (a few KB of text, cut at line ends, or one dataset row each);
a reader can start at any segment, which is how a restarted peer resumes inside a shard.

- TextFiles: local text files (and the stdlib's .py files), seen as one stream of bytes cut into
  byte ranges at line ends, so one 50 GB file shards as well as a million small ones (the `datasets`
  text loader shards by file only). A document is a file.
- ArrowRows: a dataset written by `save_to_disk` (memory-mapped Arrow): shards are row ranges, and
  each is opened on its own, so pages read for one shard are unmapped before the next (a mapping
  held across a pass grows the peer's resident memory by the corpus size). A document is a row.
- StreamingRows: a hub dataset, or a local directory of data files (parquet, json, csv, ...),
  read with `datasets.load_dataset(..., streaming=True)`: a shard is one of its files. A document is a row.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np

from swarmtrain.errors import UserError

SEGMENT_BYTES = 16 * 1024  # text read and tokenized at a time; also what held-out costs a shard
ALIGN_WINDOW = 64 * 1024  # how far a shard boundary looks for a line end before cutting mid-line
MIN_SHARD_BLOCKS = 64  # a shard holds at least this many blocks' worth of bytes (leftovers are dropped per shard)


@dataclass
class Segment:
    """A piece of a shard's text, the unit of reading, tokenizing and resuming.

    :param content: the text (bytes from text files, str from datasets)
    :param ends_document: whether a document (a file, a row) ends with it: the tokenizer's
        end-of-text token follows
    """

    content: Union[str, bytes]
    ends_document: bool


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def shard_bytes_for(total_bytes: int, config) -> int:
    """Shards of data.shard_bytes, but at least data.num_shards of them for a small corpus, and never
    smaller than MIN_SHARD_BLOCKS blocks' worth of bytes."""
    wanted = min(config.shard_bytes, math.ceil(total_bytes / config.num_shards))
    return max(wanted, MIN_SHARD_BLOCKS * config.seq_len)


class FileList:
    """Paths kept as one blob of bytes and an offsets array: ~the path's length in memory per file
    (a list of Path objects costs ~0.5 KB each: 1.5 GB for a corpus of 3 million small files).

    :param root: the directory the names are relative to, or None for absolute names
    :param names: the file names, in the corpus's order
    """

    def __init__(self, root: Optional[Path], names: List[str]):
        self.root = root
        encoded = [name.encode(errors="surrogateescape") for name in names]
        self.blob = b"".join(encoded)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def name(self, index: int) -> str:
        return self.blob[self.offsets[index] : self.offsets[index + 1]].decode(errors="surrogateescape")

    def __getitem__(self, index: int) -> str:
        name = self.name(index)
        return os.path.join(self.root, name) if self.root is not None else name

    def truncate(self, count: int) -> None:
        self.offsets = self.offsets[: count + 1]
        self.blob = self.blob[: int(self.offsets[-1])]


class TextFiles:
    """Files seen as one byte stream (in name order), cut into shards of ``shard_bytes`` at line ends.

    :param files: the files (names relative to the corpus root: what every peer agrees on)
    :param description: one line saying where the files are
    :param config: the run's DataConfig (shard sizes, seq_len)
    """

    def __init__(self, files: FileList, description: str, config):
        sizes = np.fromiter((os.stat(files[i]).st_size for i in range(len(files))), dtype=np.int64, count=len(files))
        if config.max_bytes is not None:  # whole files, up to and including the one that crosses the cap
            keep = int(np.searchsorted(np.cumsum(sizes), config.max_bytes, side="left")) + 1
            if keep < len(files):
                files.truncate(keep)
                sizes = sizes[:keep]
        self.files, self.sizes = files, sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total_bytes = int(self.starts[-1])
        self.shard_bytes = shard_bytes_for(self.total_bytes, config) if self.total_bytes else 1
        self.num_units = math.ceil(self.total_bytes / self.shard_bytes)
        self.fingerprint = _digest("text", self.shard_bytes, hashlib.sha256(files.blob).hexdigest(),
                                   hashlib.sha256(files.offsets.tobytes() + sizes.tobytes()).hexdigest())
        self.description = f"{description} ({self.total_bytes / 1e6:.1f} MB, {self.num_units} shards)"

    def _file_at(self, offset: int) -> int:
        return int(np.searchsorted(self.starts, offset, side="right")) - 1

    def _align(self, offset: int) -> int:
        """The first line start at or after ``offset``; both shards around a boundary agree on it."""
        if offset >= self.total_bytes:
            return self.total_bytes
        index = self._file_at(offset)
        inside = offset - int(self.starts[index])
        if inside == 0:
            return offset
        with open(self.files[index], "rb") as handle:
            handle.seek(inside - 1)
            window = handle.read(ALIGN_WINDOW)
        newline = window.find(b"\n")
        if newline >= 0:
            return offset + newline
        return int(self.starts[index + 1]) if len(window) < ALIGN_WINDOW else offset

    def read(self, unit: int, start: int = 0) -> Iterator[Segment]:
        begin = self._align(unit * self.shard_bytes)
        end = self._align(min((unit + 1) * self.shard_bytes, self.total_bytes))
        index = 0
        for file in range(self._file_at(begin), len(self.files)) if begin < end else ():
            if self.starts[file] >= end:
                break
            low = max(begin, int(self.starts[file])) - int(self.starts[file])
            high = min(end, int(self.starts[file + 1])) - int(self.starts[file])
            for content, ends_file in _file_segments(self.files[file], low, high, int(self.sizes[file])):
                if index >= start:
                    yield Segment(content, ends_file)
                index += 1


def _file_segments(path: Path, low: int, high: int, size: int) -> Iterator[tuple]:
    """Bytes [low, high) of a file in pieces of at most SEGMENT_BYTES, cut after a newline when one is near."""
    with open(path, "rb") as handle:
        handle.seek(low)
        position = low
        while position < high:
            content = handle.read(min(SEGMENT_BYTES, high - position))
            if not content:  # the file shrank since it was planned
                return
            if position + len(content) < high:
                cut = content.rfind(b"\n")
                if cut >= 0:
                    content = content[: cut + 1]
                    handle.seek(position + len(content))
            position += len(content)
            yield content, position >= high and high == size


def _walk(root: Path, keep=lambda name: True) -> List[str]:
    """File names under ``root`` relative to it, sorted (hidden files left out), as plain strings."""
    names: List[str] = []
    for directory, _, files in os.walk(root):
        prefix = os.path.relpath(directory, root)
        prefix = "" if prefix == "." else prefix + os.sep
        names.extend(prefix + name for name in files if not name.startswith(".") and keep(prefix + name))
    names.sort()
    return names


def _text_files(path: str, field: str) -> FileList:
    candidate = Path(path).expanduser()
    if candidate.is_file():  # (by its name alone: peers holding it elsewhere agree on the shards)
        return FileList(candidate.parent, [candidate.name])
    if candidate.is_dir():
        return FileList(candidate, _walk(candidate))
    names = sorted(p for p in glob.glob(str(candidate), recursive=True) if os.path.isfile(p))
    if not names:
        raise UserError(f"{field} {path}: no such file or directory (and no file matches it as a glob); give "
                        f"a text file, a directory of them or a pattern like 'corpus/*.txt'")
    return FileList(None, names)


def stdlib_source(config) -> TextFiles:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = _walk(root, keep=lambda name: name.endswith(".py") and "site-packages" not in name.split(os.sep))
    return TextFiles(FileList(root, names), f"Python stdlib sources in {root}", config)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _check_text_column(column_names, column: str, where: str, field: str) -> None:
    if column_names is not None and column not in column_names:
        raise UserError(f"{field} {where}: the dataset has no column {column!r} (it has "
                        f"{', '.join(column_names)}); set data.text_column to the one holding the text")


class ArrowRows:
    """Rows of a `save_to_disk` dataset, in shards of consecutive rows.

    :param path: the directory save_to_disk wrote (a Dataset, or a DatasetDict: data.split is read)
    :param config: the run's DataConfig
    :param field: the config field or flag that named the path, for messages
    """

    def __init__(self, path: Path, config, field: str):
        self.path, self.column, self.split = path, config.text_column, config.split
        dataset = self._open()
        _check_text_column(dataset.column_names, self.column, str(path), field)
        rows = len(dataset)
        text_bytes = dataset.data.column(self.column).nbytes  # from the Arrow buffers' sizes: nothing is read
        bytes_per_row = max(1.0, text_bytes / max(rows, 1))
        if config.max_bytes is not None:
            rows = min(rows, math.ceil(config.max_bytes / bytes_per_row))
        self.rows, self.total_bytes = rows, int(bytes_per_row * rows)
        self.rows_per_unit = max(1, round(shard_bytes_for(self.total_bytes, config) / bytes_per_row)) if rows else 1
        self.num_units = math.ceil(rows / self.rows_per_unit)
        self.fingerprint = _digest("arrow", rows, self.rows_per_unit, self.column, text_bytes)
        self.description = (f"dataset {path} ({rows} rows, {self.total_bytes / 1e6:.1f} MB of text, "
                            f"{self.num_units} shards)")

    def _open(self):
        import datasets

        try:
            dataset = datasets.load_from_disk(str(self.path))
        except Exception as error:
            raise UserError(f"dataset {self.path}: cannot be loaded ({_one_line(error)})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if self.split not in dataset:
                raise UserError(f"dataset {self.path} has no split {self.split!r} (it has {', '.join(dataset)}); "
                                f"set data.split")
            dataset = dataset[self.split]
        return dataset

    def read(self, unit: int, start: int = 0) -> Iterator[Segment]:
        dataset = self._open().select_columns([self.column])  # mapped for this shard only (see the module doc)
        low = unit * self.rows_per_unit + start
        high = min((unit + 1) * self.rows_per_unit, self.rows)
        for batch_start in range(low, high, 256):
            for text in dataset[batch_start : min(batch_start + 256, high)][self.column]:
                yield Segment(text or "", True)


class StreamingRows:
    """A dataset read with ``datasets.load_dataset(path, streaming=True)``: each of its files is a shard.

    :param path: a hub name (online) or a local directory of data files
    :param config: the run's DataConfig
    :param field: the config field or flag that named the path, for messages
    """

    def __init__(self, path: str, config, field: str):
        import datasets

        self.column = config.text_column
        try:
            self.dataset = datasets.load_dataset(path, split=config.split, streaming=True)
        except Exception as error:
            raise UserError(f"{field} {path}: cannot open it as a dataset ({_one_line(error)}); give text files, a "
                            f"save_to_disk directory, a directory of data files or a hub name (online)") from None
        _check_text_column(self.dataset.column_names, self.column, path, field)
        self.num_units = self.dataset.num_shards
        info = self.dataset.info
        self.total_bytes = int(info.dataset_size or info.download_size or 0) or None
        self.fingerprint = _digest("streaming", path, config.split, self.num_units, self.column)
        self.description = f"streaming dataset {path} ({self.num_units} file shard(s))"
        self._field, self._path = field, path

    def read(self, unit: int, start: int = 0) -> Iterator[Segment]:
        shard = self.dataset.shard(num_shards=self.num_units, index=unit, contiguous=True)
        for row in shard.skip(start) if start else shard:
            if self.column not in row:
                _check_text_column(list(row), self.column, self._path, self._field)
            yield Segment(row[self.column] or "", True)


Source = Union[TextFiles, ArrowRows, StreamingRows]


def open_source(config, data_path: Optional[str] = None) -> Source:
    """The run's source (``data.source`` / ``data.path``), or a peer's own ``--data`` path: text files,
    or a save_to_disk directory."""
    if data_path is None and config.source == "stdlib":
        source = stdlib_source(config)
    else:
        field = "--data" if data_path is not None else "data.path"
        path = data_path if data_path is not None else config.path
        local = Path(path).expanduser()
        if is_saved_dataset(local):
            source = ArrowRows(local, config, field)
        elif data_path is None and config.source == "datasets":
            if not local.exists() and (path.startswith((".", "/", "~")) or not _hub_like(path)):
                raise UserError(f"data.path {path}: no such file or directory; give a save_to_disk directory, a "
                                f"directory of data files or a hub name")
            source = StreamingRows(str(local) if local.exists() else path, config, field)
        else:
            source = TextFiles(_text_files(path, field), f"text from {path}", config)
    if source.num_units == 0 or source.total_bytes == 0:
        where = "the Python stdlib" if data_path is None and config.source == "stdlib" else f"{field} {path}"
        raise UserError(f"{where}: the corpus is empty (no text in it); point at the files or dataset holding your text")
    return source


def _hub_like(path: str) -> bool:
    parts = path.split("/")
    return 1 <= len(parts) <= 2 and all(parts)
