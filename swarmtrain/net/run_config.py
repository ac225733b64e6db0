"""The run config in the DHT: the coordinator publishes it signed; a peer fetches the one signed by the
initial peer it was given, so knowing the coordinator's address is what makes a volunteer trust it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarmtrain.config import RunConfig, parse_run_config
from swarmtrain.errors import UserError
from swarmtrain.net.identity import peer_id_of
from swarmtrain.signals import poll

RUN_CONFIG_KEY = "swarmtrain_run_config"
RUN_CONFIG_TTL = 3600.0  # the coordinator re-publishes well before this expires
# the swarm protocol's version, published with the run config: bumped when peers of different
# versions can no longer train together (the sparse wire format has its own, SPARSE_WIRE_VERSION)
PROTOCOL_VERSION = 1


@dataclass
class PublishedRun:
    config: RunConfig
    owner: PeerID
    protocol_version: int  # of the publisher: peers of another version refuse to join
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
    # (the key is still "wire_version", the name it had when peers of the first versions read it)
    value = json.dumps({"config": config.model_dump(mode="json", exclude=exclude), "wire_version": PROTOCOL_VERSION,
                        "initial_epoch": initial_epoch})
    return bool(
        dht.store(
            RUN_CONFIG_KEY,
            subkey=signature_validator.local_public_key,
            value=value,
            expiration_time=get_dht_time() + RUN_CONFIG_TTL,
        )
    )


def fetch_run_config(dht: hivemind.DHT, trusted: Sequence[PeerID], timeout: float = 30.0, *,
                     has_token: bool = False) -> PublishedRun:
    """Find the run config signed by one of the trusted peers (the initial peers we were given).

    A record signed by anyone else is ignored: knowing the coordinator's multiaddr is what makes a
    volunteer trust the config it then runs. `has_token` only shapes the message when none is found."""
    others_seen = []

    def find() -> Optional[PublishedRun]:
        found = dht.get(RUN_CONFIG_KEY, latest=True)
        if found is None or not isinstance(found.value, dict):
            return None
        for subkey, entry in found.value.items():
            owner = _owner_of(subkey)
            if owner is None:
                continue
            if owner not in trusted:
                others_seen.append(owner)
                continue
            return _parse_published(entry.value, owner)
        return None

    published = poll(find, timeout=timeout, interval=1.0)
    if published is None:
        hint = f" ({len(set(others_seen))} config(s) signed by other peers were ignored)" if others_seen else ""
        token_hint = "" if has_token else " (a token-gated run also needs --token)"
        raise UserError(
            "no run config signed by the initial peer(s) was found in the swarm" + hint + "; pass the "
            "coordinator's address (the join command it prints) as --initial-peers" + token_hint
        )
    return published


def _parse_published(value, owner: PeerID) -> PublishedRun:
    try:
        payload = json.loads(value)
        config = parse_run_config(payload["config"], source=f"run config from {owner}")
        return PublishedRun(config, owner, int(payload.get("wire_version", 0)), int(payload.get("initial_epoch", 0)))
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"the run config published by {owner} is malformed ({error}); tell the organiser") from None


def _owner_of(subkey) -> Optional[PeerID]:
    """Peer ID of the key in a `[owner:<ssh-rsa ...>]` subkey, or None for anything else."""
    if not isinstance(subkey, bytes) or not subkey.startswith(b"[owner:") or not subkey.endswith(b"]"):
        return None
    try:
        return peer_id_of(subkey[len(b"[owner:") : -1])
    except Exception:
        return None
