"""Peer records in a real DHT: signed per-owner subkeys and schema validation, on 127.0.0.1.

Each ``hivemind.DHT`` runs its node in its own forked child process, so the nodes below are separate
processes talking libp2p over loopback.
"""

import time

import pytest
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.monitoring.records import (
    PeerRecord,
    fetch_records,
    publish_record,
    record_validators,
    records_key,
)

RUN_ID = "recordstest"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]

pytestmark = pytest.mark.timeout(120)


def make_record(peer_id: str, **overrides) -> PeerRecord:
    fields = dict(
        peer_id=peer_id,
        role="trainer",
        step=5,
        epoch=1,
        loss=2.5,
        samples_per_second=12.0,
        samples_accumulated=64,
        bytes_sent=1000,
        bytes_received=2000,
        rounds_ok=3,
        rounds_failed=1,
        last_round_seconds=1.5,
        last_round_group_size=3,
        compression_density=0.01,
        leakage_dcor=None,
        device="cpu",
        client_mode=False,
        version="0.1.0",
    )
    fields.update(overrides)
    return PeerRecord.make(**fields)


class Node:
    """A DHT node with its own RSA identity and the run's record validators."""

    def __init__(self, initial_peers=None, with_validators=True):
        self.signer = RSASignatureValidator(RSAPrivateKey())
        validators = record_validators(RUN_ID, self.signer) if with_validators else []
        self.dht = DHT(
            initial_peers=initial_peers,
            host_maddrs=LOOPBACK,
            client_mode=False,
            record_validators=validators,
            start=True,
        )

    @property
    def owner(self) -> str:
        return self.signer.local_public_key.decode()

    def maddrs(self):
        return [str(addr) for addr in self.dht.get_visible_maddrs()]


def start_swarm(honest: int, hostile: int = 0):
    nodes = []
    try:
        first = Node()
        nodes.append(first)
        for _ in range(honest - 1):
            nodes.append(Node(initial_peers=first.maddrs()))
        # a hostile peer runs no validators at all, so its own storage accepts anything
        for _ in range(hostile):
            nodes.append(Node(initial_peers=first.maddrs(), with_validators=False))
    except BaseException:
        stop_swarm(nodes)
        raise
    return nodes


def stop_swarm(nodes):
    for node in nodes:
        node.dht.shutdown()


@pytest.fixture(scope="module")
def swarm():
    """Three honest nodes (alice, bob, carol), all running the run's validators."""
    nodes = start_swarm(honest=3)
    yield nodes
    stop_swarm(nodes)


def wait_for_records(node: Node, predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    records = {}
    while time.monotonic() < deadline:
        records = fetch_records(node.dht, RUN_ID)
        if predicate(records):
            return records
        time.sleep(0.2)
    return records


def test_honest_record_is_readable_by_a_third_node(swarm):
    alice, bob, carol = swarm
    record = make_record("alice")
    assert publish_record(alice.dht, RUN_ID, alice.signer, record, ttl=60)
    records = wait_for_records(carol, lambda found: alice.owner in found)
    assert records[alice.owner] == record
    assert bob.owner not in records


def test_peer_cannot_overwrite_another_peers_record(swarm):
    alice, bob, carol = swarm
    honest = make_record("alice", step=7)
    assert publish_record(alice.dht, RUN_ID, alice.signer, honest, ttl=60)
    forged = make_record("alice", step=999_999, loss=0.0, time=time.time() + 30)

    # bob runs the validators: his node cannot sign for alice's key, so every node refuses the store
    stored = bob.dht.store(
        records_key(RUN_ID), subkey=alice.signer.local_public_key, value=forged.dict(),
        expiration_time=time.time() + 120,
    )
    assert stored is False
    for reader in (carol, bob, alice):
        assert fetch_records(reader.dht, RUN_ID)[alice.owner] == honest


def test_peer_without_validators_cannot_overwrite_either():
    """mallory runs no validators: only her own storage takes a forgery; validating nodes refuse it
    when she pushes it and again when they read it back from her."""
    alice, carol, mallory = nodes = start_swarm(honest=2, hostile=1)
    try:
        honest = make_record("alice", step=7)
        assert publish_record(alice.dht, RUN_ID, alice.signer, honest, ttl=60)
        forged = make_record("alice", step=999_999, loss=0.0, time=time.time() + 30)
        mallory.dht.store(
            records_key(RUN_ID), subkey=alice.signer.local_public_key, value=forged.dict(),
            expiration_time=time.time() + 120,
        )
        # the forgery does exist in the DHT (mallory reads it back): it is the validators that stop it
        assert fetch_records(mallory.dht, RUN_ID)[alice.owner].step == 999_999
        for reader in (carol, alice):
            assert fetch_records(reader.dht, RUN_ID)[alice.owner] == honest, "a forgery replaced the owner's record"
    finally:
        stop_swarm(nodes)


def test_malformed_records_are_rejected(swarm):
    _, bob, carol = swarm
    good = make_record("bob").dict()
    wrong_type = dict(good, step=3.0)  # a float where the schema wants an int
    stringly = dict(good, loss="2.5")
    missing_field = {key: value for key, value in good.items() if key != "bytes_sent"}
    unknown_field = dict(good, gpu_temperature=80)
    unknown_role = dict(good, role="admin")
    for bad in (wrong_type, stringly, missing_field, unknown_field, unknown_role):
        # bob signs these properly (his own subkey): only the schema can refuse them
        stored = bob.dht.store(
            records_key(RUN_ID), subkey=bob.signer.local_public_key, value=bad,
            expiration_time=time.time() + 60,
        )
        assert stored is False, f"a malformed record was stored: {bad}"
    assert bob.owner not in fetch_records(carol.dht, RUN_ID)

    # and the same peer's well-formed record goes through
    assert publish_record(bob.dht, RUN_ID, bob.signer, make_record("bob"), ttl=60)
    records = wait_for_records(carol, lambda found: bob.owner in found)
    assert records[bob.owner].peer_id == "bob"


def test_fetch_drops_stale_records(swarm):
    alice, _, carol = swarm
    old = make_record("alice", time=time.time() - 300)
    assert publish_record(alice.dht, RUN_ID, alice.signer, old, ttl=60)
    records = fetch_records(carol.dht, RUN_ID, max_age=60)
    assert alice.owner not in records
    assert alice.owner in fetch_records(carol.dht, RUN_ID)


def test_record_schema_is_strict():
    assert PeerRecord.make(**make_record("x").dict()).step == 5
    with pytest.raises(ValueError):
        PeerRecord(**dict(make_record("x").dict(), step="5"))
    with pytest.raises(ValueError):
        PeerRecord(**dict(make_record("x").dict(), loss=float("nan")))
    with pytest.raises(ValueError):
        record_validators("run.with.dots")


def test_coordinator_aggregates_from_the_dht(swarm):
    from swarmtrain.monitoring.aggregate import SwarmAggregator

    alice, bob, carol = swarm
    now = time.time()
    assert publish_record(alice.dht, RUN_ID, alice.signer, make_record("alice", samples_per_second=5.0, time=now))
    assert publish_record(bob.dht, RUN_ID, bob.signer, make_record("bob", samples_per_second=7.0, time=now))
    aggregator = SwarmAggregator(RUN_ID, target_batch_size=1024, max_age=30)
    deadline = time.monotonic() + 10
    status = aggregator.poll(carol.dht)
    while status.peers_alive["trainer"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = aggregator.poll(carol.dht)
    assert status.peers_alive["trainer"] == 2
    assert status.samples_per_second == pytest.approx(12.0)
    assert {row.peer_id for row in status.peers} == {"alice", "bob"}
