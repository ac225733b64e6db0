"""Access tokens: the coordinator's RSA signature over (name, peer ID, expiry), in one copy-pasteable line.

A token is the authority's (the coordinator's) signature over (name, peer ID, expiration time), made
with its libp2p identity key and packed with the authority's public key into one line
(``swt1.<base64url>``). The organiser needs only the volunteer's peer ID (``swarmtrain identity``
prints it); only the holder of that peer ID's private key can use the token, so a token that leaks is
of no use to anyone else. Pure functions: issuing, parsing, checking, and reading the user's inputs.
"""
from __future__ import annotations

import base64
import binascii
import calendar
import math
import re
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarmtrain.errors import UserError
from swarmtrain.net.identity import peer_id_of

TOKEN_PREFIX = "swt1."
TOKEN_VERSION = 1
_SIGNED_DOMAIN = b"swarmtrain access token\n"  # never a prefix of anything else this key signs
_NAME_RE = re.compile(r"[\w.@+-]{1,64}")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MIN_TOKEN_LIFETIME = 60.0  # seconds: a shorter token would expire before the volunteer could paste it
MAX_TOKEN_LIFETIME = 10 * 365 * 86400.0  # seconds; "never expires" is what --expires must not mean
MAX_TOKEN_FILE_BYTES = 64 * 1024  # a token is a few hundred characters


class TokenError(ValueError):
    """A token that cannot be used, with a message for the user (one line)."""



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
    if not math.isfinite(expires) or not 0 < expires < 2**63:
        raise TokenError(f"expiry time {expires!r} is not a usable unix time; use --expires like 7d")
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

    if len(text) > 128:  # a peer ID is about 46 characters; base58-decoding megabytes takes minutes
        raise TokenError(f"{text[:20]!r}... ({len(text)} characters) is not a peer ID (like QmXfA...); the volunteer "
                         "gets theirs from `swarmtrain identity`")
    try:
        peer_id = PeerID.from_base58(text.strip())
        multihash.decode(peer_id.to_bytes())
    except Exception:
        raise TokenError(f"{text!r} is not a peer ID (like QmXfA...); the volunteer gets theirs from "
                         "`swarmtrain identity`") from None
    return peer_id


def parse_expiry(text: str, now: Optional[float] = None) -> float:
    """Unix time from a duration (90m, 12h, 7d, 4w) or a UTC date/time (2026-12-31, 2026-12-31T18:00),
    between MIN_TOKEN_LIFETIME and MAX_TOKEN_LIFETIME from now (TokenError otherwise)."""
    now = time.time() if now is None else now
    value = text.strip()
    if len(value) > 64:
        raise TokenError(f"--expires {value[:20]!r}...: use a duration like 90m, 12h, 7d or 4w, or a UTC date like "
                         "2026-12-31")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", value.lower())
    if match:
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
        if seconds <= 0:
            raise TokenError(f"--expires {text!r}: the duration must be positive, e.g. 7d")
        expires = now + seconds
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise TokenError(f"--expires {text!r}: use a duration like 90m, 12h, 7d or 4w, "
                             "or a UTC date like 2026-12-31") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        expires = float(calendar.timegm(moment.utctimetuple()))
        if expires <= now:
            raise TokenError(f"--expires {text!r} is in the past")
    if expires - now < MIN_TOKEN_LIFETIME:
        raise TokenError(f"--expires {text!r}: a token must live at least {MIN_TOKEN_LIFETIME:.0f} s (it would expire "
                         "before the volunteer could use it), e.g. 90m")
    if expires - now > MAX_TOKEN_LIFETIME:
        raise TokenError(f"--expires {text!r}: at most {MAX_TOKEN_LIFETIME / 86400 / 365:.0f} years; there is no "
                         "revocation, so prefer short lifetimes (e.g. 4w) and issue new tokens")
    return expires


def token_from_options(token: Optional[str], token_file: Optional[str]) -> Optional[str]:
    """The token given with --token or --token-file (UserError for both, or an unreadable file)."""
    if token is not None and token_file is not None:
        raise UserError("give the token once: --token or --token-file, not both")
    if token_file is None:
        return token
    try:
        with open(token_file, "rb") as handle:
            data = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as error:
        raise UserError(f"--token-file {token_file}: cannot read it ({error.strerror})") from None
    try:
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise ValueError
        return data.decode("ascii")
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"--token-file {token_file}: this is not a token file (a token is one line of text "
                        f"starting with {TOKEN_PREFIX!r}); save the token the organiser sent in it") from None
