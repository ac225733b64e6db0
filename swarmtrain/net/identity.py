"""Persistent peer identities.

A libp2p identity file (as written by hivemind) holds an RSA private key; the peer ID in a
multiaddr is the hash of its public key. swarmtrain uses the same key to sign DHT records, so a
peer that knows the coordinator's multiaddr can check that the run config really came from it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarmtrain.errors import UserError


def load_or_create_identity(path: Optional[str | Path]) -> RSAPrivateKey:
    """The RSA key in a libp2p identity file, created (mode 0400) if missing; a process-wide
    ephemeral key when no path is given."""
    if path is None:
        return RSAPrivateKey.process_wide()
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    try:
        der = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
        serialization.load_der_private_key(der, password=None)
    except Exception:
        raise UserError(f"{path} is not a libp2p identity file; move it away and a new one will be created") from None
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})  # hivemind's own (un)pickling path for RSAPrivateKey
    return key


def peer_id_of(public_key: RSAPublicKey | bytes) -> PeerID:
    """libp2p peer ID of an RSA public key (sha2-256 multihash of its protobuf encoding)."""
    if isinstance(public_key, bytes):
        public_key = RSAPublicKey.from_bytes(public_key)
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), "sha2-256"))


def default_identity_path(name: str) -> Path:
    """Where an identity lives when the user does not say: ~/.swarmtrain/<name>.id"""
    return Path(os.environ.get("SWARMTRAIN_HOME", Path.home() / ".swarmtrain")) / f"{name}.id"
