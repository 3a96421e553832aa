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

from hestia.types import Scope

PREFIX = b"/services/"
_NAME_AT = len(PREFIX)
_DOTS = frozenset({b".", b"%2e", b"%2E"})
_DOTDOTS = frozenset(a + b for a in _DOTS for b in _DOTS)


class Route:
    """Where a request goes. (A plain slotted class: made once per request, and a frozen
    dataclass's __init__ costs several times as much.)"""

    __slots__ = ("path", "prefix", "service")

    def __init__(self, service: str, path: bytes, prefix: bytes) -> None:
        self.service = service  # may be unknown or empty: the proxy answers 404 for those
        self.path = path  # the path to send upstream (before the service's base path)
        self.prefix = prefix  # what the gateway strips: sent upstream as X-Forwarded-Prefix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Route) and (self.service, self.path, self.prefix) == (
            other.service,
            other.path,
            other.prefix,
        )

    def __hash__(self) -> int:
        return hash((self.service, self.path, self.prefix))

    def __repr__(self) -> str:
        return f"Route({self.service!r}, {self.path!r}, {self.prefix!r})"


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
        query = raw.find(b"?")  # ASGI's raw_path has none; a server that sends it anyway
        if query >= 0:
            raw = raw[:query]
        slash = raw.find(b"/", _NAME_AT)
        if slash < 0:
            return Route(raw[_NAME_AT:].decode("latin-1"), b"/", raw)
        path = raw[slash:]
        if b"/." in path or b"%2" in path:
            path = remove_dot_segments(path)
        return Route(raw[_NAME_AT:slash].decode("latin-1"), path, raw[:slash])
