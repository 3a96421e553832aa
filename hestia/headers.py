"""What the proxy changes in headers on the way through, for HTTP and WebSockets alike.

Requests: hop-by-hop headers go, Host becomes the upstream's address (or stays the client's,
`preserve_host`), X-Forwarded-* are set. An `Origin` or `Referer` naming the gateway's own
origin (the Host the browser used) is rewritten to the upstream's address, so that an app's
same-origin check (Jupyter, Grafana, Home Assistant, code-server) sees what it expects; any
other origin passes unchanged and the app's CSRF protection still works.

Responses: `Location`, `Content-Location` and `Refresh` that point at the upstream's own
address, or at an absolute path of an app served under a stripped `/services/<name>` prefix,
are mapped back to the path the browser uses (nginx's `proxy_redirect`); `Set-Cookie` paths
are mapped the same way and a `Domain` naming the upstream's host is dropped (nginx's
`proxy_cookie_path`/`proxy_cookie_domain`), so two services' sessions on one gateway do not
collide. A response without those headers costs one pass over its header names.

Mapping an upstream path back: the upstream sees `base_path + mount + rest` for the public
path `prefix + rest` (mount is the prefix when it is not stripped, else nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hestia.address import Upstream
from hestia.errors import HestiaError

if TYPE_CHECKING:
    from hestia.router import Route

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# A Connection header may name hop-by-hop headers to drop, never these: dropping the body's
# length would lose the body (`Connection: content-length`).
_NEVER_DROPPED = frozenset({b"content-length", b"host", b"x-request-id"})
# Not forwarded upstream: hop-by-hop, Host (rewritten), Expect (the ASGI server already
# answered 100-continue to the client), X-Request-ID (the gateway's own is sent) and the
# X-Forwarded-* that we set ourselves.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"origin",  # re-added after the loop, rewritten when it is the gateway's own
    b"referer",
    b"expect",
    b"x-request-id",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-prefix",
}
_FORWARDED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix"}
)


class UnsupportedTransferCoding(HestiaError):
    status = 501
    code = "unsupported_transfer_coding"


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens - _NEVER_DROPPED


class TrustedProxies:
    """Peers whose X-Forwarded-* headers are kept (appended to); everyone else's are replaced,
    so a client cannot put an address of its choice first in X-Forwarded-For."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._nets)

    def trusts(self, client_ip: str | None) -> bool:
        if not self._nets or not client_ip:
            return False
        hit = self._cache.get(client_ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(client_ip)
            except ValueError:
                hit = False
            else:
                hit = any(addr in net for net in self._nets)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[client_ip] = hit
        return hit


def upstream_request_headers(
    headers: list[tuple[bytes, bytes]],
    upstream: Upstream,
    *,
    client_ip: str | None,
    scheme: str,
    prefix: bytes,
    trusted: bool = False,
    stripped: bool = True,
    preserve_host: bool = False,
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Headers to send upstream, and whether the request has a body.

    Hop-by-hop headers (and any named in Connection) are removed, Host is rewritten for the
    upstream (kept with `preserve_host`), X-Forwarded-For/-Proto/-Host/-Prefix are set:
    replaced, or, when the peer is a `trusted` proxy, X-Forwarded-For appended to and its
    -Proto/-Host kept. `prefix`: the public prefix the app is served under (X-Forwarded-
    Prefix; b"" by host name); `stripped`: whether the upstream path lacks it. Origin and
    Referer: see the module docstring.
    """
    drop = _DROP_REQUEST
    named: frozenset[bytes] | set[bytes] = _NONE
    for k, v in headers:  # a plain loop: no generator object per request
        # "keep-alive" or "close" (what clients send) name nothing more to drop
        if k == b"connection" and v not in _PLAIN_CONNECTION:
            named = _connection_tokens(headers)
            drop = drop | named
            break
    out: list[tuple[bytes, bytes]] = [(b"host", upstream.host_header)]
    has_body = False
    original_host = b""
    forwarded_for = b""
    forwarded_proto = b""
    forwarded_host = b""
    origins: list[tuple[bytes, bytes]] | None = None
    for key, value in headers:
        if key in drop:
            if key == b"host":
                original_host = value
            elif key == b"origin" or key == b"referer":
                if key not in named:
                    if origins is None:
                        origins = []
                    origins.append((key, value))
            elif key == b"transfer-encoding":
                has_body = True
                codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
                if codings != [b"chunked"]:
                    raise UnsupportedTransferCoding(
                        "request Transfer-Encoding "
                        f"{value.decode('latin-1')!r} is not supported: send the body "
                        "chunked and name a compression in Content-Encoding"
                    )
            elif trusted and key in _FORWARDED:
                if key == b"x-forwarded-for":
                    forwarded_for = value
                elif key == b"x-forwarded-proto":
                    forwarded_proto = value
                elif key == b"x-forwarded-host":
                    forwarded_host = value
            continue
        if key == b"content-length":
            has_body = value.strip() != b"0"
        out.append((key, value))
    if client_ip:
        ip = client_ip.encode()
        forwarded_for = forwarded_for + b", " + ip if forwarded_for else ip
    if forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for))
    out.append((b"x-forwarded-proto", forwarded_proto or scheme.encode()))
    if forwarded_host or original_host:
        out.append((b"x-forwarded-host", forwarded_host or original_host))
    out.append((b"x-forwarded-prefix", prefix))
    if preserve_host and original_host:
        out[0] = (b"host", original_host)
    if origins is not None:
        public = forwarded_host.partition(b",")[0].strip() if forwarded_host else original_host
        for key, value in origins:
            if not preserve_host and public:
                value = _origin_for_upstream(key, value, public, upstream, prefix, stripped)
            out.append((key, value))
    return out, has_body


_NONE: frozenset[bytes] = frozenset()
_DEFAULT_PORT = {b"http": b":80", b"https": b":443"}


def _same_authority(authority: bytes, public: bytes, scheme: bytes) -> bool:
    """`authority` of a URL and the Host `public`, compared as the same origin's would be:
    case-insensitively and with the scheme's default port or without it."""
    default = _DEFAULT_PORT.get(scheme, b"")
    return authority.lower().removesuffix(default) == public.lower().removesuffix(default)


def _scheme_end(value: bytes) -> int:
    """Where the authority of an http(s) URL starts, or 0 for anything else."""
    head = value[:8].lower()
    if head.startswith(b"http://"):
        return 7
    if head == b"https://":
        return 8
    return 0


def _authority_end(value: bytes, start: int) -> int:
    end = len(value)
    for stop in (b"/", b"?", b"#"):
        i = value.find(stop, start, end)
        if i >= 0:
            end = i
    return end


def _origin_for_upstream(
    key: bytes, value: bytes, public: bytes, upstream: Upstream, prefix: bytes, stripped: bool
) -> bytes:
    """An Origin or Referer on the gateway's own origin (the `public` Host the browser used),
    as the upstream would see it from itself; anything else unchanged.

    Browsers send both with a lower-case scheme and host and a path: that case is a few byte
    comparisons (a Referer comes with nearly every request a page makes)."""
    if value.startswith(b"http://"):
        start = 7
    elif value.startswith(b"https://"):
        start = 8
    else:
        start = _scheme_end(value)
        if not start:
            return value  # `null`, another scheme: the app decides
    end = value.find(b"/", start)
    if end < 0:
        end = _authority_end(value, start)
    authority = value[start:end]
    if authority != public and not _same_authority(authority, public, value[: start - 3]):
        return value
    own = b"http://" + upstream.host_header
    if key == b"origin":
        return own
    rest = value[end:]
    if rest[:1] != b"/":
        rest = b"/" + rest
    if prefix and stripped:
        n = len(prefix)
        if not rest.startswith(prefix) or (len(rest) > n and rest[n] not in b"/?#"):
            return own + rest  # another app's page on the gateway
        rest = rest[n:]
        if rest[:1] != b"/":
            rest = b"/" + rest
    return own + upstream.base_path + rest


def _cut_query(rest: bytes) -> tuple[bytes, bytes]:
    """`/path?q#f` -> (`/path`, `?q#f`)."""
    end = len(rest)
    if b"?" in rest or b"#" in rest:
        for stop in (b"?", b"#"):
            i = rest.find(stop, 0, end)
            if i >= 0:
                end = i
    return rest[:end], rest[end:]


def _under(path: bytes, base: bytes) -> bool:
    """`path` is `base` or below it, segment-wise (`/a` is under `/a`, `/a/b`, not `/ab`)."""
    return path.startswith(base) and (len(path) == len(base) or path[len(base)] == 0x2F)


# The gateway sends its own X-Request-ID with every answer.
_DROP_RESPONSE = HOP_BY_HOP | {b"x-request-id"}


# Response headers that may name the upstream's paths or address, and Connection: what
# makes a response need more than the one filtering pass.
_REWRITTEN = frozenset({b"location", b"content-location", b"refresh", b"set-cookie"})
_SPECIAL_RESPONSE = _REWRITTEN | {b"connection"}
# Connection values whose tokens are hop-by-hop already
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def downstream_response_headers(
    headers: list[tuple[bytes, bytes]],
    upstream: Upstream | None = None,
    route: Route | None = None,
) -> list[tuple[bytes, bytes]]:
    """The response's headers for the client: hop-by-hop ones dropped, and (given the
    `upstream` and the `route` the request took) redirects and cookies mapped back to what
    the browser sees."""
    drop = _DROP_RESPONSE
    rewrite = False
    for k, v in headers:  # a plain loop: no generator object per response
        if k in _SPECIAL_RESPONSE:
            if k == b"connection":
                # "keep-alive" or "close" (nearly every response) name nothing more to drop
                if v not in _PLAIN_CONNECTION:
                    drop = _DROP_RESPONSE | _connection_tokens(headers)
            else:
                rewrite = True
    out = [(k, v) for k, v in headers if k not in drop]
    if rewrite and route is not None and upstream is not None:
        rewrite_response_headers(out, upstream, route)
    return out


def rewrite_response_headers(
    headers: list[tuple[bytes, bytes]], upstream: Upstream, route: Route
) -> None:
    """Location, Content-Location, Refresh and Set-Cookie mapped back, in place."""
    for i, (key, value) in enumerate(headers):
        if key == b"location" or key == b"content-location":
            new = rewrite_location(value, upstream, route)
        elif key == b"refresh":
            new = rewrite_refresh(value, upstream, route)
        elif key == b"set-cookie":
            new = rewrite_set_cookie(value, upstream, route)
        else:
            continue
        if new is not value:
            headers[i] = (key, new)


def public_path(path: bytes, upstream: Upstream, route: Route) -> bytes | None:
    """The path the browser uses for a path the upstream used (absolute, no query), or None
    when there is none, or when the path is the browser's already (an app that builds its
    links from X-Forwarded-Prefix)."""
    if route.stripped and route.prefix and _under(path, route.prefix):
        return None
    mount = upstream.base_path + route.mount
    if mount:
        if not _under(path, mount):
            return None
        path = path[len(mount) :]
    return route.prefix + path or b"/"


def _upstream_authority(authority: bytes, upstream: Upstream) -> bool:
    if authority == upstream.host_header:
        return True
    authority = authority.lower()
    own = upstream.host_header.lower()
    return authority == own or (upstream.port == 80 and authority == own + b":80")


def rewrite_location(value: bytes, upstream: Upstream, route: Route) -> bytes:
    """A redirect target as the browser must follow it (the same object when unchanged).

    `http(s)://<upstream address>/x` becomes the path `/x` maps to (a path-only reference:
    the browser stays on the origin it used); `/x` under a stripped prefix becomes
    `/services/<name>/x`. Relative references and other sites are left alone."""
    target = value.strip()
    absolute = False
    if target[:1] == b"/":
        if target[:2] == b"//":
            return value  # network-path reference: another host
        if not route.prefix and not upstream.base_path:
            return value  # served at the root: its paths are the browser's
    else:
        start = _scheme_end(target)
        if not start:
            return value  # relative, or another scheme
        end = _authority_end(target, start)
        if not _upstream_authority(target[start:end], upstream):
            return value
        target = target[end:]
        if target[:1] != b"/":
            target = b"/" + target
        absolute = True
    path, tail = _cut_query(target)
    mapped = public_path(path, upstream, route)
    if mapped is None:
        return target if absolute else value
    new = mapped + tail
    return value if new == value else new


def rewrite_refresh(value: bytes, upstream: Upstream, route: Route) -> bytes:
    """`Refresh: 5; url=/x` with its URL mapped as a Location."""
    at = value.lower().find(b"url=")
    if at < 0:
        return value
    head, url = value[: at + 4], value[at + 4 :].strip()
    quote = url[:1] if url[:1] in (b"'", b'"') else b""
    if quote and url.endswith(quote) and len(url) > 1:
        url = url[1:-1]
    new = rewrite_location(url, upstream, route)
    return value if new is url else head + quote + new + quote


def rewrite_set_cookie(value: bytes, upstream: Upstream, route: Route) -> bytes:
    """A cookie's `Path` mapped to the path the browser uses (`Path=/` under a stripped
    prefix becomes `Path=/services/<name>`), and a `Domain` naming the upstream's own host
    dropped (the cookie is then the public host's). A cookie without a Path needs nothing:
    the browser scopes it to the public path it requested."""
    lowered = value.lower()
    if b"path" not in lowered and b"domain" not in lowered:
        return value
    parts: list[bytes | None] = list(value.split(b";"))
    changed = False
    host = upstream.host.lower().encode("latin-1")
    for i in range(1, len(parts)):
        part = parts[i]
        assert part is not None
        name, _, attr = part.partition(b"=")
        lname = name.strip().lower()
        if lname == b"path":
            path = attr.strip()
            if not path.startswith(b"/"):
                continue
            mapped = public_path(path, upstream, route)
            if mapped is None or mapped == path:
                continue
            if route.prefix and mapped == route.prefix + b"/":
                mapped = route.prefix  # matches /services/a and below, not /services/ab
            parts[i] = b" Path=" + mapped
            changed = True
        elif lname == b"domain" and attr.strip().lstrip(b".").lower() == host:
            parts[i] = None
            changed = True
    if not changed:
        return value
    return b";".join(p for p in parts if p is not None)
