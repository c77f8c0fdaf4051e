"""Who is calling, as far as limits are concerned: the client's address and key.

The client key is the authenticated principal when there is
one, else the client IP. The client IP is the direct peer's address, unless that
peer is a configured trusted proxy (`TRUSTED_PROXIES`): then `X-Forwarded-For`
(or, without it, `Forwarded`) is read from the right, skipping trusted hops, and
the first untrusted address is the client. A header sent by anyone else is
ignored, so a spoofed `X-Forwarded-For` never buys a fresh quota. An
IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket reports
for an IPv4 peer) is read as its IPv4 address, for trust checks and keys alike.
An IPv4 client is keyed by its address, an IPv6 client by its /64
(`IPV6_CLIENT_PREFIX`): one subscriber usually holds a whole /64, and cycling
through its addresses must not buy fresh quotas. Logs carry `key_hash(key)`, a
hash keyed with a random secret drawn when the process starts: it correlates the
requests of one client within one process, and cannot be reversed by hashing
candidate addresses (nor correlated across processes or restarts).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from starlette.requests import Request
from starlette.types import Scope

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
PrincipalOf = Callable[[Request], str]

#: IPv6 clients are keyed by this many leading bits (an ISP's usual assignment: a /64).
IPV6_CLIENT_PREFIX = 64


def _unmapped(address: IPAddress) -> IPAddress:
    """`::ffff:a.b.c.d` is the IPv4 peer a.b.c.d (as a dual-stack socket reports it)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The peers allowed to say who the client is (`TRUSTED_PROXIES`)."""

    def __init__(self, networks: Sequence[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, IPv4Address | IPv6Address):
            return False
        address = _unmapped(address)
        return any(address in network for network in self.networks)


def _parse_ip(value: str) -> IPAddress | None:
    """An address from a peer or a forwarding header: `1.2.3.4`, `1.2.3.4:80`,
    `[::1]:80`, `"[::1]"`; an IPv4-mapped IPv6 address comes back as IPv4."""
    value = value.strip().strip('"').strip()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:  # IPv4 with a port
        value = value.split(":", 1)[0]
    try:
        return _unmapped(ip_address(value))
    except ValueError:
        return None


def _header_values(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers", []) if k == name]


def _forwarded_chain(scope: Scope) -> list[str]:
    """The hops the proxies recorded, client first: X-Forwarded-For, else Forwarded's for=."""
    xff = _header_values(scope, b"x-forwarded-for")
    if xff:
        return [hop.strip() for value in xff for hop in value.split(",") if hop.strip()]
    chain: list[str] = []
    for value in _header_values(scope, b"forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, token = pair.strip().partition("=")
                if name.strip().lower() == "for" and token:
                    chain.append(token)
    return chain


def _client_address(scope: Scope, trusted: TrustedProxies) -> IPAddress | str:
    """The caller's address; forwarding headers count only from a trusted peer.

    The peer's own text when it is not an address (a Unix socket, a test client).
    """
    client = scope.get("client")
    peer_text = str(client[0]) if client else ""
    peer = _parse_ip(peer_text)
    if peer is None:
        return peer_text or "unknown"
    if peer not in trusted:
        return peer
    chain = _forwarded_chain(scope)
    if not chain:
        return peer
    for hop in reversed(chain):
        address = _parse_ip(hop)
        if address is None:
            # A proxy we trust wrote something that is not an address
            # ("unknown", "_hidden"): the nearest address we can vouch for is its own.
            return peer
        if address not in trusted:
            return address
    # Every hop is one of our proxies: the leftmost is the closest to the client.
    return _parse_ip(chain[0]) or peer


def client_ip(scope: Scope, trusted: TrustedProxies) -> str:
    """The caller's address (IPv4-mapped ones as IPv4); see `client_key` for its key."""
    return str(_client_address(scope, trusted))


def client_key(
    scope: Scope,
    trusted: TrustedProxies,
    *,
    principal_of: PrincipalOf | None = None,
    anonymous: str = "anonymous",
    ipv6_prefix: int = IPV6_CLIENT_PREFIX,
) -> str:
    """`user:<principal>` for an authenticated caller, else `ip:<IPv4 address>` or
    `ip:<IPv6 network>/<ipv6_prefix>`."""
    if principal_of is not None:
        try:
            principal = principal_of(Request(scope))
        except Exception:  # no principal is not an error: key by address
            principal = anonymous
        if principal and principal != anonymous:
            return f"user:{principal}"
    address = _client_address(scope, trusted)
    if isinstance(address, IPv6Address):
        return f"ip:{IPv6Network((address, ipv6_prefix), strict=False)}"
    return f"ip:{address}"


# Drawn once per process: `key_hash` values correlate within this process only,
# and no one without it can test guessed addresses against a logged hash.
_KEY_HASH_SECRET = secrets.token_bytes(32)


def key_hash(key: str) -> str:
    """A short stand-in for a client key in logs: stable within this process only."""
    return hashlib.blake2b(key.encode(), digest_size=8, key=_KEY_HASH_SECRET).hexdigest()
