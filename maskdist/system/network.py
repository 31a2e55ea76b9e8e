"""Is a host reachable at all? One quick look (name lookup, then a TCP connect with a short
timeout) before a library's retry loop, which on a node without a network would wait tens of
seconds for an answer that cannot come. A host that cannot be looked up, or to which there is
no route, is unreachable: nothing is retried. A refused or slow connection is left to the
caller's retries (a server restarting, a busy proxy)."""
from __future__ import annotations

import errno
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
# connect() errors that say there is no path to the host, not that the host said no
_NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL)
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _host_port(url: str) -> tuple[str, int] | None:
    parsed = urlparse(url)
    if not parsed.hostname:
        return None
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def _bypasses_proxy(host: str) -> bool:
    """``host`` is in NO_PROXY (exactly, or as a domain suffix)."""
    for entry in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(","):
        entry = entry.strip().lstrip(".")
        if entry and (entry == "*" or host == entry or host.endswith("." + entry)):
            return True
    return False


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url``'s host (or the proxy that would carry the request) cannot be reached at all,
    in a few words; None when it may be reached (connected, refused, or too slow to tell)."""
    target = _host_port(url)
    if target is None:
        return None
    host = target[0]
    for variable in _PROXY_VARIABLES:
        proxy = os.environ.get(variable)
        if proxy and not _bypasses_proxy(host):
            via = _host_port(proxy if "://" in proxy else "http://" + proxy)
            if via is not None:
                why = _why_unreachable(*via, timeout)
                return f"{why} (the proxy {variable}={proxy})" if why else None
            break
    return _why_unreachable(*target, timeout)


def _why_unreachable(host: str, port: int, timeout: float) -> str | None:
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return f"the host name {host} cannot be looked up (no network, or no DNS)"
    last = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
            return None
        except OSError as err:
            if err.errno not in _NO_ROUTE:
                return None  # refused, timed out, reset: the network is there; retries may help
            last = err
    return f"no network route to {host}:{port} ({os.strerror(last.errno)})" if last else None
