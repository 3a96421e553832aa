"""Redirects, cookies, Origin and Referer mapped between what the browser sees and what the
upstream sees, with the cases nginx documents for proxy_redirect, proxy_cookie_path and
proxy_cookie_domain."""

from __future__ import annotations

import pytest

from hestia.address import upstream_from_url
from hestia.headers import (
    downstream_response_headers,
    public_path,
    rewrite_location,
    rewrite_refresh,
    rewrite_set_cookie,
    upstream_request_headers,
)
from hestia.router import Route

UP = upstream_from_url("http://127.0.0.1:8888")
# nginx: `location /one/ { proxy_pass http://upstream:port/two/; }`
UP_TWO = upstream_from_url("http://upstream:8000/two")
BY_PATH = Route("app", b"/x", b"/services/app")
BY_HOST = Route("app", b"/x", b"", by_host=True)
BASE_URL = Route("app", b"/services/app/x", b"/services/app", stripped=False)


@pytest.mark.parametrize(
    ("route", "location", "expected"),
    [
        # the upstream's own address, absolute: the browser stays on the gateway
        (BY_PATH, b"http://127.0.0.1:8888/lab?x=1", b"/services/app/lab?x=1"),
        (BY_PATH, b"http://127.0.0.1:8888", b"/services/app/"),
        (BY_PATH, b"HTTP://127.0.0.1:8888/a#frag", b"/services/app/a#frag"),
        (BY_PATH, b"https://127.0.0.1:8888/tls", b"/services/app/tls"),  # X-Forwarded-Proto
        (BY_HOST, b"http://127.0.0.1:8888/lab", b"/lab"),
        (BASE_URL, b"http://127.0.0.1:8888/services/app/lab", b"/services/app/lab"),
        # an absolute path of an app under a stripped prefix
        (BY_PATH, b"/login", b"/services/app/login"),
        (BY_PATH, b"/login?next=%2Ftree", b"/services/app/login?next=%2Ftree"),
        (BY_PATH, b"/a/b/c?x=/y#z/w", b"/services/app/a/b/c?x=/y#z/w"),
        (BY_PATH, b"http://127.0.0.1:8888/a/b?next=/c", b"/services/app/a/b?next=/c"),
        (BY_PATH, b"http://127.0.0.1:8888?x", b"/services/app/?x"),
        (BY_PATH, b"/", b"/services/app/"),
        # already the browser's path (the app reads X-Forwarded-Prefix): unchanged
        (BY_PATH, b"/services/app/login", b"/services/app/login"),
        (BY_PATH, b"http://127.0.0.1:8888/services/app/x", b"/services/app/x"),
        # by host name or with a base URL, absolute paths are the browser's already
        (BY_HOST, b"/login", b"/login"),
        (BASE_URL, b"/services/app/tree", b"/services/app/tree"),
        # relative references, other sites, other ports, network-path references: unchanged
        (BY_PATH, b"login", b"login"),
        (BY_PATH, b"../up", b"../up"),
        (BY_PATH, b"?page=2", b"?page=2"),
        (BY_PATH, b"http://example.com/x", b"http://example.com/x"),
        (BY_PATH, b"http://127.0.0.1:9999/x", b"http://127.0.0.1:9999/x"),
        (BY_PATH, b"//127.0.0.1:8888/x", b"//127.0.0.1:8888/x"),
        (BY_PATH, b"mailto:a@b", b"mailto:a@b"),
    ],
)
def test_location(route: Route, location: bytes, expected: bytes) -> None:
    assert rewrite_location(location, UP, route) == expected


