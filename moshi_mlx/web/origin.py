"""Which web pages may open the chat websocket: the server's own pages, those of origins the user
allowed, and clients that are not browsers. No page of another site may, DNS rebinding included
(another site's name made to resolve to this server's address)."""

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp import web

LOOPBACK_NAMES = {"localhost"}
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def machine_names() -> set[str]:
    """This machine's own names (its host name and fully qualified name)."""
    return {socket.gethostname(), socket.getfqdn()}


def _name(host: str) -> str:
    return host.lower().rstrip(".")


class OriginPolicy:
    """Which web pages may open the websocket.

    A request with more than one Origin header is refused. Clients that send none (Kyutai's
    command-line clients) are let in. A browser page is let in when its origin is allowed
    explicitly (`allowed_origins`), or when it comes from this server itself (same scheme, host
    and port as the request) under one of the server's own names:
    - listening on a loopback address: a loopback name or address only;
    - otherwise: a loopback name, the host the server was started with (`bound_host`), this
      machine's names (`names`, default `machine_names()`) or an IP address. An address cannot
      be rebound: a browser sends `Host: <address>` to that address only, so the page came
      from this server. A rebinding name is none of these and cannot pass.
    """

    def __init__(self, bound_host: str, allowed_origins: Iterable[str] = (),
                 names: Iterable[str] | None = None):
        self.loopback_only = is_loopback(bound_host)
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}
        own = set()
        if not self.loopback_only:
            own = set(machine_names() if names is None else names)
            if bound_host not in WILDCARD_HOSTS:
                own.add(bound_host)
        self.own_names = {_name(n) for n in own if n}

    def is_own(self, host: str) -> bool:
        """Whether a page whose origin names `host` (no port) may come from this server."""
        if is_loopback(host):
            return True
        if self.loopback_only:
            return False
        return is_address(host) or _name(host) in self.own_names

    def allows(self, request: web.BaseRequest) -> bool:
        origins = request.headers.getall("Origin", [])
        if len(origins) > 1:
            return False
        if not origins:
            return True
        origin = origins[0].rstrip("/").lower()
        if origin in self.allowed:
            return True
        if origin != f"{request.scheme}://{request.host}".lower():
            return False
        return self.is_own(request.url.host or "")
