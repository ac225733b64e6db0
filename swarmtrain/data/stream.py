"""Training data as a stream: shards read in a background thread, tokenized, packed into blocks.

How a peer reads the corpus (all of it decided from the corpus plan and peer IDs, with no messages):
- Held-out: the heads of a few shards picked by hash, the same on every peer; those shards' training
  starts after their heads. It costs reading a few segments, not a pass.
- Shards per peer: given the peers of the swarm (``set_peers``), each shard belongs to the peer with
  the highest hash of (peer, shard) (rendezvous hashing): the peers' shard sets are disjoint and cover
  the corpus, and a peer joining or leaving moves only its own share. A peer reads its shards in an
  order seeded by its peer ID and the pass; when it has read them all, it starts the next pass.
- Shuffling: blocks are drawn at random from OPEN_SHARDS shards at a time, each shuffled by chunks of
  CHUNK_BLOCKS blocks. Memory is bounded by those chunks and the queue, never by the corpus.
- Position: which shards this pass are done, and for each open shard the chunk and how many of its
  blocks were delivered. A restarted peer re-reads only the chunks that were open and skips what it
  had delivered, so it neither replays nor skips.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import math
import queue
import threading
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from swarmtrain.errors import UserError

logger = logging.getLogger("swarmtrain.data")

OPEN_SHARDS = 8  # shards read at once: a batch mixes blocks from up to this many places in the corpus
CHUNK_BLOCKS = 2048  # blocks shuffled together within a shard (longer shards are read chunk by chunk)
EMIT_BLOCKS = 4  # blocks handed over at a time
QUEUE_ITEMS = 512  # up to QUEUE_ITEMS * EMIT_BLOCKS blocks ready ahead of the model
TOKENIZE_BYTES = 1 << 20  # text per tokenizer call (it tokenizes a call's pieces in parallel)
HELDOUT_SHARDS = 8  # held-out blocks come from the heads of this many shards (fewer in a small corpus)
POSITION_VERSION = 1


def loader_memory_bytes(seq_len: int, heldout_blocks: int) -> int:
    """An upper bound of what a peer's data holds in memory, whatever the corpus's size: the current
    chunks of OPEN_SHARDS shards and the queue ahead of the model (tokens as 4 bytes at most), the
    held-out blocks, and the text (and its token ids) of one tokenizer call per open shard."""
    blocks = OPEN_SHARDS * CHUNK_BLOCKS + QUEUE_ITEMS * EMIT_BLOCKS + heldout_blocks
    return blocks * seq_len * 4 + OPEN_SHARDS * TOKENIZE_BYTES * 2


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (wrapping arithmetic): a fast, well-spread hash."""
    values = values.astype(np.uint64, copy=True)
    values ^= values >> np.uint64(30)
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    values ^= values >> np.uint64(31)
    return values


