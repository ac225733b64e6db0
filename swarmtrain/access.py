"""Access control for a token-gated run: expiring tokens bound to a peer ID, issued by the coordinator.

A token is the authority's (the coordinator's) RSA signature over (name, peer ID, expiration time),
made with its libp2p identity key, packed with the authority's public key into one copy-pasteable
line (``swt1.<base64url>``). The organiser needs only the volunteer's peer ID (``swarmtrain identity``
prints it); only the holder of that peer ID's private key can use the token, so a token that leaks is
of no use to anyone else.

Two gates use it:

- the DHT: :class:`TokenAuthorizer` (a hivemind ``TokenAuthorizerBase``) signs every DHT request
  and response with the node's key and attaches its token; nodes refuse requests and responses
  without a valid one. A peer without a token therefore cannot read the run config, publish records
  or declare itself for matchmaking.
- averaging: hivemind's authorizer guards DHT RPCs only, so :class:`AccessGuardedAverager` makes an
  averager refuse ``rpc_join_group``, ``rpc_aggregate_part`` and ``rpc_download_state`` from a caller
  (its libp2p-authenticated peer ID) that has no valid token. Each peer publishes its token under
  ``f"{run_id}_access"`` (its own ``[owner:...]`` subkey); every averager reads them (cached, refreshed
  every few seconds) and checks each token itself. The authority is always allowed.

Trust: a volunteer accepts a token's authority only if its peer ID is one of the initial peers', the
same anchor as the signed run config. A process that takes part in a token-gated run *activates* its
:class:`LocalAccess` once (``swarmtrain peer --token``, ``swarmtrain coordinator`` with
``access.mode: token``); ``network.make_dht`` and the averager factories pick it up from there.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import logging
import math
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import AsyncIterator, Dict, Optional, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarmtrain.identity import peer_id_of

REFUSAL_READ_TIMEOUT = 5.0  # seconds a refused averaging stream may take to send what it sends
REFUSAL_READ_MESSAGES = 64  # messages read from a refused averaging stream, at most


async def _drain(stream, max_messages: int, timeout: float) -> None:
    """Read and drop up to ``max_messages`` of ``stream`` until it ends, for at most ``timeout`` s."""
    async def read():
        count = 0
        async for _ in stream:
            count += 1
            if count >= max_messages:
                return

    try:
        await asyncio.wait_for(read(), timeout=timeout)
    except Exception:
        pass  # a caller that stalls or breaks the stream gets the refusal all the same


def token_from_options(token: Optional[str], token_file: Optional[str]) -> Optional[str]:
    """The token given with --token or --token-file (UserError for both, or an unreadable file)."""
    from swarmtrain.errors import UserError

    if token is not None and token_file is not None:
        raise UserError("give the token once: --token or --token-file, not both")
    if token_file is None:
        return token
    try:
        with open(token_file) as handle:
            return handle.read()
    except OSError as error:
        raise UserError(f"--token-file {token_file}: cannot read it ({error.strerror})") from None

logger = logging.getLogger("swarmtrain.access")

TOKEN_PREFIX = "swt1."
TOKEN_VERSION = 1
_SIGNED_DOMAIN = b"swarmtrain access token\n"  # never a prefix of anything else this key signs
_NAME_RE = re.compile(r"[\w.@+-]{1,64}")
SELF_ISSUED_LIFETIME = 24 * 3600.0  # the authority's own token, re-issued when a quarter is left
ACCESS_RECORD_PERIOD = 60.0  # a peer re-publishes its token this often...
ACCESS_RECORD_TTL = 300.0  # ...with this DHT lifetime (never beyond the token's expiry)
TABLE_REFRESH_PERIOD = 5.0  # an averager re-reads the published tokens this often
TABLE_MISS_REFRESH = 1.0  # an unknown caller triggers a re-read at most this often
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenError(ValueError):
    """A token that cannot be used, with a message for the user (one line)."""


# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------


def signed_message(name: str, peer_id: PeerID, expires: int) -> bytes:
    """The exact bytes the authority signs."""
    name_bytes, id_bytes = name.encode(), peer_id.to_bytes()
    return (_SIGNED_DOMAIN + bytes([TOKEN_VERSION, len(name_bytes)]) + name_bytes + bytes([len(id_bytes)])
            + id_bytes + struct.pack(">Q", expires))


def format_time(unix_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix_time))


@dataclass(frozen=True)
class Token:
    name: str  # who the organiser gave it to (for humans and logs)
    peer_id: PeerID  # the only peer that can use it
    expires: int  # unix time, seconds
    authority: RSAPublicKey = field(repr=False)  # the key that signed it
    signature: bytes = field(repr=False)  # raw RSA-PSS signature over signed_message(...)

    @property
    def authority_id(self) -> PeerID:
        return peer_id_of(self.authority)

    def expired(self, now: Optional[float] = None) -> bool:
        return self.expires <= (time.time() if now is None else now)

    def signature_ok(self) -> bool:
        message = signed_message(self.name, self.peer_id, self.expires)
        return self.authority.verify(message, base64.b64encode(self.signature))

    def to_text(self) -> str:
        name, peer = self.name.encode(), self.peer_id.to_bytes()
        authority = self.authority._public_key.public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        blob = (bytes([TOKEN_VERSION, len(name)]) + name + bytes([len(peer)]) + peer + struct.pack(">Q", self.expires)
                + struct.pack(">H", len(authority)) + authority + self.signature)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(blob).decode().rstrip("=")

    def describe(self) -> str:
        return f"{self.name} (peer {self.peer_id}), valid until {format_time(self.expires)}"


def issue_token(authority_key: RSAPrivateKey, name: str, peer_id: PeerID | str, expires: float) -> Token:
    """Sign a token for `peer_id` that expires at unix time `expires`."""
    if not _NAME_RE.fullmatch(name or ""):
        raise TokenError(f"name {name!r}: use 1-64 letters, digits or . _ @ + - (e.g. alice)")
    peer_id = parse_peer_id(peer_id) if isinstance(peer_id, str) else peer_id
    expires = int(math.ceil(expires))
    signature = base64.b64decode(authority_key.sign(signed_message(name, peer_id, expires)))
    return Token(name, peer_id, expires, authority_key.get_public_key(), signature)


def parse_token(text: str) -> Token:
    """Decode a token line (whitespace, e.g. from a wrapped copy, is ignored). The signature is not
    checked here: see :func:`check_token`."""
    text = "".join(str(text).split())
    if not text.startswith(TOKEN_PREFIX):
        raise TokenError(f"this is not a swarmtrain access token (it should start with {TOKEN_PREFIX!r}); "
                         "copy the whole token the organiser sent")
    try:
        body = text[len(TOKEN_PREFIX):]
        blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        if blob[0] != TOKEN_VERSION:
            raise TokenError(f"this token has format version {blob[0]}; this swarmtrain reads version "
                             f"{TOKEN_VERSION} (upgrade swarmtrain, or ask the organiser for a new token)")
        at = 1
        name = blob[at + 1: at + 1 + blob[at]].decode()
        at += 1 + blob[at]
        peer_id = PeerID(blob[at + 1: at + 1 + blob[at]])
        at += 1 + blob[at]
        (expires,) = struct.unpack(">Q", blob[at: at + 8])
        at += 8
        (key_length,) = struct.unpack(">H", blob[at: at + 2])
        at += 2
        public_key = serialization.load_der_public_key(blob[at: at + key_length])
        signature = blob[at + key_length:]
        if not isinstance(public_key, rsa.RSAPublicKey) or len(signature) != public_key.key_size // 8:
            raise ValueError("bad key or signature length")
    except TokenError:
        raise
    except (ValueError, IndexError, struct.error, binascii.Error, UnicodeDecodeError):
        raise TokenError("this token is damaged (cut short or altered while copying?); "
                         "copy the whole token the organiser sent") from None
    return Token(name, peer_id, expires, RSAPublicKey(public_key), signature)


def check_token(token: Token, *, peer_id: PeerID, trusted: Sequence[PeerID], identity_hint: str = "",
                now: Optional[float] = None) -> None:
    """Raise TokenError (one line, saying what to do) unless `token` lets `peer_id` into a swarm
    whose authority is one of `trusted` (the initial peers)."""
    if not token.signature_ok():
        raise TokenError("this token's signature does not match its contents (altered or damaged while copying); "
                         "copy it again or ask the organiser for a new one")
    if token.authority_id not in trusted:
        raise TokenError(f"this token was issued by {token.authority_id}, which is not among the initial peers "
                         f"({', '.join(map(str, trusted))}); use the coordinator address that came with the token")
    if token.peer_id != peer_id:
        raise TokenError(f"this token was issued for peer {token.peer_id}, but your identity is {peer_id}"
                         f"{identity_hint}; use --identity with the key file whose peer ID you gave the organiser")
    if token.expired(now):
        raise TokenError(f"your token expired on {format_time(token.expires)} (issued to {token.name}); "
                         "ask the organiser for a new one")


def parse_peer_id(text: str) -> PeerID:
    import multihash

    try:
        peer_id = PeerID.from_base58(text.strip())
        multihash.decode(peer_id.to_bytes())
    except Exception:
        raise TokenError(f"{text!r} is not a peer ID (like QmXfA...); the volunteer gets theirs from "
                         "`swarmtrain identity`") from None
    return peer_id


def parse_expiry(text: str, now: Optional[float] = None) -> float:
    """Unix time from a duration (90m, 12h, 7d, 4w) or a UTC date/time (2026-12-31, 2026-12-31T18:00)."""
    now = time.time() if now is None else now
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", value.lower())
    if match:
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
        if seconds <= 0:
            raise TokenError(f"--expires {text!r}: the duration must be positive, e.g. 7d")
        return now + seconds
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise TokenError(f"--expires {text!r}: use a duration like 90m, 12h, 7d or 4w, "
                         "or a UTC date like 2026-12-31") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    expires = calendar.timegm(moment.utctimetuple())
    if expires <= now:
        raise TokenError(f"--expires {text!r} is in the past")
    return float(expires)


# ---------------------------------------------------------------------------------------------
# the DHT gate
# ---------------------------------------------------------------------------------------------


class TokenAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer for a token-gated run.

    Our AccessToken carries our own public key (requests are signed with its private key) and the
    authority's signature; a token is valid when the authority signed (username, peer ID of the
    AccessToken's key, expiration) and it has not expired. The authority itself holds `issuer` and
    issues its own tokens as needed."""

    def __init__(self, local_private_key: RSAPrivateKey, authority: RSAPublicKey, *, token: Optional[Token] = None,
                 issuer: Optional[RSAPrivateKey] = None):
        if (token is None) == (issuer is None):
            raise ValueError("give a token, or the issuer key for self-issued tokens (the authority)")
        super().__init__(local_private_key)
        self._authority, self._token, self._issuer = authority, token, issuer

    async def get_token(self) -> AccessToken:
        token = self._token
        if self._issuer is not None:
            token = issue_token(self._issuer, "authority", peer_id_of(self.local_public_key),
                                time.time() + SELF_ISSUED_LIFETIME)
        return AccessToken(username=token.name, public_key=self.local_public_key.to_bytes(),
                           expiration_time=str(token.expires), signature=token.signature)

    def is_token_valid(self, access_token: AccessToken) -> bool:
        try:
            expires = int(access_token.expiration_time)
            if expires <= time.time():
                return False
            message = signed_message(access_token.username, peer_id_of(access_token.public_key), expires)
            return self._authority.verify(message, base64.b64encode(access_token.signature))
        except Exception:
            return False

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        # a volunteer's token cannot be renewed from here: it is sent until it expires (then refused)
        return self._issuer is not None and int(access_token.expiration_time) - time.time() < SELF_ISSUED_LIFETIME / 4


