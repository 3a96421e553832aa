"""The dashboard (/ui) and the API docs (/docs) in a real headless Chromium with no network
beyond the gateway (no host name resolves): the page lists the services, its start button
starts a real Docker container and the row turns ready without a reload; /docs renders from
files Hestia serves; with auth on, the page sends the browser to sign in first.

A screenshot of the dashboard is kept under test-output/ (HESTIA_TEST_OUTPUT to change it)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from hestia.backends.memory import MemoryBackend
from tests.cdp import Page, chromium
from tests.conftest import ContainerFactory

REPO = Path(__file__).resolve().parent.parent
KEY = "dashboard-admin-key-0123456789abcdef"


def output_dir() -> Path:
    out = Path(os.environ.get("HESTIA_TEST_OUTPUT") or REPO / "test-output")
    out.mkdir(parents=True, exist_ok=True)
    return out


def only_the_gateway(page: Page, base: str) -> None:
    """Every request the page made went to the gateway, and none failed."""
    origin = urlsplit(base).netloc
    elsewhere = [
        r for r in page.network.requests.values() if urlsplit(r.split()[1]).netloc != origin
    ]
    assert elsewhere == [], elsewhere
    # the event stream is cut when the page goes away: that is no failure of the page
    failed = [f for f in page.network.failed if "/v1/events" not in f]
    assert failed == [], failed
    assert page.network.page_errors == [], page.network.page_errors


def row(name: str) -> str:
    return f"document.querySelector('tr[data-service={json.dumps(name)}]')"


@pytest.mark.docker
async def test_the_dashboard_starts_a_container_live(
    gateway_factory: Any,
    docker_backend: Any,
    containers: ContainerFactory,
    tmp_path: Path,
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    name = "web-" + uuid.uuid4().hex[:6]
    c = containers.create(
        "dash",
        labels={"hestia.enable": "true", "hestia.scope": scope, "hestia.service": name},
        env={"DELAY": "1"},
    )
    gw = await gateway_factory({"docker": {"scope": scope}}, docker_backend)
    async with chromium(tmp_path / "profile", offline=True) as browser:
        page = await browser.new_page()
        await page.navigate(f"{gw.url}/")  # redirected to /ui
        await page.wait_for(f"{row(name)} !== null", 30, "the service's row")
        assert await page.evaluate("location.pathname") == "/ui"
        state = f"{row(name)}.querySelector('[data-state]').dataset.state"
        assert await page.evaluate(state) == "stopped"
        await page.wait_for(
            "document.getElementById('live').textContent === 'live'", 20, "the live feed"
        )
        await page.evaluate("window.sameDocument = true")
        await page.evaluate(f"{row(name)}.querySelector('button[data-action=start]').click()")
        # 'starting' may last less than one look on a busy machine: the event list keeps it
        await page.wait_for(f"{state} === 'ready'", 60, "the row to turn ready")
        assert await page.evaluate("window.sameDocument") is True  # no reload
        assert containers.state(c) == "running"
        text = await page.evaluate(f"{row(name)}.innerText")
        assert "127.0.0.1:" in text or "172." in text  # the upstream it found
        await page.wait_for(
            "['stopped → starting', 'starting → ready'].every("
            "t => document.getElementById('events').innerText.includes(t))",
            20,
            "the transition in the event list",
        )
        await page.screenshot(output_dir() / "dashboard.png")
        assert (output_dir() / "dashboard.png").stat().st_size > 10_000
        only_the_gateway(page, gw.url)

        # the API docs render from the gateway's own files
        docs = await browser.new_page()
        await docs.navigate(f"{gw.url}/docs")
        title = await docs.wait_for(
            "document.querySelector('.swagger-ui .info .title')?.textContent",
            30,
            "Swagger UI to render",
        )
        assert "Hestia control API" in title
        await docs.wait_for(
            "document.querySelectorAll('.opblock').length > 5", 20, "the operations"
        )
        await docs.screenshot(output_dir() / "docs.png")
        only_the_gateway(docs, gw.url)


async def test_with_auth_on_the_dashboard_asks_to_sign_in(
    gateway_factory: Any, tmp_path: Path
) -> None:
    backend = MemoryBackend()
    backend.add("m", labels={"hestia.enable": "true"})
    gw = await gateway_factory(
        {
            "docker": {"reconcile_interval": 0},
            "auth": {"enabled": True, "keys": [{"name": "me", "key": KEY, "scopes": ["admin"]}]},
        },
        {"memory": backend},
    )
    async with chromium(tmp_path / "profile", offline=True) as browser:
        page = await browser.new_page()
        await page.navigate(f"{gw.url}/ui")
        await page.wait_for("location.pathname === '/login'", 20, "the sign-in page")
        assert await page.evaluate("location.search") == "?next=/ui"
        await page.wait_for("document.getElementById('key') !== null", 20, "the key field")
        await page.evaluate(
            f"document.getElementById('key').value = {json.dumps(KEY)};"
            "document.getElementById('key').form.submit()"
        )
        await page.wait_for(f"{row('m')} !== null", 30, "the dashboard after signing in")
        assert await page.evaluate("location.pathname") == "/ui"
        await page.wait_for(
            "document.getElementById('live').textContent === 'live'", 20, "the live feed"
        )
        await page.evaluate(f"{row('m')}.querySelector('button[data-action=start]').click()")
        state = f"{row('m')}.querySelector('[data-state]').dataset.state"
        await page.wait_for(f"{state} === 'ready'", 20, "the row to turn ready")
        only_the_gateway(page, gw.url)
    await backend.close()


async def test_a_refused_config_edit_shows_on_the_page(
    gateway_factory: Any, tmp_path: Path
) -> None:
    backend = MemoryBackend()
    backend.add("m-box")
    path = tmp_path / "hestia_config.yml"
    raw: dict[str, Any] = {
        "docker": {"reconcile_interval": 0},
        "services": {"m": {"container": "m-box", "backend": "memory"}},
    }
    gw = await gateway_factory(raw, {"memory": backend}, config_path=path)
    async with chromium(tmp_path / "profile", offline=True) as browser:
        page = await browser.new_page()
        await page.navigate(f"{gw.url}/ui")
        await page.wait_for(
            "document.getElementById('live').textContent === 'live'", 20, "the live feed"
        )
        banner = "document.getElementById('config-error')"
        assert await page.evaluate(f"{banner}.hidden") is True
        raw["services"]["m"]["idle_timeout"] = "soon"
        path.write_text(yaml.safe_dump(raw))
        text = await page.wait_for(
            f"!{banner}.hidden && {banner}.innerText", 20, "the refused edit on the page"
        )
        assert "services.m.idle_timeout" in text and "running configuration stays" in text
        raw["services"]["m"]["idle_timeout"] = "5m"
        raw["services"]["n"] = {"url": "http://127.0.0.1:9"}
        path.write_text(yaml.safe_dump(raw))
        await page.wait_for(f"{banner}.hidden", 20, "the banner to go once a valid save")
        await page.wait_for(f"{row('n')} !== null", 20, "the added service's row")
        only_the_gateway(page, gw.url)
    await backend.close()
