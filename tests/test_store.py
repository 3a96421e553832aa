"""State in a real SQLite file: schema, batching, and what survives a restart of Hestia."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from hestia.store import SCHEMA_VERSION, EventRow, ServiceRow, Store, StoreError
from tests.conftest import ContainerFactory, wait_for


async def test_schema_created_once_rollback_journal_and_versioned(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/sub/hestia.db"
    store = Store(url)
    store.migrate()
    store.migrate()  # idempotent: a second start changes nothing
    assert store.schema_version() == SCHEMA_VERSION
    assert {"hestia_event", "hestia_meta", "hestia_service"} <= set(store.tables())
    store.start()
    store.record_event(
        EventRow(
            service="a",
            at=1.0,
            from_state="stopped",
            to_state="starting",
            cause="request",
            reason="",
        )
    )
    store.snapshot_service(ServiceRow(name="a", state="starting", last_activity=123.0))
    await store.close()  # a clean shutdown writes what was queued
    db_file = tmp_path / "sub" / "hestia.db"
    # not WAL: its -shm file would be mapped into the gateway (a damaged one kills it, SIGBUS)
    assert db_file.read_bytes()[18:20] == b"\x01\x01"
    assert not {f"{db_file.name}-shm", f"{db_file.name}-wal"} & set(os.listdir(db_file.parent))
    with sqlite3.connect(db_file) as db:
        assert db.execute("SELECT service, to_state FROM hestia_event").fetchall() == [
            ("a", "starting")
        ]
    again = Store(url)
    again.migrate()
    assert again.load_service_states()["a"].last_activity == 123.0
    again.engine.dispose()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/h.db"
    store = Store(url)
    store.migrate()
    with sqlite3.connect(tmp_path / "h.db") as db:
        db.execute("UPDATE hestia_meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="newer than this Hestia") as caught:
        store.migrate()
    assert str(tmp_path / "h.db") in caught.value.message
    store.engine.dispose()


def _labels(scope: str, name: str, idle: str) -> dict[str, str]:
    return {
        "hestia.enable": "true",
        "hestia.scope": scope,
        "hestia.service": name,
        "hestia.idle_timeout": idle,
    }


@pytest.mark.docker
async def test_restart_keeps_the_idle_clock(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any, tmp_path: Path
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    c = containers.create("keep", labels=_labels(scope, "keep", "10m"))
    db = tmp_path / "restart.db"
    cfg = {"docker": {"enabled": True, "scope": scope}, "database": {"url": f"sqlite:///{db}"}}
    first = await gateway_factory(dict(cfg), docker_backend)
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
        assert (await client.get("/services/keep/")).status_code == 200
    await first.stop()
    assert containers.state(c) == "running"  # a restart of the gateway never stops services
    # as if Hestia had been down for 9 min 58 s of the 10 min idle period: the clock is the
    # stored last activity, so the adopted service has 2 s left, not a fresh 10 min
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE hestia_service SET last_activity = last_activity - 598")
    from hestia.backends.docker import DockerBackend

    second = await gateway_factory(dict(cfg), DockerBackend())
    svc = second.service("keep")
    await wait_for(lambda: svc.state == "ready", 10, "adoption")
    assert svc.idle_deadline is not None
    left = svc.idle_deadline - asyncio.get_running_loop().time()
    assert left < 60, left  # counted from the stored last request, not from the restart
    await wait_for(lambda: containers.state(c) == "exited", 20, "the idle stop")
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
        events = (await client.get("/v1/services/keep/events?limit=20")).json()["events"]
    transitions = [(e["from_state"], e["to_state"], e["cause"]) for e in reversed(events)]
    assert ("stopped", "starting", "request") in transitions
    assert ("starting", "ready", "request") in transitions
    assert ("ready", "stopping", "idle") in transitions
    assert transitions[-1] == ("stopping", "stopped", "idle")
    ready = next(e for e in events if e["to_state"] == "ready" and e["cause"] == "request")
    assert ready["duration_ms"] > 0  # the start took time, and it is recorded


@pytest.mark.docker
async def test_start_in_progress_when_hestia_died_is_not_left_starting(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any, tmp_path: Path
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    c = containers.create("died", labels=_labels(scope, "died", "10m"), env={"DELAY": "60"})
    db = tmp_path / "died.db"
    cfg = {"docker": {"enabled": True, "scope": scope}, "database": {"url": f"sqlite:///{db}"}}
    first = await gateway_factory(dict(cfg), docker_backend)
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
        await client.post("/v1/services/died/start")
    await wait_for(lambda: containers.state(c) == "running", 10, "the container to run")

    def stored_state() -> str | None:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT state FROM hestia_service WHERE name='died'").fetchone()
        return row[0] if row else None

    await wait_for(lambda: stored_state() == "starting", 5, "the start to be stored")
    # Hestia dies (no clean shutdown: the task is cancelled, nothing more is written) and the
    # container dies with it
    first.server.should_exit = True
    first.server.force_exit = True
    first.gateway.store._task.cancel()
    c.kill()
    await first.stop()
    await wait_for(lambda: containers.state(c) == "exited", 10, "the container to be dead")
    from hestia.backends.docker import DockerBackend

    second = await gateway_factory(dict(cfg), DockerBackend())
    svc = second.service("died")
    await wait_for(lambda: svc.state == "failed", 10, "recovery")
    assert svc.last_error is not None
    assert "Hestia restarted while starting" in svc.last_error["message"]


@pytest.mark.docker
async def test_hestia_killed_during_a_start_the_next_run_finishes_it(
    containers: ContainerFactory, gateway_factory: Any, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from tests.conftest import free_port, wait_http_ok

    scope = "t-" + uuid.uuid4().hex[:8]
    c = containers.create("kill9", labels=_labels(scope, "kill9", "10m"), env={"DELAY": "4"})
    db = tmp_path / "kill9.db"
    cfg_file = tmp_path / "hestia_config.yml"
    cfg_file.write_text(f"docker: {{scope: {scope}}}\ndatabase: {{url: 'sqlite:///{db}'}}\n")
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the gateway under test, killed below
        [sys.executable, "-m", "hestia", "serve", "--config", str(cfg_file), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await wait_http_ok(client, "/v1/health")
            await client.post("/v1/services/kill9/start")

        def stored_state() -> str | None:
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT state FROM hestia_service WHERE name='kill9'").fetchone()
            return row[0] if row else None

        await wait_for(lambda: stored_state() == "starting", 5, "the start to be stored")
        proc.send_signal(signal.SIGKILL)  # no shutdown code runs at all
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert containers.state(c) == "running"
    started_at = c.attrs["State"]["StartedAt"]
    with sqlite3.connect(db) as conn:  # as if the crash was 590 s after the last request
        conn.execute("UPDATE hestia_service SET last_activity = last_activity - 590")
    from hestia.backends.docker import DockerBackend

    gw = await gateway_factory(
        {"docker": {"enabled": True, "scope": scope}, "database": {"url": f"sqlite:///{db}"}},
        DockerBackend(),
    )
    svc = gw.service("kill9")
    await wait_for(lambda: svc.state == "ready", 15, "the start to be finished")
    # its idle clock starts at adoption (10 min), not at the request before the crash
    assert svc.idle_deadline is not None
    assert svc.idle_deadline - asyncio.get_running_loop().time() > 500
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        assert (await client.get("/services/kill9/")).status_code == 200
        events = (await client.get("/v1/services/kill9/events")).json()["events"]
    # adopted mid-start and finished, not restarted
    assert ("starting", "ready", "adopted") in [
        (e["from_state"], e["to_state"], e["cause"]) for e in events
    ]
    c.reload()
    assert c.attrs["RestartCount"] == 0 and c.attrs["State"]["StartedAt"] == started_at
