"""Safe proxying, as properties (hypothesis): a request for `/services/a/...` reaches service a
or is refused, never service b, never the control API, never an address that the configuration
did not name, whatever the path's encoding, the Host, X-Forwarded-* or an absolute-form target.

The pure part (Router and header rules) runs thousands of examples; the gateway-level part sends
raw bytes to real gateways (with and without auth) in front of two real recording upstreams and
a canary address that nothing may ever connect to.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hestia.address import upstream_from_url
from hestia.headers import upstream_request_headers
from hestia.router import Router, remove_dot_segments
from tests.recorder import Recorder
from tests.threaded import ThreadedLoop

T = TypeVar("T")
KEY_A = "prop-key-a-0123456789abcdef"
KEY_ADMIN = "prop-key-admin-0123456789abcdef"

# every spelling of the characters that can move a path: dots, slashes, backslashes, percent
TOKENS = [
    "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "%252e", "%2f", "%2F",
    "%5c", "%5C", "\\", "%", "%25", "%%", "%2", "%c3%a9", "%C3%A9", "%ff", "%00", "~", ";",
    ":", "@", "a", "b", "v1", "services", "health", "x", "%3f", "?", "?x=/../b", "&",
    "%u002e", "%c0%ae", "%e0%80%ae", "..;", ";..", "...",
]  # fmt: skip
# what no valid request line carries: rarer, or most requests would be 400s
INVALID = [" ", "\t", "é", "#", "\x7f"]
PREFIXES = [
    "/services/a/", "/services/a", "/services/b/", "/services/a%2f", "/services%2fa/",
    "/%73ervices/a/", "/Services/a/", "//services/a/", "/services//a/", "/./services/a/",
    "/services/./a/", "/services/a/../b/", "/v1/", "/services/", "/services/ab/", "",
]  # fmt: skip
_DOTS = {b".", b"%2e", b"%2E"}
_DOTDOTS = {a + b for a in _DOTS for b in _DOTS}

suffixes = st.lists(st.sampled_from(TOKENS * 6 + INVALID), max_size=10).map("".join)


def rfc_resolve(path: bytes) -> bytes:
    """What an upstream that follows RFC 3986 makes of a path: 5.2.4's algorithm, written
    here independently of the router's, with %2e taken as the unreserved '.' it encodes."""
    inp = re.sub(rb"%2[eE]", b".", path)
    out = b""
    while inp:
        if inp.startswith(b"../"):
            inp = inp[3:]
        elif inp.startswith(b"./"):
            inp = inp[2:]
        elif inp.startswith(b"/./") or inp == b"/.":
            inp = b"/" + inp[3:]
        elif inp.startswith(b"/../") or inp == b"/..":
            inp = b"/" + inp[4:]
            out = out[: out.rfind(b"/")] if b"/" in out else b""
        elif inp in (b".", b".."):
            inp = b""
        else:
            cut = inp.find(b"/", 1)
            seg, inp = (inp, b"") if cut < 0 else (inp[:cut], inp[cut:])
            out += seg
    return out


def service_of(raw_path: bytes) -> str | None:
    """The service a raw path names by the documented rule, independently of the router."""
    if not raw_path.startswith(b"/services/"):
        return None
    return raw_path[len(b"/services/") :].split(b"/", 1)[0].decode("latin-1")


def segments(path: bytes) -> list[bytes]:
    return path.split(b"/")[1:]


# ------------------------------------------------------------------ pure
@settings(max_examples=3000, deadline=None, derandomize=True)
@given(suffix=suffixes)
def test_a_service_path_stays_in_its_service(suffix: str) -> None:
    raw = b"/services/a/" + suffix.encode()
    route = Router().resolve({"raw_path": raw, "path": "/"})
    assert route is not None
    assert route.service == "a" and route.prefix == b"/services/a"
    assert route.path.startswith(b"/")
    assert b"?" not in route.path
    # nothing left that climbs (no dot segment), and the path means what the client's meant
    # below /services/a
    assert not any(seg in _DOTS or seg in _DOTDOTS for seg in segments(route.path))
    assert route.path == remove_dot_segments(route.path)
    rest = raw[len(b"/services/a") :].split(b"?", 1)[0]
    assert rfc_resolve(route.path) == rfc_resolve(rest)
    # under a url's base path it stays under that base path
    for base in (b"", b"/base"):  # a url's base path, without its trailing slash
        target = base + route.path
        assert rfc_resolve(target).startswith(base)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(prefix=st.sampled_from(PREFIXES), suffix=suffixes)
def test_only_the_exact_prefix_is_a_service_route(prefix: str, suffix: str) -> None:
    raw = (prefix + suffix).encode()
    if not raw.startswith(b"/"):
        raw = b"/" + raw
    route = Router().resolve({"raw_path": raw, "path": "/"})
    if not raw.startswith(b"/services/"):
        assert route is None  # the control API, which answers 404 for what it does not know
        return
    assert route is not None
    name = service_of(raw.split(b"?", 1)[0])
    assert route.service == name
    assert route.prefix == b"/services/" + route.service.encode("latin-1")


