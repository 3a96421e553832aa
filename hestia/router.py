"""One place that decides where a request goes: to a service (and with which path), or to the
gateway's own control API. The HTTP proxy and the WebSocket relay both take its `Route`, so
host-based routing and authentication are each one change here.

Path routing: `/services/{name}/{rest}`. The prefix is matched on the raw path, byte for byte:
`/%73ervices/x` or `/services%2fx` are not service routes (they go to the API, which answers
404). `rest` has its dot-segments removed (RFC 3986 5.2.4, also in their percent-encoded
forms `%2e`), so `/services/a/../b` reaches `/b` *of service a*, never another service, `/v1`
or a path above a `url:`'s base path.
"""

from __future__ import annotations

from dataclasses import dataclass

from hestia.types import Scope

PREFIX = b"/services/"
_DOTS = frozenset({b".", b"%2e", b"%2E"})
_DOTDOTS = frozenset(a + b for a in _DOTS for b in _DOTS)


@dataclass(frozen=True, slots=True)
class Route:
    service: str  # may be unknown or empty: the proxy answers 404 for those
    path: bytes  # the path to send upstream (before the service's base path), from "/"
    prefix: bytes  # what the gateway strips: sent upstream as X-Forwarded-Prefix


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


class Router:
    def resolve(self, scope: Scope) -> Route | None:
        """The service route for this request, or None when it is for the control API."""
        raw: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
        if not raw.startswith(PREFIX):
            return None
        rest = raw[len(PREFIX) :]
        q = rest.find(b"?")
        if q >= 0:
            rest = rest[:q]
        name, slash, tail = rest.partition(b"/")
        path = remove_dot_segments(b"/" + tail) if slash else b"/"
        return Route(name.decode("latin-1"), path, PREFIX + name)
