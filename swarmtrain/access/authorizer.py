"""How a node takes part in a token-gated run: its :class:`LocalAccess`, and the DHT's gate.

:class:`TokenAuthorizer` (a hivemind ``TokenAuthorizerBase``) signs every DHT request and response
with the node's key and attaches its token; nodes refuse requests and responses without a valid one.
A peer without a token therefore cannot read the run config, publish records or declare itself for
matchmaking. The command that starts a node builds its LocalAccess (``coordinator_access`` for the
authority, ``peer_access`` from a volunteer's token) and passes it to what needs it: the DHT
(``LocalAccess.authorizer()``) and the averagers (``swarmtrain.access.guard``).

Trust: a volunteer accepts a token's authority only if its peer ID is one of the initial peers', the
same anchor as the signed run config.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from hivemind.p2p import PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarmtrain.access.tokens import Token, check_token, issue_token, parse_token, signed_message
from swarmtrain.net.identity import peer_id_of

SELF_ISSUED_LIFETIME = 24 * 3600.0  # the authority's own token, re-issued when a quarter is left


class TokenAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer for a token-gated run.

    Our AccessToken carries our own public key (requests are signed with its private key) and the
    authority's signature; a token is valid when the authority signed (username, peer ID of the
    AccessToken's key, expiration) and it has not expired. The authority itself holds `issuer` and
    issues its own tokens as needed.

    :param local_private_key: this node's identity key (signs its requests and responses)
    :param authority: the coordinator's public key: only tokens it signed are valid
    :param token: a volunteer's own token (give this or `issuer`)
    :param issuer: the authority's own key, to issue itself tokens (the coordinator)
    """

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


def volunteer_access(token_text: str, identity: Optional[str], initial_peers: Sequence[str]) -> Tuple[LocalAccess, str]:
    """A volunteer's access from the token they were given and their identity file (default:
    ~/.swarmtrain/peer.id, created if missing), checked against the initial peers; and that file's
    path. TokenError (one line) if the token would not let them in."""
    from swarmtrain.net.addresses import peer_id_in
    from swarmtrain.net.identity import default_identity_path, load_or_create_identity

    identity = identity or str(default_identity_path("peer"))
    access = peer_access(token_text, load_or_create_identity(identity), [peer_id_in(m) for m in initial_peers],
                         identity_hint=f" ({identity})")
    return access, identity


def peer_access(token_text: str, private_key: RSAPrivateKey, trusted: Sequence[PeerID],
                identity_hint: str = "") -> LocalAccess:
    """A volunteer's access from its token; TokenError (one line) if the token would not let it in."""
    token = parse_token(token_text)
    check_token(token, peer_id=peer_id_of(private_key.get_public_key()), trusted=trusted, identity_hint=identity_hint)
    return LocalAccess(private_key, token.authority, token=token)

