"""The login cookie in a real headless Chromium (Debian's `chromium`), driven over the DevTools
protocol: sign in on /login by typing the key, use a web service and a WebSocket through the
gateway, a cross-origin form post refused (CSRF), sign out."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from hestia.backends.memory import MemoryBackend
from tests.conftest import wait_for
from tests.recorder import serve_recorder

KEY = "browser-admin-key-0123456789abcdef"
WEB_PAGE = b"<!doctype html><title>web</title><p id=msg>hello from the web service</p>"


class CDP:
    """The little of the DevTools protocol these tests need: commands and awaited events, on
    one page session."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.session: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self.pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                self.events.append(msg)
                self.changed.set()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 20)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def event(self, method: str, since: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events[since:]:
                if ev.get("method") == method:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {method} within {timeout}s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        """Go to `url` and wait for its load event."""
        mark = len(self.events)
        await self.send("Page.navigate", url=url)
        await self.event("Page.loadEventFired", mark)

    async def until_loaded(self, action: str) -> None:
        """Run `action` (a navigation by the page itself) and wait for the next page's load."""
        mark = len(self.events)
        await self.evaluate(action)
        await self.event("Page.loadEventFired", mark)

    async def cookies(self, url: str) -> dict[str, dict[str, Any]]:
        found = await self.send("Network.getCookies", urls=[url])
        return {c["name"]: c for c in found["cookies"]}


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[CDP]:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp / "profile"
    profile.mkdir()
    proc = await asyncio.create_subprocess_exec(
        exe,
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group: all of it is ended below
    )
    try:
        port_file = profile / "DevToolsActivePort"
        await wait_for(
            lambda: port_file.exists() and len(port_file.read_text().split()) == 2,
            30,
            "Chromium's DevTools port",
        )
        port, path = port_file.read_text().split()
        async with ws_connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
            cdp = CDP(ws)
            target = await cdp.send("Target.createTarget", url="about:blank")
            attached = await cdp.send(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )
            cdp.session = attached["sessionId"]
            await cdp.send("Page.enable")
            await cdp.send("Runtime.enable")
            await cdp.send("Network.enable")
            try:
                yield cdp
            finally:
                cdp.reader.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 20)


async def test_login_cookie_in_a_real_browser(gateway_factory: Any, tmp_path: Path) -> None:
    backend = MemoryBackend()
    backend.add("m", labels={"hestia.enable": "true"})
    async with (
        serve_recorder("web", page=WEB_PAGE) as (web, web_port),
        serve_recorder(
            "evil",
            # another origin on the same host (same site): a classic CSRF form post
            page=b"<!doctype html><form method=post action='GATEWAY/v1/services/m/start'>"
            b"</form><script>document.forms[0].submit()</script>",
        ) as (evil, evil_port),
    ):
        gw = await gateway_factory(
            {
                "auth": {
                    "enabled": True,
                    "keys": [{"name": "me", "key": KEY, "scopes": ["admin"]}],
                },
                "docker": {"reconcile_interval": 0},
                "services": {
                    "web": {"url": f"http://127.0.0.1:{web_port}"},
                },
            },
            {"memory": backend},
        )
        evil.page = (evil.page or b"").replace(b"GATEWAY", gw.url.encode())
        async with chromium(tmp_path) as page:
            # not signed in: the service is refused
            await page.navigate(f"{gw.url}/services/web/")
            text = await page.evaluate("document.body.innerText")
            assert json.loads(text)["error"]["code"] == "unauthorized"

            # sign in the way a person does: type the key, press Enter
            await page.navigate(f"{gw.url}/login?next=/services/web/")
            # autofocus: applied once the page is rendered, a moment after load on a busy machine
            focused = await page.evaluate(
                "new Promise(ok => { const t0 = Date.now(); (function look() {"
                "  const id = document.activeElement && document.activeElement.id;"
                "  if (id === 'key' || Date.now() - t0 > 10000) ok(id); else setTimeout(look, 20);"
                "})(); })"
            )
            assert focused == "key"
            await page.send("Input.insertText", text=KEY)
            mark = len(page.events)
            for kind in ("keyDown", "keyUp"):
                await page.send(
                    "Input.dispatchKeyEvent",
                    type=kind,
                    key="Enter",
                    code="Enter",
                    windowsVirtualKeyCode=13,
                    **({"text": "\r"} if kind == "keyDown" else {}),
                )
            await page.event("Page.loadEventFired", mark)
            assert await page.evaluate("location.pathname") == "/services/web/"
            assert await page.evaluate("document.getElementById('msg').textContent") == (
                "hello from the web service"
            )

            cookie = (await page.cookies(gw.url))["hestia_session"]
            assert cookie["httpOnly"] is True
            assert cookie["sameSite"] == "Lax"
            assert cookie["secure"] is False  # plain http, no trusted proxy
            assert cookie["session"] is False and cookie["expires"] > time.time() + 6 * 86400
            assert cookie["path"] == "/"
            # HttpOnly: the pages' scripts cannot read it
            assert "hestia_session" not in await page.evaluate("document.cookie")
            # the service never sees the gateway's cookie
            assert web.seen and all(
                b"hestia_session" not in v for s in web.seen for v in s.header(b"cookie")
            )

            # a WebSocket from the service's page, signed in by the cookie
            ws_url = gw.url.replace("http://", "ws://") + "/services/web/socket"
            echoed = await page.evaluate(
                "new Promise((ok, fail) => {"
                f"  const ws = new WebSocket({json.dumps(ws_url)});"
                "  ws.onopen = () => ws.send('ping');"
                "  ws.onmessage = (m) => { ok(m.data); ws.close(); };"
                "  ws.onerror = () => fail('websocket refused');"
                "})"
            )
            assert echoed == "web ws:ping"

            # a same-origin write with the cookie goes through
            status = await page.evaluate(
                "fetch('/v1/services/m/start?wait=true', {method: 'POST'}).then(r => r.status)"
            )
            assert status == 200 and backend.count("start") == 1
            await page.evaluate(
                "fetch('/v1/services/m/stop?wait=true', {method: 'POST'}).then(r => r.status)"
            )

            # CSRF: a page of another origin on the same host posts a form to the API; the
            # browser sends the SameSite=Lax cookie (same site), the gateway refuses
            await page.navigate(f"http://127.0.0.1:{evil_port}/")

            def answers() -> list[dict[str, Any]]:
                return [
                    e["params"]["response"]
                    for e in page.events
                    if e.get("method") == "Network.responseReceived"
                    and e["params"]["response"]["url"].startswith(f"{gw.url}/v1/services/m/start")
                    and e["params"]["response"]["status"] != 200  # the fetch above was 200
                ]

            await wait_for(lambda: bool(answers()), 20, "the cross-origin post to be answered")
            assert [a["status"] for a in answers()] == [403]
            assert evil.seen  # the attacking page was really loaded
            assert backend.count("start") == 1  # still only the same-origin one

            # sign out from the signed-in page
            await page.navigate(f"{gw.url}/login")
            assert "Signed in as" in await page.evaluate("document.body.innerText")
            await page.until_loaded("document.querySelector('form[action=\"/logout\"]').submit()")
            assert await page.evaluate("location.pathname") == "/login"
            assert "hestia_session" not in await page.cookies(gw.url)
            await page.navigate(f"{gw.url}/services/web/")
            text = await page.evaluate("document.body.innerText")
            assert json.loads(text)["error"]["code"] == "unauthorized"
    async with httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/services/web/")).status_code == 401
    await backend.close()
