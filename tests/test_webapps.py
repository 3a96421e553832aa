"""Web apps through a real gateway: host routing beside path routing, Origin following Host,
a refused WebSocket passed on as the app refused it, strip_prefix, preserve_host, redirects
and cookies mapped back. The upstream is a small ASGI app that checks Origin against Host the
way Jupyter (Tornado), Grafana and Home Assistant do. A real JupyterLab and a real browser
are in tests/e2e/test_jupyter.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from hestia.backends.memory import MemoryBackend
from tests.conftest import free_port, serve_asgi


class OriginCheckingApp:
    """Refuses a WebSocket or a POST whose Origin's host:port is not the Host it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @staticmethod
    def _same_origin(headers: dict[str, str]) -> bool:
        origin = headers.get("origin")
        return origin is None or urlsplit(origin).netloc == headers.get("host")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"type": scope["type"], "raw_path": scope["raw_path"], **headers})
        if scope["type"] == "websocket":
            await receive()  # connect
            if not self._same_origin(headers):
                refusal = b'{"message": "origin mismatch"}'
                await send(
                    {
                        "type": "websocket.http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "websocket.http.response.body", "body": refusal})
                return
            await send({"type": "websocket.accept"})
            msg = await receive()
            await send({"type": "websocket.send", "text": "echo:" + msg.get("text", "")})
            await send({"type": "websocket.close", "code": 1000})
            return
        path = scope["path"]
        status = 200
        extra: list[tuple[bytes, bytes]] = []
        body = json.dumps({"path": path, "host": headers["host"]})
        if scope["method"] == "POST" and not self._same_origin(headers):
            status, body = 403, "cross-origin POST refused"
        elif path.endswith("/login-redirect"):
            # what an app does that believes it owns the root of the Host it was sent
            status = 302
            extra = [
                (b"location", f"http://{headers['host']}/login?next=%2F".encode()),
                (b"set-cookie", b"session=s3cret; Path=/; HttpOnly"),
                (b"set-cookie", b"prefs=dark; Path=/settings; Domain=127.0.0.1"),
            ]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


@pytest.fixture
async def app() -> AsyncIterator[tuple[OriginCheckingApp, int]]:
    upstream = OriginCheckingApp()
    async with serve_asgi(upstream) as port:
        yield upstream, port


@pytest.fixture
async def gw(app: tuple[OriginCheckingApp, int], gateway_factory: Any) -> Any:
    _, port = app
    url = f"http://127.0.0.1:{port}"
    return await gateway_factory(
        {
            "routing": {"subdomains": True, "domain": "home.arpa"},
            "services": {
                "web": {"url": url, "hosts": ["web.example"]},
                "other": {"url": url},
                "based": {"url": url, "strip_prefix": False},
                "kept": {"url": url, "preserve_host": True, "hosts": ["kept.example"]},
            },
        }
    )


def _client(gw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.url, timeout=10)


async def test_a_host_name_serves_the_app_at_its_root_for_every_path(
    gw: Any, app: tuple[OriginCheckingApp, int]
) -> None:
    upstream, port = app
    async with _client(gw) as client:
        for host in (f"web.example:{gw.port}", "WEB.localhost", f"web.home.arpa.:{gw.port}"):
            for path in ("/lab", "/v1/health", "/services/other/x"):
                r = await client.get(path, headers={"Host": host})
                assert r.status_code == 200, (host, path, r.text)
                assert r.json() == {"path": path, "host": f"127.0.0.1:{port}"}
                seen = upstream.seen[-1]
                assert seen["x-forwarded-prefix"] == ""
                assert seen["x-forwarded-host"] == host
        # the gateway's own names keep the control API and path routing
        assert (await client.get("/v1/health")).json()["status"] == "ok"
        r = await client.get("/services/other/x", headers={"Host": f"localhost:{gw.port}"})
        assert r.json()["path"] == "/x"
        assert upstream.seen[-1]["x-forwarded-prefix"] == "/services/other"


async def test_unknown_host_names_get_the_gateways_own_404(gw: Any) -> None:
    async with _client(gw) as client:
        for host in ("nosuch.localhost", "nosuch.example", "xweb.example"):
            r = await client.get("/services/nosuch/x", headers={"Host": host})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "service_not_found"
            r = await client.get("/", headers={"Host": host})
            assert r.status_code == 404 and "error" in r.json()  # the API's, not an app's


async def test_same_origin_websocket_and_post_are_accepted_by_host_and_by_path(
    gw: Any, app: tuple[OriginCheckingApp, int]
) -> None:
    for host, path in (
        (f"web.example:{gw.port}", "/ws"),
        (f"127.0.0.1:{gw.port}", "/services/web/ws"),
        (f"localhost:{gw.port}", "/services/based/ws"),
    ):
        async with ws_connect(
            f"ws://{host}{path}", host="127.0.0.1", port=gw.port, origin=Origin(f"http://{host}")
        ) as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo:hi"
        async with _client(gw) as client:
            r = await client.post(
                path, headers={"Host": host, "Origin": f"http://{host}"}, content=b"x"
            )
            assert r.status_code == 200, (host, path, r.text)


async def test_a_refused_websocket_is_passed_on_with_the_apps_status_and_body(gw: Any) -> None:
    with pytest.raises(InvalidStatus) as exc:
        async with ws_connect(
            f"ws://127.0.0.1:{gw.port}/services/web/ws", origin=Origin("http://evil.example")
        ):
            pass
    response = exc.value.response
    assert response.status_code == 403  # refused, not "down" (502)
    assert json.loads(response.body or b"{}") == {"message": "origin mismatch"}
    assert response.headers["content-type"] == "application/json"
    # a cross-origin POST is still the app's to refuse: Origin passes unchanged
    async with _client(gw) as client:
        r = await client.post(
            "/services/web/form", headers={"Origin": "http://evil.example"}, content=b"x"
        )
    assert r.status_code == 403


async def test_strip_prefix_false_sends_the_full_path(
    gw: Any, app: tuple[OriginCheckingApp, int]
) -> None:
    upstream, _ = app
    async with _client(gw) as client:
        r = await client.get("/services/based/lab/tree?x=1")
    assert r.json()["path"] == "/services/based/lab/tree"
    assert upstream.seen[-1]["x-forwarded-prefix"] == "/services/based"


async def test_preserve_host_sends_the_clients_host_and_origin(
    gw: Any, app: tuple[OriginCheckingApp, int]
) -> None:
    upstream, _ = app
    host = f"kept.example:{gw.port}"
    async with _client(gw) as client:
        r = await client.post("/x", headers={"Host": host, "Origin": f"http://{host}"})
    assert r.status_code == 200
    assert r.json()["host"] == host
    assert upstream.seen[-1]["origin"] == f"http://{host}"
    async with ws_connect(
        f"ws://{host}/ws", host="127.0.0.1", port=gw.port, origin=Origin(f"http://{host}")
    ) as ws:
        await ws.send("kept")
        assert await ws.recv() == "echo:kept"
    assert upstream.seen[-1]["type"] == "websocket"
    assert (upstream.seen[-1]["host"], upstream.seen[-1]["origin"]) == (host, f"http://{host}")


async def test_redirects_and_cookies_are_mapped_back(gw: Any) -> None:
    async with _client(gw) as client:
        r = await client.get("/services/web/login-redirect")
        assert r.status_code == 302
        assert r.headers["location"] == "/services/web/login?next=%2F"
        assert r.headers.get_list("set-cookie") == [
            "session=s3cret; Path=/services/web; HttpOnly",
            "prefs=dark; Path=/services/web/settings",
        ]
        # the same app by host name is served at the root: only its address goes
        r = await client.get("/login-redirect", headers={"Host": "web.localhost"})
        assert r.headers["location"] == "/login?next=%2F"
        assert r.headers.get_list("set-cookie") == [
            "session=s3cret; Path=/; HttpOnly",
            "prefs=dark; Path=/settings",
        ]


async def test_two_services_sessions_do_not_collide(gw: Any) -> None:
    async with _client(gw) as client:
        await client.get("/services/web/login-redirect")
        await client.get("/services/other/login-redirect")
        paths = sorted(c.path for c in client.cookies.jar if c.name == "session")
    assert paths == ["/services/other", "/services/web"]


async def test_a_managed_service_reached_by_host_name_starts_and_is_counted(
    gateway_factory: Any,
) -> None:
    backend = MemoryBackend()
    backend.add("notes", labels={"hestia.enable": "true", "hestia.host": "notes.example"})
    try:
        gw = await gateway_factory({"docker": {"reconcile_interval": 0}}, {"memory": backend})
        svc = gw.service("notes")
        async with _client(gw) as client:
            r = await client.get("/anything", headers={"Host": "notes.example"})
            assert r.status_code == 200 and r.text.startswith("notes")  # held, started, served
            assert backend.count("start") == 1
            r = await client.get("/v1/services/notes/status")
        assert r.json()["state"] == "ready"
        assert svc.in_flight == 0 and svc.last_activity > 0  # idle clock from this request
        assert sum(gw.gateway.metrics.service("notes").requests) == 1
        assert gw.gateway.metrics.service("notes").cold_starts == 1
    finally:
        await backend.close()


async def test_the_websocket_relay_never_goes_through_an_http_proxy(
    gw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a proxy variable in Hestia's environment (set for image pulls, say) must not send the
    # relay to a service's private address through it
    dead = f"http://127.0.0.1:{free_port()}"
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, dead)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    async with ws_connect(f"ws://127.0.0.1:{gw.port}/services/web/ws", proxy=None) as ws:
        await ws.send("direct")
        assert await ws.recv() == "echo:direct"
