"""What the proxy changes in headers on the way through, for HTTP and WebSockets alike."""

from __future__ import annotations

from hestia.lifecycle import Upstream

PREFIX = b"/services/"

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
# Not forwarded upstream: hop-by-hop, Host (rewritten), Expect (the ASGI server already
# answered 100-continue to the client), and X-Forwarded-* that we set ourselves.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"expect",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-prefix",
}


def split_service_path(raw_path: bytes) -> tuple[str, bytes] | None:
    """b'/services/ollama/api/tags' -> ('ollama', b'/api/tags'); b'/services/ollama' -> '/'."""
    rest = raw_path[len(PREFIX) :]
    name, slash, tail = rest.partition(b"/")
    if not name:
        return None
    return name.decode("latin-1"), b"/" + tail if slash else b"/"


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def upstream_request_headers(
    headers: list[tuple[bytes, bytes]],
    upstream: Upstream,
    *,
    client_ip: str | None,
    scheme: str,
    prefix: bytes,
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Headers to send upstream, and whether the request has a body.

    Hop-by-hop headers (and any named in Connection) are removed, Host is rewritten for the
    upstream, X-Forwarded-For/-Proto/-Host/-Prefix are set.
    """
    drop = _DROP_REQUEST
    if any(k == b"connection" for k, _ in headers):
        drop = drop | _connection_tokens(headers)
    out: list[tuple[bytes, bytes]] = [(b"host", upstream.host_header)]
    has_body = False
    original_host = b""
    forwarded_for = b""
    for key, value in headers:
        if key in drop:
            if key == b"host":
                original_host = value
            elif key == b"transfer-encoding":
                has_body = True
            continue
        if key == b"content-length":
            has_body = value.strip() != b"0"
        elif key == b"x-forwarded-for":
            forwarded_for = value
            continue
        out.append((key, value))
    if client_ip:
        ip = client_ip.encode()
        forwarded_for = forwarded_for + b", " + ip if forwarded_for else ip
    if forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for))
    out.append((b"x-forwarded-proto", scheme.encode()))
    if original_host:
        out.append((b"x-forwarded-host", original_host))
    out.append((b"x-forwarded-prefix", prefix))
    return out, has_body


def downstream_response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = HOP_BY_HOP
    if any(k == b"connection" for k, _ in headers):
        drop = drop | _connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in drop]