header_names = st.sampled_from(
    [
        b"host", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto",
        b"x-forwarded-prefix", b"forwarded", b"x-real-ip", b"x-original-url", b"x-rewrite-url",
        b"connection", b"keep-alive", b"te", b"upgrade", b"proxy-authorization", b"x-other",
        b"content-length", b"expect", b"x-request-id",
    ]
)  # fmt: skip
header_values = st.sampled_from(
    [
        b"127.0.0.1:9", b"evil.example", b"http://evil.example/", b"/v1/services",
        b"/services/b/", b"1.2.3.4", b"https", b"host, x-forwarded-for", b"close", b"0",
        b"x-other", b"keep-alive",
    ]
)  # fmt: skip


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=12))
def test_headers_never_change_the_upstream(headers: list[tuple[bytes, bytes]]) -> None:
    upstream = upstream_from_url("http://10.1.2.3:8000/base")
    out, _ = upstream_request_headers(
        headers, upstream, client_ip="192.0.2.7", scheme="http", prefix=b"/services/a"
    )
    hosts = [v for k, v in out if k == b"host"]
    assert hosts == [upstream.host_header]
    # from an untrusted client, the chain is the gateway's alone
    assert [v for k, v in out if k == b"x-forwarded-for"] == [b"192.0.2.7"]
    assert [v for k, v in out if k == b"x-forwarded-prefix"] == [b"/services/a"]
    assert [v for k, v in out if k == b"x-forwarded-proto"] == [b"http"]
    hop = {b"connection", b"keep-alive", b"te", b"upgrade", b"proxy-authorization", b"expect"}
    assert not [k for k, _ in out if k in hop]