@pytest.mark.parametrize(
    ("route", "location", "expected"),
    [
        # nginx's `proxy_redirect default` for proxy_pass http://upstream:port/two/
        (Route("one", b"/", b"/services/one"), b"http://upstream:8000/two/some/uri/", None),
        (Route("one", b"/", b"", by_host=True), b"http://upstream:8000/two/some/uri/", None),
        (Route("one", b"/", b"/services/one"), b"/two/x", b"/services/one/x"),
        (Route("one", b"/", b"/services/one"), b"/two", b"/services/one"),
        # outside the base path there is nothing the gateway serves: absolute ones become
        # paths on the gateway (never the upstream's private address), paths stay
        (Route("one", b"/", b"/services/one"), b"http://upstream:8000/other", b"/other"),
        (Route("one", b"/", b"/services/one"), b"/other", b"/other"),
        (Route("one", b"/", b"/services/one"), b"/twofold", b"/twofold"),
    ],
)
def test_location_under_a_base_path(route: Route, location: bytes, expected: bytes | None) -> None:
    if expected is None:
        expected = route.prefix + b"/some/uri/"
    assert rewrite_location(location, UP_TWO, route) == expected


def test_upstream_on_port_80_matches_with_and_without_the_port() -> None:
    up = upstream_from_url("http://ollama")
    assert rewrite_location(b"http://ollama/x", up, BY_PATH) == b"/services/app/x"
    assert rewrite_location(b"http://OLLAMA:80/x", up, BY_PATH) == b"/services/app/x"


def test_unchanged_location_is_the_same_object() -> None:
    value = b"https://example.com/"
    assert rewrite_location(value, UP, BY_PATH) is value


@pytest.mark.parametrize(
    ("refresh", "expected"),
    [
        (b"5; url=/login", b"5; url=/services/app/login"),
        (b"0;URL='http://127.0.0.1:8888/x'", b"0;URL='/services/app/x'"),
        (b'3; url="/a"', b'3; url="/services/app/a"'),
        (b"10", b"10"),
        (b"1; url=https://example.com/", b"1; url=https://example.com/"),
    ],
)
def test_refresh(refresh: bytes, expected: bytes) -> None:
    assert rewrite_refresh(refresh, UP, BY_PATH) == expected


@pytest.mark.parametrize(
    ("route", "cookie", "expected"),
    [
        # Path=/ under a stripped prefix: scoped to the service (matches /services/app and
        # below, not /services/apple), so two services' "session" cookies do not collide
        (BY_PATH, b"session=abc; Path=/; HttpOnly", b"session=abc; Path=/services/app; HttpOnly"),
        (BY_PATH, b"a=1; path=/api; Secure", b"a=1; Path=/services/app/api; Secure"),
        (BY_PATH, b"a=1;Path=/api/", b"a=1; Path=/services/app/api/"),
        # no Path: the browser scopes it to the public path it requested; nothing to do
        (BY_PATH, b"a=1", b"a=1"),
        (BY_PATH, b"a=1; HttpOnly; SameSite=Lax", b"a=1; HttpOnly; SameSite=Lax"),
        # already under the prefix (the app honours X-Forwarded-Prefix or a base URL)
        (BY_PATH, b"a=1; Path=/services/app/", b"a=1; Path=/services/app/"),
        (BASE_URL, b"_xsrf=t; Path=/services/app/", b"_xsrf=t; Path=/services/app/"),
        (BY_HOST, b"a=1; Path=/", b"a=1; Path=/"),
        # a Domain naming the upstream's own host is dropped (the cookie becomes the public
        # host's); other domains are the app's business
        (BY_HOST, b"a=1; Domain=127.0.0.1; Path=/", b"a=1; Path=/"),
        (BY_PATH, b"a=1; domain=.127.0.0.1", b"a=1"),
        (BY_PATH, b"a=1; Domain=example.com", b"a=1; Domain=example.com"),
        (BY_PATH, b"a=1; path = /x", b"a=1; Path=/services/app/x"),  # RFC 6265 trims
        # a value with '=' and quoted parts survives byte for byte
        (BY_PATH, b'a="x=y;"; Path=/', b'a="x=y;"; Path=/services/app'),
        (BY_PATH, b"a=1; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Path=/", None),
    ],
)
def test_set_cookie(route: Route, cookie: bytes, expected: bytes | None) -> None:
    if expected is None:
        expected = b"a=1; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Path=/services/app"
    assert rewrite_set_cookie(cookie, UP, route) == expected


