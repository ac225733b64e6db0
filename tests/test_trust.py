"""Issue #20, the fast part: what peers and files say is bounded where it enters (records, progress
claims, checkpoints, configs, tokens). The swarm-level attacks are in test_trust_swarm.py."""
import base64
import json
import os
import re
import time

import pytest
import torch
import yaml
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.monitoring.aggregate import SwarmAggregator
from swarmtrain.monitoring.records import PeerRecord, fetch_records, publish_record, record_validators, records_key
from swarmtrain.net.identity import peer_id_of
from swarmtrain.training import checkpoint as ckpt
from tests.support import TINY_CONFIG, assert_one_line_error, run_cli

pytestmark = pytest.mark.timeout(180)
RUN_ID = "trusttest"
NOW = time.time()


def record(peer_id, at=None, **overrides) -> PeerRecord:
    fields = dict(
        peer_id=peer_id, role="trainer", step=10, epoch=5, loss=1.0, samples_per_second=10.0,
        samples_accumulated=100, bytes_sent=1000, bytes_received=1000, rounds_ok=1, rounds_failed=0,
        last_round_seconds=2.0, last_round_group_size=2, compression_density=None, leakage_dcor=None,
        device="cpu", client_mode=False, version="0.1.0", time=NOW if at is None else at,
    )
    fields.update(overrides)
    return PeerRecord.make(**fields)


def owner(name):
    return f"[owner:ssh-rsa AAAA{name}]"


# ---------------------------------------------------------------- records: bounds where they enter


@pytest.mark.parametrize("field, value", [
    ("epoch", 4_600_000_000_000_000_000), ("samples_per_second", 1e300), ("bytes_sent", 9_200_000_000_000_000_000),
    ("step", 2**63), ("rounds_ok", 10**15), ("loss", 1e300), ("last_round_seconds", 1e12),
])
def test_absurd_record_values_are_refused_by_the_schema(field, value):
    with pytest.raises(ValueError):
        record("liar", **{field: value})


def test_a_record_from_the_future_does_not_stay_alive():
    MAX_CLOCK_SKEW = 30.0  # swarmtrain.net.claims
    aggregator = SwarmAggregator("run", target_batch_size=1000, max_age=20)
    ten_years = 10 * 365 * 86400.0
    records = {owner("honest"): record("honest"), owner("ahead"): record("ahead", at=NOW + ten_years),
               owner("skewed"): record("skewed", at=NOW + MAX_CLOCK_SKEW / 2)}
    status = aggregator.update(records, now=NOW + 1)
    assert status.peers_alive["trainer"] == 2  # a clock a little ahead is tolerated, ten years is not
    assert {row.peer_id for row in status.peers} == {"honest", "skewed"}


def test_one_reducer_cannot_frame_a_peer():
    aggregator = SwarmAggregator("run", max_age=20)
    records = {owner("liar"): record("liar", rejected_peers=["honest"]), owner("honest"): record("honest"),
               # a poisoner sends bad parts to every reducer of its group: several report it
               owner("a"): record("a", rejected_peers=["poisoner"]), owner("b"): record("b", rejected_peers=["poisoner"]),
               owner("self"): record("self", rejected_peers=["self"])}
    status = aggregator.update(records, now=NOW)
    assert status.rejected_senders == {"poisoner": 2}


def test_a_thousand_fake_records_count_as_the_one_peer_that_sent_them():
    honest = {owner(f"h{i}"): record(f"peer-{i}") for i in range(2)}
    fakes = {owner(f"fake{i}"): record(f"fake-{i}", epoch=10**9 - i, samples_per_second=1e7) for i in range(990)}
    # some claim the honest peers' IDs, some the forger's own (it is connected: it counts, once)
    fakes.update({owner(f"claim{i}"): record(f"peer-{i % 2}", epoch=10**9) for i in range(5)})
    fakes.update({owner(f"forger{i}"): record("forger", epoch=10**9) for i in range(5)})
    aggregator = SwarmAggregator("run", target_batch_size=1000, max_age=20)
    aggregator.update(honest, now=NOW - 1, observed={"peer-0", "peer-1"})  # the honest records came first
    status = aggregator.update({**honest, **fakes}, now=NOW, observed={"peer-0", "peer-1", "forger"})
    assert status.peers_alive["trainer"] == 3
    assert status.epoch == 5  # the majority's, not 10**9
    assert {row.peer_id: row.epoch for row in status.peers} == {"peer-0": 5, "peer-1": 5, "forger": 10**9}
    assert status.samples_per_second < 1e7 + 100


