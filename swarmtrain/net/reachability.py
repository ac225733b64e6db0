"""Can other peers dial this one?

A peer that nobody can dial (home NAT, firewall) still connects *out* to everyone, so every check
made over its own connections succeeds; only a connection opened *towards* it tells the truth. So
a peer asks another peer of the swarm to dial it back: the checker starts a throw-away libp2p
daemon (a fresh identity, no listening, no relays, so no existing connection can be reused) and
dials each address the asker announces, one at a time, with the asker's peer ID (libp2p's
handshake proves it reached the asker and not whoever else listens there). Every full peer and the
coordinator serve these checks (`serve_reachability_checks`).

A checker is not a port scanner for hire: it dials only addresses at an IP the asker's own
connection comes from (an address elsewhere is answered "not dialled" without a connection attempt),
and on a token-gated run it answers only askers that hold a valid access token (the same check as
the DHT's: the caller's node signs nothing here, so the token's key must be the caller's peer ID).

An unreachable peer can still train as a client (hivemind `client_mode`): it sends its gradients
to reducers and takes no share of the reduction, so it never needs an incoming connection.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict
from hivemind.proto.auth_pb2 import AccessToken

from swarmtrain.net.addresses import DEFAULT_PORT

logger = logging.getLogger(__name__)

# the protocol id of the dial-back RPC; bump the suffix if the request/response fields change
CHECK_HANDLER = "swarmtrain.ReachabilityCheck.v1"
MAX_ADDRESSES_PER_CHECK = 8  # bounds the work one request can make a checker do
MAX_CONCURRENT_CHECKS = 2  # each check starts a libp2p daemon; volunteers' machines are small
CHECKER_TIMEOUT_LIMIT = 30.0  # a checker never spends longer dialling for one request
MAX_TOKEN_CHARS = 8192  # an access token in a request (a few hundred bytes in base64)
PROBE_STARTUP_TIMEOUT = 30.0  # starting the throw-away libp2p daemon (hivemind's default is 15 s)


@dataclass
class Reachability:
    reachable: bool
    detail: str  # what was tried and what happened, for logs and `swarmtrain doctor`
    suggestion: str  # the exact change that would make this peer reachable ("" when reachable)
    checked_by: str = ""  # "peer <id>" (dialled from another machine) or "this machine" (fallback)
    dialable_maddrs: List[str] = field(default_factory=list)
    observed_ips: List[str] = field(default_factory=list)  # our address as the checker saw it (NAT's public side)


# ---------------------------------------------------------------------------------------------
# dialling: shared by the checker (remote) and the fallback (this machine)
# ---------------------------------------------------------------------------------------------


def _dialable(maddr: str) -> bool:
    """Direct TCP/QUIC addresses only: relay circuits say nothing about our own reachability."""
    parts = maddr.split("/")
    return len(parts) >= 5 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") and "p2p-circuit" not in parts


def _without_peer_id(maddr: str) -> str:
    return maddr.split("/p2p/", 1)[0]


def _ip_of(maddr: str) -> Optional[str]:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


def _encode_token(token: AccessToken) -> str:
    return base64.b64encode(token.SerializeToString()).decode()


def token_admits(authorizer, token_text, caller) -> bool:
    """Whether ``token_text`` (a base64 hivemind AccessToken) is valid for ``authorizer`` (the node's DHT
    authorizer) and was issued to ``caller`` (the libp2p-authenticated peer ID of the request)."""
    from swarmtrain.net.identity import peer_id_of

    if not isinstance(token_text, str) or len(token_text) > MAX_TOKEN_CHARS:
        return False
    try:
        token = AccessToken.FromString(base64.b64decode(token_text, validate=True))
        return bool(authorizer.is_token_valid(token)) and peer_id_of(token.public_key) == caller
    except Exception:
        return False


async def _dial_each(target, maddrs: Sequence[str], timeout: float) -> List[Dict[str, object]]:
    """Dial `target` (a PeerID) at each address separately from a fresh daemon: which of them work."""
    from hivemind.p2p import P2P
    from hivemind.utils.multiaddr import Multiaddr

    # the daemon's start-up does not count against the dialling time: on a loaded machine it can
    # take seconds, and a slow start must not read as "unreachable"
    probe = await P2P.create(no_listen=True, use_relay=False, auto_nat=False, nat_port_map=False,
                             startup_timeout=PROBE_STARTUP_TIMEOUT)
    deadline = time.monotonic() + timeout
    results = []
    try:
        for maddr in maddrs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                results.append(dict(maddr=maddr, ok=False, error="no time left to dial"))
                continue
            try:
                await asyncio.wait_for(probe._client.connect(target, [Multiaddr(maddr)]), remaining)
                results.append(dict(maddr=maddr, ok=True, error=""))
                # forget the connection, or libp2p would reuse it to "reach" the next address
                await probe._client.disconnect(target)
            except asyncio.TimeoutError:
                results.append(dict(maddr=maddr, ok=False, error=f"no answer within {timeout:.0f}s"))
            except Exception as error:
                results.append(dict(maddr=maddr, ok=False, error=_short_error(error)))
    finally:
        await probe.shutdown()
    return results


# libp2p's dial errors are long and nested; these are the causes a volunteer can act on
_DIAL_CAUSES = [("connection refused", "connection refused (nothing listens there)"),
                ("peer id mismatch", "another peer answers at that address"),
                ("i/o timeout", "timed out (a firewall or NAT drops the connection)"),
                ("deadline exceeded", "timed out (a firewall or NAT drops the connection)"),
                ("no route to host", "no route to host"),
                ("network is unreachable", "network is unreachable")]


def _short_error(error: BaseException) -> str:
    text = str(error).strip()
    for marker, cause in _DIAL_CAUSES:
        if marker in text.lower():
            return cause
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


# ---------------------------------------------------------------------------------------------
# the checker: served by every full peer and the coordinator
# ---------------------------------------------------------------------------------------------


class _DialBackService:
    """Runs inside the DHT's process, on its event loop, next to hivemind's own handlers.

    :param p2p: the DHT's P2P
    :param authorizer: the DHT's authorizer on a token-gated run (askers must hold a token it accepts), or None
    """

    def __init__(self, p2p, authorizer=None):
        self.p2p, self.authorizer = p2p, authorizer
        self.slots = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)

    async def handle(self, request: struct_pb2.Struct, context) -> struct_pb2.Struct:
        asked = MessageToDict(request)
        if self.authorizer is not None and not token_admits(self.authorizer, asked.get("access_token"),
                                                            context.remote_id):
            return ParseDict(dict(refused="this run is token-gated: dial-back checks need a valid access token"),
                             struct_pb2.Struct())
        # dial only the peer that asked (context.remote_id is authenticated by libp2p), so this
        # RPC cannot be used to make us connect to a third party's peer ID...
        maddrs = [_without_peer_id(m) for m in asked.get("maddrs", []) if isinstance(m, str) and len(m) < 512]
        maddrs = [m for m in maddrs if _dialable(m)][:MAX_ADDRESSES_PER_CHECK]
        try:
            timeout = min(max(float(asked.get("timeout", 10.0)), 0.0), CHECKER_TIMEOUT_LIMIT)
        except (TypeError, ValueError):
            timeout = 10.0
        observed = await self._observed_ips(context.remote_id)
        # ...and only at an IP its connection comes from, so that it cannot probe anyone else's ports
        elsewhere = [m for m in maddrs if _ip_of(m) not in observed]
        maddrs = [m for m in maddrs if _ip_of(m) in observed]
        skipped = [dict(maddr=m, ok=False, error="not dialled: your connection does not come from this IP")
                   for m in elsewhere]
        if self.slots.locked():
            return ParseDict(dict(busy=True, observed_ips=observed), struct_pb2.Struct())
        async with self.slots:
            results = await _dial_each(context.remote_id, maddrs, timeout) if maddrs else []
        return ParseDict(dict(results=results + skipped, observed_ips=observed), struct_pb2.Struct())

    async def _observed_ips(self, peer_id) -> List[str]:
        """The IPs the asker's own connections come from: behind NAT, the router's public side."""
        try:
            peers = await self.p2p.list_peers()
        except Exception:
            return []
        ips = []
        for info in peers:
            if info.peer_id == peer_id:
                for maddr in info.addrs:
                    parts = str(maddr).split("/")
                    if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in ips:
                        ips.append(parts[2])
        return ips


async def _register_service(_dht, node) -> None:
    # a token-gated run's DHT has an authorizer: the same one decides who may ask for a check
    service = _DialBackService(node.p2p, node.protocol.authorizer)
    await node.p2p.add_protobuf_handler(CHECK_HANDLER, service.handle, struct_pb2.Struct)


def serve_reachability_checks(dht) -> None:
    """Answer other peers' "can you dial me?" requests. Call once on the coordinator's DHT and on
    every full (non-client) peer's DHT, right after it starts. On a token-gated run (a DHT with an
    authorizer) only askers with a valid token are answered."""
    dht.run_coroutine(_register_service)


# ---------------------------------------------------------------------------------------------
# the asker
# ---------------------------------------------------------------------------------------------


async def _ask_swarm(_dht, node, timeout: float, initial_peers: List[str]) -> dict:
    from hivemind.p2p import PeerID

    own_maddrs = [_without_peer_id(str(m)) for m in await node.p2p.get_visible_maddrs(latest=True)]
    own_maddrs = [m for m in own_maddrs if _dialable(m)][:MAX_ADDRESSES_PER_CHECK]
    # the initial peers (usually the coordinator) first, then whoever else our DHT knows
    candidates: List[PeerID] = []
    for maddr in initial_peers:
        if "/p2p/" in maddr:
            candidates.append(PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1]))
    candidates += [p for p in node.protocol.routing_table.peer_id_to_uid if p not in candidates]
    candidates = [p for p in candidates if p != node.peer_id]
    asked = dict(maddrs=own_maddrs, timeout=timeout)
    if node.protocol.authorizer is not None:  # a token-gated run: checkers want to see our token
        asked["access_token"] = _encode_token(await node.protocol.authorizer.get_token())
    request = ParseDict(asked, struct_pb2.Struct())
    refusals = []
    deadline = time.monotonic() + timeout + PROBE_STARTUP_TIMEOUT  # the checker also starts a daemon
    for candidate in candidates[:8]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            response = await asyncio.wait_for(
                node.p2p.call_protobuf_handler(candidate, CHECK_HANDLER, request, struct_pb2.Struct), remaining)
        except Exception as error:  # an older peer without the handler, or one that left
            refusals.append(f"{str(candidate)[:12]}…: {_short_error(error) or 'timed out'}")
            continue
        answer = MessageToDict(response)
        if answer.get("busy") or answer.get("refused"):
            refusals.append(f"{str(candidate)[:12]}…: {answer.get('refused') or 'busy'}")
            continue
        return dict(own_maddrs=own_maddrs, checker=str(candidate), results=answer.get("results", []),
                    observed_ips=answer.get("observed_ips", []), refusals=refusals)
    # nobody in the swarm checks yet: dial ourselves from a fresh daemon on this machine. That
    # proves a failure (the daemon is not where we say it is) but not success from outside.
    results = await _dial_each(node.peer_id, own_maddrs, min(timeout, 10.0)) if own_maddrs else []
    return dict(own_maddrs=own_maddrs, checker=None, results=results, observed_ips=[], refusals=refusals)


def check_reachability(dht, timeout: float = 15.0, *, initial_peers: Sequence[str] = (),
                       listen_port: Optional[int] = None) -> Reachability:
    """Find out whether other peers can open a connection to this DHT's peer.

    `initial_peers` (the multiaddrs the DHT was started with) are asked first; `listen_port` is
    the --port the user fixed, if any, so the suggestion can name the port to forward."""
    try:
        outcome = dht.run_coroutine(partial(_ask_swarm, timeout=timeout, initial_peers=list(initial_peers)))
    except Exception as error:
        return Reachability(False, f"the check itself failed: {_short_error(error)}",
                            "try again; if it persists, run `swarmtrain doctor` with the same flags", "")
    return _interpret(outcome, listen_port)


def _interpret(outcome: dict, listen_port: Optional[int]) -> Reachability:
    own, results = outcome["own_maddrs"], outcome["results"]
    checked_by = f"peer {outcome['checker']}" if outcome["checker"] else "this machine"
    observed = outcome.get("observed_ips", [])
    ok = [str(r["maddr"]) for r in results if r.get("ok")]
    if not own:
        return Reachability(False, "this peer announces no direct address (listening disabled?)",
                            f"listen on a port: --port {listen_port or DEFAULT_PORT}", checked_by)
    if ok:
        where = "" if outcome["checker"] else " (only checked from this machine: no peer in the swarm answers dial-back requests yet)"
        return Reachability(True, f"dialled at {', '.join(ok)} by {checked_by}{where}", "", checked_by, ok, observed)
    tried = "; ".join(f"{r['maddr']}: {r.get('error') or 'failed'}" for r in results) or ", ".join(own)
    detail = f"{checked_by} could not dial this peer at any announced address ({tried})"
    return Reachability(False, detail, _suggestion(own, observed, listen_port), checked_by, [], observed)


def _suggestion(own_maddrs: Sequence[str], observed_ips: Sequence[str], listen_port: Optional[int]) -> str:
    port = listen_port or DEFAULT_PORT
    own_ips = {m.split("/")[2] for m in own_maddrs}
    public = [ip for ip in observed_ips if ip not in own_ips]
    if public:  # the swarm sees us at another address: we are behind NAT
        return (f"forward TCP port {port} on your router to this machine and restart with "
                f"--public-ip {public[0]} --port {port} (the swarm sees you as {public[0]}); or train as a "
                "client with --client-mode")
    if listen_port is None:
        return (f"listen on a fixed port and let it in through your firewall/router: --port {port} "
                f"(add --public-ip <your public IP> if your router forwards it); or train as a client with --client-mode")
    return (f"allow incoming TCP connections to port {port} in this machine's firewall "
            f"(e.g. `sudo ufw allow {port}/tcp`) and check the address you announce; or train as a client with --client-mode")


# ---------------------------------------------------------------------------------------------
# the decision for `swarmtrain peer`
# ---------------------------------------------------------------------------------------------


@dataclass
class NetworkMode:
    client_mode: bool
    reachability: Optional[Reachability]  # None when client mode was asked for (nothing checked)
    log_line: Optional[str]  # the one line logged when we switched to client mode


def start_dht_checking_reachability(
    start_dht: Callable[[bool], object],
    *,
    client_mode: bool,
    initial_peers: Sequence[str] = (),
    listen_port: Optional[int] = None,
    timeout: float = 15.0,
    log: logging.Logger = logger,
):
    """Start the peer's DHT as a full peer, check that others can dial it, and restart it in
    client mode (one warning line) when they cannot. Returns (dht, NetworkMode).

    `start_dht(client_mode)` must start and return a hivemind DHT with the peer's own settings.
    A reachable peer also starts serving dial-back checks for the peers that join after it."""
    if client_mode:
        return start_dht(True), NetworkMode(True, None, None)
    dht = start_dht(False)
    reachability = check_reachability(dht, timeout, initial_peers=initial_peers, listen_port=listen_port)
    if reachability.reachable:
        serve_reachability_checks(dht)
        return dht, NetworkMode(False, reachability, None)
    line = (f"other peers cannot connect to this one, so it trains as a client (sends gradients, does not "
            f"reduce): {reachability.detail}. To take a full part: {reachability.suggestion}")
    log.warning(line)
    dht.shutdown()
    return start_dht(True), NetworkMode(True, reachability, line)
