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
from ipaddress import ip_address, ip_network


class ClientAddress:
    def __init__(self, trusted: Sequence[str]) -> None:
        self.enabled = bool(trusted)
        self._any = "*" in trusted  # for a port that only the proxy can reach
        self._networks = tuple(ip_network(t, strict=False) for t in trusted if t != "*")

    def of(self, peer: str | None, forwarded_for: Iterable[str]) -> str | None:
        """``peer``, or the client a trusted ``peer`` forwarded for; ``forwarded_for`` is
        every X-Forwarded-For value in the order received."""
        if not self.enabled or peer is None or not self._trusted(peer):
            return peer
        client = peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            if not _is_address(hop):
                break  # not written by a proxy we trust: stop at the last hop that was
            client = hop
            if not self._trusted(hop):
                break
        return client

    def _trusted(self, address: str) -> bool:
        if self._any:
            return True
        try:
            ip = ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True
