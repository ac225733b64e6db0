"""Bytes a swarmtrain node moves, by kind, counted at hivemind's RPC layer (benchmarks/scale.py).

``install(run_id, directory)`` wraps hivemind's P2P protobuf calls and handlers (client and server
side, unary and streaming) before the node starts anything, so the DHT process, the averager processes
and the main process -- all forked from it -- add to one shared table. Every message this node sends
or receives is counted once, by the serialized size of its protobuf, and attributed to a kind:

    progress       hivemind's progress records ({run_id}_progress), stored and read through the DHT
    peer_records   swarmtrain's PeerRecords ({run_id}_peers)
    matchmaking    averagers finding groups: rpc_join_group streams and the DHT keys {prefix}.0b...
                   (mode local's rounds use 4 group bits: the round's epoch mod 16)
    access         access tokens: the auth fields of DHT messages and the {run_id}_access records
    averaging      the all-reduce itself (rpc_aggregate_part)
    state          state downloads (rpc_download_state) and the donors' {prefix}.all_averagers keys
    dht_other      DHT pings, routing lookups, the run config record, anything unrecognised

What libp2p adds (framing, noise encryption, identify, TCP/IP headers) is not in these counts: the
benchmark reads it as the difference to the interface counters where it has namespaces. A thread of
the main process writes the table to ``directory/traffic.json`` every WRITE_PERIOD seconds.
"""
from __future__ import annotations

import atexit
import ctypes
import itertools
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

KINDS = ("progress", "peer_records", "matchmaking", "access", "averaging", "state", "dht_other")
# the DHT part of each kind, by operation (included in the kinds above): what is stored, what is read
DETAILS = tuple(f"{kind}:{op}" for kind in ("progress", "peer_records", "matchmaking", "access", "state", "dht_other")
                for op in ("store", "find", "ping")) + ("access:auth",)  # auth: the signed fields of every DHT message
WRITE_PERIOD = 1.0
GROUP_BITS_DEPTH = 5  # matchmaking keys with up to this many group bits are recognised


def _dht_key_kinds(run_id: str) -> dict:
    from hivemind.dht.routing import DHTID

    def key_id(key: str) -> bytes:
        return DHTID.generate(source=key).to_bytes()

    kinds = {key_id(f"{run_id}_progress"): "progress", key_id(f"{run_id}_peers"): "peer_records",
             key_id(f"{run_id}_access"): "access"}
    from swarmtrain.compression.crosscheck import CHECK_PROTOCOL_VERSION

    # a gradient / delta averager with the round check matches under its own prefix (crosscheck.py);
    # without this its matchmaking keys were counted as dht_other
    checked = f"{run_id}_grad_averager_checked{CHECK_PROTOCOL_VERSION}"
    for prefix in (f"{run_id}_grad_averager", checked, f"{run_id}_state_averager"):
        kinds[key_id(f"{prefix}.all_averagers")] = "state"
        for group_bits in ("".join(bits) for depth in range(GROUP_BITS_DEPTH + 1)
                           for bits in itertools.product("01", repeat=depth)):
            kinds[key_id(f"{prefix}.0b{group_bits}")] = "matchmaking"
    return kinds


