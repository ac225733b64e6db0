"""The ban list: peers this averager refuses to average with, for a while.

A peer lands on it when this peer caught it lying as a reducer (compression/verify.py: the cross-check of
a round proves it to the member that checks), or when enough others say so, or when the organiser of a
token-gated run revoked it:

- local bans: decided by this peer's own checks, for ``BAN_SECONDS``;
- published accusations: every peer stores its current bans under ``{run_id}_bans``, in its own
  ``[owner:<public key>]`` subkey (signed by the DHT's RSASignatureValidator, as access tokens are),
  as ``{"bans": [[peer id, until (unix time), reason], ...]}`` with the DHT expiration of the last one.
  One accuser could be a liar itself, so a published accusation counts only when ``quorum`` distinct
  accusers name the same peer;
- revocations: entries published under the *authority's* subkey (the coordinator of a token-gated run,
  see :func:`publish_revocations`) count alone.

Averagers consult :meth:`BanList.is_banned` when a peer asks to join their group, when they pick a
leader to join, and when a group forms (a banned member fails the round before anything is sent). The
object is created in the host process and used in the averager's process (it is forked with it): its
DHT reads and writes go through the DHT's pipe like every other averager request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, Iterable, List, Optional, Set, Tuple

logger = logging.getLogger("swarmtrain.access")

BAN_SECONDS = 3600.0  # a peer caught lying is refused for an hour; it can come back after that
BAN_QUORUM = 2  # distinct accusers whose published bans make every peer refuse a peer
REFRESH_PERIOD = 10.0  # published bans are re-read this often
MAX_PUBLISHED = 32  # entries per accuser
REASON_CHARS = 120


def bans_key(run_id: str) -> str:
    return f"{run_id}_bans"


def _parse_entries(value) -> List[Tuple[str, float, str]]:
    """Well-formed [peer, until, reason] entries of one published value; anything else is dropped."""
    if not isinstance(value, dict) or not isinstance(value.get("bans"), (list, tuple)):
        return []
    entries = []
    for entry in list(value["bans"])[:MAX_PUBLISHED]:
        if isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str) \
                and isinstance(entry[1], (int, float)) and isinstance(entry[2], str) and len(entry[0]) <= 128:
            entries.append((entry[0], float(entry[1]), entry[2][:REASON_CHARS]))
    return entries


def _owner_id(subkey) -> Optional[str]:
    """The peer ID of the key that signed an ``[owner:...]`` subkey, or None."""
    from hivemind.dht.crypto import RSASignatureValidator

    from swarmtrain.net.identity import peer_id_of

    raw = subkey if isinstance(subkey, bytes) else str(subkey).encode()
    match = RSASignatureValidator._PUBLIC_KEY_RE.search(raw)
    if match is None:
        return None
    try:
        return str(peer_id_of(match.group(1)))
    except Exception:
        return None


class BanList:
    """Peers to refuse, with expiry (see the module docstring).

    :param dht: the DHT to publish and read bans through (None: local bans only, e.g. in tests)
    :param run_id: the run (the DHT key is ``{run_id}_bans``)
    :param owner_subkey: this peer's ``[owner:<public key>]`` subkey, which its DHT signs (None: this
      peer does not publish its bans, it still reads the others')
    :param authority_id: peer ID of the organiser whose revocations count alone (token-gated runs)
    :param quorum: distinct accusers that make a published accusation count
    :param ban_seconds: how long a local ban lasts
    """

    def __init__(self, dht=None, run_id: Optional[str] = None, owner_subkey: Optional[bytes] = None,
                 authority_id: Optional[str] = None, quorum: int = BAN_QUORUM, ban_seconds: float = BAN_SECONDS):
        self.dht, self.run_id, self.owner_subkey = dht, run_id, owner_subkey
        self.authority_id = None if authority_id is None else str(authority_id)
        self.quorum, self.ban_seconds = int(quorum), float(ban_seconds)
        self.local: Dict[str, Tuple[float, str]] = {}  # peer -> (until, reason)
        self.accusers: Dict[str, Set[str]] = {}  # peer -> accusers with a valid published entry
        self.revoked: Dict[str, float] = {}  # peer -> until, by the authority
        self.refreshed_at = float("-inf")
        self._refreshing: Optional[asyncio.Task] = None

    # -------------------------------------------------------------- deciding
    def is_banned(self, peer_id, now: Optional[float] = None) -> bool:
        peer, now = str(peer_id), time.time() if now is None else now
        until = self.local.get(peer, (0.0, ""))[0]
        if until > now or self.revoked.get(peer, 0.0) > now:
            return True
        return len(self.accusers.get(peer, ())) >= self.quorum

    def banned_peers(self, now: Optional[float] = None) -> List[str]:
        now = time.time() if now is None else now
        candidates = set(self.local) | set(self.revoked) | set(self.accusers)
        return sorted(peer for peer in candidates if self.is_banned(peer, now))

    def ban(self, peer_id, reason: str, now: Optional[float] = None) -> None:
        """Refuse ``peer_id`` for ``ban_seconds`` from now, and tell the swarm (when publishing)."""
        now = time.time() if now is None else now
        peer = str(peer_id)
        self.local[peer] = (now + self.ban_seconds, reason[:REASON_CHARS])
        logger.warning(f"banning peer {peer} for {self.ban_seconds:.0f} s: {reason}")
        self._publish(now)

    # -------------------------------------------------------------- the DHT
    def _publish(self, now: float) -> None:
        if self.dht is None or self.owner_subkey is None or self.run_id is None:
            return
        entries = [[peer, until, reason] for peer, (until, reason) in self.local.items() if until > now]
        entries = sorted(entries, key=lambda entry: -entry[1])[:MAX_PUBLISHED]
        if not entries:
            return
        try:
            self.dht.store(bans_key(self.run_id), subkey=self.owner_subkey, value={"bans": entries},
                           expiration_time=max(entry[1] for entry in entries), return_future=True)
        except Exception as error:  # the DHT is shutting down: the local ban holds all the same
            logger.debug(f"could not publish bans: {error!r}")

    def update(self, found, now: Optional[float] = None) -> None:
        """Replace the published view with a ``dht.get(bans_key(run_id), latest=True)`` result."""
        now = time.time() if now is None else now
        accusers: Dict[str, Set[str]] = {}
        revoked: Dict[str, float] = {}
        entries = found.value.items() if found is not None and isinstance(getattr(found, "value", None), dict) else ()
        for subkey, item in entries:
            accuser = _owner_id(subkey)
            if accuser is None:
                continue  # not a signed subkey: anyone could have written it
            for peer, until, _reason in _parse_entries(getattr(item, "value", None)):
                if until <= now or peer == accuser:
                    continue
                if self.authority_id is not None and accuser == self.authority_id:
                    revoked[peer] = max(until, revoked.get(peer, 0.0))
                else:
                    accusers.setdefault(peer, set()).add(accuser)
        self.accusers, self.revoked = accusers, revoked
        self.refreshed_at = time.monotonic()

    async def refresh(self, min_age: float = REFRESH_PERIOD) -> None:
        """Re-read the published bans if the view is older than ``min_age`` (in the averager's process)."""
        if self.dht is None or self.run_id is None or time.monotonic() - self.refreshed_at < min_age:
            return
        self.refreshed_at = time.monotonic()  # also after a failure: do not hammer a struggling DHT
        try:
            found = await asyncio.wait_for(self.dht.get(bans_key(self.run_id), latest=True, return_future=True), 10.0)
        except Exception as error:
            logger.debug(f"could not read the published bans: {error!r}")
            return
        self.update(found)

    def refresh_in_background(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self.refresh())


def publish_revocations(dht, run_id: str, owner_subkey: bytes, revocations: Iterable[Tuple[str, float, str]],
                        timeout: float = 30.0) -> bool:
    """Store the organiser's revocations (peer id, until, reason) under its own subkey: on a token-gated
    run every averager then refuses those peers until then. Returns whether a DHT node stored them."""
    entries = [[str(peer), float(until), str(reason)[:REASON_CHARS]] for peer, until, reason in revocations]
    entries = [entry for entry in entries if entry[1] > time.time()][:MAX_PUBLISHED]
    if not entries:
        return True
    stored = dht.store(bans_key(run_id), subkey=owner_subkey, value={"bans": entries},
                       expiration_time=max(entry[1] for entry in entries), return_future=True)
    return bool(stored.result(timeout=timeout))


REVOCATION_DEFAULT = "30d"


def read_revocations(path) -> List[Tuple[str, float, str]]:
    """The organiser's revocations file: one peer per line, ``PEER_ID [UNTIL] [# reason]``; UNTIL is a
    duration counted from the file's last change (90m, 12h, 7d; default 30d) or a UTC date
    (2026-12-31). Blank lines and ``#`` comments are skipped; a malformed line is a UserError naming it."""
    from pathlib import Path

    from swarmtrain.access.tokens import TokenError, parse_expiry, parse_peer_id
    from swarmtrain.errors import UserError

    path = Path(path)
    try:
        text, changed = path.read_text(), path.stat().st_mtime
    except OSError as error:
        raise UserError(f"--revoked {path}: cannot read it ({error.strerror}); give a text file with one "
                        "peer ID per line") from None
    revocations = []
    for number, line in enumerate(text.splitlines(), start=1):
        content, _, reason = line.partition("#")
        fields = content.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise UserError(f"--revoked {path}, line {number}: expected 'PEER_ID [UNTIL] [# reason]', got {line.strip()!r}")
        try:
            peer = parse_peer_id(fields[0])
            when = fields[1] if len(fields) == 2 else REVOCATION_DEFAULT
            # a duration counts from the file's last change; a date stands for itself (a past one: expired,
            # not an error -- parse_expiry refuses dates a token could not have)
            until = parse_expiry(when, now=changed) if when[-1:].lower() in "smhdw" else _utc_date(when)
        except (TokenError, ValueError) as error:
            raise UserError(f"--revoked {path}, line {number}: {str(error).replace('--expires ', '')}") from None
        if until > time.time():
            revocations.append((str(peer), until, reason.strip() or "revoked by the organiser"))
    return revocations


def _utc_date(text: str) -> float:
    """Unix time of a UTC date or date/time (2026-12-31, 2026-12-31T18:00); ValueError naming the format."""
    import calendar
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r}: use a duration like 12h or 7d, or a UTC date like 2026-12-31") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return float(calendar.timegm(moment.utctimetuple()))
