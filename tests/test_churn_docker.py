"""The lifecycle under real-world churn on a real Docker engine: `docker-compose up -d`
recreating a labelled service while requests flow, label changes applied through a recreate,
config entries mixed with labels, containers killed mid-download."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import RUN_ID, TEST_LABEL, ContainerFactory, wait_for

pytestmark = pytest.mark.docker


def _compose(project: str, workdir: Path, *args: str) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
    proc = subprocess.run(
        [exe, "-p", project, "-f", str(workdir / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
    )
    if proc.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def _write_compose(workdir: Path, image: str, labels: dict[str, str]) -> None:
    doc = {
        "services": {
            "web": {
                "image": image,
                "environment": {"DELAY": "0.3"},
                "ports": ["127.0.0.1::80"],
                "labels": {TEST_LABEL: RUN_ID, **labels},
            }
        }
    }
    (workdir / "docker-compose.yml").write_text(yaml.safe_dump(doc))


async def _steady_stream(
    url: str, stop: asyncio.Event, results: list[int], failures: list[str]
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            try:
                r = await client.get("/services/web/index.html")
                results.append(r.status_code)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
            except httpx.HTTPError as exc:
                results.append(-1)
                failures.append(f"client error: {exc!r}")
            await asyncio.sleep(0.02)


@pytest.fixture
def compose_project(tmp_path: Path) -> Any:
    project = f"hestia-t-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    yield project, tmp_path
    if (tmp_path / "docker-compose.yml").exists():
        subprocess.run(
            ["docker-compose", "-p", project, "-f", str(tmp_path / "docker-compose.yml"), "down"],
            capture_output=True,
            timeout=120,
        )


async def test_compose_recreate_under_load_is_a_replacement(
    busybox_image: str,
    docker_client: Any,
    gateway_factory: Any,
    docker_backend: Any,
    compose_project: tuple[str, Path],
) -> None:
    project, workdir = compose_project
    scope = "t-" + uuid.uuid4().hex[:8]
    base = {"hestia.enable": "true", "hestia.scope": scope, "hestia.port": "80"}
    _write_compose(workdir, busybox_image, {**base, "hestia.max_concurrency": "1"})
    await asyncio.to_thread(_compose, project, workdir, "up", "-d")
    gw = await gateway_factory(
        {"docker": {"enabled": True, "scope": scope, "reconcile_interval": "30s"}},
        docker_backend,
    )
    await wait_for(lambda: "web" in gw.gateway.registry, 10, "the compose service")
    svc = gw.service("web")
    old_id = svc.instance_id
    assert svc.config.max_concurrency == 1

    stop = asyncio.Event()
    results: list[int] = []
    failures: list[str] = []
    clients = [
        asyncio.create_task(_steady_stream(gw.url, stop, results, failures)) for _ in range(4)
    ]
    await wait_for(lambda: len(results) > 20, 20, "requests flowing")
    # change a label: compose recreates (stop, rename, create, start, remove)
    _write_compose(workdir, busybox_image, {**base, "hestia.max_concurrency": "3"})
    await asyncio.to_thread(_compose, project, workdir, "up", "-d")
    await wait_for(
        lambda: svc.instance_id != old_id and svc.state == "ready", 20, "the new container"
    )
    done = len(results)
    await wait_for(lambda: len(results) > done + 20, 20, "requests to the new container")
    stop.set()
    await asyncio.gather(*clients)

    assert gw.gateway.registry.get("web") is svc  # never removed, never 404
    assert failures == [], f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    assert svc.config.max_concurrency == 3  # the new label applies at once
    # compose removed the old container: Hestia did not start it again mid-recreate
    assert not docker_client.containers.list(all=True, filters={"id": old_id})


async def test_label_change_through_recreate_moves_the_url(
    containers: ContainerFactory,
    gateway_factory: Any,
    docker_backend: Any,
) -> None:
    """`hestia.url` changed on a running service (labels change by re-creating the
    container): the next request goes to the new url."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nelsewhere")
        await writer.drain()
        writer.close()

    elsewhere = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = elsewhere.sockets[0].getsockname()[1]
    scope = "t-" + uuid.uuid4().hex[:8]
    lineage = {"com.docker.compose.project": scope, "com.docker.compose.service": "app"}
    labels = {"hestia.enable": "true", "hestia.scope": scope, "hestia.port": "80", **lineage}
    old = containers.create("app", labels=labels, start=True)
    gw = await gateway_factory({"docker": {"enabled": True, "scope": scope}}, docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/app/index.html")
        assert r.text == "hello from busybox\n"
        # what compose does, by hand: stop, rename, create (new labels), start, remove
        old.stop(timeout=1)
        old.rename(f"{old.id[:12]}_{old.name}")
        new = containers.create(
            "app", labels={**labels, "hestia.url": f"http://127.0.0.1:{port}"}, start=True
        )
        old.remove(force=True)
        svc = gw.service("app")
        await wait_for(lambda: svc.instance_id == new.id, 10, "the new container")
        r = await client.get("/services/app/")
        assert r.text == "elsewhere"
    elsewhere.close()


async def test_config_entry_with_labels_applies_both(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    c = containers.create(
        "mix",
        labels={"hestia.enable": "true", "hestia.scope": scope, "hestia.max_concurrency": "1"},
        env={"DELAY": "0"},
    )
    gw = await gateway_factory(
        {
            "docker": {"enabled": True, "scope": scope},
            "services": {"mixed": {"container": c.name, "port": 80}},
        },
        docker_backend,
    )
    svc = gw.service("mixed")
    assert svc.config.source == "config+labels" and svc.config.max_concurrency == 1
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        # a slow CGI stream holds the one slot; the next request waits in line
        async with client.stream("GET", "/services/mixed/cgi-bin/stream?10") as first:
            assert first.status_code == 200
            second = asyncio.create_task(client.get("/services/mixed/index.html"))
            await wait_for(lambda: svc.queued == 1, 10, "the second request to queue")
            async for _ in first.aiter_raw():
                pass
        assert (await second).status_code == 200


async def test_container_killed_mid_download_ends_the_stream(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    c = containers.create(
        "kill", labels={"hestia.enable": "true", "hestia.scope": scope, "hestia.service": "dl"}
    )
    gw = await gateway_factory({"docker": {"enabled": True, "scope": scope}}, docker_backend)
    svc = gw.service("dl")
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        async with client.stream("GET", "/services/dl/cgi-bin/stream?1000") as r:
            assert r.status_code == 200
            chunks = r.aiter_raw()
            await anext(chunks)
            assert svc.in_flight == 1
            c.kill()

            async def read_slowly() -> None:
                async for _ in chunks:  # a slow reader: the stream must end, not hang
                    await asyncio.sleep(0.05)

            # busybox's CGI body ends with the connection: cut by the kill, it may end
            # cleanly or broken, but it must end
            with contextlib.suppress(httpx.HTTPError):
                await asyncio.wait_for(read_slowly(), 20)
    await wait_for(lambda: svc.in_flight == 0, 10, "the dead stream to be released")
    await wait_for(lambda: svc.state == "stopped", 10, "the death to be noticed")


async def test_failed_start_stops_the_container_it_started(
    containers: ContainerFactory, gateway_factory: Any, docker_backend: Any
) -> None:
    scope = "t-" + uuid.uuid4().hex[:8]
    labels = {
        "hestia.enable": "true",
        "hestia.scope": scope,
        "hestia.service": "never",
        "hestia.startup_timeout": "1.5s",
    }
    c = containers.create("never", labels=labels, env={"DELAY": "600"})  # never listens
    gw = await gateway_factory({"docker": {"enabled": True, "scope": scope}}, docker_backend)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/services/never/")
        assert r.status_code == 504
        assert "Hestia stopped the instance" in r.json()["error"]["message"]
        await wait_for(lambda: containers.state(c) == "exited", 15, "the container to stop")
        status = (await client.get("/v1/services/never/status")).json()
    assert status["state"] == "failed"
    assert status["last_error"]["detail"]["instance_stopped"] is True
