"""A small Chrome DevTools Protocol client for the browser tests: headless Chromium (Debian's
`chromium`) started in its own process group, one page driven over the protocol with the
`websockets` library, and every network failure, refused WebSocket, HTTP error and page
error collected as it happens.

Only what the tests need: navigate, evaluate JavaScript (awaiting promises), wait for a
condition with a deadline, take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(Exception):
    pass


@dataclass
class NetworkLog:
    """What the page's network did, from the DevTools events."""

    failed: list[str] = field(default_factory=list)  # Network.loadingFailed
    http_errors: list[str] = field(default_factory=list)  # responses 400 and above
    websockets: dict[str, str] = field(default_factory=dict)  # requestId -> url
    websocket_status: dict[str, int] = field(default_factory=dict)  # requestId -> status
    websocket_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions, console errors
    requests: dict[str, str] = field(default_factory=dict)  # requestId -> "METHOD url"
    answered: list[str] = field(default_factory=list)  # "METHOD url -> status", redirects too
    # Chromium aborts requests with ERR_NETWORK_CHANGED when the machine's network interfaces
    # change (Docker creating or removing a network does): the client's doing, not a server's
    network_changed: bool = False

    def on(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            rid = params["requestId"]
            if "redirectResponse" in params and rid in self.requests:
                self.answered.append(
                    f"{self.requests[rid]} -> {params['redirectResponse']['status']}"
                )
            req = params["request"]
            self.requests[rid] = f"{req['method']} {req['url']}"
        elif method == "Network.loadingFailed":
            what = self.requests.get(params["requestId"], params["requestId"])
            if params.get("errorText") == "net::ERR_NETWORK_CHANGED":
                self.network_changed = True
            self.failed.append(
                f"{what}: {params.get('errorText')}"
                + (f" (blocked: {params['blockedReason']})" if params.get("blockedReason") else "")
                + (" (canceled)" if params.get("canceled") else "")
            )
        elif method == "Network.responseReceived":
            resp = params["response"]
            what = self.requests.get(params["requestId"], resp["url"])
            self.answered.append(f"{what} -> {resp['status']}")
            if resp["status"] >= 400:
                self.http_errors.append(f"{what} -> {resp['status']}")
        elif method == "Network.webSocketCreated":
            self.websockets[params["requestId"]] = params["url"]
        elif method == "Network.webSocketHandshakeResponseReceived":
            self.websocket_status[params["requestId"]] = params["response"]["status"]
        elif method == "Network.webSocketFrameError":
            url = self.websockets.get(params["requestId"], "?")
            self.websocket_errors.append(f"{url}: {params.get('errorMessage')}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.page_errors.append(f"exception: {text}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.page_errors.append(
                f"{entry.get('source')}: {entry['text']} {entry.get('url', '')}"
            )

    def failed_requests(self) -> list[str]:
        """Failures other than the page cancelling its own request (JupyterLab aborts a
        pending workspace save when it saves again)."""
        return [f for f in self.failed if not f.endswith("net::ERR_ABORTED (canceled)")]

    def refused_websockets(self) -> list[str]:
        """WebSockets whose handshake did not end in 101 (never answered, or refused)."""
        return [
            f"{url} -> {self.websocket_status.get(rid, 'no handshake response')}"
            for rid, url in self.websockets.items()
            if self.websocket_status.get(rid) != 101
        ]


class Page:
    """One page (a target attached with flat sessions) of a Browser."""

    def __init__(self, browser: Browser, session: str) -> None:
        self._browser = browser
        self.session = session
        self.network = NetworkLog()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._browser.send(method, params, session=self.session)

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url} failed: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited), or CdpError with the
        page's exception."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"{expression[:80]!r} threw: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy (exceptions count as not yet)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = await self.evaluate(expression)
            except CdpError as exc:
                last = exc
            else:
                if last:
                    return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {what}; last: {last!r}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


class Browser:
    """Headless Chromium and its DevTools connection."""

    def __init__(self, proc: subprocess.Popen[bytes], ws: ClientConnection) -> None:
        self._proc = proc
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if "id" in msg:
                    fut = self._waiting.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    continue
                page = self._pages.get(msg.get("sessionId", ""))
                if page is not None:
                    page.network.on(msg["method"], msg.get("params", {}))
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(CdpError("the browser's DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self._ws.send(json.dumps(msg))
        answer = await asyncio.wait_for(fut, 60)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error'].get('message')}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        self._pages[page.session] = page
        for domain in ("Network", "Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page


@contextlib.asynccontextmanager
async def chromium(
    profile: Path, timeout: float = 60.0, offline: bool = False
) -> AsyncIterator[Browser]:
    """Headless Chromium under the reaper, in a process group of its own, stopped and reaped
    whole afterwards. `offline`: no host name resolves (a CDN, any site), so only pages at an
    IP address (the gateway on 127.0.0.1) load: what a machine without internet sees."""
    proc = await asyncio.to_thread(_start_chromium, profile, offline)
    try:
        url = await asyncio.wait_for(_devtools_url(proc), timeout)
        async with connect(url, max_size=None, ping_interval=None, proxy=None) as ws:
            browser = Browser(proc, ws)
            try:
                yield browser
            finally:
                browser._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await browser._reader
    finally:
        await asyncio.to_thread(kill_group, proc)


def _start_chromium(profile: Path, offline: bool = False) -> subprocess.Popen[bytes]:
    exe = chromium_path()
    if exe is None:
        raise CdpError("no chromium on PATH (Debian: apt-get install chromium)")
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            *reaped(),
            exe,
            "--headless=new",
            "--no-sandbox",  # as root in a container: the sandbox needs user namespaces
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--no-proxy-server",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--password-store=basic",
            "--use-mock-keychain",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            *(["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"] if offline else []),
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


async def _devtools_url(proc: subprocess.Popen[bytes]) -> str:
    """Chromium prints `DevTools listening on ws://...` on stderr once it listens."""
    assert proc.stderr is not None
    stderr = proc.stderr
    seen: list[str] = []
    while True:
        line = await asyncio.to_thread(stderr.readline)
        if not line:
            raise CdpError("chromium exited before listening: " + "".join(seen[-20:]))
        text = line.decode(errors="replace")
        seen.append(text)
        match = re.search(r"DevTools listening on (ws://\S+)", text)
        if match:
            # keep draining stderr so that Chromium never blocks on a full pipe
            asyncio.get_running_loop().run_in_executor(None, _drain, stderr)
            return match.group(1)


def _drain(stream: Any) -> None:
    with contextlib.suppress(Exception):
        while stream.read(65536):
            pass


def reaped() -> list[str]:
    """The command prefix that runs a program under tests/reaper.py (see there why)."""
    return [sys.executable, str(Path(__file__).with_name("reaper.py"))]


def kill_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the process group (the reaper leading it stops and reaps every descendant),
    SIGKILL the group if that takes longer than `grace`, and reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if proc.stderr is not None:
        proc.stderr.close()