# ---------------------------------------------------------------------------------------------
# this process's access
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalAccess:
    """How this node takes part in a token-gated run."""

    private_key: RSAPrivateKey  # this node's identity key
    authority: RSAPublicKey  # whose tokens this node accepts
    token: Optional[Token] = None  # a volunteer's own token (None for the authority)
    issuer: Optional[RSAPrivateKey] = None  # the authority's key, to issue its own tokens
    _authorizer: Optional[TokenAuthorizer] = field(default=None, repr=False)

    @property
    def peer_id(self) -> PeerID:
        return peer_id_of(self.private_key.get_public_key())

    @property
    def authority_id(self) -> PeerID:
        return peer_id_of(self.authority)

    @property
    def owner_subkey(self) -> bytes:
        # the subkey RSASignatureValidator protects: only this key can store under it
        return b"[owner:" + self.private_key.get_public_key().to_bytes() + b"]"

    def authorizer(self) -> TokenAuthorizer:
        if self._authorizer is None:
            self._authorizer = TokenAuthorizer(self.private_key, self.authority, token=self.token, issuer=self.issuer)
        return self._authorizer


def coordinator_access(private_key: RSAPrivateKey) -> LocalAccess:
    """The authority: it issues its own tokens and accepts the tokens it issued."""
    return LocalAccess(private_key, private_key.get_public_key(), issuer=private_key)


