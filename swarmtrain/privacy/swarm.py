"""Split runs through the swarm: `swarmtrain peer --role trunk` and `swarmtrain peer --role data-owner`.

A run whose config has a `privacy.split` section is a split run (the digits split task of
swarmtrain.privacy.digits):

- trunk peers (`--role trunk`, or the default role on a split run) join like any peer, host the
  layers after the cut with split.TrunkHost on their DHT's P2P daemon, and announce their peer ID
  under the DHT key f"{run_id}_trunks" (subkey: their own public key, so the record is signed and
  nobody can overwrite another host's). When there are other trunk hosts, every
  `privacy.split.average_every` seconds they average the trunk's parameters with
  hivemind.averaging.DecentralizedAverager (prefix f"{run_id}_trunk"); updates made by data owners
  while a round runs are kept (new = current + (average - snapshot)).
  A trunk host that finds other trunk hosts announced when it starts first downloads the current
  trunk from one of them (the averager's state sharing), checks it (shapes, finite values), and only
  then serves and averages; if no host sends one, it says so in one line and starts from the
  seeded initial trunk. A host shares its trunk only once it has trained, loaded or averaged away
  from the initial weights, so a newcomer never receives the initial weights from another newcomer.
- data owners (`--role data-owner`) join the DHT, find a trunk host from the announcements, and
  train their bottom layers plus the privacy head through it with split.DataOwnerClient: only Z
  (float32 [batch, cut_width]) and the labels leave the machine. They print progress, and at the
  end the held-out accuracy and the leakage (dCor between X and Z).

On a token-gated run (access.mode: token) every node publishes its token, the trunk averager is an
AccessGuardedAverager (swarmtrain.access.guard: averaging and state downloads refused to callers
without a valid token), and the trunk's own RPCs ask the same check before they look at a request.

This module holds what both roles share (announcements, the access gate, the event-loop thread);
the roles are ``trunk_host.TrunkHostRole`` and ``data_owner.DataOwnerRole``, run by
``swarmtrain peer`` (swarmtrain.peer.run).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Dict, List, Optional

import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarmtrain.access.authorizer import LocalAccess
from swarmtrain.access.guard import AccessGuardedAverager, access_record_key
from swarmtrain.errors import UserError
from swarmtrain.hivemind_compat import is_signed_subkey
from swarmtrain.monitoring.reporter import PeerReporter

from .config import SplitConfig
from .digits import DigitsNet

logger = logging.getLogger("swarmtrain.split")

ANNOUNCE_TTL = 45.0        # a trunk host's announcement expires this long after its last refresh
ANNOUNCE_PERIOD = 10.0


def trunks_key(run_id: str) -> str:
    return f"{run_id}_trunks"


def split_models(split: SplitConfig, seed: int) -> DigitsNet:
    torch.manual_seed(seed)  # every trunk host starts from the same trunk, so averaging starts aligned
    return DigitsNet(hidden=split.hidden, cut_width=split.cut_width, trunk_hidden=split.trunk_hidden)


def split_of(config, role: str) -> SplitConfig:
    if config.privacy.split is None:
        raise UserError(f"--role {role}: run {config.run_id!r} is not a split run (its config has no privacy.split "
                        "section); join it without --role")
    return config.privacy.split


def run_in_loop_thread(make_coroutine, stop: threading.Event, name: str):
    """Run make_coroutine(stop) with asyncio.run in a thread; the main thread waits for it.

    A stop signal raises StopRequested in the main thread (here, while it waits) and never inside the
    event loop: raised there, it leaves the P2P's tasks half-cancelled and asyncio.run never returns.
    We set `stop`, let the coroutine finish its step and clean up, and re-raise.
    """
    outcome: Dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = asyncio.run(make_coroutine(stop))
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        thread.join(10.0)  # a daemon thread: if its cleanup hangs, the process still exits
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def announce_trunk(dht, run_id: str, signer: RSASignatureValidator):
    value = {"peer_id": dht.peer_id.to_base58(), "time": time.time()}
    return dht.store(trunks_key(run_id), subkey=signer.local_public_key, value=value,
                     expiration_time=get_dht_time() + ANNOUNCE_TTL, return_future=True)


def find_trunks(dht, run_id: str, exclude: Optional[PeerID] = None) -> List[PeerID]:
    """Peer IDs of the trunk hosts announced for the run (fresh, well-formed, signed subkeys only)."""
    found = dht.get(trunks_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    result = []
    for subkey, entry in found.value.items():
        if not is_signed_subkey(subkey):
            continue  # an unsigned subkey: anyone could have written it
        value = entry.value
        if not isinstance(value, dict) or not isinstance(value.get("peer_id"), str):
            continue
        if not isinstance(value.get("time"), (int, float)) or time.time() - value["time"] > ANNOUNCE_TTL:
            continue
        try:
            peer_id = PeerID.from_base58(value["peer_id"])
        except Exception:
            continue
        if peer_id != exclude and peer_id not in result:
            result.append(peer_id)
    return result


class AccessGate(AccessGuardedAverager):
    """The averagers' token check (swarmtrain.access.guard.AccessGuardedAverager), for the trunk's own RPCs.

    The same table of tokens published under f"{run_id}_access", refreshed the same way, with the same
    refusal log line; creating it also keeps this node's own token published (data owners need that
    for the trunk hosts to accept their calls). Its check runs in the event loop that serves the RPCs.

    :param dht: this node's DHT (the tokens are read and this node's own published through it)
    :param access: this node's LocalAccess
    :param run_id: the run (the tokens live under f"{run_id}_access")
    """

    def __init__(self, dht, access: LocalAccess, run_id: str):
        self.dht = dht  # what the mixin reads the tokens with and publishes ours through
        super().__init__(access=access, access_key=access_record_key(run_id))  # next in the MRO: object

    async def allows(self, peer_id: PeerID, what: str) -> bool:
        return await self._access_allows(peer_id, what)

    def shutdown(self) -> None:  # no averager behind it: only stop publishing
        self.stop_publishing_token()


def access_gate(dht, config, access) -> Optional[AccessGate]:
    """The token check of a token-gated run (None on an open run); `access` is this node's LocalAccess."""
    if config.access.mode != "token":
        return None
    if access is None:  # normally unreachable: without a token the swarm's DHT would not have let us in
        raise UserError(f"run {config.run_id!r} is token-gated: join with --token (ask the organiser for one)")
    return AccessGate(dht, access, config.run_id)


