"""Multiaddrs from the user's flags: --initial-peers, and the --port / --public-ip shorthands."""
from __future__ import annotations

import ipaddress
from typing import Iterable, List, Optional, Sequence, Tuple

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarmtrain.errors import UserError

DEFAULT_PORT = 31337  # suggested when a peer listens on a random port: a port to forward must be fixed


def split_values(values: Iterable[str]) -> List[str]:
    """A repeatable flag's values, each of which may itself hold several separated by spaces or commas."""
    return [item for value in values for item in value.replace(",", " ").split()]


def parse_initial_peers(values: Iterable[str]) -> List[str]:
    """Check that each value is a full multiaddr with a peer ID; one clear line if not."""
    result = []
    for value in values:
        for item in split_values([value]):
            try:
                maddr = Multiaddr(item)
            except Exception:
                raise UserError(
                    f"initial peer {item!r} is not a multiaddr; copy it from the coordinator's output, "
                    "e.g. /ip4/203.0.113.5/tcp/31337/p2p/Qm..."
                ) from None
            if "/p2p/" not in str(maddr):
                raise UserError(f"initial peer {item!r} lacks the /p2p/<peer id> part; copy the full address")
            result.append(str(maddr))
    return result


def peer_id_in(maddr: str) -> PeerID:
    return PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])


def parse_public_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):  # "[2001:db8::1]", as IPv6 is written in URLs
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"--public-ip {value!r} is not an IP address; give the numeric address other peers dial, "
            "e.g. 203.0.113.5 (a host name or a multiaddr goes in --announce-maddrs)"
        ) from None
    if address.is_unspecified:
        raise ValueError(f"--public-ip {value} means 'any interface'; give the address other peers dial, e.g. 203.0.113.5")
    if address.is_multicast:
        raise ValueError(f"--public-ip {value} is a multicast address; give the address other peers dial, e.g. 203.0.113.5")
    return address


def host_and_announce_maddrs(
    port: Optional[int],
    public_ip: Optional[str],
    *,
    host_maddrs: Sequence[str] = (),
    announce_maddrs: Sequence[str] = (),
) -> Tuple[List[str], List[str]]:
    """Turn `--port P` / `--public-ip X` into (host_maddrs, announce_maddrs).

    `--port 31337` listens on TCP 31337 on every interface; `--public-ip 203.0.113.5` also tells
    the swarm to dial 203.0.113.5:31337 (the router forwards that port to this machine), so it
    needs --port: a forwarded port must be fixed. Explicit multiaddrs, when given, are kept, and
    mixing them with the shorthand they would contradict is an error."""
    host_maddrs, announce_maddrs = list(host_maddrs), list(announce_maddrs)
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"--port {port} is out of range; use 1-65535, e.g. {DEFAULT_PORT}")
    address = parse_public_ip(public_ip) if public_ip is not None else None
    if address is not None and port is None:
        raise ValueError(
            f"--public-ip needs --port: peers dial {public_ip}:<port>, so the port must be fixed "
            f"(and forwarded to this machine), e.g. --public-ip {public_ip} --port {DEFAULT_PORT}"
        )
    if port is not None and host_maddrs:
        raise ValueError("use either --port or --host-maddrs, not both (--port P means --host-maddrs /ip4/0.0.0.0/tcp/P)")
    if address is not None and announce_maddrs:
        raise ValueError("use either --public-ip or --announce-maddrs, not both")
    family = "ip6" if address is not None and address.version == 6 else "ip4"
    if port is not None:
        host_maddrs = [f"/{family}/{'::' if family == 'ip6' else '0.0.0.0'}/tcp/{port}"]
    if address is not None:
        announce_maddrs = [f"/{family}/{address}/tcp/{port}"]
    if not host_maddrs:
        host_maddrs = ["/ip4/0.0.0.0/tcp/0"]
    return host_maddrs, announce_maddrs