def peer_access(token_text: str, private_key: RSAPrivateKey, trusted: Sequence[PeerID],
                identity_hint: str = "") -> LocalAccess:
    """A volunteer's access from its token; TokenError (one line) if the token would not let it in."""
    token = parse_token(token_text)
    check_token(token, peer_id=peer_id_of(private_key.get_public_key()), trusted=trusted, identity_hint=identity_hint)
    return LocalAccess(private_key, token.authority, token=token)


_active: Optional[LocalAccess] = None


def activate(access: Optional[LocalAccess]) -> Optional[LocalAccess]:
    """Make `access` this process's access (None: an open run). DHTs started afterwards with
    ``network.make_dht`` and averagers built afterwards are gated by it."""
    global _active
    _active = access
    return access


def active_access() -> Optional[LocalAccess]:
    return _active


# ---------------------------------------------------------------------------------------------
# the averaging gate
# ---------------------------------------------------------------------------------------------


def access_record_key(run_id: str) -> str:
    return f"{run_id}_access"


def _run_id_of_prefix(prefix: str) -> str:
    for suffix in ("_grad_averager", "_state_averager"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


class AccessTable:
    """Peers whose valid token is published under the run's access key, and until when; the
    authority is always in it."""

    def __init__(self, authority: RSAPublicKey):
        self.authority = authority
        self.authority_id = peer_id_of(authority)
        self.allowed: Dict[PeerID, int] = {}
        self.refreshed_at = float("-inf")  # time.monotonic()

    def allows(self, peer_id: PeerID, now: Optional[float] = None) -> bool:
        if peer_id == self.authority_id:
            return True
        expires = self.allowed.get(peer_id)
        return expires is not None and expires > (time.time() if now is None else now)

    def age(self) -> float:
        return time.monotonic() - self.refreshed_at

    def update(self, found, now: Optional[float] = None) -> None:
        """Replace the table with the valid tokens in a ``dht.get(key, latest=True)`` result."""
        now = time.time() if now is None else now
        allowed: Dict[PeerID, int] = {}
        entries = found.value.values() if found is not None and isinstance(found.value, dict) else ()
        for entry in entries:
            try:
                token = parse_token(entry.value)
            except (TokenError, TypeError, AttributeError):
                continue
            # the token must be signed by *our* authority; whoever published it, it admits only its peer ID
            if (token.authority_id == self.authority_id and not token.expired(now) and token.signature_ok()):
                allowed[token.peer_id] = max(token.expires, allowed.get(token.peer_id, 0))
        self.allowed = allowed
        self.refreshed_at = time.monotonic()


class _TokenPublisher:
    """Keeps this peer's token in the DHT (a host-process thread, shared by the averagers of one DHT)."""

    _registry: Dict[tuple, "_TokenPublisher"] = {}
    _lock = threading.Lock()

    def __init__(self, dht, key: str, access: LocalAccess):
        self.dht, self.key, self.access = dht, key, access
        self.users = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="swarmtrain-access-publisher", daemon=True)

    @classmethod
    def acquire(cls, dht, key: str, access: LocalAccess) -> Optional["_TokenPublisher"]:
        if access.token is None:
            return None  # the authority is always allowed: nothing to publish
        with cls._lock:
            publisher = cls._registry.get((id(dht), key))
            if publisher is None:
                publisher = cls._registry[id(dht), key] = cls(dht, key, access)
                publisher.thread.start()
            publisher.users += 1
            return publisher

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users <= 0:
                self.stop.set()
                self._registry.pop((id(self.dht), self.key), None)

    def _run(self) -> None:
        token, delay, warned = self.access.token, 0.0, False
        while not self.stop.wait(delay):
            if token.expired():
                if not warned:
                    logger.error(f"your access token expired on {format_time(token.expires)}: the swarm refuses this "
                                 "peer from now on; ask the organiser for a new token and restart with it")
                    warned = True
                delay = ACCESS_RECORD_PERIOD
                continue
            try:
                stored = self.dht.store(self.key, subkey=self.access.owner_subkey, value=token.to_text(),
                                        expiration_time=min(token.expires, time.time() + ACCESS_RECORD_TTL),
                                        return_future=True).result(timeout=30)
            except Exception as error:  # the DHT is shutting down, or a timeout: try again soon
                logger.debug(f"could not publish the access token: {error!r}")
                stored = False
            delay = ACCESS_RECORD_PERIOD if stored else 5.0