class SplitRole:
    """What both roles of a split run share (run by `swarmtrain peer`, see swarmtrain.peer.run): the
    split settings, the access gate of a token-gated run, this peer's record in the DHT, and a
    ``close()`` that writes the status and releases them.

    :param swarm: the run this peer joined (swarmtrain.net.join.JoinedSwarm)
    :param options: the volunteer's flags (swarmtrain.peer.options.PeerOptions)
    :param status: this peer's status (swarmtrain.monitoring.status.PeerStatus)
    :param machine: unused: the split models are small and run on the CPU
    """

    role = ""  # trunk or data-owner

    def __init__(self, swarm, options, status, machine=None):
        self.swarm, self.options, self.status, self.config = swarm, options, status, swarm.config
        self.split = split_of(self.config, self.role)
        self.gate = self.reporter = None

    def start_reporting(self) -> None:
        """The access gate (on a token-gated run it also keeps this peer's token published, which the
        other side checks) and this peer's record in the DHT."""
        swarm = self.swarm
        self.gate = access_gate(swarm.dht, self.config, swarm.access)
        self.reporter = PeerReporter(swarm.dht, self.config.run_id, swarm.signature_validator, role=self.role,
                                     device="cpu", client_mode=swarm.client_mode,
                                     metrics_port=self.options.metrics_port)

    def close(self) -> None:
        self.status.write(self.options.status_file)
        if self.reporter is not None:
            self.reporter.close()
        if self.gate is not None:
            self.gate.shutdown()
