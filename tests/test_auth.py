"""Authentication through a real gateway on 127.0.0.1: keys in both header forms and from every
source, scopes on the proxy and the API, the login cookie, CSRF, rate limiting, rotation, what
reaches the services, and that no key is ever logged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from hestia.backends.memory import MemoryBackend
from hestia.config import AuthConfig, parse_config
from hestia.errors import ConfigError
from tests.conftest import free_port, wait_for, wait_http_ok
from tests.recorder import Recorder, serve_recorder

ON = {"hestia.enable": "true"}
ADMIN = "adm-" + secrets.token_hex(16)
READ = "rd-" + secrets.token_hex(16)
ONLY_A = "sa-" + secrets.token_hex(16)  # configured as key_sha256
ALL_SVC = "all-" + secrets.token_hex(16)  # configured as ${HESTIA_TEST_ALL_KEY}
FILED = "fil-" + secrets.token_hex(16)  # configured as key_file
NEW = "new-" + secrets.token_hex(16)  # rotated in
WRONG = "wrong-" + secrets.token_hex(16)
SERVICE_TOKEN = "svc-own-" + secrets.token_hex(16)  # a service's own Authorization
EVERY_KEY = (ADMIN, READ, ONLY_A, ALL_SVC, FILED, NEW, WRONG)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(autouse=True)
def captured_logs() -> Iterator[list[str]]:
    """Every log line of the test (message and fields); after it, no key may be in any."""
    lines: list[str] = []

    def sink(message: Any) -> None:
        record = message.record
        lines.append(record["message"] + " " + json.dumps(record["extra"], default=str))

    handler = logger.add(sink, level="DEBUG")
    try:
        yield lines
    finally:
        logger.remove(handler)
    text = "\n".join(lines)
    for key in EVERY_KEY:
        assert key not in text, "a key appeared in the logs"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "secret"
    p.write_text(FILED + "\n")  # as a Docker secret usually is: with a newline
    return p


@pytest.fixture(autouse=True)
def env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HESTIA_TEST_ALL_KEY", ALL_SVC)


def auth_block(key_file: Path, **over: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "enabled": True,
        "keys": [
            {"name": "root", "key": ADMIN, "scopes": ["admin"]},
            {"name": "monitor", "key": READ, "scopes": ["read"]},
            {"name": "only-a", "key_sha256": sha(ONLY_A), "scopes": ["service:a"]},
            {"name": "all-services", "key": "${HESTIA_TEST_ALL_KEY}", "scopes": ["service:*"]},
            {"name": "filed", "key_file": str(key_file), "scopes": ["service:b", "read"]},
        ],
    }
    block.update(over)
    return block


class World:
    def __init__(self, gw: Any, a: Recorder, b: Recorder, backend: MemoryBackend) -> None:
        self.gw = gw
        self.a = a
        self.b = b
        self.backend = backend
        self.url = gw.url


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[Recorder, int, Recorder, int]]:
    async with serve_recorder("A") as (a, pa), serve_recorder("B") as (b, pb):
        yield a, pa, b, pb


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    b = MemoryBackend()
    yield b
    await b.close()


async def start_world(
    gateway_factory: Any,
    upstreams: tuple[Recorder, int, Recorder, int],
    backend: MemoryBackend,
    auth: dict[str, Any],
    **raw: Any,
) -> World:
    a, pa, b, pb = upstreams
    backend.add("m", labels=ON)
    config = {
        "auth": auth,
        "docker": {"reconcile_interval": 0},
        "services": {
            "a": {"url": f"http://127.0.0.1:{pa}/base"},
            "b": {"url": f"http://127.0.0.1:{pb}"},
        },
        **raw,
    }
    gw = await gateway_factory(config, {"memory": backend})
    return World(gw, a, b, backend)


@pytest.fixture
async def world(
    gateway_factory: Any,
    upstreams: tuple[Recorder, int, Recorder, int],
    backend: MemoryBackend,
    key_file: Path,
) -> World:
    return await start_world(gateway_factory, upstreams, backend, auth_block(key_file))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code and err["message"]
    return err


# ------------------------------------------------------------------ config
def test_config_resolves_env_file_and_hash_and_names_the_key_in_errors(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = parse_config({"auth": auth_block(key_file)})
    digests = dict(zip([k.name for k in cfg.auth.keys], cfg.auth.key_digests(), strict=True))
    assert digests["root"] == hashlib.sha256(ADMIN.encode()).digest()
    assert digests["only-a"] == hashlib.sha256(ONLY_A.encode()).digest()
    assert digests["all-services"] == hashlib.sha256(ALL_SVC.encode()).digest()
    assert digests["filed"] == hashlib.sha256(FILED.encode()).digest()  # newline stripped

    def refused(auth: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as info:
            parse_config({"auth": auth}, source="hestia_config.yml")
        assert info.value.message.startswith("invalid config in hestia_config.yml: ")
        return info.value.message

    one = [{"name": "laptop", "key": "${HESTIA_TEST_UNSET}", "scopes": ["admin"]}]
    monkeypatch.delenv("HESTIA_TEST_UNSET", raising=False)
    msg = refused({"enabled": True, "keys": one})
    assert "laptop" in msg and "HESTIA_TEST_UNSET" in msg and "is not set" in msg
    monkeypatch.setenv("HESTIA_TEST_UNSET", "")
    assert "laptop.key: is empty" in refused({"keys": one})
    msg = refused({"keys": [{"name": "box", "key_file": "/nonexistent/x", "scopes": ["read"]}]})
    assert "auth.keys.box.key_file" in msg and "does not exist" in msg
    empty = key_file.parent / "empty"
    empty.write_text("\n")
    msg = refused({"keys": [{"name": "box", "key_file": str(empty), "scopes": ["read"]}]})
    assert "box" in msg and "is empty" in msg
    both = [{"name": "two", "key": "x" * 20, "key_sha256": sha("x"), "scopes": ["admin"]}]
    assert "exactly one of key, key_sha256, key_file" in refused({"keys": both})
    assert "exactly one of" in refused({"keys": [{"name": "none", "scopes": ["admin"]}]})
    bad_scope = [{"name": "s", "key": "x" * 20, "scopes": ["service"]}]
    assert "unknown scope 'service'" in refused({"keys": bad_scope})
    assert "64 hex digits" in refused(
        {"keys": [{"name": "h", "key_sha256": "9f86d081", "scopes": ["read"]}]}
    )
    assert "nobody could get in" in refused({"enabled": True, "keys": []})
    twice = [{"name": "x", "key": "k" * 20, "scopes": ["read"]}] * 2
    assert "used twice" in refused({"keys": twice})
    same = [
        {"name": "x", "key": "k" * 20, "scopes": ["read"]},
        {"name": "y", "key_sha256": sha("k" * 20), "scopes": ["admin"]},
    ]
    assert "'x' and 'y' are the same key" in refused({"keys": same})
    spaced = [{"name": "sp", "key": "has space", "scopes": ["read"]}]
    assert "sp" in refused({"keys": spaced})
    assert "header" in refused({"header": "cookie"})
    assert parse_config({"auth": {"header": "X-API-Key"}}).auth.header == "x-api-key"
    short = {"session_secret": "short"}
    assert "at least 16" in refused(short)


# ------------------------------------------------------------------ statuses
async def test_no_key_or_a_wrong_key_is_401_json_with_www_authenticate(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        for path in ("/services/a/x", "/v1/services", "/v1/services/m/status", "/docs"):
            for headers in ({}, bearer(WRONG), api_key(WRONG), {"Authorization": "Basic eA=="}):
                r = await c.get(path, headers=headers)
                assert_error(r, 401, "unauthorized")
                assert r.headers["www-authenticate"] == 'Bearer realm="hestia"'
        r = await c.post("/v1/services/m/start", headers=api_key(WRONG))
        assert_error(r, 401, "unauthorized")
        err = assert_error(await c.get("/services/a/x"), 401, "unauthorized")
        assert err["service"] == "a" and "/login" in err["message"]
    assert world.a.seen == [] and world.b.seen == [] and world.backend.count("start") == 0


async def test_both_header_forms_and_every_key_source_reach_the_service(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        for key, svc in ((ADMIN, "a"), (ONLY_A, "a"), (ALL_SVC, "b"), (FILED, "b")):
            for headers in (bearer(key), api_key(key), {"authorization": f"bearer  {key}"}):
                r = await c.get(f"/services/{svc}/hello", headers=headers)
                assert (r.status_code, r.text) == (200, svc.upper())
    assert {s.target for s in world.a.seen} == {b"/base/hello"}


async def test_scopes_on_services_and_on_the_api(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:

        async def status(method: str, path: str, key: str) -> int:
            return (await c.request(method, path, headers=bearer(key))).status_code

        # service:a: a only, nothing of the API
        assert await status("GET", "/services/a/", ONLY_A) == 200
        r = await c.get("/services/b/", headers=bearer(ONLY_A))
        err = assert_error(r, 403, "forbidden")
        assert err["service"] == "b" and "only-a" in err["message"]
        assert "service:b" in err["message"]
        assert await status("GET", "/v1/services", ONLY_A) == 403
        assert await status("GET", "/services/m/", ONLY_A) == 403
        # service:*: every service, nothing of the API
        assert await status("GET", "/services/m/", ALL_SVC) == 200
        assert await status("GET", "/services/a/", ALL_SVC) == 200
        assert await status("GET", "/v1/services", ALL_SVC) == 403
        # read: GETs of the API, no writes, no services
        for path in ("/v1/services", "/v1/services/m/status", "/v1/metrics", "/metrics"):
            assert await status("GET", path, READ) == 200, path
        assert await status("GET", "/openapi.json", READ) == 200
        assert_error(await c.post("/v1/services/m/start", headers=bearer(READ)), 403, "forbidden")
        assert await status("GET", "/services/a/", READ) == 403
        # read + service:b from one key
        assert await status("GET", "/services/b/", FILED) == 200
        assert await status("GET", "/v1/services", FILED) == 200
        assert await status("POST", "/v1/services/m/stop", FILED) == 403
        assert world.backend.count("start") == 1  # only the service:* request above
        # admin: everything
        assert await status("POST", "/v1/services/m/start?wait=true", ADMIN) == 200
        assert await status("GET", "/services/b/", ADMIN) == 200
        assert await status("POST", "/v1/services/m/stop?wait=true", ADMIN) == 200
        assert await status("GET", "/v1/services/nope/status", ADMIN) == 404


async def test_health_is_open_and_metrics_need_read_unless_public(
    gateway_factory: Any,
    upstreams: tuple[Recorder, int, Recorder, int],
    backend: MemoryBackend,
    key_file: Path,
) -> None:
    world = await start_world(gateway_factory, upstreams, backend, auth_block(key_file))
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        assert (await c.get("/v1/health")).json()["status"] == "ok"
        assert (await c.head("/v1/health")).status_code == 200
        assert_error(await c.post("/v1/health"), 401, "unauthorized")
        assert_error(await c.get("/v1/health/"), 401, "unauthorized")
        assert_error(await c.get("/metrics"), 401, "unauthorized")
        assert_error(await c.get("/metrics", headers=bearer(ONLY_A)), 403, "forbidden")
        assert "hestia_" in (await c.get("/metrics", headers=bearer(READ))).text
    public = auth_block(key_file, public_metrics=True)
    world = await start_world(gateway_factory, upstreams, MemoryBackend(), public)
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert_error(await c.get("/v1/metrics"), 401, "unauthorized")


async def test_the_gateway_credential_never_reaches_a_service(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        # the gateway's key in Authorization: removed
        assert (await c.get("/services/a/1", headers=bearer(ADMIN))).status_code == 200
        # X-API-Key for the gateway, the service's own Authorization passes untouched
        headers = {**api_key(ONLY_A), "Authorization": f"Bearer {SERVICE_TOKEN}"}
        assert (await c.get("/services/a/2", headers=headers)).status_code == 200
        headers = {**api_key(ADMIN), "Authorization": "Basic dXNlcjpwdw=="}
        assert (await c.get("/services/a/3", headers=headers)).status_code == 200
        # both headers carry gateway keys: both removed
        headers = {**api_key(ADMIN), **bearer(ONLY_A), "X-Other": "kept"}
        assert (await c.get("/services/a/4", headers=headers)).status_code == 200
        # the session cookie is the gateway's too; the service's own cookies stay
        cookie = await login(c, ONLY_A)
        headers = {"Cookie": f"theirs=1; hestia_session={cookie}; also=2"}
        assert (await c.get("/services/a/5", headers=headers)).status_code == 200
        # a cookie-signed-in browser sending the service's own bearer token
        headers = {"Cookie": f"hestia_session={cookie}", **bearer(SERVICE_TOKEN)}
        assert (await c.get("/services/a/6", headers=headers)).status_code == 200
    seen = {s.target.decode(): s for s in world.a.seen}
    assert sorted(seen) == [f"/base/{i}" for i in range(1, 7)]
    everything = b"\n".join(k + b": " + v for k, v in world.a.all_headers()).decode()
    for key in EVERY_KEY:
        assert key not in everything
    assert "x-api-key" not in everything and "hestia_session" not in everything
    assert seen["/base/1"].header(b"authorization") == []
    assert seen["/base/2"].header(b"authorization") == [f"Bearer {SERVICE_TOKEN}".encode()]
    assert seen["/base/3"].header(b"authorization") == [b"Basic dXNlcjpwdw=="]
    assert seen["/base/4"].header(b"authorization") == []
    assert seen["/base/4"].header(b"x-other") == [b"kept"]
    assert seen["/base/5"].header(b"cookie") == [b"theirs=1; also=2"]
    assert seen["/base/6"].header(b"authorization") == [f"Bearer {SERVICE_TOKEN}".encode()]


async def test_header_x_api_key_leaves_authorization_to_the_services(
    gateway_factory: Any,
    upstreams: tuple[Recorder, int, Recorder, int],
    backend: MemoryBackend,
    key_file: Path,
) -> None:
    auth = auth_block(key_file, header="x-api-key")
    world = await start_world(gateway_factory, upstreams, backend, auth)
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        # Authorization is the service's business now: never a gateway credential
        assert_error(await c.get("/services/a/x", headers=bearer(ADMIN)), 401, "unauthorized")
        headers = {**api_key(ONLY_A), **bearer(ONLY_A)}
        assert (await c.get("/services/a/y", headers=headers)).status_code == 200
        assert (await c.get("/v1/auth", headers=api_key(READ))).json()["header"] == "x-api-key"
    [seen] = world.a.seen
    # even a gateway key in Authorization goes through untouched in this mode, by design
    assert seen.header(b"authorization") == [f"Bearer {ONLY_A}".encode()]
    assert seen.header(b"x-api-key") == []


async def test_websocket_upgrades_need_a_key_with_the_scope(world: World) -> None:
    ws_url = world.url.replace("http://", "ws://") + "/services/b/socket"
    for headers, status in (({}, 401), (bearer(WRONG), 401), (bearer(ONLY_A), 403)):
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(ws_url, additional_headers=headers, open_timeout=10):
                pass
        response = info.value.response
        assert response.status_code == status
        assert json.loads(response.body or b"")["error"]["service"] == "b"
        if status == 401:
            assert response.headers["www-authenticate"] == 'Bearer realm="hestia"'
    assert world.b.seen == []
    for headers in (bearer(FILED), api_key(ALL_SVC)):
        async with ws_connect(ws_url, additional_headers=headers, open_timeout=10) as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 10) == "B ws:hi"
    assert len(world.b.seen) == 2
    for key in EVERY_KEY:
        assert key.encode() not in b"".join(v for _, v in world.b.all_headers())


# ------------------------------------------------------------------ browsers
async def login(c: httpx.AsyncClient, key: str, **headers: str) -> str:
    r = await c.post(
        "/login",
        data={"key": key, "next": "/services/a/"},
        headers={"Accept": "text/html", **headers},
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/services/a/"
    match = re.match(r"hestia_session=([^;]+);", r.headers["set-cookie"])
    assert match is not None
    c.cookies.clear()  # each test sends the cookie by hand, where it means to
    return match.group(1)


async def test_login_page_cookie_and_logout(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        r = await c.get("/login?next=/services/a/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert 'name="key"' in page and 'value="/services/a/"' in page
        # no external assets: nothing to load at all
        assert not re.search(r"<script|<link|<img|src=|url\(|https?://", page, re.I)
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert (await c.head("/login")).status_code == 200

        r = await c.post("/login", data={"key": WRONG}, headers={"Accept": "text/html"})
        assert r.status_code == 401 and "not valid" in r.text
        assert_error(await c.post("/login", data={"key": WRONG}), 401, "unauthorized")
        assert_error(await c.post("/login", json={"key": ADMIN}), 400, "bad_request")
        assert_error(await c.put("/login"), 405, "method_not_allowed")
        assert_error(await c.get("/logout"), 405, "method_not_allowed")

        r = await c.post("/login", data={"key": ONLY_A, "next": "/services/a/"})
        assert r.status_code == 303
        set_cookie = r.headers["set-cookie"]
        attrs = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")[1:]}
        assert attrs == {"max-age", "path", "httponly", "samesite"}  # no Secure over http
        assert "SameSite=Lax" in set_cookie and "Path=/" in set_cookie
        assert int(re.search(r"Max-Age=(\d+)", set_cookie).group(1)) > 0  # type: ignore[union-attr]
        value = re.match(r"hestia_session=([^;]+);", set_cookie).group(1)  # type: ignore[union-attr]
        cookie = {"Cookie": f"hestia_session={value}"}

        assert (await c.get("/services/a/in", headers=cookie)).text == "A"
        assert (await c.get("/services/b/", headers=cookie)).status_code == 403
        assert (await c.get("/v1/services", headers=cookie)).status_code == 403
        me = (await c.get("/login", headers=cookie)).text
        assert "Signed in as <strong>only-a</strong>" in me
        # a forged or tampered cookie is no session
        payload, _, sig = value.rpartition("|")
        longer = payload.replace("|1", "|2", 1)  # another expiry, the same signature
        for forged in (f"{payload}|{sig[::-1]}", f"{longer}|{sig}", "garbage", f"{payload}|"):
            r = await c.get("/services/a/", headers={"Cookie": f"hestia_session={forged}"})
            assert "sign in again" in assert_error(r, 401, "unauthorized")["message"]

        r = await c.post("/logout", headers={**cookie, "Accept": "text/html"})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert (
            "hestia_session=;" in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
        )
        assert (await c.post("/logout")).status_code == 204


async def test_session_cookie_expires(world: World) -> None:
    auth = world.gw.gateway.auth
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        cookie = {"Cookie": f"hestia_session={await login(c, ONLY_A)}"}
        assert (await c.get("/services/a/", headers=cookie)).status_code == 200
        now = auth.wall()
        auth.wall = lambda: now + 8 * 86400
        assert_error(await c.get("/services/a/", headers=cookie), 401, "unauthorized")


async def test_secure_cookie_only_over_https_through_a_trusted_proxy(
    gateway_factory: Any,
    upstreams: tuple[Recorder, int, Recorder, int],
    backend: MemoryBackend,
    key_file: Path,
) -> None:
    auth = auth_block(key_file)
    world = await start_world(
        gateway_factory, upstreams, backend, auth, server={"trusted_proxies": ["127.0.0.1/32"]}
    )
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        https = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "hestia.example"}
        r = await c.post("/login", data={"key": ADMIN}, headers=https)
        assert r.status_code == 303 and "; Secure" in r.headers["set-cookie"]
        r = await c.post("/login", data={"key": ADMIN})
        assert "Secure" not in r.headers["set-cookie"]
    untrusted = await start_world(gateway_factory, upstreams, MemoryBackend(), auth_block(key_file))
    async with httpx.AsyncClient(base_url=untrusted.url, timeout=10) as c:
        r = await c.post("/login", data={"key": ADMIN}, headers={"X-Forwarded-Proto": "https"})
        assert "Secure" not in r.headers["set-cookie"]


async def test_login_never_sends_anyone_to_another_site(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        for nxt in (
            "//evil.example/",
            "https://evil.example/",
            "/\\evil.example",
            "javascript:alert(1)",
            "/ok\r\nSet-Cookie: x=1",
            "",
        ):
            r = await c.post("/login", data={"key": ADMIN, "next": nxt})
            assert r.headers["location"] == "/login", nxt
            c.cookies.clear()  # the form, not the signed-in page
            page = (await c.get("/login", params={"next": nxt})).text
            assert 'name="next" value="/login"' in page
        r = await c.post("/login", data={"key": ADMIN, "next": "/services/a/x?y=1"})
        assert r.headers["location"] == "/services/a/x?y=1"


async def test_cookie_authenticated_writes_need_the_same_origin(world: World) -> None:
    host = world.url.removeprefix("http://")
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        cookie = {"Cookie": f"hestia_session={await login(c, ADMIN)}"}
        start = "/v1/services/m/start"
        for headers in (
            {},
            {"Origin": "http://evil.example"},
            {"Origin": f"http://127.0.0.1:{free_port()}"},  # same site, another origin
            {"Origin": "null"},
            {"Referer": "http://evil.example/page"},
        ):
            r = await c.post(start, headers={**cookie, **headers})
            assert "cross-origin" in assert_error(r, 403, "forbidden")["message"]
        assert world.backend.count("start") == 0
        # reads need no origin; writes from the gateway's own pages go through
        assert (await c.get("/v1/services", headers=cookie)).status_code == 200
        r = await c.post(start, headers={**cookie, "Origin": f"http://{host}"})
        assert r.status_code == 200
        r = await c.post(start, headers={**cookie, "Referer": f"http://{host}/login"})
        assert r.status_code == 200
        # a key in a header is no ambient credential: no origin check
        assert (await c.post(start, headers=bearer(ADMIN))).status_code == 200
        # WebSocket handshakes signed in by the cookie: the same check
        ws_url = world.url.replace("http://", "ws://") + "/services/b/socket"
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(
                ws_url, additional_headers={**cookie, "Origin": "http://evil.example"}
            ):
                pass
        assert info.value.response.status_code == 403
        async with ws_connect(
            ws_url, additional_headers={**cookie, "Origin": f"http://{host}"}, open_timeout=10
        ) as ws:
            await ws.send("x")
            assert await asyncio.wait_for(ws.recv(), 10) == "B ws:x"


# ------------------------------------------------------------------ failures
async def test_failed_attempts_are_logged_and_rate_limited(
    world: World, captured_logs: list[str]
) -> None:
    auth = world.gw.gateway.auth
    now = [1000.0]
    auth.limiter.clock = lambda: now[0]
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        signed_in = {"Cookie": f"hestia_session={await login(c, ONLY_A)}"}
        r = await c.get("/services/b/", headers=bearer(ONLY_A))
        assert r.status_code == 403
        assert any(
            "authentication failed: key 'only-a' from 127.0.0.1" in line for line in captured_logs
        )
        for i in range(auth.limiter.limit):
            headers = bearer(WRONG) if i % 2 else api_key(WRONG + str(i))
            assert_error(await c.get("/services/a/", headers=headers), 401, "unauthorized")
        failures = [line for line in captured_logs if "unknown key from 127.0.0.1" in line]
        assert len(failures) == auth.limiter.limit
        assert any("refused (429)" in line for line in captured_logs)
        # blocked: even the right key is not looked at, nor a sign-in
        for headers in (bearer(WRONG), bearer(ADMIN), {}):
            r = await c.get("/services/a/", headers=headers)
            err = assert_error(r, 429, "too_many_attempts")
            assert int(r.headers["retry-after"]) == err["detail"]["retry_after_s"] == 60
        r = await c.post("/login", data={"key": ADMIN})
        assert_error(r, 429, "too_many_attempts")
        assert "retry-after" in r.headers
        # a browser already signed in goes on working
        assert (await c.get("/services/a/", headers=signed_in)).status_code == 200
        now[0] += 45
        r = await c.get("/services/a/", headers=bearer(ADMIN))
        assert r.status_code == 429 and r.headers["retry-after"] == "15"
        now[0] += 16
        assert (await c.get("/services/a/", headers=bearer(ADMIN))).status_code == 200
        assert_error(await c.get("/services/a/", headers=bearer(WRONG)), 401, "unauthorized")


def test_the_failure_table_stays_bounded() -> None:
    from hestia.auth import FailureLimiter

    t = [0.0]
    limiter = FailureLimiter(lambda: t[0], limit=3, window=10, block=5, max_addresses=100)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
        assert len(limiter._seen) <= 100
    for _ in range(3):
        blocked = limiter.failed("192.0.2.1")
    assert blocked and limiter.retry_after("192.0.2.1") == 5
    t[0] = 5.5
    assert limiter.retry_after("192.0.2.1") is None


def test_suspects_are_the_addresses_with_failures_on_record() -> None:
    """What data-plane workers hand to the controller: addresses with failures in the window
    or a block; they drop out once both are over."""
    from hestia.auth import FailureLimiter

    t = [0.0]
    limiter = FailureLimiter(lambda: t[0], limit=2, window=10, block=30)
    limiter.failed("192.0.2.9")
    limiter.failed("192.0.2.1")
    limiter.failed("192.0.2.1")  # blocked until 30
    assert limiter.suspects() == ["192.0.2.1", "192.0.2.9"]
    t[0] = 20.0
    assert limiter.suspects() == ["192.0.2.1"]
    t[0] = 31.0
    assert limiter.suspects() == []


# ------------------------------------------------------------------ workers' quiet admission
_W_USER = "wu-" + secrets.token_hex(8)
_W_ADMIN = "wa-" + secrets.token_hex(8)


def _pair(header: str) -> tuple[Any, Any]:
    from hestia.auth import Authenticator

    config = AuthConfig.model_validate(
        {
            "enabled": True,
            "header": header,
            "keys": [
                {"name": "user", "key": _W_USER, "scopes": ["service:a"]},
                {"name": "adm", "key": _W_ADMIN, "scopes": ["admin"]},
            ],
        }
    )
    config.load_secrets()
    controller = Authenticator(config)
    worker = Authenticator(AuthConfig())
    worker.use_worker_state(controller.worker_state())
    return controller, worker


@settings(max_examples=400, deadline=None)
@given(
    header=st.sampled_from(["both", "x-api-key"]),
    api=st.sampled_from([None, "user", "adm", "wrong"]),
    bearer_of=st.sampled_from([None, "user", "adm", "wrong", "service-token"]),
    cookie_of=st.sampled_from([None, "user", "adm", "forged"]),
    other_cookie=st.booleans(),
    service=st.sampled_from(["a", "b"]),
    websocket=st.booleans(),
    origin=st.sampled_from([None, "http://gw.test", "http://evil.test"]),
)
def test_a_worker_admits_exactly_what_the_controller_admits(
    header: str,
    api: str | None,
    bearer_of: str | None,
    cookie_of: str | None,
    other_cookie: bool,
    service: str,
    websocket: bool,
    origin: str | None,
) -> None:
    """`admits_quietly` (a worker, from the key set in the table) says yes to exactly the
    service requests `admit` lets through, and forwards the same headers; everything else it
    leaves to the controller without answering."""
    from hestia.router import Route

    controller, worker = _pair(header)
    keys = {"user": _W_USER, "adm": _W_ADMIN, "wrong": "nope-" + "x" * 20}
    headers: list[tuple[bytes, bytes]] = [(b"host", b"gw.test")]
    if api is not None:
        headers.append((b"x-api-key", keys[api].encode()))
    if bearer_of is not None:
        token = "svc-own-token" if bearer_of == "service-token" else keys[bearer_of]
        headers.append((b"authorization", b"Bearer " + token.encode()))
    if cookie_of is not None:
        if cookie_of == "forged":
            value = "1|9999999999|00|user|" + "0" * 64
        else:
            value = controller.issue_session(controller._state.by_name[cookie_of])
        jar = ("theme=dark; " if other_cookie else "") + f"hestia_session={value}"
        headers.append((b"cookie", jar.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    base: dict[str, Any] = {
        "type": "websocket" if websocket else "http",
        "method": "GET",
        "path": f"/services/{service}/x",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "scheme": "ws" if websocket else "http",
    }
    route = Route(service, b"/x", f"/services/{service}".encode())
    sent: list[Any] = []

    async def send(msg: Any) -> None:
        sent.append(msg)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    on_controller = dict(base)
    admitted = asyncio.run(controller.admit(on_controller, receive, send, route))
    on_worker = dict(base)
    quiet = worker.admits_quietly(on_worker, route)
    assert quiet == admitted
    if admitted:
        assert on_worker["headers"] == on_controller["headers"]
        assert on_worker["hestia.key"].name == on_controller["hestia.key"].name
        assert on_worker["hestia.via"] == on_controller["hestia.via"]
    else:
        assert "headers" in on_worker and on_worker["headers"] is headers  # untouched
        assert sent  # the controller answered it


# ------------------------------------------------------------------ rotation
async def test_keys_rotate_at_runtime(world: World, key_file: Path) -> None:
    auth = world.gw.gateway.auth
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        old_session = {"Cookie": f"hestia_session={await login(c, ONLY_A)}"}
        admin_session = {"Cookie": f"hestia_session={await login(c, ADMIN)}"}
        assert (await c.get("/services/a/", headers=old_session)).status_code == 200

        rotated = auth_block(key_file)
        rotated["keys"][2] = {"name": "only-a", "key": NEW, "scopes": ["service:a", "service:b"]}
        auth.reconfigure(parse_config({"auth": rotated}).auth)
        assert_error(await c.get("/services/a/", headers=bearer(ONLY_A)), 401, "unauthorized")
        assert (await c.get("/services/b/", headers=bearer(NEW))).status_code == 200
        # the changed key's sessions end; others keep theirs
        assert_error(await c.get("/services/a/", headers=old_session), 401, "unauthorized")
        assert (await c.get("/services/a/", headers=admin_session)).status_code == 200

        # a reload whose key cannot be read changes nothing
        broken = auth_block(key_file)
        broken["keys"][0] = {"name": "root", "key_file": "/nonexistent", "scopes": ["admin"]}
        with pytest.raises(ConfigError):
            auth.reconfigure(parse_config({"auth": broken}).auth)
        with pytest.raises(ConfigError):
            auth.reconfigure(AuthConfig.model_validate(broken))
        assert (await c.get("/services/b/", headers=bearer(NEW))).status_code == 200

        # turning auth off and on again at runtime
        auth.reconfigure(parse_config({}).auth)
        assert (await c.get("/services/a/")).status_code == 200
        auth.reconfigure(parse_config({"auth": auth_block(key_file)}).auth)
        assert_error(await c.get("/services/a/"), 401, "unauthorized")
        assert (await c.get("/services/a/", headers=bearer(ONLY_A))).status_code == 200


async def test_auth_status_names_keys_but_never_shows_them(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        r = await c.get("/v1/auth", headers=api_key(READ))
        body = r.json()
        assert body["enabled"] is True and body["header"] == "both"
        assert body["you"] == {"name": "monitor", "scopes": ["read"], "via": "key"}
        assert [k["name"] for k in body["keys"]] == [
            "root",
            "monitor",
            "only-a",
            "all-services",
            "filed",
        ]
        for key in (*EVERY_KEY, sha(ONLY_A)):
            assert key not in r.text
        cookie = {"Cookie": f"hestia_session={await login(c, ADMIN)}"}
        me = (await c.get("/v1/auth", headers=cookie)).json()["you"]
        assert me == {"name": "root", "scopes": ["admin"], "via": "cookie"}


async def test_auth_off_leaves_everything_open(
    gateway_factory: Any, upstreams: tuple[Recorder, int, Recorder, int], backend: MemoryBackend
) -> None:
    world = await start_world(gateway_factory, upstreams, backend, {"enabled": False})
    assert world.gw.gateway.auth.enabled is False
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as c:
        r = await c.get("/services/a/x", headers={**bearer(ADMIN), "X-API-Key": "k"})
        assert r.status_code == 200
        assert (await c.get("/v1/services")).status_code == 200
        assert (await c.get("/v1/auth")).json()["enabled"] is False
        assert_error(await c.get("/login"), 404, "not_found")
    # with auth off nothing is the gateway's: every header reaches the service as sent
    [seen] = world.a.seen
    assert seen.header(b"authorization") == [f"Bearer {ADMIN}".encode()]
    assert seen.header(b"x-api-key") == [b"k"]


# ------------------------------------------------------------------ `hestia serve`
def _spawn_serve(config: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "hestia", "serve", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: ended as a whole below
        )


def _end(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def test_hestia_serve_with_env_and_file_keys(tmp_path: Path, key_file: Path) -> None:
    async with serve_recorder("A") as (_, pa):
        port = free_port()
        config = tmp_path / "hestia_config.yml"
        config.write_text(
            f"""
