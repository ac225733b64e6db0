"""Starting this node's DHT (one-line errors for unreachable or malformed addresses), and keeping its
neighbourhood fresh."""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from swarmtrain import hivemind_compat
from swarmtrain.errors import UserError
from swarmtrain.net.addresses import peer_id_in

logger = logging.getLogger(__name__)


def raised_in(error: BaseException, function_name: str) -> bool:
    """Whether ``error``, or an error it was raised from, passed through a function of that name."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frame = error.__traceback__
        while frame is not None:
            if frame.tb_frame.f_code.co_name == function_name:
                return True
            frame = frame.tb_next
        error = error.__cause__ or error.__context__
    return False


class RequestPipe:
    """The DHT process's end of its request pipe.

    A request carries the reply pipe of the process that sent it. When that process exits while the
    DHT process unpickles the request (an averager that stops right after a last DHT call), Python
    raises EOFError from ``rebuild_connection``. hivemind's request loop catches OSError there, not
    EOFError, so its DHT process died with a traceback. Raised as ConnectionResetError it takes
    hivemind's path for a broken request: logged (one debug line, see swarmtrain.cli.logs) and skipped.

    :param pipe: hivemind's end of the pipe
    """

    def __init__(self, pipe):
        self._pipe = pipe

    def recv(self):
        try:
            return self._pipe.recv()
        except EOFError as error:
            if not raised_in(error, "rebuild_connection"):
                raise  # the pipe itself is closed: not ours to hide
            raise ConnectionResetError("a DHT request from a process that has already exited") from error

    def __getattr__(self, name):
        return getattr(self._pipe, name)


class SwarmDHT(hivemind.DHT):
    """hivemind.DHT whose process survives a request from a process that exited mid-handover."""

    def run(self) -> None:  # runs in the DHT's own process
        hivemind_compat.set_dht_request_pipe(self, RequestPipe(hivemind_compat.dht_request_pipe(self)))
        super().run()


def make_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: Optional[str] = None,
    client_mode: bool = False,
    signature_validator: Optional[RSASignatureValidator] = None,
    startup_timeout: float = 30.0,
    access=None,
    authorizer=None,
) -> hivemind.DHT:
    """Start this node's DHT; unreachable or malformed addresses become one-line UserErrors.

    :param initial_peers: multiaddrs (with /p2p/<peer id>) of nodes already in the swarm; none for the first node
    :param host_maddrs: addresses to listen on
    :param announce_maddrs: addresses to tell other peers, when they differ from the listen addresses
    :param identity_path: the private key file that fixes the peer ID (None: a new ID)
    :param client_mode: do not accept incoming connections (behind NAT)
    :param signature_validator: this node's RSASignatureValidator, so its signed records are accepted
    :param startup_timeout: seconds the p2p daemon may take to start
    :param access: on a token-gated run, this node's LocalAccess: the DHT signs its requests with its
      token and refuses peers without one (None: an open run)
    :param authorizer: a hivemind authorizer to use instead of the access's (tests)
    """
    validators = [signature_validator] if signature_validator is not None else []
    if authorizer is None and access is not None:
        authorizer = access.authorizer()
    try:
        return SwarmDHT(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) or None,
            identity_path=identity_path,
            client_mode=client_mode,
            record_validators=validators,
            startup_timeout=startup_timeout,
            authorizer=authorizer,
            # no copies of found values beyond a key's replicas: a read with latest=True (hivemind's
            # progress tracker, matchmaking, our records) asks every node of a small DHT, and every
            # node that had read a key answered with its cached copy of all N records. Per peer,
            # progress bytes grew linearly with N (benchmarks/scale.py: x3.1 from 4 to 16 peers) although
            # reads per peer fall as 1/N (benchmarks/progress_reads.py): 18 copies at 16 peers, 5 without
            cache_locally=False,
            cache_nearest=0,
            start=True,
        )
    except RuntimeError as error:
        if "bootstrap failed" not in str(error):
            raise
        if authorizer is None:
            raise UserError(
                f"the initial peer(s) ({', '.join(initial_peers)}) did not let this node into the swarm's DHT: "
                "the run may need an access token (ask the organiser for one and pass --token), or the "
                "coordinator is overloaded (try again)"
            ) from None
        # a refused token and an initial peer too busy to answer in time look the same from here (no
        # answer to the bootstrap ping): seen with 24 peers joining a coordinator on a 2-core machine
        raise UserError(
            f"the initial peer(s) ({', '.join(initial_peers)}) did not accept this node: either they refused its "
            "access token (check that the run is token-gated, that the token is for this coordinator and that "
            "this machine's clock is right: `swarmtrain doctor --token ...` checks all three), or they were "
            "too busy to answer in time (try again)"
        ) from None
    except P2PDaemonError as error:
        text = str(error)
        if "failed to connect to bootstrap peers" in text:
            raise UserError(
                f"could not reach any initial peer ({', '.join(initial_peers)}): check that the coordinator "
                "is running and that the address, port and firewall let you in"
            ) from None
        if "already taken" in text:
            raise UserError(f"identity {identity_path} is in use by another running peer; give this one its own --identity") from None
        if "invalid" in text and "multiaddr" in text:
            raise UserError(f"a host or announce address is not a valid multiaddr: {text.split(': ')[-1]}") from None
        if "address already in use" in text:
            raise UserError(f"the listen address is in use by another program; choose another port ({text.split(': ')[-1]})") from None
        raise UserError(f"could not start the networking daemon: {text}") from None


async def _refresh_neighbourhood(_dht, node, initial_peer_ids: Sequence[PeerID]) -> int:
    # runs inside the DHT process (module level: it is pickled there)
    for peer_id in initial_peer_ids:
        await node.protocol.call_ping(peer_id)
    await node.find_nearest_nodes([node.node_id])  # meet the peers near us, as at bootstrap
    return len(node.protocol.routing_table.uid_to_peer_id)


class NeighbourhoodKeeper:
    """Re-ping the initial peers and look up our own neighbourhood every `period` seconds.

    hivemind removes a node from the routing table after failed requests and never re-bootstraps:
    a peer whose table empties (one slow answer from a busy coordinator is enough) then reads only
    the records in its own storage, believes it is alone, and trains on its own for good.

    :param dht: this peer's DHT
    :param initial_peers: the multiaddrs it joined through
    :param period: seconds between refreshes
    """

    def __init__(self, dht: hivemind.DHT, initial_peers: Sequence[str], period: float = 5.0):
        self.dht, self.period = dht, period
        self.initial_peer_ids = [peer_id_in(maddr) for maddr in initial_peers]
        self._last = float("-inf")  # the first refresh at the first step: peers that start together need it most
        self._pending = None  # keep the future until the DHT process has answered

    def refresh_now(self) -> int:
        """Refresh and wait; returns how many nodes the routing table knows."""
        self._last = time.monotonic()
        return self.dht.run_coroutine(partial(_refresh_neighbourhood, initial_peer_ids=self.initial_peer_ids))

    def maybe_refresh(self) -> None:
        if time.monotonic() - self._last < self.period or (self._pending is not None and not self._pending.done()):
            return
        self._last = time.monotonic()
        self._pending = self.dht.run_coroutine(partial(_refresh_neighbourhood, initial_peer_ids=self.initial_peer_ids),
                                               return_future=True)