def test_a_record_signed_with_the_peers_own_identity_key_wins_its_peer_id():
    identity = RSAPrivateKey()
    peer_id = str(peer_id_of(identity.get_public_key()))
    own = "[owner:" + identity.get_public_key().to_bytes().decode() + "]"
    aggregator = SwarmAggregator("run", max_age=20)
    impostor = {owner("impostor"): record(peer_id, epoch=7)}
    aggregator.update(impostor, now=NOW - 1, observed={peer_id})  # even seen first
    status = aggregator.update({**impostor, own: record(peer_id, epoch=5)}, now=NOW, observed={peer_id})
    assert [row.epoch for row in status.peers] == [5]


def test_implausible_counter_jumps_are_not_added_to_the_swarms_totals():
    aggregator = SwarmAggregator("run", max_age=20)
    aggregator.update({owner("a"): record("a", at=NOW - 5, bytes_sent=1000)}, now=NOW - 5)
    status = aggregator.update({owner("a"): record("a", at=NOW, bytes_sent=10**16)}, now=NOW)
    assert status.bytes_sent_total == 1000
    status = aggregator.update({owner("a"): record("a", at=NOW + 5, bytes_sent=10**16 + 5000)}, now=NOW + 5)
    assert status.bytes_sent_total == 6000  # honest growth from the new level counts again


def test_quorum_epoch():
    from swarmtrain.net.claims import quorum_epoch

    assert quorum_epoch([]) is None
    assert quorum_epoch([5, 5, 10**6]) == 5
    assert quorum_epoch([5, 10**6]) == 5
    assert quorum_epoch([50]) == 50
    assert quorum_epoch([9, 8, 5, 5]) == 5
    assert quorum_epoch([6, 6, 5]) == 6


def test_the_swarm_epoch_is_not_any_one_records_claim():
    from swarmtrain.averaging.progress import credible_epoch

    # a veteran at 5 with one honest peer and one forged record at 5 + 1000
    assert credible_epoch(5, {b"honest": 5, b"forged": 1005}, own_vote=True, known={b"honest", b"forged"}) == 5
    # alone with the forger
    assert credible_epoch(5, {b"forged": 1005}, own_vote=True, known={b"forged"}) == 5
    # hivemind's "a peer just switched": followed, one epoch, from a key seen before only
    assert credible_epoch(5, {b"first": 6, b"other": 5}, own_vote=True, known={b"first"}) == 6
    assert credible_epoch(5, {b"fresh": 6, b"other": 5}, own_vote=True, known=set()) == 5
    assert credible_epoch(5, {b"forged": 7}, own_vote=True, known={b"forged"}) == 5
    # a joiner (no vote yet) believes the majority of the others
    assert credible_epoch(0, {b"a": 50, b"b": 50, b"forged": 1050}, own_vote=False, known=set()) == 50
    assert credible_epoch(0, {b"a": 50}, own_vote=False, known=set()) == 50


# ---------------------------------------------------------------- records in a real DHT


@pytest.fixture(scope="module")
def two_nodes():
    signers = [RSASignatureValidator(RSAPrivateKey()) for _ in range(2)]
    first = DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False,
                record_validators=record_validators(RUN_ID, signers[0]), start=True)
    second = DHT(initial_peers=[str(m) for m in first.get_visible_maddrs()], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                 client_mode=False, record_validators=record_validators(RUN_ID, signers[1]), start=True)
    yield (first, signers[0]), (second, signers[1])
    second.shutdown()
    first.shutdown()


def test_the_dht_refuses_absurd_and_immortal_records(two_nodes):
    (first, signer), (second, _) = two_nodes
    absurd = dict(record("liar", at=time.time()).dict(), epoch=4_600_000_000_000_000_000)
    assert first.store(records_key(RUN_ID), subkey=signer.local_public_key, value=absurd,
                       expiration_time=time.time() + 20) is False
    # a schema-valid record that would live in everyone's storage for ten years
    assert not publish_record(first, RUN_ID, signer, record("immortal", at=time.time()), ttl=10 * 365 * 86400.0)
    assert fetch_records(second, RUN_ID) == {}
    assert publish_record(first, RUN_ID, signer, record("honest", at=time.time()), ttl=20)
    deadline = time.monotonic() + 10
    while not fetch_records(second, RUN_ID) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [r.peer_id for r in fetch_records(second, RUN_ID).values()] == ["honest"]


def test_a_record_dated_in_the_future_is_dropped_by_readers(two_nodes):
    (first, signer), (second, _) = two_nodes
    ahead = record("ahead", at=time.time() + 10 * 365 * 86400.0)
    assert publish_record(first, RUN_ID, signer, ahead, ttl=20)  # the schema cannot tell the time...
    assert all(r.peer_id != "ahead" for r in fetch_records(second, RUN_ID, max_age=20).values())  # ...readers can


# ---------------------------------------------------------------- checkpoints: nothing the user had is lost


def _weights(value: float):
    return {"w": torch.full((4, 3), value), "b": torch.full((3,), value)}


