"""The run's tokenizer file through the DHT, so that a volunteer still needs only the join line.

The coordinator stores the file, compressed, as a manifest record and chunk records of at most
CHUNK_BYTES; a peer that knows the sha256 from the signed run config reads them back. (The chunks
are small because of hivemind, not libp2p: the DHT process reads its request pipe without blocking,
and a request above 16 KB, which multiprocessing writes in two parts, kills the DHT process with
"Resource temporarily unavailable". A 2 MB tokenizer.json compresses to ~0.6 MB: ~80 records.) Every chunk is checked against the manifest and the whole against the
sha256, and among several values under a key (other subkeys) the one that checks out is taken, so a
peer that stores rubbish under the same keys can delay a volunteer but never change its tokenizer.
The functions take any object with hivemind.DHT's ``store`` / ``get``.
"""
from __future__ import annotations

import hashlib
import time
import zlib
from typing import Any, Iterable, List, Optional, Tuple

from swarmtrain.errors import UserError

CHUNK_BYTES = 8 * 1024  # a store request stays well below 16 KB (see above)


def tokenizer_key(run_id: str, sha256: str) -> str:
    return f"{run_id}_tokenizer_{sha256[:16]}"


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def split_into_records(content: bytes, chunk_bytes: int = CHUNK_BYTES) -> Tuple[dict, List[bytes]]:
    """(manifest, chunks): the zlib-compressed file cut into chunks; the manifest lists their hashes."""
    packed = zlib.compress(content, 9)
    chunks = [packed[start : start + chunk_bytes] for start in range(0, len(packed), chunk_bytes)] or [b""]
    manifest = {"sha256": _sha256(content), "size": len(content), "encoding": "zlib",
                "chunks": [_sha256(chunk) for chunk in chunks]}
    return manifest, chunks


def assemble(manifest: dict, chunks: List[bytes]) -> bytes:
    """The file back from its chunks; ValueError unless every chunk and the whole match the manifest."""
    if len(chunks) != len(manifest["chunks"]):
        raise ValueError(f"{len(chunks)} chunks for a manifest of {len(manifest['chunks'])}")
    for index, (chunk, expected) in enumerate(zip(chunks, manifest["chunks"])):
        if _sha256(chunk) != expected:
            raise ValueError(f"chunk {index} does not match its hash")
    content = zlib.decompress(b"".join(chunks)) if manifest.get("encoding") == "zlib" else b"".join(chunks)
    if len(content) != manifest["size"] or _sha256(content) != manifest["sha256"]:
        raise ValueError("the reassembled file does not match its sha256")
    return content


def publish_tokenizer(dht, run_id: str, content: bytes, expiration_time: float, subkey: Optional[Any] = None) -> bool:
    """Store the file under the run's keys; re-publish before ``expiration_time`` (with the run config).
    ``subkey``: the coordinator's signature validator's ``local_public_key``, so that nobody else can
    replace these records (others can only add values next to them, which ``fetch_tokenizer`` skips)."""
    manifest, chunks = split_into_records(content)
    key = tokenizer_key(run_id, manifest["sha256"])
    stored = [dht.store(f"{key}_{index}", chunk, expiration_time, subkey=subkey) for index, chunk in enumerate(chunks)]
    stored.append(dht.store(key, manifest, expiration_time, subkey=subkey))  # last: a manifest means all chunks are there
    return all(bool(ok) for ok in stored)


def _values(found) -> Iterable[Any]:
    """The values of a dht.get result: one plain value, or one per subkey."""
    if found is None:
        return []
    value = found.value
    if isinstance(value, dict) and all(hasattr(entry, "value") for entry in value.values()):
        return [entry.value for entry in value.values()]
    return [value]


def _try_manifest(dht, key: str, manifest: dict) -> Optional[bytes]:
    chunks = []
    for index, expected in enumerate(manifest["chunks"]):
        found = [value for value in _values(dht.get(f"{key}_{index}", latest=True))
                 if isinstance(value, bytes) and _sha256(value) == expected]
        if not found:
            return None
        chunks.append(found[0])
    try:
        return assemble(manifest, chunks)
    except (ValueError, zlib.error):
        return None


def fetch_tokenizer(dht, run_id: str, sha256: str, timeout: float = 60.0, poll_seconds: float = 1.0) -> bytes:
    """The run's tokenizer file from the swarm, verified against ``sha256`` (from the signed run config)."""
    key = tokenizer_key(run_id, sha256)
    deadline = time.monotonic() + timeout
    while True:
        for manifest in _values(dht.get(key, latest=True)):
            if isinstance(manifest, dict) and manifest.get("sha256") == sha256 and isinstance(manifest.get("chunks"), list):
                content = _try_manifest(dht, key, manifest)
                if content is not None:
                    return content
        if time.monotonic() > deadline:
            raise UserError(f"the swarm has no verifiable copy of the run's tokenizer (sha256 {sha256[:16]}...) after "
                            f"{timeout:.0f} s; the coordinator publishes it: check that it runs, or copy the "
                            f"tokenizer.json to this machine and point data.tokenizer at it")
        time.sleep(poll_seconds)
