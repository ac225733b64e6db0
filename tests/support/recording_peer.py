"""`swarmtrain peer`, with every message it hands to the p2p daemon for another peer recorded.

Patches hivemind's daemon client class (unary calls: their payloads; stream opens: their protocol
names) before anything starts, so the DHT's child process (forked later) records too. Each process
appends (pid, kind, handle name, payload) pickles to $SWARMTRAIN_RECORD_DIR/<pid>.rec.

Usage: python tests/support/recording_peer.py peer --initial-peers ... (same arguments as swarmtrain)."""
import os
import pickle

from hivemind.p2p.p2p_daemon_bindings.p2pclient import Client

from swarmtrain.cli import main

RECORD_DIR = os.environ["SWARMTRAIN_RECORD_DIR"]
_unary, _stream_open = Client.call_unary_handler, Client.stream_open


def _record(kind: str, name: str, payload: bytes) -> None:
    with open(os.path.join(RECORD_DIR, f"{os.getpid()}.rec"), "ab") as handle:
        pickle.dump((kind, name, payload), handle)


async def recording_unary(self, peer_id, proto, data):
    _record("unary", proto, bytes(data))
    return await _unary(self, peer_id, proto, data)


async def recording_stream_open(self, peer_id, protocols):
    _record("stream", ",".join(protocols), b"")
    return await _stream_open(self, peer_id, protocols)


Client.call_unary_handler = recording_unary
Client.stream_open = recording_stream_open

if __name__ == "__main__":
    main(prog_name="swarmtrain")