def test_cookie_paths_under_a_base_path() -> None:
    # nginx: proxy_cookie_path /two/ /one/  ("path=/two/some/uri/" -> "path=/one/some/uri/")
    route = Route("one", b"/", b"/services/one")
    assert rewrite_set_cookie(b"a=1; path=/two/some/uri/", UP_TWO, route) == (
        b"a=1; Path=/services/one/some/uri/"
    )
    # by host name, served at the root: proxy_cookie_path /two/ /
    host = Route("one", b"/", b"", by_host=True)
    assert rewrite_set_cookie(b"a=1; path=/two/some/uri/", UP_TWO, host) == (
        b"a=1; Path=/some/uri/"
    )
    assert rewrite_set_cookie(b"a=1; Path=/two", UP_TWO, host) == b"a=1; Path=/"


def test_response_headers_with_several_cookies_and_a_redirect() -> None:
    headers = [
        (b"content-type", b"text/html"),
        (b"location", b"http://127.0.0.1:8888/login?next=%2F"),
        (b"set-cookie", b"a=1; Path=/"),
        (b"set-cookie", b"b=2; Path=/x; Domain=127.0.0.1"),
        (b"set-cookie", b"c=3"),
        (b"content-location", b"/doc"),
        (b"connection", b"close"),
        (b"x-request-id", b"upstream's"),
    ]
    assert downstream_response_headers(headers, UP, BY_PATH) == [
        (b"content-type", b"text/html"),
        (b"location", b"/services/app/login?next=%2F"),
        (b"set-cookie", b"a=1; Path=/services/app"),
        (b"set-cookie", b"b=2; Path=/services/app/x"),
        (b"set-cookie", b"c=3"),
        (b"content-location", b"/services/app/doc"),
    ]


def test_response_headers_without_a_route_are_only_filtered() -> None:
    headers = [(b"location", b"/login"), (b"set-cookie", b"a=1; Path=/")]
    assert downstream_response_headers(headers) == headers


def test_connection_may_drop_a_cookie_before_it_is_rewritten() -> None:
    headers = [(b"connection", b"set-cookie"), (b"set-cookie", b"a=1; Path=/")]
    assert downstream_response_headers(headers, UP, BY_PATH) == []


@pytest.mark.parametrize(
    "path",
    [b"/", b"/lab", b"/lab/tree/x.ipynb"],
)
def test_public_path_inverts_what_the_router_sends(path: bytes) -> None:
    # the upstream sees base_path + route.path; mapping that back gives the browser's path
    for route, public in (
        (Route("app", path, b"/services/app"), b"/services/app" + path),
        (Route("app", b"/services/app" + path, b"/services/app", stripped=False), None),
        (Route("app", path, b"", by_host=True), path),
    ):
        upstream_path = UP_TWO.base_path + route.path
        expected = public if public is not None else route.path
        assert public_path(upstream_path, UP_TWO, route) == expected


def _sent(headers: list[tuple[bytes, bytes]], **kw: object) -> dict[bytes, bytes]:
    args: dict[str, object] = {
        "client_ip": "10.0.0.9",
        "scheme": "http",
        "prefix": b"/services/app",
    }
    args.update(kw)
    out, _ = upstream_request_headers(headers, UP, **args)  # type: ignore[arg-type]
    return dict(out)


def test_same_origin_origin_and_referer_follow_host() -> None:
    sent = _sent(
        [
            (b"host", b"Gateway.Example:8080"),
            (b"origin", b"http://gateway.example:8080"),
            (b"referer", b"http://gateway.example:8080/services/app/lab/tree?x=1"),
        ]
    )
    assert sent[b"host"] == b"127.0.0.1:8888"
    assert sent[b"origin"] == b"http://127.0.0.1:8888"
    assert sent[b"referer"] == b"http://127.0.0.1:8888/lab/tree?x=1"
    assert sent[b"x-forwarded-host"] == b"Gateway.Example:8080"
    assert sent[b"x-forwarded-prefix"] == b"/services/app"