class TrafficTable:
    """Bytes per kind, in shared memory (made before the node forks anything).

    :param run_id: the run (its DHT keys are recognised)
    """

    def __init__(self, run_id: str):
        self.counts = mp.RawArray(ctypes.c_double, len(KINDS) + len(DETAILS))
        self.messages = mp.RawArray(ctypes.c_double, len(KINDS) + len(DETAILS))
        self.lock = mp.Lock()
        self.key_kinds = _dht_key_kinds(run_id)

    def add(self, kind: str, nbytes: int, detail: str = "") -> None:
        index = KINDS.index(kind)
        with self.lock:
            self.counts[index] += nbytes
            self.messages[index] += 1
            if detail in DETAILS:
                self.counts[len(KINDS) + DETAILS.index(detail)] += nbytes
                self.messages[len(KINDS) + DETAILS.index(detail)] += 1

    def snapshot(self) -> dict:
        names = KINDS + DETAILS
        with self.lock:
            return {"time": time.time(), "bytes": dict(zip(names, list(self.counts))),
                    "messages": dict(zip(names, list(self.messages)))}

    def kind_of_handler(self, name: str) -> str:
        if "rpc_aggregate_part" in name:
            return "averaging"
        if "rpc_join_group" in name:
            return "matchmaking"
        if "rpc_download_state" in name:
            return "state"
        return "dht_other"

    def count(self, name: str, message, request=None) -> None:
        """A message of handler `name`; for DHT responses, `request` is the request they answer."""
        if message is None:
            return
        size = message.ByteSize()
        kind = self.kind_of_handler(name)
        detail = ""
        if kind == "dht_other":
            keys = getattr(request if request is not None else message, "keys", None) or ()
            kind = next((self.key_kinds[key] for key in keys if key in self.key_kinds), "dht_other")
            op = next((op for op in ("store", "find", "ping") if f"rpc_{op}" in name), "")
            detail = f"{kind}:{op}"
            auth = getattr(message, "auth", None)
            if auth is not None and message.HasField("auth"):
                auth_size = auth.ByteSize()
                self.add("access", auth_size, detail="access:auth")
                size -= auth_size
        self.add(kind, max(size, 0), detail=detail)


def _wrap_p2p(table: TrafficTable) -> None:
    from hivemind.p2p import P2P

    call_unary, add_unary = P2P._call_unary_protobuf_handler, P2P._add_protobuf_unary_handler
    iterate_stream, add_stream = P2P._iterate_protobuf_stream_handler, P2P._add_protobuf_stream_handler

    async def counted_call_unary(self, peer_id, handle_name, input, output_protobuf_type):
        response = await call_unary(self, peer_id, handle_name, input, output_protobuf_type)
        table.count(handle_name, input)
        table.count(handle_name, response, request=input)
        return response

    async def counted_add_unary(self, handle_name, handler, input_protobuf_type, balanced=False):
        async def counted_handler(request, context):
            response = await handler(request, context)
            table.count(handle_name, request)
            table.count(handle_name, response, request=request)
            return response

        return await add_unary(self, handle_name, counted_handler, input_protobuf_type, balanced=balanced)

    def counted_stream(name, stream):
        async def wrapped():
            async for message in stream:
                table.count(name, message)
                yield message
        return wrapped()

    async def counted_iterate_stream(self, peer_id, name, requests, output_protobuf_type):
        responses = await iterate_stream(self, peer_id, name, counted_stream(name, requests), output_protobuf_type)
        return counted_stream(name, responses)

    async def counted_add_stream(self, name, handler, input_protobuf_type, max_prefetch=5, balanced=False):
        def counted_handler(requests, context):
            return counted_stream(name, handler(counted_stream(name, requests), context))

        return await add_stream(self, name, counted_handler, input_protobuf_type, max_prefetch=max_prefetch,
                                balanced=balanced)

    P2P._call_unary_protobuf_handler = counted_call_unary
    P2P._add_protobuf_unary_handler = counted_add_unary
    P2P._iterate_protobuf_stream_handler = counted_iterate_stream
    P2P._add_protobuf_stream_handler = counted_add_stream


def install(run_id: str, directory: Path) -> TrafficTable:
    """Count this node's traffic from now on; write it to ``directory/traffic.json`` periodically."""
    table = TrafficTable(run_id)
    _wrap_p2p(table)
    path = Path(directory) / "traffic.json"
    owner = os.getpid()

    def write() -> None:
        if os.getpid() != owner:
            return  # a forked child: the parent writes
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table.snapshot()))
        os.replace(tmp, path)

    def writer() -> None:
        while True:
            time.sleep(WRITE_PERIOD)
            try:
                write()
            except OSError:
                pass

    threading.Thread(target=writer, daemon=True, name="traffic-meter").start()
    atexit.register(write)
    return table
