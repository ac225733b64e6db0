"""The run's tokenizer through a real hivemind DHT: chunked, reassembled, verified."""
import os

import pytest

from swarmtrain.data.transfer import (CHUNK_BYTES, assemble, fetch_tokenizer, publish_tokenizer, split_into_records,
                                      tokenizer_key)
from swarmtrain.errors import UserError


def _content(size=120_000):
    # incompressible enough to need several chunks after zlib
    return os.urandom(size // 2) + b'{"model": "BPE"}' * (size // 32)


def test_records_round_trip_and_reject_tampering():
    content = _content()
    manifest, chunks = split_into_records(content)
    assert len(chunks) > 1 and all(len(chunk) <= CHUNK_BYTES for chunk in chunks)
    assert assemble(manifest, chunks) == content
    broken = list(chunks)
    broken[1] = broken[1][:-1] + bytes([broken[1][-1] ^ 1])
    with pytest.raises(ValueError, match="chunk 1"):
        assemble(manifest, broken)
    with pytest.raises(ValueError):
        assemble(manifest, chunks[:-1])


@pytest.fixture
def two_dhts():
    import hivemind

    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False, start=True)
    second = hivemind.DHT(initial_peers=[str(a) for a in first.get_visible_maddrs()],
                          host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False, start=True)
    try:
        yield first, second
    finally:
        second.shutdown()
        first.shutdown()


def test_a_peer_fetches_the_tokenizer_another_published(two_dhts):
    from hivemind.utils import get_dht_time

    coordinator, volunteer = two_dhts
    content = _content()
    manifest, _ = split_into_records(content)
    assert publish_tokenizer(coordinator, "run", content, get_dht_time() + 600, subkey=b"coordinator")
    # a stranger adds rubbish next to the real records: it is skipped, not taken
    key = tokenizer_key("run", manifest["sha256"])
    coordinator.store(f"{key}_0", b"rubbish", get_dht_time() + 900, subkey=b"stranger")
    coordinator.store(key, {**manifest, "chunks": ["0" * 64] * len(manifest["chunks"])}, get_dht_time() + 900,
                      subkey=b"stranger")
    assert fetch_tokenizer(volunteer, "run", manifest["sha256"], timeout=30) == content


def test_no_copy_in_the_swarm_is_one_line(two_dhts):
    from hivemind.utils import get_dht_time

    coordinator, volunteer = two_dhts
    content = _content(30_000)
    manifest, chunks = split_into_records(content)
    key = tokenizer_key("run", manifest["sha256"])
    coordinator.store(key, manifest, get_dht_time() + 600)  # a manifest whose chunk never arrived
    with pytest.raises(UserError) as error:
        fetch_tokenizer(volunteer, "run", manifest["sha256"], timeout=2, poll_seconds=0.5)
    assert "\n" not in error.value.message and "no verifiable copy of the run's tokenizer" in error.value.message
