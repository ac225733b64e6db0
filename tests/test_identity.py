"""A persistent identity gives the same peer ID, and it is the DHT's own."""
import hivemind

from swarmtrain.net.identity import load_or_create_identity, peer_id_of


def test_identity_is_persistent_and_matches_the_dht(tmp_path):
    path = tmp_path / "node.id"
    first = peer_id_of(load_or_create_identity(path).get_public_key())
    second = peer_id_of(load_or_create_identity(path).get_public_key())
    assert first == second
    dht = hivemind.DHT(start=True, identity_path=str(path), host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False)
    try:
        assert dht.peer_id == first
    finally:
        dht.shutdown()
