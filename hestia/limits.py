"""What a client may ask of the gateway, and the server-wide guards that hold it to that.

The rules and the refusals they lead to (status, JSON error code, a message saying which
setting to change), a request head's byte and line count, connection caps, a coarse clock with
one sweep for every connection's timeouts, and warnings at most once per interval. The protocol
in `hestia.server` applies them.

What the protocol pays per request for the timeouts is a timestamp copied from
`ConnectionGuard.now` at each phase change: no timer is armed per request or per connection.
`tick()` runs from uvicorn's main loop (every 0.1 s) and, every `sweep_every` seconds, asks each
connection whether one of its deadlines has passed, so a deadline is kept to within one sweep
(a quarter of the shortest timeout, between 0.1 s and 1 s).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import httptools
from loguru import logger

from hestia.config import ServerLimits, ServerTimeouts

# A refused connection's last bytes are read (and dropped) this long before it is closed, so
# that a client still sending its oversized request reads the answer instead of a reset.
LINGER_S = 2.0
# Warnings of one kind (e.g. "per-client connection cap") come out at most this often.
LOG_EVERY_S = 10.0


class Refusal(NamedTuple):
    status: int
    code: str  # the JSON error's code
    message: str
    kind: str  # what the warning is counted under


def uri_too_long(lim: ServerLimits) -> Refusal:
    return Refusal(
        414,
        "uri_too_long",
        f"the request line is longer than {lim.max_request_line} bytes "
        "(server.limits.max_request_line); shorten the URL or raise the limit",
        "uri_too_long",
    )


def header_line_too_long(lim: ServerLimits) -> Refusal:
    return Refusal(
        431,
        "request_header_too_large",
        f"a request header line is longer than {lim.max_header_line} bytes "
        "(server.limits.max_header_line)",
        "request_header_too_large",
    )


def head_too_large(lim: ServerLimits) -> Refusal:
    return Refusal(
        431,
        "request_header_too_large",
        f"the request head is larger than {lim.max_header_bytes} bytes "
        "(server.limits.max_header_bytes)",
        "request_header_too_large",
    )


def too_many_headers(lim: ServerLimits) -> Refusal:
    return Refusal(
        431,
        "request_header_too_large",
        f"the request has more than {lim.max_headers} header fields (server.limits.max_headers)",
        "request_header_too_large",
    )


def trailers_too_large(lim: ServerLimits) -> Refusal:
    return Refusal(
        431,
        "request_header_too_large",
        f"the chunked request's trailer section is larger than {lim.max_header_bytes} bytes "
        "(server.limits.max_header_bytes)",
        "request_header_too_large",
    )


def head_timeout(t: ServerTimeouts) -> Refusal:
    return Refusal(
        408,
        "request_timeout",
        f"the request head did not arrive in full within {t.header:g}s (server.timeouts.header)",
        "header_timeout",
    )


def body_timeout(t: ServerTimeouts) -> Refusal:
    return Refusal(
        408,
        "request_timeout",
        f"no byte of the request body arrived for {t.body:g}s (server.timeouts.body)",
        "body_timeout",
    )


def invalid_request(reason: object) -> Refusal:
    return Refusal(400, "bad_request", f"invalid HTTP request: {reason}", "bad_request")


class HeadCounter:
    """A request head's bytes, and its lines once it is past the smallest limit, counted as
    they arrive: a line or head over its limit is refused before the parser holds it."""

    __slots__ = ("limits", "line_len", "line_no", "seen")

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.seen = 0  # bytes of the head so far
        self.line_len = 0  # bytes of its unfinished line (kept once the head spans reads)
        self.line_no = 0  # index of that line (0: the request line)

    def scan(self, data: bytes) -> Refusal | None:
        """Walk the head's lines in `data`, up to the empty line that ends it."""
        lim = self.limits
        line_len = self.line_len
        line_no = self.line_no
        total = self.seen
        pos = 0
        end = len(data)
        find = data.find
        while pos < end:
            nl = find(b"\n", pos)
            stop = end if nl < 0 else nl + 1
            line_len += stop - pos
            total += stop - pos
            if line_no == 0:
                if line_len > lim.max_request_line + 2:  # + its CRLF
                    return uri_too_long(lim)
            elif line_len > lim.max_header_line + 2:
                return header_line_too_long(lim)
            if total > lim.max_header_bytes:
                return head_too_large(lim)
            if nl < 0:
                break
            pos = stop
            if line_len == 1 or (line_len == 2 and (nl == 0 or data[nl - 1] == 13)):
                if line_no:
                    return None  # the empty line: the head ends here, a body may follow
                # an empty line before the request line is skipped (by the parser too)
            else:
                line_no += 1
                if line_no > lim.max_headers + 1:
                    return too_many_headers(lim)
            line_len = 0
        self.line_len = line_len
        self.line_no = line_no
        self.seen = total
        return None

    def note_partial(self, data: bytes) -> None:
        """Keep the unfinished line's length from a read that was not walked, in case the head
        grows past the smallest limit in a later one."""
        nl = data.rfind(b"\n")
        if nl < 0:
            self.line_len += len(data)
        else:
            self.line_len = len(data) - nl - 1
            self.line_no += data.count(b"\n")


