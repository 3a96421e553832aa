"""What changes in headers on the way through."""

from __future__ import annotations

import pytest

from hestia.address import upstream_from_url
from hestia.headers import (
    TrustedProxies,
    UnsupportedTransferCoding,
    downstream_response_headers,
    upstream_request_headers,
)

UP = upstream_from_url("http://ollama:11434")


def test_header_rewriting() -> None:
    headers, has_body = upstream_request_headers(
        [
            (b"host", b"gw:8080"),
            (b"connection", b"upgrade, x-secret"),
            (b"upgrade", b"h2c"),
            (b"x-secret", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-request-id", b"from-the-client"),
            (b"authorization", b"Bearer t"),
        ],
        UP,
        client_ip="127.0.0.1",
        scheme="http",
        prefix=b"/services/ollama",
    )
    assert has_body
    assert headers == [
        (b"host", b"ollama:11434"),
        (b"authorization", b"Bearer t"),
        (b"x-forwarded-for", b"127.0.0.1"),  # the client's own claim is replaced
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"gw:8080"),
        (b"x-forwarded-prefix", b"/services/ollama"),
    ]
    _, has_body = upstream_request_headers(
        [(b"content-length", b"0")], UP, client_ip=None, scheme="http", prefix=b"/"
    )
    assert not has_body


def test_trusted_proxy_keeps_the_forwarded_chain() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    assert trusted.trusts("10.1.2.3") and not trusted.trusts("192.168.1.2")
    assert not TrustedProxies().trusts("10.1.2.3")
    headers, _ = upstream_request_headers(
        [
            (b"x-forwarded-for", b"203.0.113.9"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"home.example"),
            (b"host", b"hestia:8080"),
        ],
        UP,
        client_ip="10.1.2.3",
        scheme="http",
        prefix=b"/services/ollama",
        trusted=True,
    )
    assert dict(headers)[b"x-forwarded-for"] == b"203.0.113.9, 10.1.2.3"
    assert dict(headers)[b"x-forwarded-proto"] == b"https"
    assert dict(headers)[b"x-forwarded-host"] == b"home.example"


def test_connection_cannot_drop_the_body_length() -> None:
    headers, has_body = upstream_request_headers(
        [(b"connection", b"content-length, x-a"), (b"content-length", b"3"), (b"x-a", b"1")],
        UP,
        client_ip=None,
        scheme="http",
        prefix=b"/",
    )
    assert has_body and (b"content-length", b"3") in headers
    assert all(k != b"x-a" for k, _ in headers)


def test_transfer_codings_other_than_chunked_are_refused() -> None:
    with pytest.raises(UnsupportedTransferCoding) as exc:
        upstream_request_headers(
            [(b"transfer-encoding", b"gzip, chunked")],
            UP,
            client_ip=None,
            scheme="http",
            prefix=b"/",
        )
    assert exc.value.status == 501


def test_downstream_drops_hop_by_hop_and_the_upstreams_request_id() -> None:
    assert downstream_response_headers(
        [
            (b"connection", b"close, x-b"),
            (b"transfer-encoding", b"chunked"),
            (b"x-b", b"2"),
            (b"x-request-id", b"upstream-own"),
            (b"x-a", b"1"),
        ]
    ) == [(b"x-a", b"1")]
