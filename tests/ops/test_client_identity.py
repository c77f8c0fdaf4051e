"""Who a request is keyed by: the principal, else the client address, believing
forwarding headers only from trusted proxies."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from ipaddress import ip_network

from starlette.types import Scope

from app.core.ratelimit import TrustedProxies, client_ip, client_key, key_hash
from tests.support import ROOT

PROXIES = TrustedProxies([ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32")])


def scope_from(peer: str, *headers: tuple[str, str]) -> Scope:
    return {
        "type": "http",
        "method": "GET",
        "path": "/v1/stories",
        "client": (peer, 51234),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


def test_without_trusted_proxies_the_peer_address_is_the_client() -> None:
    scope = scope_from("203.0.113.7", ("X-Forwarded-For", "198.51.100.1"))

    assert client_ip(scope, TrustedProxies()) == "203.0.113.7"


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    scope = scope_from("203.0.113.7", ("X-Forwarded-For", "198.51.100.1"))

    assert client_ip(scope, PROXIES) == "203.0.113.7"


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client() -> None:
    scope = scope_from("10.1.2.3", ("X-Forwarded-For", "198.51.100.1"))

    assert client_ip(scope, PROXIES) == "198.51.100.1"


def test_the_rightmost_untrusted_hop_is_the_client_not_a_spoofed_leftmost_one() -> None:
    # The client sent "1.1.1.1" itself; our proxies appended the real addresses.
    scope = scope_from("10.0.0.2", ("X-Forwarded-For", "1.1.1.1, 198.51.100.1, 10.0.0.1"))

    assert client_ip(scope, PROXIES) == "198.51.100.1"


def test_several_x_forwarded_for_headers_read_as_one_list() -> None:
    scope = scope_from(
        "10.0.0.2", ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "198.51.100.9")
    )

    assert client_ip(scope, PROXIES) == "198.51.100.9"


def test_forwarded_header_is_read_when_there_is_no_x_forwarded_for() -> None:
    scope = scope_from(
        "10.0.0.2", ("Forwarded", 'for=192.0.2.60;proto=https, for="[2001:db8:cafe::17]:4711"')
    )

    assert client_ip(scope, PROXIES) == "2001:db8:cafe::17"


def test_an_ipv4_hop_with_a_port_is_read_without_it() -> None:
    scope = scope_from("10.0.0.2", ("Forwarded", "for=192.0.2.60:8443"))

    assert client_ip(scope, PROXIES) == "192.0.2.60"


def test_an_obfuscated_hop_from_a_trusted_proxy_keys_by_that_proxy() -> None:
    scope = scope_from("10.0.0.2", ("Forwarded", "for=unknown"))

    assert client_ip(scope, PROXIES) == "10.0.0.2"


def test_a_trusted_peer_without_forwarding_headers_is_the_client() -> None:
    assert client_ip(scope_from("10.0.0.2"), PROXIES) == "10.0.0.2"


def test_the_anonymous_principal_is_keyed_by_address() -> None:
    scope = scope_from("203.0.113.7")

    key = client_key(scope, PROXIES, principal_of=lambda request: "anonymous")

    assert key == "ip:203.0.113.7"


def test_an_authenticated_principal_is_keyed_by_principal_wherever_it_calls_from() -> None:
    first = client_key(scope_from("203.0.113.7"), PROXIES, principal_of=lambda r: "user-42")
    second = client_key(scope_from("198.51.100.1"), PROXIES, principal_of=lambda r: "user-42")

    assert first == second == "user:user-42"


def test_a_failing_principal_lookup_falls_back_to_the_address() -> None:
    def broken(request: object) -> str:
        raise LookupError("no app state")

    assert client_key(scope_from("203.0.113.7"), PROXIES, principal_of=broken) == ("ip:203.0.113.7")


# --- IPv6 and IPv4-mapped addresses -------------------------------------------------------


def test_ipv6_clients_are_keyed_by_their_64_bit_prefix() -> None:
    # One subscriber usually gets a whole /64: rotating the interface id buys nothing.
    first = client_key(scope_from("2001:db8:1:2::10"), PROXIES)
    second = client_key(scope_from("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), PROXIES)

    assert first == second == "ip:2001:db8:1:2::/64"


def test_ipv6_clients_in_different_64s_have_different_keys() -> None:
    one = client_key(scope_from("2001:db8:1:2::10"), PROXIES)
    other = client_key(scope_from("2001:db8:1:3::10"), PROXIES)

    assert one != other


def test_a_forwarded_ipv6_client_is_keyed_by_its_64_too() -> None:
    scope = scope_from("10.0.0.2", ("X-Forwarded-For", "2001:db8:cafe:17::1234"))

    assert client_key(scope, PROXIES) == "ip:2001:db8:cafe:17::/64"


def test_ipv4_clients_are_keyed_by_their_full_address() -> None:
    assert client_key(scope_from("203.0.113.7"), PROXIES) == "ip:203.0.113.7"


def test_an_ipv4_mapped_peer_is_the_same_client_as_its_ipv4_address() -> None:
    mapped = client_key(scope_from("::ffff:203.0.113.7"), PROXIES)

    assert mapped == client_key(scope_from("203.0.113.7"), PROXIES) == "ip:203.0.113.7"


def test_an_ipv4_mapped_trusted_proxy_is_trusted() -> None:
    # A dual-stack socket reports the IPv4 load balancer 10.0.0.2 as ::ffff:10.0.0.2.
    scope = scope_from("::ffff:10.0.0.2", ("X-Forwarded-For", "198.51.100.1"))

    assert client_ip(scope, PROXIES) == "198.51.100.1"


def test_an_ipv4_mapped_hop_of_a_trusted_proxy_is_skipped_like_its_ipv4_form() -> None:
    scope = scope_from("10.0.0.2", ("X-Forwarded-For", "198.51.100.1, ::ffff:10.0.0.1"))

    assert client_ip(scope, PROXIES) == "198.51.100.1"


def test_an_ipv4_mapped_forwarded_client_is_keyed_by_its_ipv4_address() -> None:
    scope = scope_from("10.0.0.2", ("X-Forwarded-For", "::ffff:198.51.100.1"))

    assert client_key(scope, PROXIES) == "ip:198.51.100.1"


def test_membership_of_an_ipv4_mapped_address_is_decided_by_its_ipv4_form() -> None:
    from ipaddress import ip_address

    assert ip_address("::ffff:10.9.8.7") in PROXIES
    assert ip_address("::ffff:203.0.113.7") not in PROXIES


# --- the client hash in logs ------------------------------------------------------------------


def test_the_logged_key_hash_is_stable_and_does_not_contain_the_address() -> None:
    assert key_hash("ip:203.0.113.7") == key_hash("ip:203.0.113.7")
    assert "203.0.113.7" not in key_hash("ip:203.0.113.7")
    assert key_hash("ip:203.0.113.7") != key_hash("ip:203.0.113.8")


def test_the_logged_key_hash_cannot_be_recomputed_from_the_address_alone() -> None:
    # An unkeyed hash of "ip:<address>" falls to enumerating the IPv4 space.
    unkeyed = hashlib.blake2b(b"ip:203.0.113.7", digest_size=8).hexdigest()

    assert key_hash("ip:203.0.113.7") != unkeyed


def test_the_logged_key_hash_correlates_within_one_process_only() -> None:
    code = "from app.core.ratelimit import key_hash; print(key_hash('ip:203.0.113.7'))"

    def in_a_new_process() -> str:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    first, second = in_a_new_process(), in_a_new_process()

    assert len(first) == len(second) == 16
    assert first != second
