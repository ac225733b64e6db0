"""The averaging gate of a token-gated run: averagers refuse callers without a valid token.

hivemind's authorizer guards DHT RPCs only, so :class:`AccessGuardedAverager` makes an averager refuse
``rpc_join_group``, ``rpc_aggregate_part`` and ``rpc_download_state`` from a caller (its
libp2p-authenticated peer ID) that has no valid token. Each peer publishes its token under
``f"{run_id}_access"`` (its own ``[owner:...]`` subkey); every averager reads them (cached, refreshed
every few seconds) and checks each token itself. The authority is always allowed.

Averager factories take the node's :class:`~swarmtrain.access.authorizer.LocalAccess` (None on an
open run) and wrap their class with :func:`with_access_guard`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial
from typing import AsyncIterator, Dict, Optional

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.crypto import RSAPublicKey

from swarmtrain.access.authorizer import LocalAccess
from swarmtrain.access.tokens import TokenError, format_time, parse_token
from swarmtrain.net.identity import peer_id_of

logger = logging.getLogger("swarmtrain.access")

REFUSAL_READ_TIMEOUT = 5.0  # seconds a refused averaging stream may take to send what it sends
REFUSAL_READ_MESSAGES = 64  # messages read from a refused averaging stream, at most
ACCESS_RECORD_PERIOD = 60.0  # a peer re-publishes its token this often...
ACCESS_RECORD_TTL = 300.0  # ...with this DHT lifetime (never beyond the token's expiry)
TABLE_REFRESH_PERIOD = 5.0  # an averager re-reads the published tokens this often...
TABLE_REFRESH_PEERS = 4  # ...stretched by (tokens / this) beyond: a read returns every peer's token
TABLE_MISS_REFRESH = 1.0  # an unknown caller triggers a re-read at most this often


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


def access_record_key(run_id: str) -> str:
    return f"{run_id}_access"


def _run_id_of_prefix(prefix: str) -> str:
    for suffix in ("_grad_averager", "_state_averager"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


class AccessTable:
    """Peers whose valid token is published under the run's access key, and until when; the
    authority is always in it.

    :param authority: the coordinator's public key (tokens it did not sign are ignored)
    """

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

    def refresh_period(self) -> float:
        """Seconds between re-reads while every caller is known (an unknown caller triggers one sooner):
        TABLE_REFRESH_PERIOD, longer in proportion beyond TABLE_REFRESH_PEERS tokens, so that what a
        peer reads per second does not grow with the swarm."""
        return TABLE_REFRESH_PERIOD * max(1.0, len(self.allowed) / TABLE_REFRESH_PEERS)

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
    ``access_key`` is given.

    :param access: this node's LocalAccess (its token is published; the authority's tokens are checked)
    :param access_key: the DHT key of the run's tokens (default: derived from the averager's prefix)
    :param args, kwargs: the averager's own
    """

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

    def stop_publishing_token(self) -> None:
        if self._access_publisher is not None:
            self._access_publisher.release()
            self._access_publisher = None

    def shutdown(self) -> None:
        self.stop_publishing_token()
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
            period = table.refresh_period()
            if table.age() > period and idle:
                self._access_background = asyncio.create_task(self._refresh_access_table(period))
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


def with_access_guard(cls: type, access: Optional[LocalAccess]):
    """A factory for `cls` averagers: guarded when `access` is given (a token-gated run), plain `cls`
    otherwise (an open run)."""
    return cls if access is None else partial(guarded_class(cls), access=access)

