"""Joining a run: start this node's DHT (as a full peer when others can dial it, as a client
otherwise), fetch the run config its initial peers signed, and check that this version can train it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.config import RunConfig
from swarmtrain.errors import UserError
from swarmtrain.net.addresses import peer_id_in
from swarmtrain.net.dht import make_dht
from swarmtrain.net.identity import load_or_create_identity
from swarmtrain.net.reachability import start_dht_checking_reachability
from swarmtrain.net.run_config import PROTOCOL_VERSION, PublishedRun, fetch_run_config
from swarmtrain.signals import children_ignore_interrupts

logger = logging.getLogger("swarmtrain.peer")


@dataclass
class JoinedSwarm:
    """A node that has joined a run: what every role (trainer, trunk host, data owner) starts from.

    :param dht: this node's DHT (shut it down with :meth:`leave`)
    :param published: the run config and what came with it (its publisher, the epoch it resumed at)
    :param client_mode: True when other peers cannot dial this node
    :param private_key: this node's identity key
    :param signature_validator: signs this node's records (the same key)
    :param access: on a token-gated run, this node's LocalAccess; None on an open run
    """

    dht: hivemind.DHT
    published: PublishedRun
    client_mode: bool
    private_key: RSAPrivateKey
    signature_validator: RSASignatureValidator
    access: Optional[object] = None

    @property
    def config(self) -> RunConfig:
        return self.published.config

    def leave(self) -> None:
        self.dht.shutdown()


def join_swarm(*, initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = (),
               identity: Optional[str] = None, client_mode: bool = False, listen_port: Optional[int] = None,
               run_id: Optional[str] = None, access=None) -> JoinedSwarm:
    """Join the run the initial peers serve; one-line UserErrors for what the user can fix.

    :param initial_peers: multiaddrs of the coordinator (or any peer): whose signed run config is trusted
    :param host_maddrs: addresses to listen on
    :param announce_maddrs: public addresses to tell other peers
    :param identity: private key file for a stable peer ID (None: a new one)
    :param client_mode: join as a client without checking whether others can dial this node
    :param listen_port: the --port the user fixed, if any (for the advice when others cannot dial us)
    :param run_id: refuse to join any other run
    :param access: on a token-gated run, this node's LocalAccess
    """
    private_key = load_or_create_identity(identity)
    signature_validator = RSASignatureValidator(private_key)
    with children_ignore_interrupts():
        # join as a full peer, ask the swarm to dial us back, and fall back to client mode (one
        # warning line with the fix) when nobody can
        dht, network_mode = start_dht_checking_reachability(
            lambda as_client: make_dht(
                initial_peers=initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                identity_path=identity, client_mode=as_client, signature_validator=signature_validator, access=access),
            client_mode=client_mode, initial_peers=initial_peers, listen_port=listen_port, log=logger,
        )
    swarm = JoinedSwarm(dht, None, network_mode.client_mode, private_key, signature_validator, access)
    try:
        swarm.published = fetch_run_config(dht, [peer_id_in(maddr) for maddr in initial_peers],
                                           has_token=access is not None)
        config = swarm.config
        if run_id is not None and run_id != config.run_id:
            raise UserError(f"the initial peer serves run {config.run_id!r}, not {run_id!r}; check --run-id or the "
                            "address")
        if swarm.published.protocol_version != PROTOCOL_VERSION:
            raise UserError(f"the run needs swarmtrain protocol version {swarm.published.protocol_version}, this is "
                            f"{PROTOCOL_VERSION}; upgrade swarmtrain")
    except BaseException:
        swarm.leave()
        raise
    return swarm
