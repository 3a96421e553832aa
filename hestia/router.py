"""One place that decides where a request goes: to a service (and with which path), or to the
gateway's own control API. The HTTP proxy and the WebSocket relay both take its `Route`, so
authentication is one change here.

Host routing comes first: a request whose Host header (case-insensitive, without its port or
a trailing dot) is one of a service's host names goes to that service, whatever its path, so
`/v1/...` and `/services/...` on that host are the app's own paths and never reach the control
API or another service. The host table is the registry's (`configure()`, called whenever
services appear, change or go); with no host names configured this costs nothing per request.
Any other Host is the gateway's own.

Path routing: `/services/{name}/{rest}`. The prefix is matched on the raw path, byte for byte:
`/%73ervices/x` or `/services%2fx` are not service routes (they go to the API, which answers
404). `rest` has its dot-segments removed (RFC 3986 5.2.4, also in their percent-encoded
forms `%2e`), so `/services/a/../b` reaches `/b` *of service a*, never another service, `/v1`
or a path above a `url:`'s base path. A service with `strip_prefix: false` gets
`/services/{name}{rest}` instead (its app knows that base URL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from hestia.types import Scope

PREFIX = b"/services/"
_NAME_AT = len(PREFIX)
_DOTS = frozenset({b".", b"%2e", b"%2E"})
_DOTDOTS = frozenset(a + b for a in _DOTS for b in _DOTS)
# raw Host values seen -> service (or None: the gateway's own); bounded, a client picks them
_HOST_CACHE_MAX = 1024
_ROUTE_CACHE_MAX = 1024
_ROUTE_CACHE_KEY_MAX = 256


class Route(NamedTuple):
    """Immutable; a tuple because one is made per request (a frozen dataclass costs twice
    the instructions to build)."""

    service: str  # may be unknown or empty: the proxy answers 404 for those
    path: bytes  # the path to send upstream (before the service's base path), from "/"
    # The public path prefix the app is served under (`/services/<name>`, or b"" when reached
    # by host name): sent upstream as X-Forwarded-Prefix, and what redirects and cookie
    # paths are mapped back under.
    prefix: bytes
    by_host: bool = False  # reached by one of its host names (served at the root)
    stripped: bool = True  # `prefix` is not part of `path` (strip_prefix)

    @property
    def mount(self) -> bytes:
        """What the upstream sees in front of a public path's part below `prefix`."""
        return b"" if self.stripped else self.prefix


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 on an absolute path, with `%2e` counted as `.`."""
    if b"/." not in path and b"%2" not in path:
        return path
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg in _DOTS:
            if i == last:
                out.append(b"")
        elif seg in _DOTDOTS:
            if out:
                out.pop()
            if i == last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


def host_key(value: bytes) -> bytes:
    """A Host header as host routing compares it: lower case, no port, no trailing dot."""
    host = value.strip().lower()
    if host.startswith(b"["):  # an IPv6 literal: its colons are not a port
        host = host[: host.find(b"]") + 1]
    else:
        host = host.partition(b":")[0]
    return host.rstrip(b".")


class Router:
    def __init__(self) -> None:
        self._hosts: dict[bytes, str] = {}
        self._keep_prefix: frozenset[str] = frozenset()
        self._seen: dict[bytes, str | None] = {}
        self._routes: dict[bytes, Route] = {}

    def configure(self, hosts: Mapping[str, str], keep_prefix: Iterable[str] = ()) -> None:
        """The routing table: host name (normalized, see `config.normalize_host`) -> service,
        and the services with `strip_prefix: false`. Replaces the previous one whole."""
        self._hosts = {h.encode("latin-1"): name for h, name in hosts.items()}
        self._keep_prefix = frozenset(keep_prefix)
        self._seen = {}
        self._routes = {}

    @property
    def keep_prefix(self) -> frozenset[str]:
        return self._keep_prefix

    @property
    def hosts(self) -> dict[str, str]:
        return {h.decode("latin-1"): name for h, name in self._hosts.items()}

    def _service_for_host(self, value: bytes) -> str | None:
        try:
            return self._seen[value]
        except KeyError:
            pass
        name = self._hosts.get(host_key(value))
        if len(self._seen) >= _HOST_CACHE_MAX:
            self._seen.clear()
        self._seen[value] = name
        return name

    def resolve(self, scope: Scope) -> Route | None:
        """The service route for this request, or None when it is for the control API."""
        raw: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
        if self._hosts:
            for key, value in scope["headers"]:
                if key == b"host":
                    owner = self._service_for_host(value)
                    if owner is not None:
                        return self._by_host(owner, raw)
                    break
        route = self._routes.get(raw)
        if route is not None:
            return route
        if not raw.startswith(PREFIX):
            return None
        key = raw
        query = raw.find(b"?")  # ASGI's raw_path has none; a server that sends it anyway
        if query >= 0:
            raw = raw[:query]
        slash = raw.find(b"/", _NAME_AT)
        if slash < 0:
            name_b, path, prefix = raw[_NAME_AT:], b"/", raw
        else:
            name_b, path, prefix = raw[_NAME_AT:slash], raw[slash:], raw[:slash]
            if b"/." in path or b"%2" in path:
                path = remove_dot_segments(path)
        service = name_b.decode("latin-1")
        if service in self._keep_prefix:
            route = Route(service, prefix + path, prefix, stripped=False)
        else:
            route = Route(service, path, prefix)
        # the same paths come again and again (an API's endpoints, a page's assets): their
        # routes are kept (bounded, and only for short paths)
        if len(key) <= _ROUTE_CACHE_KEY_MAX:
            if len(self._routes) >= _ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[key] = route
        return route

    @staticmethod
    def _by_host(name: str, raw: bytes) -> Route:
        q = raw.find(b"?")
        if q >= 0:
            raw = raw[:q]
        path = remove_dot_segments(raw) if raw.startswith(b"/") else b"/"
        return Route(name, path, b"", by_host=True)