# ------------------------------------------------------------------ through real gateways
class Harness(ThreadedLoop):
    """Two recording upstreams, a canary address and two gateways (open, and locked with a key
    for service a only), driven synchronously by hypothesis with raw sockets."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.a = Recorder("A")
        self.b = Recorder("B")
        self.canary_hits = 0
        self.ids = itertools.count()

    async def start(self) -> None:
        self.pa = await self.serve_app(self.a)
        self.pb = await self.serve_app(self.b)

        async def hit(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.canary_hits += 1
            writer.close()

        self.canary = await asyncio.start_server(hit, "127.0.0.1", 0)
        self.pc = int(self.canary.sockets[0].getsockname()[1])
        services = {
            "a": {"url": f"http://127.0.0.1:{self.pa}/base"},
            "b": {"url": f"http://127.0.0.1:{self.pb}/"},
        }
        _, self.open_port = await self.gateway({"services": services, "logging": {"access": False}})
        auth = {
            "enabled": True,
            "keys": [
                {"name": "a-only", "key": KEY_A, "scopes": ["service:a"]},
                {"name": "root", "key": KEY_ADMIN, "scopes": ["admin"]},
            ],
        }
        locked, self.locked_port = await self.gateway(
            {"services": services, "logging": {"access": False}, "auth": auth}
        )
        # wrong keys are part of the sample: no blocking of 127.0.0.1 here
        locked.auth.limiter.limit = 1 << 30

    def request(self, port: int, head: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send a raw request head (Connection: close) and read the whole answer."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        raw = b"".join(chunks)
        head_bytes, _, body = raw.partition(b"\r\n\r\n")
        lines = head_bytes.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        return status, headers, body

    def seen_by(self, recorder: Recorder, rid: bytes) -> list[bytes]:
        with recorder.lock:
            return [s.target for s in recorder.seen if s.header(b"x-request-id") == [rid]]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("safe"))
    try:
        h.run(h.start())
        yield h
    finally:
        if hasattr(h, "canary"):
            h.loop.call_soon_threadsafe(h.canary.close)
        h.close()


forms = st.sampled_from(["origin"] * 6 + ["absolute-own"] * 3 + ["absolute-b", "absolute-canary"])
hosts = st.sampled_from(["gateway"] * 6 + ["b", "canary", "evil.example", "localhost"])
forwarded = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "X-Forwarded-Host", "X-Forwarded-For", "X-Forwarded-Proto", "Forwarded",
                "X-Original-URL", "X-Rewrite-URL", "X-Forwarded-Prefix", "X-Real-IP",
            ]
        ),
        st.sampled_from(["b", "canary", "/v1/services", "/services/b/", "evil.example"]),
    ),
    max_size=4,
)  # fmt: skip
credentials = st.sampled_from(
    ["bearer-a"] * 3 + ["x-api-key-a"] * 2 + ["bearer-admin"] * 2 + ["none", "wrong"]
)


@settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    prefix=st.sampled_from(["/services/a/"] * 8 + PREFIXES),
    suffix=suffixes,
    form=forms,
    host=hosts,
    extra=forwarded,
    locked=st.booleans(),
    cred=credentials,
)
def test_a_request_reaches_what_the_router_says_or_is_refused(
    harness: Harness,
    prefix: str,
    suffix: str,
    form: str,
    host: str,
    extra: list[tuple[str, str]],
    locked: bool,
    cred: str,
) -> None:
    h = harness
    port = h.locked_port if locked else h.open_port
    addr = {
        "gateway": f"127.0.0.1:{port}",
        "b": f"127.0.0.1:{h.pb}",
        "canary": f"127.0.0.1:{h.pc}",
    }
    path = prefix + suffix
    if not path.startswith("/"):
        path = "/" + path
    target = path
    if form != "origin":
        which = {"absolute-own": "gateway", "absolute-b": "b", "absolute-canary": "canary"}[form]
        target = f"http://{addr[which]}{path}"
    rid = f"prop-{next(h.ids)}".encode()
    lines = [
        f"GET {target} HTTP/1.1".encode(),
        b"Host: " + addr.get(host, host).encode(),
        b"X-Request-ID: " + rid,
        b"Connection: close",
    ]
    for name, value in extra:
        lines.append(f"{name}: {addr.get(value, value)}".encode())
    if cred == "bearer-a":
        lines.append(f"Authorization: Bearer {KEY_A}".encode())
    elif cred == "x-api-key-a":
        lines.append(f"X-API-Key: {KEY_A}".encode())
    elif cred == "bearer-admin":
        lines.append(f"Authorization: Bearer {KEY_ADMIN}".encode())
    elif cred == "wrong":
        lines.append(b"X-API-Key: not-a-key-at-all")
    status, headers, body = h.request(port, b"\r\n".join(lines) + b"\r\n\r\n")

    raw_path = re.split(rb"[?#]", path.encode("utf-8"), maxsplit=1)[0]
    expected = service_of(raw_path)
    reached_a = h.seen_by(h.a, rid)
    reached_b = h.seen_by(h.b, rid)

    event("reached a" if reached_a else "reached b" if reached_b else f"answered {status}")
    # never an address the configuration did not name
    assert h.canary_hits == 0
    if reached_a:
        # a's upstream saw it: the router said a, and the target is under a's base path
        assert expected == "a", (target, reached_a)
        assert (status, body) == (200, b"A")
        [seen] = reached_a
        seen_path = seen.split(b"?", 1)[0]
        assert seen_path.startswith(b"/base/") or seen_path == b"/base"
        # no dot segment reaches a's upstream; what it makes of the path stays under its base
        # path and means what the client's path meant below /services/a
        assert not any(seg in _DOTS or seg in _DOTDOTS for seg in segments(seen_path))
        rest = raw_path[len(b"/services/a") :] or b"/"
        assert rfc_resolve(seen_path) == b"/base" + rfc_resolve(rest)
        if locked:
            assert cred in ("bearer-a", "x-api-key-a", "bearer-admin")
    if reached_b:
        assert expected == "b", (target, reached_b)
        assert not locked or cred == "bearer-admin"  # the a-only key never reaches b
    if not reached_a and not reached_b:
        if 200 <= status < 300:
            # only the control API answers 2xx without an upstream, and only for its paths
            assert expected is None, (target, status, body)
            assert raw_path.startswith(b"/v1/") or raw_path == b"/v1"
            assert not locked or cred == "bearer-admin"
        else:
            assert status >= 400
            assert headers.get(b"content-type", b"").startswith(b"application/json")
            error = json.loads(body)["error"]
            assert re.fullmatch(r"[a-z_]+", error["code"]) and error["message"]
    # a request for service a never gets anything from anyone else
    if raw_path.startswith(b"/services/a/"):
        assert not reached_b and (reached_a or status >= 400)


def test_absolute_form_targets_never_pick_the_upstream(harness: Harness) -> None:
    """An absolute-form target naming another host is refused; naming the gateway itself, it
    is routed by its path like any request. Host and X-Forwarded-Host never matter."""
    h = harness
    gateway = f"127.0.0.1:{h.open_port}"
    for authority in (f"127.0.0.1:{h.pb}", f"127.0.0.1:{h.pc}", "evil.example"):
        head = (
            f"GET http://{authority}/services/a/x HTTP/1.1\r\nHost: {gateway}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status, _, body = h.request(h.open_port, head)
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    rid = b"absolute-own"
    head = (
        f"GET http://{gateway}/services/a/own HTTP/1.1\r\nHost: {gateway}\r\n"
        f"X-Forwarded-Host: 127.0.0.1:{h.pb}\r\nX-Request-ID: absolute-own\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status, _, body = h.request(h.open_port, head)
    assert (status, body) == (200, b"A")
    assert h.seen_by(h.a, rid) == [b"/base/own"] and h.seen_by(h.b, rid) == []
    assert h.canary_hits == 0
