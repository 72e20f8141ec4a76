"""The client's address, for the failed-authentication throttle and its log line.

Behind a load balancer or reverse proxy (RunPod's, Vast.ai's, nginx) every request
arrives from the proxy's address, so one client guessing keys would get the throttle
applied to every client, valid keys included. When the peer is a proxy named in
TRUSTED_PROXIES, the client is the nearest address in X-Forwarded-For that is not one
of those proxies (each proxy appends the address it received from, so the entries to
the left of the last trusted hop are whatever the client wrote). From any other peer
the header is ignored: anyone can write anything into it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network


class ClientAddress:
    def __init__(self, trusted: Sequence[str]) -> None:
        self.enabled = bool(trusted)
        # "*": whoever connects is the proxy (a port only it can reach); the hops it
        # forwarded are not trusted, so the client is the last one, the one it appended
        self._any_peer = "*" in trusted
        self._networks = tuple(ip_network(t, strict=False) for t in trusted if t != "*")

    def of(self, peer: str | None, forwarded_for: Iterable[str]) -> str | None:
        """``peer``, or the client a trusted ``peer`` forwarded for; ``forwarded_for`` is
        every X-Forwarded-For value in the order received."""
        if not self.enabled or peer is None or not (self._any_peer or self._trusted(peer)):
            return peer
        client = peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break  # not written by a proxy we trust: stop at the last hop that was
            client = address
            if not self._trusted(address):
                break
        return client

    def _trusted(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self._networks)


def _ip(text: str) -> IPv4Address | IPv6Address | None:
    try:
        ip = ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return ip


def _address(hop: str) -> str | None:
    """The address in an X-Forwarded-For entry, which some proxies write with a port
    (``203.0.113.7:41234``, ``[2001:db8::5]:443``); None when there is none."""
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    ip = _ip(hop)
    return None if ip is None else str(ip)