def check_parsed_head(
    lim: ServerLimits, url: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> Refusal | None:
    """The head limits, from the parsed head, for a head the byte count could not follow (one
    that began in the same read as the end of a pipelined request)."""
    if len(url) > lim.max_request_line:
        return uri_too_long(lim)
    total = len(url) + 16
    for name, value in headers:
        n = len(name) + len(value) + 2
        if n > lim.max_header_line:
            return header_line_too_long(lim)
        total += n + 2
    if total > lim.max_header_bytes:
        return head_too_large(lim)
    return None


def check_request(
    http_version: str,
    method: bytes,
    url: bytes,
    headers: list[tuple[bytes, bytes]],
    hosts: int,
) -> Refusal | None:
    """A request the gateway must not pass on: without exactly one Host (RFC 9112 3.2), a
    CONNECT, or an absolute-form target naming another host than the request's Host.

    CONNECT is 501, not 405: Hestia supports it for no resource at all, and a 405 would owe an
    Allow header for a target that is not Hestia's. An absolute-form target is accepted when it
    names the host the Host header names: the gateway answers to any name it is reached by, so
    the Host is its own name for the request, and it routes by the path either way."""
    if hosts != 1 and (hosts or http_version == "1.1"):
        message = (
            "the request has no Host header (HTTP/1.1 requires one)"
            if not hosts
            else f"the request has {hosts} Host headers (one is allowed)"
        )
        return Refusal(400, "bad_request", message, "bad_request")
    if method == b"CONNECT":
        return Refusal(
            501,
            "method_not_implemented",
            "CONNECT is not supported: Hestia is a gateway, not a forward proxy; request "
            "http://<gateway>/services/<name>/... instead",
            "connect",
        )
    if url[:1] != b"/" and not (url == b"*" and method == b"OPTIONS"):
        host = next((v for n, v in headers if n == b"host"), b"")
        if not host or _authority(url) != _authority(b"http://" + host):
            return Refusal(
                400,
                "bad_request",
                f"the request target {url[:200].decode('latin-1')!r} names another host than "
                f"the request's Host ({host[:200].decode('latin-1')!r}); Hestia is not a "
                "forward proxy: send the path only (GET /services/<name>/...)",
                "absolute_form",
            )
    return None


def _authority(url: bytes) -> tuple[bytes, int] | None:
    """(host, port) of an http(s) URL, lowercased and with the scheme's default port."""
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return None
    scheme = (parsed.schema or b"").lower()
    if scheme not in (b"http", b"https") or not parsed.host:
        return None
    return parsed.host.lower(), parsed.port or (443 if scheme == b"https" else 80)


class Sweepable(Protocol):
    def check_timeouts(self, now: float) -> None: ...


class ConnectionGuard:
    """Counts open connections, in all and per client address, and sweeps their timeouts."""

    def __init__(
        self,
        limits: ServerLimits,
        timeouts: ServerTimeouts,
        *,
        log_every: float = LOG_EVERY_S,
    ) -> None:
        self.limits = limits
        self.timeouts = timeouts
        self.log_every = log_every
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.conns: set[Sweepable] = set()
        # a head shorter than every head limit needs no line-by-line check
        self.scan_from = min(limits.max_request_line, limits.max_header_line)
        self.scan_from = min(self.scan_from, limits.max_header_bytes)
        self.now = time.monotonic()
        shortest = min(timeouts.header, timeouts.body, timeouts.keep_alive)
        self.sweep_every = min(1.0, max(0.1, shortest / 4))
        self._next_sweep = self.now + self.sweep_every
        self._last_warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    # ------------------------------------------------------------------ connections
    def admit(self, client: str) -> Refusal | None:
        """Take a slot for a new connection from `client`, or say why there is none."""
        lim = self.limits
        if self.total >= lim.max_connections:
            self.warn(
                "max_connections",
                f"refused a connection from {client}: {self.total} connections are open "
                f"(server.limits.max_connections is {lim.max_connections})",
            )
            return Refusal(
                503,
                "too_many_connections",
                f"the gateway has {self.total} open connections, its limit "
                "(server.limits.max_connections); try again shortly",
                "max_connections",
            )
        n = self.per_client.get(client, 0)
        if n >= lim.max_connections_per_client:
            self.warn(
                "max_connections_per_client",
                f"refused a connection from {client}: it has {n} open "
                f"(server.limits.max_connections_per_client is {lim.max_connections_per_client}"
                "; behind a TLS proxy every client shares its address: raise it)",
            )
            return Refusal(
                503,
                "too_many_connections",
                f"{client} has {n} open connections to the gateway, its limit per client "
                "(server.limits.max_connections_per_client); close some and try again",
                "max_connections_per_client",
            )
        self.per_client[client] = n + 1
        self.total += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        n = self.per_client[client] - 1
        if n:
            self.per_client[client] = n
        else:
            del self.per_client[client]

    # ------------------------------------------------------------------ time
    def tick(self) -> None:
        """Advance the clock; sweep the connections' deadlines when a sweep is due."""
        now = self.now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_every
        for conn in list(self.conns):
            conn.check_timeouts(now)
        if self._suppressed:
            self._flush_suppressed(now)

    # ------------------------------------------------------------------ warnings
    def warn(self, kind: str, message: str) -> None:
        """Log `message` unless one of this kind was logged less than `log_every` ago; those
        are counted and summed up in the next one (or by the sweep once the interval is over)."""
        now = self.now
        last = self._last_warned.get(kind)
        if last is not None and now - last < self.log_every:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_warned[kind] = now
        more = self._suppressed.pop(kind, 0)
        if more:
            message += f" (and {more} more like it in the last {self.log_every:g}s)"
        logger.bind(limit=kind).warning("{}", message)

    def _flush_suppressed(self, now: float) -> None:
        for kind, n in list(self._suppressed.items()):
            if now - self._last_warned[kind] >= self.log_every:
                del self._suppressed[kind]
                self._last_warned[kind] = now
                logger.bind(limit=kind).warning(
                    "{} more refusal(s) of kind {} in the last {:g}s", n, kind, self.log_every
                )


def raise_nofile_limit(max_connections: int) -> int:
    """Raise this process's open-file soft limit to its hard limit; return the limit in force.

    Every client connection can hold an upstream connection as well, so the gateway needs about
    two descriptors per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            new = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit {} to {}: {}", soft, target, exc)
    if new != soft:
        logger.info("open-file limit raised from {} to {} (the hard limit)", soft, new)
    else:
        logger.info("open-file limit: {}", new)
    need = 2 * max_connections + 64
    if new != resource.RLIM_INFINITY and new < need:
        logger.warning(
            "server.limits.max_connections is {} but the open-file limit is {}: about {} are "
            "needed (a client and an upstream connection each); raise the limit (ulimit -n, "
            "docker --ulimit nofile=) or lower max_connections",
            max_connections,
            new,
            need,
        )
    return new