def hash64(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def peer_hash(peer_id: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(bytes(peer_id), digest_size=8).digest(), "little")


def shard_hashes(source) -> np.ndarray:
    return _mix(np.arange(source.num_units, dtype=np.uint64) ^ np.uint64(hash64("shards", source.fingerprint)))


def shard_owners(hashes: np.ndarray, peers: np.ndarray) -> np.ndarray:
    """Index into ``peers`` of each shard's owner: the peer with the highest hash of (peer, shard)."""
    best = np.zeros(len(hashes), dtype=np.uint64)
    owner = np.zeros(len(hashes), dtype=np.int64)
    for index, peer in enumerate(peers):
        score = _mix(hashes ^ np.uint64(peer))
        better = score > best
        best[better], owner[better] = score[better], index
    return owner


def _tokenized(tokenizer, segments, separator: int, limit_bytes: int) -> Tuple[List[np.ndarray], int, int]:
    """Tokenize segments from an iterator, up to ``limit_bytes`` of text: (token arrays, segments, bytes)."""
    batch, size = [], 0
    for segment in segments:
        batch.append(segment)
        size += len(segment.content)
        if size >= limit_bytes:
            break
    pieces: List[np.ndarray] = []
    for segment, ids in zip(batch, tokenizer.encode([s.content for s in batch]) if batch else ()):
        pieces.append(ids)
        if segment.ends_document:
            pieces.append(np.array([separator], dtype=ids.dtype))
    return pieces, len(batch), size


@dataclass
class Heldout:
    """The held-out blocks, and where training starts in the shards they came from.

    :param blocks: [n, seq_len] token ids
    :param start_segments: for each shard the held-out read from, the segment its training starts at
    :param used_up: shards the held-out read to their end: not trained on
    :param tokens_per_byte: measured on the held-out text (for estimates of the corpus's blocks)
    """

    blocks: np.ndarray
    start_segments: Dict[int, int]
    used_up: List[int]
    tokens_per_byte: float


def read_heldout(source, tokenizer, seq_len: int, wanted: int) -> Heldout:
    """The first blocks of a few shards picked by hash (the same on every peer), segment by segment."""
    order = np.argsort(_mix(shard_hashes(source) ^ np.uint64(hash64("held-out"))), kind="stable")
    num_shards = min(HELDOUT_SHARDS, max(1, source.num_units // 8))
    per_shard, most = math.ceil(wanted / num_shards), max(1, source.num_units // 2)
    separator = tokenizer.vocabulary.separator_id
    blocks, start_segments, used_up, tokens, size = [], {}, [], 0, 0
    for unit in order[:most].tolist():
        need = min(per_shard, wanted - sum(len(b) for b in blocks))
        if need <= 0:
            break
        segments, pieces, consumed, length = source.read(unit), [], 0, 0
        while length < need * seq_len:
            new, count, read = _tokenized(tokenizer, segments, separator, 1)  # one segment at a time
            if count == 0:
                used_up.append(unit)
                break
            pieces += new
            consumed, size, length = consumed + count, size + read, length + sum(len(p) for p in new)
        segments.close()  # (an Arrow shard stays mapped while its reader lives)
        tokens += length
        start_segments[unit] = consumed
        if length >= seq_len:
            flat = np.concatenate(pieces)
            blocks.append(flat[: (length // seq_len) * seq_len].reshape(-1, seq_len)[:need])
    if not blocks or len(used_up) >= source.num_units:
        raise UserError(f"{source.description}: too small for data.seq_len={seq_len} (not even one held-out block "
                        f"and some training text); lower data.seq_len or give more text")
    return Heldout(np.concatenate(blocks), start_segments, used_up, tokens / max(size, 1))


class _ShardReader:
    """One open shard: its segments from a start, tokenized and packed one chunk at a time."""

    def __init__(self, source, tokenizer, unit: int, start_segment: int, seq_len: int, seed: int):
        self.unit, self.tokenizer, self.seq_len, self.seed = unit, tokenizer, seq_len, seed
        self.segments = source.read(unit, start_segment)
        self.next_segment = self.chunk_start = start_segment
        self.blocks = np.zeros((0, seq_len), dtype=tokenizer.dtype)
        self.emitted = 0

    @property
    def remaining(self) -> int:
        return len(self.blocks) - self.emitted

    def load_chunk(self) -> bool:
        """Tokenize the next chunk (at least CHUNK_BLOCKS blocks of tokens, ending at a segment end) and
        shuffle its blocks; False when the shard has nothing left."""
        start, pieces, length = self.next_segment, [], 0
        separator = self.tokenizer.vocabulary.separator_id
        while length < CHUNK_BLOCKS * self.seq_len:
            new, count, _ = _tokenized(self.tokenizer, self.segments, separator, TOKENIZE_BYTES)
            if count == 0:
                break
            pieces += new
            self.next_segment += count
            length += sum(len(p) for p in new)
        if self.next_segment == start:
            return False
        usable = (length // self.seq_len) * self.seq_len
        blocks = np.concatenate(pieces)[:usable].reshape(-1, self.seq_len) if usable else self.blocks[:0]
        order = np.random.default_rng([self.seed, self.unit, start]).permutation(len(blocks))
        self.blocks, self.chunk_start, self.emitted = blocks[order], start, 0
        return True

    def advance(self) -> bool:
        """Load chunks until one has blocks to give; False when the shard is done."""
        while self.remaining <= 0:
            if not self.load_chunk():
                return False
        return True

    def take(self, count: int) -> np.ndarray:
        taken = self.blocks[self.emitted : self.emitted + count]
        self.emitted += len(taken)
        return taken


@dataclass
class Position:
    """Where a peer is in the corpus (see the module doc); ``token()`` is small and JSON-able.

    :param fingerprint: the corpus plan's (a token of another plan is not used)
    :param pass_number: passes this peer has completed over its shards
    :param done: bool per shard: finished in this pass
    :param open: shard -> (its current chunk's first segment, blocks of that chunk delivered)
    """

    fingerprint: str
    pass_number: int
    done: np.ndarray
    open: Dict[int, Tuple[int, int]] = field(default_factory=dict)

    def token(self) -> dict:
        bits = base64.b64encode(zlib.compress(np.packbits(self.done).tobytes())).decode()
        return {"version": POSITION_VERSION, "corpus": self.fingerprint[:16], "pass": self.pass_number,
                "done": bits, "open": [[unit, chunk, taken] for unit, (chunk, taken) in self.open.items()]}

    @classmethod
    def start(cls, fingerprint: str, num_units: int, token: Optional[dict]) -> Tuple["Position", Optional[str]]:
        """The position a token describes, or the start of the corpus and why the token was not used."""
        fresh = cls(fingerprint, 0, np.zeros(num_units, dtype=bool))
        if token is None:
            return fresh, None
        try:
            if token.get("version") != POSITION_VERSION or token.get("corpus") != fingerprint[:16]:
                return fresh, "the saved data position is of another corpus or shard plan; starting from its beginning"
            done = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(token["done"])), dtype=np.uint8))
            position = cls(fingerprint, int(token["pass"]), done[:num_units].astype(bool),
                           {int(u): (int(c), int(t)) for u, c, t in token["open"]})
        except (KeyError, TypeError, ValueError, zlib.error) as error:
            return fresh, f"the saved data position is unreadable ({error}); starting from the corpus's beginning"
        return position, None


@dataclass
class _Blocks:
    blocks: np.ndarray
    unit: int
    chunk_start: int
    emitted_before: int
    pass_number: int


@dataclass
class _ShardDone:
    unit: int
    pass_number: int


@dataclass
class _Failed:
    error: BaseException


_END = object()


class _Producer(threading.Thread):
    """The background reader. A daemon thread: it never keeps the process alive, and setting
    ``stopping`` ends it within one tokenizer call (its waits on a full queue last 0.2 s at most)."""

    def __init__(self, source, tokenizer, seq_len: int, heldout: Heldout, peer_id: bytes, position: Position,
                 max_passes: Optional[int], items: queue.Queue):
        super().__init__(daemon=True, name="swarmtrain-data")
        self.source, self.tokenizer, self.seq_len, self.items = source, tokenizer, seq_len, items
        self.seed, self.max_passes, self.start_position = peer_hash(peer_id), max_passes, position
        self.hashes = shard_hashes(source)
        self.trainable = np.ones(source.num_units, dtype=bool)
        self.trainable[heldout.used_up] = False
        self.start_segments = heldout.start_segments
        self.stopping = threading.Event()
        self.space = threading.Event()  # set by the training thread when the queue is half empty
        self._peers: Optional[np.ndarray] = None
        self._peers_version = 0
        self._lock = threading.Lock()
        self._owned_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self._order_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self._none_left: Tuple[int, int] = (-1, -1)

    def set_peers(self, hashes: np.ndarray) -> None:
        with self._lock:
            self._peers, self._peers_version = hashes, self._peers_version + 1

    def run(self) -> None:
        try:
            self._produce()
        except BaseException as error:  # handed to the training thread, which raises it there
            self._put(_Failed(error))

    def _put(self, item) -> bool:
        """Hand an item over; on a full queue, sleep until the model has taken half of it. Refilling in
        bursts keeps this thread off the GIL while the training thread takes its batches."""
        while not self.stopping.is_set():
            if self.items.full():
                self.space.clear()
                if self.items.qsize() > self.items.maxsize // 2:  # (the training thread sets it below half)
                    self.space.wait(0.2)
                continue
            try:
                self.items.put_nowait(item)
                return True
            except queue.Full:
                continue
        return False

    def _owned(self) -> Tuple[int, np.ndarray]:
        with self._lock:
            peers, version = self._peers, self._peers_version
        if self._owned_cache[0] != version:
            owned = self.trainable.copy()
            if peers is not None and len(peers) > 1:
                owners = shard_owners(self.hashes, peers)
                mine = owned & (peers[owners] == np.uint64(self.seed))
                owned = mine if mine.any() else owned  # more peers than shards: read them all
            self._owned_cache = (version, owned)
        return self._owned_cache

    def _order(self, pass_number: int) -> np.ndarray:
        if self._order_cache[0] != pass_number:
            keys = _mix(self.hashes ^ np.uint64(hash64("order", self.seed, pass_number)))
            self._order_cache = (pass_number, np.argsort(keys, kind="stable"))
        return self._order_cache[1]

    def _next_unit(self, pass_number: int, done: np.ndarray, readers: List[_ShardReader]) -> Optional[int]:
        version, owned = self._owned()
        if self._none_left == (pass_number, version):  # done only grows within a pass: no need to look again
            return None
        eligible = owned & ~done
        eligible[[reader.unit for reader in readers]] = False
        order = self._order(pass_number)
        candidates = order[eligible[order]]
        if len(candidates) == 0:  # (a shard open now is done once closed: it never becomes eligible again)
            self._none_left = (pass_number, version)
        return int(candidates[0]) if len(candidates) else None

    def _open(self, unit: int, start: int, emitted: int, pass_number: int) -> Optional[_ShardReader]:
        reader = _ShardReader(self.source, self.tokenizer, unit, start, self.seq_len, hash64(self.seed, pass_number))
        if reader.load_chunk():
            reader.emitted = min(emitted, len(reader.blocks))
            if reader.advance():
                return reader
        self._put(_ShardDone(unit, pass_number))
        return None

    def _produce(self) -> None:
        position = self.start_position
        pass_number, done = position.pass_number, position.done.copy()
        readers = []
        for unit, (chunk_start, emitted) in position.open.items():  # the shards open when the position was taken
            reader = self._open(unit, chunk_start, emitted, pass_number)
            readers += [reader] if reader else []
            done[unit] = reader is None
        rng = np.random.default_rng([self.seed, pass_number, int(done.sum())])
        delivered, whole_pass = 0, not position.open and not done.any()
        while not self.stopping.is_set():
            unit = None
            if len(readers) < OPEN_SHARDS:  # at most one new shard per block handed over: no long stall
                unit = self._next_unit(pass_number, done, readers)
                if unit is not None:
                    reader = self._open(unit, self.start_segments.get(unit, 0), 0, pass_number)
                    readers += [reader] if reader else []
                    done[unit] = reader is None
            if not readers and unit is not None:
                continue  # that shard had nothing left (the held-out took it): the pass goes on with the next
            if not readers:
                if whole_pass and delivered == 0:
                    raise UserError(f"{self.source.description}: a whole pass gave no training block of "
                                    f"{self.seq_len} tokens; lower data.seq_len or give more text")
                pass_number, delivered, whole_pass = pass_number + 1, 0, True
                done[:] = False
                if self.max_passes is not None and pass_number >= self.max_passes:
                    self._put(_END)
                    return
                continue
            reader = readers[int(rng.integers(len(readers)))]
            blocks = reader.take(EMIT_BLOCKS)
            delivered += len(blocks)
            self._put(_Blocks(blocks, reader.unit, reader.chunk_start, reader.emitted - len(blocks), pass_number))
            if not reader.advance():
                readers.remove(reader)
                done[reader.unit] = True
                self._put(_ShardDone(reader.unit, pass_number))


class TrainingData:
    """A peer's training data: endless batches of its shards, the run's held-out blocks, its position.

    :param source: the corpus (swarmtrain.data.sources)
    :param tokenizer: the run's tokenizer (swarmtrain.data.tokenizer)
    :param seq_len: tokens per block
    :param heldout: the held-out blocks and where training starts in their shards (``read_heldout``)
    :param peer_id: this peer's ID (bytes): seeds its shard order and its share of the shards
    :param position: where to start (``Position.start``)
    :param max_passes: stop after this many passes over this peer's shards (None: never)
    :param peers: the swarm's training peers' IDs, if known (see ``set_peers``)
    """

    def __init__(self, source, tokenizer, seq_len: int, heldout: Heldout, peer_id: bytes, position: Position,
                 max_passes: Optional[int] = None, peers: Optional[Iterable[bytes]] = None):
        self.source, self.tokenizer, self.seq_len, self.peer_id = source, tokenizer, seq_len, bytes(peer_id)
        self.vocabulary = tokenizer.vocabulary
        self.heldout = torch.from_numpy(heldout.blocks.astype(np.int64))
        bytes_per_block = seq_len / max(heldout.tokens_per_byte, 1e-9)
        total = source.total_bytes
        self.estimated_blocks = int(total / bytes_per_block) if total else None
        self.description = (f"{source.description}, tokenizer {tokenizer.name}: {len(self.heldout)} held-out "
                            f"blocks of {seq_len} tokens" + (f", about {self.estimated_blocks} training blocks"
                                                             if self.estimated_blocks else ""))
        self._position = Position(position.fingerprint, position.pass_number, position.done.copy(), dict(position.open))
        self._items: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self._producer = _Producer(source, tokenizer, seq_len, heldout, self.peer_id, position, max_passes, self._items)
        self._current: Optional[_Blocks] = None
        self._offset = 0
        if peers is not None:
            self.set_peers(peers)
        self._producer.start()

    def set_peers(self, peer_ids: Iterable[bytes]) -> None:
        """The swarm's training peers (this one included or not): from now on this peer reads only the
        shards it owns among them. Call it when the set changes; it takes effect at the next shard."""
        hashes = {peer_hash(p) for p in peer_ids} | {peer_hash(self.peer_id)}
        self._producer.set_peers(np.array(sorted(hashes), dtype=np.uint64))

    def position(self) -> dict:
        """Where the blocks delivered so far end: store it in the checkpoint, give it back to resume."""
        return self._position.token()

    def _next_item(self):
        while True:
            try:
                item = self._items.get(timeout=0.5)
                if self._items.qsize() <= QUEUE_ITEMS // 2:
                    self._producer.space.set()
                break
            except queue.Empty:
                if not self._producer.is_alive():
                    raise RuntimeError("the data reader thread stopped") from None
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item

    def _record(self, item, taken: int) -> None:
        position = self._position
        if item.pass_number != position.pass_number:
            position.pass_number, position.done[:] = item.pass_number, False
        if isinstance(item, _ShardDone):
            position.open.pop(item.unit, None)
            position.done[item.unit] = True
        else:
            position.open[item.unit] = (item.chunk_start, item.emitted_before + taken)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Batches of ``batch_size`` blocks ([batch, seq_len] int64), endless unless max_passes was given.
        Call again with another size (e.g. after running out of memory): it goes on from the same place."""
        while True:
            rows, needed = [], batch_size
            while needed:
                if self._current is None:
                    item = self._next_item()
                    if item is _END:
                        return
                    if isinstance(item, _ShardDone):
                        self._record(item, 0)
                        continue
                    self._current, self._offset = item, 0
                taken = self._current.blocks[self._offset : self._offset + needed]
                rows.append(taken)
                self._offset += len(taken)
                needed -= len(taken)
                self._record(self._current, self._offset)
                if self._offset >= len(self._current.blocks):
                    self._current = None
            yield torch.from_numpy(np.concatenate(rows).astype(np.int64))

    def probe_batch(self, batch_size: int) -> torch.Tensor:
        """A batch of the right shape without touching the stream (the held-out blocks, repeated)."""
        repeats = math.ceil(batch_size / len(self.heldout))
        return self.heldout.repeat(repeats, 1)[:batch_size].clone()

    def close(self) -> None:
        self._producer.stopping.set()
        self._producer.space.set()
        while True:  # unblock a put in progress
            try:
                self._items.get_nowait()
            except queue.Empty:
                break
        if self._producer.is_alive() and threading.current_thread() is not self._producer:
            self._producer.join(timeout=5)

    def __enter__(self) -> "TrainingData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_training_data(config, data_path: Optional[str], peer_id: bytes, start_position: Optional[dict] = None,
                       tokenizer=None, max_passes: Optional[int] = None,
                       peers: Optional[Iterable[bytes]] = None) -> TrainingData:
    """Open the run's corpus (``config`` is its DataConfig) or a peer's own ``--data`` for this peer.

    ``tokenizer``: the run's (``resolve_tokenizer``); by default loaded from ``data.tokenizer`` here.
    ``start_position``: a ``TrainingData.position()`` saved earlier; one of another corpus is ignored
    with a warning. ``peers``: the swarm's training peers, if known (``TrainingData.set_peers``). Raises UserError (one line) for a missing, empty or unusable corpus."""
    from swarmtrain.data.sources import open_source
    from swarmtrain.data.tokenizer import check_tokenizer, load_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer)
    check_tokenizer(config, tokenizer)
    source = open_source(config, data_path)
    heldout = read_heldout(source, tokenizer, config.seq_len, config.heldout_blocks)
    position, note = Position.start(source.fingerprint, source.num_units, start_position)
    if note:
        logger.warning(note)
    return TrainingData(source, tokenizer, config.seq_len, heldout, peer_id, position, max_passes, peers)