server: {{host: 0.0.0.0, port: {port}}}
docker: {{enabled: false}}
database: {{url: "sqlite:///{tmp_path}/h.db"}}
auth:
  enabled: true
  keys:
    - name: laptop
      key: ${{HESTIA_ADMIN_KEY}}
      scopes: [admin]
    - name: secret-file
      key_file: {key_file}
      scopes: ["service:a"]
services:
  a: {{url: "http://127.0.0.1:{pa}"}}
"""
        )
        env = {**os.environ, "HESTIA_ADMIN_KEY": ADMIN, "PYTHONPATH": str(Path.cwd())}
        out = tmp_path / "out.log"
        proc = _spawn_serve(config, out, env)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                await wait_http_ok(c, "/v1/health")
                assert_error(await c.get("/services/a/"), 401, "unauthorized")
                assert_error(
                    await c.get("/services/a/", headers=bearer(WRONG)), 401, "unauthorized"
                )
                assert (await c.get("/services/a/", headers=bearer(FILED))).text == "A"
                assert (await c.get("/v1/services", headers=api_key(ADMIN))).status_code == 200
                assert (await c.get("/v1/services", headers=api_key(FILED))).status_code == 403
        finally:
            await asyncio.to_thread(_end, proc)
        log = out.read_text()
        assert "authentication failed: unknown key from 127.0.0.1" in log
        assert "key 'secret-file'" in log  # the 403
        assert "without authentication" not in log
        assert "authentication is on" in log
        for key in EVERY_KEY:
            assert key not in log
    # and without auth, beyond loopback, the warning says so
    config.write_text(config.read_text().replace("enabled: true", "enabled: false"))
    out2 = tmp_path / "out2.log"
    proc = _spawn_serve(config, out2, env)
    try:
        await wait_for(lambda: "listening on" in out2.read_text(), 30, "hestia serve to start")
    finally:
        await asyncio.to_thread(_end, proc)
    assert "without authentication" in out2.read_text()


# ------------------------------------------------------------------ what the API can do
def test_the_control_api_cannot_create_remove_or_exec_containers() -> None:
    from fastapi.routing import APIRoute

    from hestia.api import build_api
    from hestia.backends.base import Backend
    from hestia.metrics import Metrics
    from hestia.registry import Registry
    from hestia.store import Store

    config = parse_config({})
    api = build_api(Registry(config, {}), Metrics(), Store("sqlite://"))
    routes = {
        (method, route.path)
        for route in api.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    writes = {r for r in routes if r[0] not in ("GET", "HEAD")}
    assert writes == {
        ("POST", "/v1/services/{name}/start"),
        ("POST", "/v1/services/{name}/stop"),
        # reads the operator's own file again; no way to write it through the API
        ("POST", "/v1/config/reload"),
    }
    forbidden = re.compile(r"create|remove|delete|exec|run|pull|kill|attach|volume|image", re.I)
    assert not [p for _, p in routes if forbidden.search(p)]
    # the backend protocol itself has no such operation for anyone to call
    operations = {n for n in vars(Backend) if not n.startswith("_")} | set(Backend.__annotations__)
    assert operations == {
        "name",
        "inspect",
        "start",
        "stop",
        "logs_tail",
        "discover",
        "events",
        "close",
    }