class AccessGuardedAverager:
    """Mixin for hivemind DecentralizedAverager subclasses (put it first in the bases): averaging
    RPCs from a peer without a valid token are refused, and this peer's own token is published so
    that the others accept its calls. Needs ``access`` (a LocalAccess); the DHT key is derived from
    the averager's prefix (``{run_id}_grad_averager`` / ``{run_id}_state_averager``) unless
    ``access_key`` is given."""

    def __init__(self, *args, access: LocalAccess, access_key: Optional[str] = None, **kwargs):
        # set before super().__init__: it forks the averager process, which needs them
        self._access = access
        self._access_key = access_key or access_record_key(_run_id_of_prefix(kwargs.get("prefix", "")))
        self._access_table = AccessTable(access.authority)
        self._access_lock: Optional[asyncio.Lock] = None  # made in the averager process, on first use
        self._access_background: Optional[asyncio.Task] = None
        self._access_refused_logged: Dict[tuple, float] = {}  # (peer, RPC) -> when its refusal was last logged
        self._access_publisher = None
        super().__init__(*args, **kwargs)
        self._access_publisher = _TokenPublisher.acquire(self.dht, self._access_key, access)

    def shutdown(self) -> None:
        if self._access_publisher is not None:
            self._access_publisher.release()
            self._access_publisher = None
        super().shutdown()

    async def _refresh_access_table(self, min_age: float) -> None:
        if self._access_lock is None:
            self._access_lock = asyncio.Lock()
        async with self._access_lock:
            if self._access_table.age() < min_age:
                return
            try:
                found = await asyncio.wait_for(self.dht.get(self._access_key, latest=True, return_future=True), 10.0)
            except Exception as error:
                logger.debug(f"could not read the access tokens: {error!r}")
                self._access_table.refreshed_at = time.monotonic()  # do not hammer a struggling DHT
                return
            self._access_table.update(found)

    async def _access_allows(self, peer_id: PeerID, what: str) -> bool:
        table = self._access_table
        if table.allows(peer_id):
            idle = self._access_background is None or self._access_background.done()
            if table.age() > TABLE_REFRESH_PERIOD and idle:
                self._access_background = asyncio.create_task(self._refresh_access_table(TABLE_REFRESH_PERIOD))
            return True
        await self._refresh_access_table(TABLE_MISS_REFRESH)
        if table.allows(peer_id):
            return True
        last = self._access_refused_logged.get((peer_id, what), float("-inf"))
        if time.monotonic() - last > 60.0:  # once a minute per peer and RPC
            self._access_refused_logged[(peer_id, what)] = time.monotonic()
            logger.warning(f"refused {what} from peer {peer_id}: it has no valid access token for this run")
        return False

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._access_allows(context.remote_id, "rpc_join_group"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._access_allows(context.remote_id, "rpc_aggregate_part"):
            # read what the caller sends, up to its end of stream, before answering: a stream closed
            # with input still unread is reset, the reset can overtake the answer, and the caller
            # then sees a broken pipe instead of the refusal (reading only the first message still
            # lost the race now and then). Bounded in messages and time.
            await _drain(stream, REFUSAL_READ_MESSAGES, REFUSAL_READ_TIMEOUT)
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._access_allows(context.remote_id, "rpc_download_state"):
            return  # an empty answer: hivemind's downloader moves on to the next peer
        async for message in super().rpc_download_state(request, context):
            yield message


_guarded_classes: Dict[type, type] = {}


def guarded_class(cls: type) -> type:
    """`cls` (a DecentralizedAverager subclass) with :class:`AccessGuardedAverager` in front."""
    if issubclass(cls, AccessGuardedAverager):
        return cls
    if cls not in _guarded_classes:
        # the same name on purpose: hivemind names an averager's RPC handlers after its class
        # ("{prefix}::{class name}.rpc_join_group"), so a guarded averager must keep the name for
        # unguarded callers of the same class (the coordinator's state downloads) to reach it
        _guarded_classes[cls] = type(cls.__name__, (AccessGuardedAverager, cls),
                                     {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _guarded_classes[cls]


def with_access_guard(cls: type, access: Optional[LocalAccess] = None):
    """A factory for `cls` averagers: guarded when `access` (default: this process's active access,
    i.e. a token-gated run) is set, plain `cls` otherwise."""
    access = access or active_access()
    return cls if access is None else partial(guarded_class(cls), access=access)


def make_state_averager(owner, make_default, /, **kwargs):
    """hivemind.Optimizer._make_state_averager (hivemind 1.1.12) for the Optimizer `owner`, with a
    guarded TrainingStateAverager on a token-gated run; `make_default(**kwargs)` (hivemind's own)
    otherwise. (`kwargs` holds hivemind's own arguments, among them `optimizer`.)"""
    access = active_access()
    if access is None:
        return make_default(**kwargs)
    from hivemind.optim.state_averager import TrainingStateAverager

    return guarded_class(TrainingStateAverager)(
        access=access,
        dht=owner.dht,
        prefix=f"{owner.run_id}_state_averager",
        min_matchmaking_time=owner.matchmaking_time,
        allreduce_timeout=owner.allreduce_timeout,
        shutdown_timeout=owner.shutdown_timeout,
        offload_optimizer=owner.offload_optimizer,
        custom_gradients=owner.offload_optimizer,
        status_loglevel=owner.status_loglevel,
        next_chunk_timeout=owner.next_chunk_timeout,
        client_mode=owner.client_mode,
        auxiliary=owner.auxiliary,
        start=True,
        **kwargs,
    )