def _save(directory, epoch, value, run_id="run", **kwargs):
    return ckpt.save_checkpoint(directory, epoch, _weights(value), {"state": {}, "param_groups": []},
                                meta={"run_id": run_id}, **kwargs)


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated model", "garbage meta", "missing model", "random optimizer"])
def test_a_damaged_checkpoint_is_detected_and_the_older_intact_one_used(tmp_path, damage):
    _save(tmp_path, 1, 1.0)
    newest = _save(tmp_path, 2, 2.0)
    if damage == "truncated model":
        data = (newest / ckpt.MODEL_FILE).read_bytes()
        (newest / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "garbage meta":
        (newest / ckpt.META_FILE).write_bytes(os.urandom(200))
    elif damage == "missing model":
        (newest / ckpt.MODEL_FILE).unlink()
    else:
        (newest / ckpt.OPTIMIZER_FILE).write_bytes(os.urandom(2000))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(newest)
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.epoch == 1 and torch.equal(loaded.model_state["w"], _weights(1.0)["w"])
    # saving more never removes the damaged one
    before = _snapshot(tmp_path / newest.name)
    for epoch in (2, 3, 4, 5):
        _save(tmp_path, epoch, float(epoch), keep_last=1)
    assert _snapshot(tmp_path / newest.name) == before


def test_another_runs_checkpoints_are_neither_replaced_nor_pruned(tmp_path):
    theirs = [_save(tmp_path, epoch, 9.0, run_id="theirs") for epoch in (1, 2)]
    before = {path.name: _snapshot(path) for path in theirs}
    mine = [_save(tmp_path, epoch, float(epoch), run_id="mine", keep_last=2) for epoch in (1, 2, 3, 4)]
    assert {path.name: _snapshot(path) for path in theirs} == before
    assert all(path.name not in before for path in mine)  # the same epochs went under other names
    names = {path.name for path in tmp_path.iterdir()}
    assert names == set(before) | {mine[-2].name, mine[-1].name}  # mine pruned to 2, theirs all kept
    assert ckpt.load_checkpoint(tmp_path, run_id="mine").epoch == 4
    assert ckpt.load_checkpoint(tmp_path, run_id="theirs").epoch == 2


def test_an_epoch_saved_again_replaces_only_this_runs_older_save(tmp_path):
    _save(tmp_path, 3, 1.0)
    again = _save(tmp_path, 3, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == [again.name]
    assert torch.equal(ckpt.load_checkpoint(tmp_path).model_state["w"], _weights(2.0)["w"])


def test_staging_left_overs_of_a_killed_save_are_cleaned(tmp_path):
    _save(tmp_path, 1, 1.0)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    leftover = tmp_path / f".epoch-00000002-{dead}-abcd1234"  # what a save killed mid-write leaves
    (leftover / "model.safetensors").parent.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    legacy = tmp_path / ".epoch-00000003-q1w2e3r4"  # an older swarmtrain's staging name
    legacy.mkdir()
    old = time.time() - 2 * ckpt.LEGACY_STAGING_AGE
    os.utime(legacy, (old, old))
    live = tmp_path / f".epoch-00000004-{os.getpid()}-feedbeef"  # a save under way in a live process
    live.mkdir()
    ckpt.check_checkpoint_dir(tmp_path)
    assert not leftover.exists() and not legacy.exists() and live.exists()


@pytest.mark.parametrize("where", ["parent is a file", "under /proc"])
def test_an_unwritable_checkpoint_dir_is_refused_at_start_in_one_line(tmp_path, where):
    if where == "parent is a file":
        (tmp_path / "file").write_text("x")
        directory = tmp_path / "file" / "checkpoints"
    else:
        directory = "/proc/swarmtrain-checkpoints"
    started = time.monotonic()
    # an address nobody listens on: the directory must be refused before any attempt to join
    result = run_cli("peer", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmXfAzSxy4dQZuz4J5ZFkYqjAv3q6zg5cMTSvn8Xj2B1Yb",
                     "--checkpoint-dir", str(directory), timeout=60)
    assert_one_line_error(result, "--checkpoint-dir", "cannot be written")
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------- run configs the coordinator refuses


def _config(tmp_path, change) -> str:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    change(config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


CONFIG_MISTAKES = {
    "lr-inf": (lambda c: c["optimizer"].__setitem__("lr", float("inf")), "optimizer.lr"),
    "seed-2**70": (lambda c: c.__setitem__("seed", 2**70), "seed"),
    "n_layer--1": (lambda c: c["model"]["config"].__setitem__("n_layer", -1), "n_layer"),
    "seq_len-65536": (lambda c: c["data"].__setitem__("seq_len", 65536), "data.seq_len"),
    "target-10**30": (lambda c: c.__setitem__("target_batch_size", 10**30), "target_batch_size"),
    "typo": (lambda c: c["model"]["config"].__setitem__("n_lyer", 3),
             "n_lyer is not a gpt2 config field (did you mean n_layer?)"),
    "heads": (lambda c: c["model"]["config"].__setitem__("n_head", 3), "multiple of n_head"),
}


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
def test_run_configs_peers_cannot_run_are_refused_naming_the_field(tmp_path, mistake):
    from swarmtrain.config import load_run_config
    from swarmtrain.errors import UserError

    change, fragment = CONFIG_MISTAKES[mistake]
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_run_config(_config(tmp_path, change))


@pytest.mark.parametrize("mistake", ["typo", "seed-2**70"])
def test_the_coordinator_refuses_them_in_one_line_before_publishing(tmp_path, mistake):
    change, fragment = CONFIG_MISTAKES[mistake]
    result = run_cli("coordinator", "--config", _config(tmp_path, change), "--metrics-port", "0", timeout=60)
    assert_one_line_error(result, fragment)
    assert "Volunteers join with" not in result.stdout


def test_a_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(os.urandom(4096) + b"\xff\xfe")
    assert_one_line_error(run_cli("coordinator", "--config", str(path), timeout=60), "not a text file")


# ---------------------------------------------------------------- token inputs


@pytest.mark.parametrize("expires, fragment", [("99999999999999999999w", "at most 10 years"),
                                               ("0.001s", "at least 60 s"), ("9999-12-31", "at most 10 years"),
                                               ("x" * 10_000, "use a duration")])
def test_token_expiry_is_bounded(expires, fragment):
    from swarmtrain.access.tokens import TokenError, parse_expiry

    with pytest.raises(TokenError, match=re.escape(fragment)):
        parse_expiry(expires)


def test_issue_token_with_an_absurd_expiry_is_one_line(tmp_path):
    from swarmtrain.net.identity import load_or_create_identity

    identity = tmp_path / "coordinator.id"
    peer = str(peer_id_of(load_or_create_identity(identity).get_public_key()))
    result = run_cli("coordinator", "issue-token", "--identity", str(identity), "--name", "alice", "--peer-id", peer,
                     "--expires", "99999999999999999999w", timeout=60)
    assert_one_line_error(result, "--expires", "at most 10 years")


def test_a_binary_token_file_is_one_line(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_bytes(os.urandom(300) + b"\xff")
    result = run_cli("peer", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmXfAzSxy4dQZuz4J5ZFkYqjAv3q6zg5cMTSvn8Xj2B1Yb",
                     "--token-file", str(token_file), timeout=60)
    assert_one_line_error(result, "--token-file", "not a token file")


def test_a_token_for_a_dial_back_check_is_bound_to_the_caller():
    from hivemind.proto.auth_pb2 import AccessToken

    from swarmtrain.access.authorizer import TokenAuthorizer
    from swarmtrain.access.tokens import issue_token
    from swarmtrain.net.reachability import token_admits

    authority, volunteer, other = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()
    token = issue_token(authority, "alice", peer_id_of(volunteer.get_public_key()), time.time() + 3600)
    wire = AccessToken(username=token.name, public_key=volunteer.get_public_key().to_bytes(),
                       expiration_time=str(token.expires), signature=token.signature)
    text = base64.b64encode(wire.SerializeToString()).decode()
    checker = TokenAuthorizer(authority, authority.get_public_key(), issuer=authority)
    assert token_admits(checker, text, peer_id_of(volunteer.get_public_key()))
    assert not token_admits(checker, text, peer_id_of(other.get_public_key()))  # a copied token is of no use
    assert not token_admits(checker, "garbage", peer_id_of(volunteer.get_public_key()))
    assert not token_admits(checker, None, peer_id_of(volunteer.get_public_key()))
    assert json.dumps(text)  # (it travels in a protobuf Struct)


# ---------------------------------------------------------------- the metrics server and its scrapers


def test_the_metrics_server_queues_a_burst_of_scrapers():
    """With socketserver's backlog of 5, the sixth simultaneous scraper's SYN was dropped and retried a
    second later (p99 ~1 s under 20 clients: benchmarks/trust.py). Here the server listens but does not
    accept yet: every connection of a burst of 40 must still complete its handshake at once."""
    import select
    import socket

    from swarmtrain.monitoring.metrics import MetricsServer, SwarmMetrics

    server = MetricsServer(SwarmMetrics().registry, lambda: None, "127.0.0.1", 0)  # not started: nobody accepts
    clients = []
    try:
        for _ in range(40):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", server.port))
            clients.append(client)
        deadline, connected = time.monotonic() + 0.5, []
        while time.monotonic() < deadline and len(connected) < len(clients):
            _, writable, _ = select.select([], clients, [], 0.05)
            connected = [c for c in writable if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
        assert len(connected) == len(clients)
    finally:
        for client in clients:
            client.close()
        server.stop()
