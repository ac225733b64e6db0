"""Joining the DHT, and the run config record that the coordinator publishes into it."""
from __future__ import annotations

import json
import logging
import time
from functools import partial
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from swarmtrain.config import RunConfig, parse_run_config
from swarmtrain.errors import UserError
from swarmtrain.identity import peer_id_of

logger = logging.getLogger(__name__)

RUN_CONFIG_KEY = "swarmtrain_run_config"
RUN_CONFIG_TTL = 3600.0  # the coordinator re-publishes well before this expires
WIRE_VERSION = 1  # bumped when peers of different versions can no longer train together


def parse_initial_peers(values: Iterable[str]) -> List[str]:
    """Check that each value is a full multiaddr with a peer ID; one clear line if not."""
    result = []
    for value in values:
        for item in value.replace(",", " ").split():
            try:
                maddr = Multiaddr(item)
            except Exception:
                raise UserError(
                    f"initial peer {item!r} is not a multiaddr; copy it from the coordinator's output, "
                    "e.g. /ip4/203.0.113.5/tcp/31337/p2p/Qm..."
                ) from None
            if "/p2p/" not in str(maddr):
                raise UserError(f"initial peer {item!r} lacks the /p2p/<peer id> part; copy the full address")
            result.append(str(maddr))
    return result


def peer_id_in(maddr: str) -> PeerID:
    return PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])


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


class _RequestPipe:
    """The DHT process's end of its request pipe.

    A request carries the reply pipe of the process that sent it. When that process exits while the
    DHT process unpickles the request (an averager that stops right after a last DHT call), Python
    raises EOFError from ``rebuild_connection``. hivemind's request loop catches OSError there, not
    EOFError, so its DHT process died with a traceback. Raised as ConnectionResetError it takes
    hivemind's path for a broken request: logged (one debug line, see swarmtrain.cli) and skipped."""

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
        self._inner_pipe = _RequestPipe(self._inner_pipe)
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
    authorizer=None,
) -> hivemind.DHT:
    """Start this node's DHT; unreachable or malformed addresses become one-line UserErrors.

    On a token-gated run (an access activated with ``swarmtrain.access.activate``) the DHT signs its
    requests with the access's token and refuses peers without one; `authorizer` overrides that."""
    from swarmtrain.access import active_access

    validators = [signature_validator] if signature_validator is not None else []
    if authorizer is None and active_access() is not None:
        authorizer = active_access().authorizer()
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
        raise UserError(
            f"the initial peer(s) ({', '.join(initial_peers)}) refused this node's access token: check that the "
            "run is token-gated and the token is for this coordinator, and that this machine's clock is right "
            "(`swarmtrain doctor --token ...` checks both)"
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


@dataclass
class PublishedRun:
    config: RunConfig
    owner: PeerID
    wire_version: int
    initial_epoch: int = 0  # > 0 when the coordinator resumed the run from a checkpoint


def publish_run_config(dht: hivemind.DHT, config: RunConfig, signature_validator: RSASignatureValidator,
                       initial_epoch: int = 0) -> bool:
    """Store the config under our own `[owner:<key>]` subkey: the DHT signs it with our key and
    every node rejects a record under that subkey that we did not sign, so nobody else can
    replace it."""
    # an open run's config leaves the access section out, so peers from before it existed still read it
    exclude = {"access": True} if config.access.mode == "open" else {}
    if config.privacy.split is None:  # likewise privacy.split, for peers from before split runs
        exclude["privacy"] = {"split"}
    value = json.dumps({"config": config.model_dump(mode="json", exclude=exclude), "wire_version": WIRE_VERSION,
                        "initial_epoch": initial_epoch})
    return bool(
        dht.store(
            RUN_CONFIG_KEY,
            subkey=signature_validator.local_public_key,
            value=value,
            expiration_time=get_dht_time() + RUN_CONFIG_TTL,
        )
    )


def fetch_run_config(dht: hivemind.DHT, trusted: Sequence[PeerID], timeout: float = 30.0) -> PublishedRun:
    """Find the run config signed by one of the trusted peers (the initial peers we were given).

    A record signed by anyone else is ignored: knowing the coordinator's multiaddr is what makes a
    volunteer trust the config it then runs."""
    deadline = time.monotonic() + timeout
    others_seen = 0
    while True:
        found = dht.get(RUN_CONFIG_KEY, latest=True)
        if found is not None and isinstance(found.value, dict):
            for subkey, entry in found.value.items():
                owner = _owner_of(subkey)
                if owner is None:
                    continue
                if owner not in trusted:
                    others_seen += 1
                    continue
                try:
                    payload = json.loads(entry.value)
                    config = parse_run_config(payload["config"], source=f"run config from {owner}")
                    return PublishedRun(config, owner, int(payload.get("wire_version", 0)),
                                        int(payload.get("initial_epoch", 0)))
                except UserError:
                    raise
                except Exception as error:
                    raise UserError(f"the run config published by {owner} is malformed ({error}); tell the organiser") from None
        if time.monotonic() > deadline:
            hint = (
                f" ({others_seen} config(s) signed by other peers were ignored)" if others_seen else ""
            )
            from swarmtrain.access import active_access

            token_hint = "" if active_access() is not None else " (a token-gated run also needs --token)"
            raise UserError(
                "no run config signed by the initial peer(s) was found in the swarm" + hint + "; pass the "
                "coordinator's address (the join command it prints) as --initial-peers" + token_hint
            )
        time.sleep(1.0)


def _owner_of(subkey) -> Optional[PeerID]:
    """Peer ID of the key in a `[owner:<ssh-rsa ...>]` subkey, or None for anything else."""
    if not isinstance(subkey, bytes) or not subkey.startswith(b"[owner:") or not subkey.endswith(b"]"):
        return None
    try:
        return peer_id_of(subkey[len(b"[owner:") : -1])
    except Exception:
        return None


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
    the records in its own storage, believes it is alone, and trains on its own for good."""

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


def progress_records(dht: hivemind.DHT, run_id: str, max_age: float) -> List[LocalTrainingProgress]:
    """The progress records hivemind's trackers publish, without dead peers' (filtered by age)."""
    found = dht.get(f"{run_id}_progress", latest=True)
    records: List[LocalTrainingProgress] = []
    if found is not None and isinstance(found.value, dict):
        for entry in found.value.values():
            try:
                records.append(LocalTrainingProgress.parse_obj(entry.value))
            except Exception:
                continue  # malformed or a goodbye (None): the schema validator lets goodbyes through
    now = get_dht_time()
    return [r for r in records if now - r.time < max_age]
