"""Metrics after a known sequence of requests, as JSON and as Prometheus text (parsed with
prometheus-client's own parser), and the JSON access log with request ids."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ContainerFactory, free_port, wait_http_ok


@pytest.mark.docker
async def test_metrics_after_cold_start_404_and_502(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    containers.create(
        "met",
        labels={"hestia.enable": "true", "hestia.scope": scope, "hestia.service": "web"},
        env={"DELAY": "0.5"},
    )
    gw = await gateway_factory(
        {
            "docker": {"enabled": True, "scope": scope},
            "services": {"dead": {"url": f"http://127.0.0.1:{free_port()}"}},
        },
        docker_backend,
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        assert (await client.get("/services/web/")).status_code == 200  # cold start
        assert (await client.get("/services/web/index.html")).status_code == 200
        assert (await client.get("/services/web/missing")).status_code == 404
        r = await client.post("/services/web/cgi-bin/stream?1", content=b"12345")
        assert r.status_code == 200
        assert (await client.get("/services/dead/")).status_code == 502
        for junk in ("nope", "nope2", "x" * 40):  # unknown names share one series
            assert (await client.get(f"/services/{junk}/")).status_code == 404
        snap = (await client.get("/v1/metrics")).json()
        prom = (await client.get("/metrics")).text

    web = snap["services"]["web"]
    assert web["requests"]["2xx"] + web["requests"]["5xx"] == 3
    assert web["requests"]["4xx"] == 1
    assert web["requests_total"] == 4
    assert web["cold_starts"] == 1
    assert web["start_duration_s"]["count"] == 1
    assert web["start_duration_s"]["p50"] >= 0.4  # the container's 0.5 s delay
    assert web["wait_s"]["count"] == 1 and web["wait_s"]["total"] >= 0.4
    assert web["bytes_in"] == 5
    assert web["bytes_out"] > len("hello from busybox\n")
    assert web["state"] == "ready" and web["in_flight"] == 0
    assert 0 < web["uptime_share"] <= 1
    dead = snap["services"]["dead"]
    assert dead["requests"]["5xx"] == 1 and dead["errors"] == 1 and dead["upstream_errors"] == 1
    assert not {"nope", "nope2", "x" * 40} & set(snap["services"])
    assert snap["services"]["<unknown>"]["requests"]["4xx"] == 3
    assert snap["totals"]["requests"] == 8
    assert snap["totals"]["cold_starts"] == 1

    families = {f.name: f for f in text_string_to_metric_families(prom)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("hestia_requests_total", (("class", "4xx"), ("service", "web")))] == 1
    assert samples[("hestia_requests_total", (("class", "5xx"), ("service", "dead")))] == 1
    assert samples[("hestia_cold_starts_total", (("service", "web"),))] == 1
    assert samples[("hestia_errors_total", (("service", "dead"),))] == 1
    assert samples[("hestia_start_duration_seconds_count", (("service", "web"),))] == 1
    assert samples[("hestia_service_ready", (("service", "web"),))] == 1
    assert samples[("hestia_bytes_in_total", (("service", "web"),))] == 5


_OPEN_WRITERS: list[asyncio.StreamWriter] = []


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _OPEN_WRITERS.append(writer)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"content-length: 3" in head.lower():
                await reader.readexactly(3)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def test_json_access_log_carries_the_request_id(tmp_path: Path) -> None:
    upstream = await asyncio.start_server(_answer_ok, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    cfg = tmp_path / "hestia_config.yml"
    cfg.write_text(
        "docker: {enabled: false}\n"
        f"database: {{url: 'sqlite:///{tmp_path}/h.db'}}\n"
        f"services:\n  dead:\n    url: http://127.0.0.1:{free_port()}\n"
        f"  ok:\n    url: http://127.0.0.1:{up_port}\n"
    )
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the gateway under test, a child process
        [sys.executable, "-m", "hestia", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "HESTIA_LOG_FORMAT"},
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await wait_http_ok(client, "/v1/health")
            given = await client.get("/services/dead/x?y=1", headers={"X-Request-ID": "abc-123"})
            made = await client.get("/services/nope/")
            insane = await client.get("/services/nope/", headers={"X-Request-ID": "a b\t<c>"})
            ok = await client.post(
                "/services/ok/p", content=b"abc", headers={"X-Request-ID": "ok-1"}
            )
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        upstream.close()
        for writer in _OPEN_WRITERS:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        _OPEN_WRITERS.clear()
        await upstream.wait_closed()
    assert given.status_code == 502 and given.headers["x-request-id"] == "abc-123"
    generated = made.headers["x-request-id"]
    assert len(generated) == 16
    assert insane.headers["x-request-id"] not in ("a b\t<c>", generated)
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("event") == "access"}
    line = access["abc-123"]
    assert line["service"] == "dead"
    assert line["method"] == "GET"
    assert line["path"] == "/services/dead/x"
    assert line["status"] == 502
    assert line["duration_ms"] >= 0 and line["waited_ms"] == 0
    assert line["cold_start"] is False
    assert line["client"] == "127.0.0.1"
    assert "did not answer" in line["error"]
    assert access[generated]["status"] == 404
    # a successful request (written by the fast JSON access writer of `hestia serve`)
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "ok-1"
    good = access["ok-1"]
    assert (good["status"], good["bytes_in"], good["bytes_out"]) == (200, 3, 2)
    assert (good["service"], good["path"], good["level"]) == ("ok", "/services/ok/p", "info")
    assert "error" not in good and good["cold_start"] is False
    assert all({"ts", "level", "msg"} <= set(line) for line in lines)
    # uvicorn's own lines go through the same JSON sink
    assert any(
        "Uvicorn running" in line["msg"] or "Started server" in line["msg"] for line in lines
    )


async def test_grafana_example_only_uses_metrics_hestia_exports(gateway_factory: Any) -> None:
    import re

    dashboard = json.loads(
        (Path(__file__).parent.parent / "examples" / "grafana-dashboard.json").read_text()
    )
    gw = await gateway_factory({"services": {"x": {"url": "http://127.0.0.1:9"}}})
    async with httpx.AsyncClient(base_url=gw.url) as client:
        prom = (await client.get("/metrics")).text
    exported = {s.name for f in text_string_to_metric_families(prom) for s in f.samples}
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"hestia_[a-z_]+", target["expr"])
    }
    assert used and used <= exported, used - exported
