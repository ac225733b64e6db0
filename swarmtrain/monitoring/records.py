"""Signed, schema-validated peer progress records in the DHT.

Every peer publishes one ``PeerRecord`` under the DHT key ``f"{run_id}_peers"`` with the subkey set to
its own RSA public key in hivemind's ``[owner:<key>]`` form. Two hivemind validators, registered on
*every* node (peers and coordinator alike, or reads of the key fail), enforce that:

- ``RSASignatureValidator`` accepts a value under an ``[owner:...]`` subkey only if it is signed by
  that owner's private key, so no peer can overwrite (or forge) another peer's record;
- ``SchemaValidator`` accepts only values that parse as a ``PeerRecord`` *without any type
  conversion*: a wrong type, a missing field or an unknown field is refused by every node that would
  store it.

Readers still re-parse what they get (``fetch_records``): a node with no validators, an old node or a
stale record must not crash the coordinator's tracker.

Keys are free, so a valid signature says nothing about whether a record is true. Every field has a
plausible bound (a record claiming epoch 4.6e18 or 1e300 samples/s is refused by every node that
would store it), readers drop a record whose ``time`` runs ahead of their clock by more than
``MAX_CLOCK_SKEW`` (it would count as fresh for ever), and ``RecordLifetimeValidator`` refuses records that would stay in the DHT for
longer than a few record periods, so whatever a hostile node stores dies out soon after it stops.
How many records count, and whose, is the reader's business (``swarmtrain.monitoring.aggregate``).
"""

from __future__ import annotations

import math
import time as time_module
from typing import Dict, List, Literal, Optional, Set

import pydantic.v1 as pydantic
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time, get_logger

from swarmtrain.net.claims import MAX_CLOCK_SKEW

logger = get_logger(__name__)

PEER_ROLES = ("trainer", "coordinator", "data-owner", "trunk")
RECORD_PERIOD = 5.0  # seconds between a peer's records
RECORD_TTL = 20.0  # a killed peer disappears from the swarm's counts this long after its last record
PeerRole = Literal["trainer", "coordinator", "data-owner", "trunk"]

MAX_RECORD_LIFETIME = 120.0  # seconds a record may stay in the DHT (a peer re-publishes every RECORD_PERIOD)
MAX_RECORDS_READ = 4096  # records of one key a reader parses, at most (a hostile node may store thousands)

# Bounds keep a hostile peer from storing huge strings in everyone's DHT storage, and absurd numbers
# out of the swarm's figures: each is far beyond anything a real peer reaches, and far below what
# breaks a sum or a Prometheus float.
MAX_EPOCH = 10**9
MAX_STEPS = 10**12
MAX_SAMPLES = 10**12
MAX_SAMPLES_PER_SECOND = 1e7
MAX_BYTES = 10**17  # cumulative since the peer started: 100 PB
MAX_ROUNDS = 10**9
MAX_ABS_LOSS = 1e6
MAX_ROUND_SECONDS = 86400.0
MAX_GROUP_SIZE = 10**5
_ShortText = pydantic.constr(strict=True, min_length=0, max_length=128)
_Count = pydantic.conint(strict=True, ge=0, le=MAX_SAMPLES)
_NonNegative = pydantic.confloat(strict=True, ge=0.0)
_Fraction = pydantic.confloat(strict=True, ge=0.0, le=1.0)


