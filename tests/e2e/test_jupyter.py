"""A real web app behind Hestia: JupyterLab (from PyPI) on 127.0.0.1, reached only through the
gateway, (a) by host name (`lab.localhost:<port>`, `routing.subdomains`) and (b) by path with
`base_url=/services/jupyter/` and `strip_prefix: false`.

Over plain HTTP and WebSocket clients: log in with the token, create a kernel over the REST
API, run code over the kernel's WebSocket and read the result; a WebSocket from another
origin is refused by Jupyter with 403, and the client sees that 403. In headless Chromium
(Debian's `chromium`, driven over the DevTools protocol, tests/cdp.py): open a notebook, run
its cell, see the output, with no failed request and no refused WebSocket; and the same after
a password login (a form POST with Jupyter's XSRF token). A screenshot of each browser run is
kept in the test's tmp_path.

Jupyter and Chromium run under tests/reaper.py in process groups of their own, stopped and
reaped whole afterwards (PID 1 here does not reap orphans).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.cdp import Page, chromium, chromium_path, kill_group, reaped

PASSWORD = "correct horse battery staple"
READY_S = 120.0  # JupyterLab's first start on a busy 2-core machine


def _need(what: str, present: bool) -> None:
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI (see .ci/run and the test extras)")
    pytest.skip(f"{what} is not installed")


@dataclass
class Jupyter:
    port: int
    base_url: str  # "/" or "/services/jupyter/"
    token: str
    root: Path
    log: Path
    proc: subprocess.Popen[bytes]


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


def _start_jupyter(tmp: Path, base_url: str) -> Jupyter:
    _need("JupyterLab (pip install jupyterlab)", importlib.util.find_spec("jupyterlab") is not None)
    root = tmp / "notebooks"
    settings = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    root.mkdir(parents=True)
    settings.mkdir(parents=True)
    # no "get Jupyter news?" prompt, no fetch of the news feed from the internet
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    salt = secrets.token_hex(6)
    hashed = f"sha1:{salt}:{hashlib.sha1((PASSWORD + salt).encode()).hexdigest()}"
    token = secrets.token_hex(16)
    port = _free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "IPYTHONDIR": str(tmp / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    log = tmp / "jupyter.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *reaped(),
                sys.executable,
                "-m",
                "jupyterlab",
                "--allow-root",  # CI runs as root
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                f"--ServerApp.base_url={base_url}",
                f"--ServerApp.root_dir={root}",
                f"--IdentityProvider.token={token}",
                f"--PasswordIdentityProvider.hashed_password={hashed}",
                f"--LabApp.user_settings_dir={tmp / 'lab-settings'}",
                f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
                "--LabApp.extension_manager=readonly",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabServerApp.expose_app_in_browser=True",  # window.jupyterapp, to run cells
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )
    jupyter = Jupyter(port, base_url, token, root, log, proc)
    try:
        _wait_ready(jupyter)
    except BaseException:
        kill_group(proc)
        raise
    return jupyter


def _wait_ready(j: Jupyter) -> None:
    deadline = time.monotonic() + READY_S
    url = f"http://127.0.0.1:{j.port}{j.base_url}api"
    while True:
        if j.proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({j.proc.returncode}):\n{_tail(j.log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"JupyterLab not up after {READY_S}s:\n{_tail(j.log)}")
        time.sleep(0.2)


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


@pytest.fixture(scope="module")
def jupyter_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    """Served at its root: reached by host name."""
    j = _start_jupyter(tmp_path_factory.mktemp("jupyter-root"), "/")
    yield j
    kill_group(j.proc)


@pytest.fixture(scope="module")
def jupyter_based(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    """Told its base URL: reached by path, prefix not stripped."""
    j = _start_jupyter(tmp_path_factory.mktemp("jupyter-based"), "/services/jupyter/")
    yield j
    kill_group(j.proc)


@dataclass
class Via:
    """How the browser (or a client) reaches one of the Jupyters through the gateway."""

    jupyter: Jupyter
    host: str  # the Host header / authority the client uses
    base: str  # the app's base path as the client sees it

    @property
    def origin(self) -> str:
        return f"http://{self.host}"

    def url(self, path: str) -> str:
        return f"{self.origin}{self.base}{path}"


@pytest.fixture
async def gateway(gateway_factory: Any, jupyter_root: Jupyter, jupyter_based: Jupyter) -> Any:
    return await gateway_factory(
        {
            "routing": {"subdomains": True},
            "logging": {"access": False},
            "services": {
                "lab": {"url": f"http://127.0.0.1:{jupyter_root.port}"},
                "jupyter": {
                    "url": f"http://127.0.0.1:{jupyter_based.port}",
                    "strip_prefix": False,
                },
            },
        }
    )


@pytest.fixture(params=["by_host", "by_path"])
def via(request: pytest.FixtureRequest, gateway: Any) -> Via:
    if request.param == "by_host":
        jupyter = request.getfixturevalue("jupyter_root")
        return Via(jupyter, f"lab.localhost:{gateway.port}", "/")
    jupyter = request.getfixturevalue("jupyter_based")
    return Via(jupyter, f"127.0.0.1:{gateway.port}", "/services/jupyter/")


# ------------------------------------------------------------------ REST and WebSocket


def _execute_request(code: str, session: str) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "username": "test",
            "session": session,
            "msg_type": "execute_request",
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }


async def test_token_login_kernel_over_rest_and_websocket(gateway: Any, via: Via) -> None:
    # a client that behaves like a browser: the gateway's own origin on every request
    headers = {"Host": via.host, "Origin": via.origin}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=30) as client:
        r = await client.get(f"{via.base}lab?token={via.jupyter.token}")
        assert r.status_code == 200, r.text[:300]
        assert "_xsrf" in client.cookies and any(c.startswith("username-") for c in client.cookies)
        xsrf = {"X-XSRFToken": client.cookies["_xsrf"]}
        r = await client.post(f"{via.base}api/kernels", json={"name": "python3"}, headers=xsrf)
        assert r.status_code == 201, r.text[:300]
        kernel = r.json()["id"]
        cookie = "; ".join(f"{c.name}={c.value}" for c in client.cookies.jar)
        session = uuid.uuid4().hex
        ws_url = f"ws://{via.host}{via.base}api/kernels/{kernel}/channels?session_id={session}"
        try:
            async with ws_connect(
                ws_url,
                host="127.0.0.1",
                port=gateway.port,
                origin=Origin(via.origin),
                additional_headers={"Cookie": cookie},
                max_size=None,
            ) as ws:
                marker = secrets.token_hex(4)
                request = _execute_request(f"print(6 * 7, {marker!r})", session)
                await ws.send(json.dumps(request))
                text = await asyncio.wait_for(_stdout_of(ws, request["header"]["msg_id"]), 60)
                assert text == f"42 {marker}\n"
            # another origin's WebSocket: Jupyter refuses it, and the client is told so as
            # Jupyter said it (403), not as if Jupyter were down (502)
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(
                    ws_url,
                    host="127.0.0.1",
                    port=gateway.port,
                    origin=Origin("http://evil.example"),
                    additional_headers={"Cookie": cookie},
                ):
                    pass
            assert refused.value.response.status_code == 403
        finally:
            r = await client.delete(f"{via.base}api/kernels/{kernel}", headers=xsrf)
            assert r.status_code == 204


async def _stdout_of(ws: Any, msg_id: str) -> str:
    """What the execution of `msg_id` printed, once the kernel is idle again."""
    out = ""
    async for raw in ws:
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "stream":
            out += msg["content"]["text"]
        elif kind == "error":
            raise AssertionError(f"the kernel raised: {msg['content']}")
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return out
    raise AssertionError("the kernel WebSocket closed before the cell finished")


# ------------------------------------------------------------------ a real browser

KERNEL_READY = """(() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
})()"""
OUTPUT = """(() => {
  const w = window.jupyterapp.shell.currentWidget;
  const o = w && w.node.querySelector('.jp-OutputArea-output');
  return o ? o.textContent : '';
})()"""


def _notebook(root: Path, name: str, code: str) -> None:
    cell: dict[str, Any] = {
        "cell_type": "code",
        "execution_count": None,
        "id": "cell-1",
        "metadata": {},
        "outputs": [],
        "source": [code],
    }
    kernelspec = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook = {
        "cells": [cell],
        "metadata": {"kernelspec": kernelspec},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (root / name).write_text(json.dumps(notebook))


async def _run_notebook(page: Page, via: Via, name: str, marker: str, password: bool) -> None:
    # `reset`: a fresh workspace, with only this notebook open
    if password:
        await page.navigate(via.url(f"lab/tree/{name}?reset"))
        await page.wait_for("!!document.querySelector('#password_input')", 60, "the login form")
        await page.evaluate(
            f"document.querySelector('#password_input').value = {json.dumps(PASSWORD)};"
            "document.querySelector('#login_submit').click(); true"
        )
    else:
        await page.navigate(via.url(f"lab/tree/{name}?reset&token={via.jupyter.token}"))
    await page.wait_for(KERNEL_READY, 90, "the notebook's kernel to be connected and idle")
    opened = await page.evaluate("window.jupyterapp.shell.currentWidget.context.path")
    assert opened == name
    await page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    output = await page.wait_for(OUTPUT, 60, "the cell's output")
    assert output.strip() == f"42 {marker}"


async def _browser_run(tmp_path: Path, via: Via, password: bool) -> None:
    _need("Chromium (apt-get install chromium)", chromium_path() is not None)
    attempts = 3
    for attempt in range(1, attempts + 1):
        marker = secrets.token_hex(4)
        name = f"run-{marker}.ipynb"
        _notebook(via.jupyter.root, name, f"print(6 * 7, {marker!r})")
        async with chromium(tmp_path / f"profile-{attempt}") as browser:
            page = await browser.new_page()
            try:
                await _run_notebook(page, via, name, marker, password)
            except (TimeoutError, AssertionError):
                if not page.network.network_changed or attempt == attempts:
                    await page.screenshot(tmp_path / "failure.png")
                    raise
            await page.screenshot(tmp_path / "jupyter.png")
        net = page.network
        if net.network_changed and attempt < attempts:
            continue  # Chromium cut requests itself (Docker changed the interfaces): again
        assert net.failed_requests() == [], net.failed_requests()
        assert net.http_errors == []
        assert net.refused_websockets() == []
        assert net.websocket_errors == []
        assert net.page_errors == []
        # the events socket and the kernel's socket both went through the gateway
        urls = list(net.websockets.values())
        assert any("/api/events/subscribe" in u for u in urls), urls
        assert any("/channels?" in u for u in urls), urls
        assert all(u.startswith(f"ws://{via.host}{via.base}") for u in urls), urls
        if password:
            logins = [a for a in net.answered if a.startswith(f"POST {via.url('login')}")]
            assert logins and logins[0].endswith("-> 302"), net.answered
        assert (tmp_path / "jupyter.png").stat().st_size > 10_000
        return


async def test_browser_runs_a_notebook_with_the_token(tmp_path: Path, via: Via) -> None:
    await _browser_run(tmp_path, via, password=False)


async def test_browser_runs_a_notebook_after_a_password_login(
    tmp_path: Path, gateway: Any, jupyter_based: Jupyter
) -> None:
    via = Via(jupyter_based, f"127.0.0.1:{gateway.port}", "/services/jupyter/")
    await _browser_run(tmp_path, via, password=True)
