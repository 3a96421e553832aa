"""What the proxy changes in headers on the way through, for HTTP and WebSockets alike."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from hestia.address import Upstream
from hestia.errors import HestiaError

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
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Headers to send upstream, and whether the request has a body.

    Hop-by-hop headers (and any named in Connection) are removed, Host is rewritten for the
    upstream, X-Forwarded-For/-Proto/-Host/-Prefix are set: replaced, or, when the peer is a
    `trusted` proxy, X-Forwarded-For appended to and its -Proto/-Host kept.
    """
    drop = _DROP_REQUEST
    if any(k == b"connection" for k, _ in headers):
        drop = drop | _connection_tokens(headers)
    out: list[tuple[bytes, bytes]] = [(b"host", upstream.host_header)]
    has_body = False
    original_host = b""
    forwarded_for = b""
    forwarded_proto = b""
    forwarded_host = b""
    for key, value in headers:
        if key in drop:
            if key == b"host":
                original_host = value
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
    return out, has_body


# The gateway sends its own X-Request-ID with every answer.
_DROP_RESPONSE = HOP_BY_HOP | {b"x-request-id"}


def downstream_response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = _DROP_RESPONSE
    if any(k == b"connection" for k, _ in headers):
        drop = drop | _connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in drop]