class PeerRecord(pydantic.BaseModel):
    """One peer's progress, as published in the DHT.

    Counters (``bytes_*``, ``rounds_*``) are cumulative since the peer process started; readers turn
    them into rates with deltas between polls and treat a decrease as a restart.
    Optional fields are ``None`` until they mean something (no step yet, no round yet, no
    compression, no privacy head). They must still be present: the schema check refuses a record
    whose parsed form differs from what was sent, and a missing key parses to ``None``.
    """

    peer_id: _ShortText  # libp2p peer id, self-reported (the subkey is what authenticates)
    role: PeerRole
    step: pydantic.conint(strict=True, ge=0, le=MAX_STEPS)  # local optimizer steps
    epoch: pydantic.conint(strict=True, ge=0, le=MAX_EPOCH)  # swarm epoch the peer is in
    # last local training loss, None before the first step
    loss: Optional[pydantic.confloat(strict=True, ge=-MAX_ABS_LOSS, le=MAX_ABS_LOSS)]
    samples_per_second: pydantic.confloat(strict=True, ge=0.0, le=MAX_SAMPLES_PER_SECOND)
    samples_accumulated: _Count  # samples toward the current epoch's target batch
    bytes_sent: pydantic.conint(strict=True, ge=0, le=MAX_BYTES)
    bytes_received: pydantic.conint(strict=True, ge=0, le=MAX_BYTES)
    rounds_ok: pydantic.conint(strict=True, ge=0, le=MAX_ROUNDS)
    rounds_failed: pydantic.conint(strict=True, ge=0, le=MAX_ROUNDS)
    # duration of the last averaging round
    last_round_seconds: Optional[pydantic.confloat(strict=True, ge=0.0, le=MAX_ROUND_SECONDS)]
    last_round_group_size: Optional[pydantic.conint(strict=True, ge=0, le=MAX_GROUP_SIZE)]  # peers in the last group
    compression_density: Optional[_Fraction]  # fraction of entries sent, None = dense
    leakage_dcor: Optional[_Fraction]  # distance correlation at the cut layer, None = no privacy head
    parts_rejected: _Count = 0  # parts this peer, as a reducer, left out of averages (bad or outsized)
    rejected_peers: pydantic.conlist(_ShortText, max_items=8) = []  # the senders of the latest rejected parts
    utilization: Optional[_Fraction] = None  # share of the wall time since training began spent computing
    # groupmates this peer lately caught lying in a round's check (compression/verify.py), e.g. a reducer
    # that answered something else than the average of the parts it received
    lying_peers: pydantic.conlist(_ShortText, max_items=8) = []
    device: _ShortText
    client_mode: pydantic.StrictBool
    version: _ShortText
    time: _NonNegative  # unix time when the record was made (the peer's clock)

    class Config:
        extra = pydantic.Extra.forbid

    @pydantic.validator("loss", "samples_per_second", "last_round_seconds", "time")
    def _finite(cls, value):
        # NaN would also be refused by SchemaValidator (NaN != NaN), but with an obscure message.
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @classmethod
    def make(cls, **fields) -> "PeerRecord":
        """Build a record from loosely typed values (numpy scalars, ints for floats, NaN loss).

        Values are coerced to the exact types the strict schema wants, non-finite floats in optional
        fields become ``None`` and ``time`` defaults to now. Use this rather than the constructor in
        trainer code.
        """
        fields.setdefault("time", time_module.time())
        coerced = {}
        for name, field in cls.__fields__.items():
            if name not in fields:
                if not field.required and field.default is not None:
                    coerced[name] = field.get_default()
                    continue
                if field.allow_none:
                    coerced[name] = None
                    continue
                raise TypeError(f"PeerRecord.make: missing field {name!r}")
            value = fields[name]
            coerced[name] = _coerce(value, field)
        unknown = set(fields) - set(cls.__fields__)
        if unknown:
            raise TypeError(f"PeerRecord.make: unknown fields {sorted(unknown)}")
        return cls(**coerced)


_FLOAT_FIELDS = frozenset(
    {"loss", "samples_per_second", "last_round_seconds", "compression_density", "leakage_dcor", "utilization", "time"}
)
_TEXT_FIELDS = frozenset({"peer_id", "role", "device", "version"})


def _coerce(value, field):
    if value is None:
        return None
    if field.name == "client_mode":
        return bool(value)
    if field.name in ("rejected_peers", "lying_peers"):
        return [str(item) for item in value]
    if field.name in _TEXT_FIELDS:
        return str(value)
    if field.name in _FLOAT_FIELDS:
        value = float(value)
        if not math.isfinite(value):
            if field.allow_none:
                return None
            raise ValueError(f"PeerRecord.make: {field.name} must be finite, got {value}")
        return value
    return int(value)


class PeerRecordsSchema(pydantic.BaseModel):
    """The DHT key layout: ``{run_id}_peers`` -> {``[owner:<public key>]`` subkey: PeerRecord}."""

    peers: Dict[BytesWithPublicKey, PeerRecord]


def records_key(run_id: str) -> str:
    return f"{run_id}_peers"


class RecordLifetimeValidator(RecordValidatorBase):
    """Refuses records of the given DHT keys that would outlive ``max_lifetime`` seconds (by this node's
    clock, with MAX_CLOCK_SKEW of slack): what a hostile node stores then dies out soon after it stops
    storing, and each node's storage for those keys stays bounded by what arrives in that window.

    :param keys: the raw DHT keys (e.g. ``records_key(run_id)``) it applies to; others pass
    :param max_lifetime: seconds
    """

    def __init__(self, keys, max_lifetime: float = MAX_RECORD_LIFETIME):
        self._lifetimes = {DHTID.generate(source=key).to_bytes(): max_lifetime for key in keys}

    def validate(self, record: DHTRecord) -> bool:
        lifetime = self._lifetimes.get(record.key)
        return lifetime is None or record.expiration_time <= get_dht_time() + lifetime + MAX_CLOCK_SKEW

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, RecordLifetimeValidator):
            return False
        for key, lifetime in other._lifetimes.items():
            self._lifetimes[key] = max(lifetime, self._lifetimes.get(key, 0.0))
        return True