def test_referer_maps_under_the_base_path_and_keeps_other_pages() -> None:
    out, _ = upstream_request_headers(
        [(b"host", b"gw"), (b"referer", b"http://gw/services/app/a")],
        UP_TWO,
        client_ip=None,
        scheme="http",
        prefix=b"/services/app",
    )
    assert dict(out)[b"referer"] == b"http://upstream:8000/two/a"
    # the referring page is another app on the gateway: only the origin changes
    sent = _sent([(b"host", b"gw"), (b"referer", b"http://gw/services/other/a")])
    assert sent[b"referer"] == b"http://127.0.0.1:8888/services/other/a"
    sent = _sent([(b"host", b"gw"), (b"referer", b"http://gw/services/apple/a")])
    assert sent[b"referer"] == b"http://127.0.0.1:8888/services/apple/a"
    sent = _sent([(b"host", b"gw"), (b"referer", b"http://gw/services/app?x=/y")])
    assert sent[b"referer"] == b"http://127.0.0.1:8888/?x=/y"
    sent = _sent([(b"host", b"gw"), (b"referer", b"http://gw?x")])
    assert sent[b"referer"] == b"http://127.0.0.1:8888/?x"
    # by host name (nothing stripped) and with a base URL (nothing stripped either)
    sent = _sent([(b"host", b"gw"), (b"referer", b"http://gw/lab")], prefix=b"")
    assert sent[b"referer"] == b"http://127.0.0.1:8888/lab"
    sent = _sent([(b"host", b"gw"), (b"referer", b"http://gw/services/app/lab")], stripped=False)
    assert sent[b"referer"] == b"http://127.0.0.1:8888/services/app/lab"


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        (b"gw:8080", b"http://evil.example"),  # another site: the app's CSRF check decides
        (b"gw:8080", b"http://gw:8081"),  # another port is another origin
        (b"gw:8080", b"null"),
        (b"gw:8080", b"http://gw:8080.evil.example"),
    ],
)
def test_other_origins_pass_unchanged(host: bytes, origin: bytes) -> None:
    sent = _sent([(b"host", host), (b"origin", origin), (b"referer", origin + b"/x")])
    assert sent[b"origin"] == origin
    assert sent[b"referer"] == origin + b"/x"


def test_default_ports_and_schemes_are_the_same_origin() -> None:
    # behind a TLS proxy the browser's origin is https://gw, the Host it forwards is gw
    sent = _sent([(b"host", b"gw"), (b"origin", b"https://gw")])
    assert sent[b"origin"] == b"http://127.0.0.1:8888"
    sent = _sent([(b"host", b"gw:443"), (b"origin", b"https://gw")])
    assert sent[b"origin"] == b"http://127.0.0.1:8888"


def test_trusted_proxy_forwarded_host_is_the_public_origin() -> None:
    headers = [
        (b"host", b"hestia:8080"),
        (b"x-forwarded-host", b"apps.example.org"),
        (b"origin", b"https://apps.example.org"),
    ]
    assert _sent(headers, trusted=True)[b"origin"] == b"http://127.0.0.1:8888"
    # an untrusted peer's X-Forwarded-Host counts for nothing
    assert _sent(headers)[b"origin"] == b"https://apps.example.org"


def test_preserve_host_keeps_host_origin_and_referer() -> None:
    headers = [
        (b"host", b"jupyter.localhost:8080"),
        (b"origin", b"http://jupyter.localhost:8080"),
        (b"referer", b"http://jupyter.localhost:8080/lab"),
    ]
    sent = _sent(headers, preserve_host=True, prefix=b"")
    assert sent[b"host"] == b"jupyter.localhost:8080"
    assert sent[b"origin"] == b"http://jupyter.localhost:8080"
    assert sent[b"referer"] == b"http://jupyter.localhost:8080/lab"
    assert sent[b"x-forwarded-prefix"] == b""


def test_origin_named_in_connection_is_dropped() -> None:
    sent = _sent([(b"host", b"gw"), (b"connection", b"origin"), (b"origin", b"http://gw")])
    assert b"origin" not in sent
