"""A hostile DHT node for tests: it publishes validly signed records under as many fresh keys as it likes.

Keys are free in a DHT: each ``[owner:<key>]`` subkey only proves that whoever stored the value holds that
key. ``ManyKeySigner`` signs each record with the key its subkey names, so one node stores, say, a
thousand peer records that every honest node's RSASignatureValidator and SchemaValidator accept.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.monitoring.records import PeerRecord, records_key


def fresh_keys(count: int, bits: int = 1024) -> List[RSAPrivateKey]:
    """``count`` new RSA keys (1024 bits: four times faster to make than hivemind's 2048, as valid)."""
    keys = []
    for _ in range(count):
        der = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": der})  # hivemind's own unpickling path
        keys.append(key)
    return keys


def owner_subkey(key: RSAPrivateKey) -> bytes:
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", key.get_public_key().to_bytes())


class ManyKeySigner(RecordValidatorBase):
    """Signs a record with whichever of its keys the record's subkey names; validates nothing.

    :param keys: the forger's keys
    """

    def __init__(self, keys: Sequence[RSAPrivateKey]):
        self._signers = {owner_subkey(key): RSASignatureValidator(key) for key in keys}

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        for subkey, signer in self._signers.items():
            if record.subkey is not None and subkey in record.subkey:
                return signer.sign_value(record)
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        # (this node reads its own stored values back when it refreshes its cache)
        return next(iter(self._signers.values())).strip_value(record)

    @property
    def priority(self) -> int:
        return 10  # like RSASignatureValidator: signs last, over the serialized value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def start_forger(initial_peers: Sequence[str], keys: Sequence[RSAPrivateKey]) -> DHT:
    """A DHT node in the swarm that can sign for every one of ``keys``."""
    return DHT(initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False,
               record_validators=[ManyKeySigner(keys)], start=True)


def forge_peer_records(dht: DHT, run_id: str, keys: Sequence[RSAPrivateKey], peer_ids: Sequence[str],
                       ttl: float = 60.0, ahead: float = 25.0) -> int:
    """One schema-valid, absurd-but-bounded PeerRecord per key (claiming ``peer_ids[i % len]``), dated
    ``ahead`` seconds in the future (readers tolerate 30 s of clock skew: the records stay fresh longer);
    how many the swarm stored."""
    futures = []
    for index, key in enumerate(keys):
        record = PeerRecord.make(
            peer_id=peer_ids[index % len(peer_ids)], role="trainer", step=10**12, epoch=10**9, loss=0.0,
            samples_per_second=1e7, samples_accumulated=10**12, bytes_sent=10**17, bytes_received=10**17,
            rounds_ok=10**9, rounds_failed=0, last_round_seconds=0.0, last_round_group_size=10**5,
            compression_density=None, leakage_dcor=None, device="cpu", client_mode=False, version="9.9.9",
            time=time.time() + ahead)
        futures.append(dht.store(records_key(run_id), subkey=owner_subkey(key), value=record.dict(),
                                 expiration_time=time.time() + ttl, return_future=True))
    return sum(1 for future in futures if future.result(timeout=120))


def forge_progress(dht: DHT, run_id: str, key: RSAPrivateKey, epoch: int, peer_id: Optional[bytes] = None,
                   ttl: float = 60.0) -> bool:
    """One schema-valid hivemind progress record claiming ``epoch`` (what ProgressTracker publishes)."""
    value = dict(peer_id=peer_id or dht.peer_id.to_bytes(), epoch=epoch, samples_accumulated=0,
                 samples_per_second=10.0, time=time.time(), client_mode=False)
    return bool(dht.store(f"{run_id}_progress", subkey=owner_subkey(key), value=value,
                          expiration_time=time.time() + ttl))