def record_validators(
    run_id: str, signature_validator: Optional[RSASignatureValidator] = None
) -> List[RecordValidatorBase]:
    """Validators to pass as ``hivemind.DHT(record_validators=...)`` on every node of the run.

    ``signature_validator`` carries this node's private key (its ``local_public_key`` is the subkey it
    may write); by default hivemind's process-wide key. Keep the same instance for ``publish_record``.
    Other validators of the run (e.g. a run-config schema) can be added to the same list: hivemind
    merges SchemaValidators and keeps one RSASignatureValidator.
    """
    if "." in run_id:
        raise ValueError(f"run_id must not contain '.', got {run_id!r}")
    if signature_validator is None:
        signature_validator = RSASignatureValidator()
    return [signature_validator, SchemaValidator(PeerRecordsSchema, prefix=run_id),
            RecordLifetimeValidator([records_key(run_id), f"{run_id}_progress"])]


def publish_record(
    dht: DHT,
    run_id: str,
    signature_validator: RSASignatureValidator,
    record: PeerRecord,
    ttl: float = 60.0,
    wait: bool = True,
    timeout: Optional[float] = None,
):
    """Store this node's record under its own ``[owner:...]`` subkey for ``ttl`` seconds.

    The DHT signs the value with ``signature_validator``'s key (it must be the instance passed in
    ``record_validators`` for this DHT). With ``wait=True`` returns True if at least one node stored
    it; with ``wait=False`` returns a future (for a trainer loop that must not block on the network).
    """
    value = record.dict()
    store = dht.store(
        key=records_key(run_id),
        subkey=signature_validator.local_public_key,
        value=value,
        expiration_time=time_module.time() + ttl,
        return_future=True,
    )
    if not wait:
        return store
    return bool(store.result(timeout=timeout))


def fetch_records(
    dht: DHT,
    run_id: str,
    max_age: Optional[float] = None,
    latest: bool = True,
    now: Optional[float] = None,
    peer_ids: Optional[Set[str]] = None,
) -> Dict[str, PeerRecord]:
    """Current records of the run, keyed by the owner's public key subkey (``[owner:...]`` as str).

    Drops entries that fail to parse (a node without validators could have returned them), records
    whose own ``time`` lies ahead of this node's clock by more than MAX_CLOCK_SKEW and, if ``max_age``
    is given, records older than ``max_age`` seconds (a peer that died keeps its record until the DHT
    expiration). Subkeys that are not ``[owner:...]`` keys are dropped as well: they could not have
    passed the signature check. With ``peer_ids``, entries claiming another peer ID are skipped before
    they are parsed (a flood of forged records then costs a dictionary lookup each). At most
    MAX_RECORDS_READ entries are parsed.
    """
    found = dht.get(records_key(run_id), latest=latest)
    if found is None or not isinstance(found.value, dict):
        return {}
    now = time_module.time() if now is None else now
    records: Dict[str, PeerRecord] = {}
    parsed = 0
    for subkey, entry in found.value.items():
        if peer_ids is not None and (not isinstance(entry.value, dict) or entry.value.get("peer_id") not in peer_ids):
            continue
        if parsed >= MAX_RECORDS_READ:
            logger.debug(f"{len(found.value)} records under {records_key(run_id)}; read the first {MAX_RECORDS_READ}")
            break
        parsed += 1
        owner = subkey.decode(errors="replace") if isinstance(subkey, bytes) else str(subkey)
        if RSASignatureValidator._PUBLIC_KEY_RE.search(owner.encode()) is None:
            logger.debug(f"Dropping a peer record under an unprotected subkey {owner[:40]!r}")
            continue
        if entry.expiration_time < now:
            continue
        try:
            record = PeerRecord.parse_obj(entry.value)
        except (pydantic.ValidationError, TypeError) as error:
            logger.debug(f"Dropping a malformed peer record from {owner[:60]}: {error}")
            continue
        if record.time > now + MAX_CLOCK_SKEW:
            continue
        if max_age is not None and now - record.time > max_age:
            continue
        records[owner] = record
    return records


def short_owner(owner: str, length: int = 12) -> str:
    """A short, stable label for an ``[owner:<key>]`` subkey (the key's tail differs between peers)."""
    inner = owner
    match = RSASignatureValidator._PUBLIC_KEY_RE.search(owner.encode())
    if match is not None:
        inner = match.group(1).decode(errors="replace")
    inner = "".join(ch for ch in inner if ch.isalnum())
    return inner[-length:]
