"""The `hestia` command as a real process: bad config, and SIGTERM with requests held."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ContainerFactory, free_port, wait_for, wait_http_ok


def test_invalid_config_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    cfg = tmp_path / "hestia_config.yml"
    cfg.write_text("services:\n  ollama:\n    container: ollama\n    startup_timeout: forever\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hestia", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr
    assert "services.ollama.startup_timeout" in proc.stderr
    assert "not a duration" in proc.stderr


@pytest.mark.docker
async def test_sigterm_answers_held_requests_and_leaves_containers(
    containers: ContainerFactory, tmp_path: Path
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    c = containers.create(
        "term",
        labels={"hestia.enable": "true", "hestia.scope": scope, "hestia.service": "slow"},
        env={"DELAY": "60"},
    )
    cfg = tmp_path / "hestia_config.yml"
    cfg.write_text(
        f"docker:\n  scope: {scope}\nserver:\n  shutdown_grace: 10s\n"
        f"database:\n  url: sqlite:///{tmp_path}/h.db\n"
    )
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child that outlives this coroutine
        [sys.executable, "-m", "hestia", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HESTIA_LOG_FORMAT": "json"},
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            await wait_http_ok(client, "/v1/services/slow/status")
            held = asyncio.create_task(client.get("/services/slow/"))

            async def waiting() -> bool:
                return bool((await client.get("/v1/services/slow/status")).json()["waiting"])

            await wait_for(waiting, 10, "the request to be held")
            # the container is up (its web server waits 60 s), the request held for it
            await wait_for(lambda: containers.state(c) == "running", 20, "the container's start")
            proc.send_signal(signal.SIGTERM)
            r = await asyncio.wait_for(held, 10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "shutting_down"
        # a graceful shutdown is a clean exit: 0, not "killed by SIGTERM" (143)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout is not None
        assert b"Application shutdown complete" in proc.stdout.read()
        # the container Hestia was starting is left as it is: still running
        assert containers.state(c) == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
