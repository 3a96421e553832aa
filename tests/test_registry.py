"""Which services exist and which instance is each one's, on the memory backend: config and
labels mixed, conflicts, recreates, renames, removals, scopes and an unreachable backend.
The same paths against a real Docker engine are in test_lifecycle_docker.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from hestia.backends.memory import MemoryBackend
from hestia.config import parse_config
from hestia.errors import BackendUnreachable, ConfigError, ServiceRemoved
from hestia.lifecycle import State
from hestia.registry import Registry
from tests.conftest import wait_for

ON = {"hestia.enable": "true"}


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    b = MemoryBackend()
    yield b
    await b.close()


@pytest.fixture
async def make_registry(
    backend: MemoryBackend,
) -> AsyncIterator[Callable[..., Any]]:
    made: list[Registry] = []

    async def make(raw: dict[str, Any] | None = None) -> Registry:
        raw = dict(raw or {})
        raw.setdefault("docker", {}).setdefault("reconcile_interval", 0)
        raw["docker"].setdefault("recreate_grace", "1s")
        reg = Registry(parse_config(raw), {"memory": backend})
        made.append(reg)
        await reg.start()
        return reg

    yield make
    for reg in made:
        await reg.close()


async def test_labelled_instance_becomes_a_service(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    backend.add("web-1", labels={**ON, "hestia.service": "web", "hestia.max_concurrency": "2"})
    reg = await make_registry()
    svc = reg.get("web")
    assert svc.config.source == "labels" and svc.config.max_concurrency == 2
    assert svc.status()["container"] == "web-1" and svc.state is State.STOPPED
    backend.add("late", labels=ON)  # found through its create event
    await wait_for(lambda: "late" in reg, 2, "the new instance")


async def test_config_service_with_url_label_and_max_concurrency_label(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    # a config entry naming an instance whose labels set url and max_concurrency: both apply
    # (the config wins only for the keys it sets)
    elsewhere = await _http_server()
    port = elsewhere.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    inst = backend.add("api-box", labels={**ON, "hestia.url": url, "hestia.max_concurrency": "1"})
    reg = await make_registry(
        {"services": {"api": {"container": "api-box", "backend": "memory", "idle_timeout": "5m"}}}
    )
    svc = reg.get("api")
    assert svc.config.source == "config+labels"
    assert svc.config.url == url and svc.config.max_concurrency == 1
    assert svc.config.idle_timeout == 300
    up = await asyncio.wait_for(svc.acquire(), 5)
    assert (up.port, up.base_path) == (port, b"/x")  # the url label, not the instance's address
    second = asyncio.create_task(svc.acquire())
    await wait_for(lambda: svc.queued == 1, 2, "the limit of 1 to hold the second request")
    svc.release()
    await asyncio.wait_for(second, 2)
    svc.release()
    assert inst.starts == 1
    elsewhere.close()


async def _http_server() -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_one_instance_one_service(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    backend.add("box", labels={**ON, "hestia.service": "other"})
    reg = await make_registry({"services": {"mine": {"container": "box", "backend": "memory"}}})
    assert "other" not in reg  # the config's claim wins; the label's is refused
    conflicts = reg.get("mine").status()["conflicts"]
    assert conflicts and conflicts[0]["instance"] == "box"
    assert "hestia.service=other" in conflicts[0]["reason"]


async def test_two_unrelated_instances_claiming_one_name(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    first = backend.add("a", labels={**ON, "hestia.service": "web"})
    reg = await make_registry()
    backend.add("b", labels={**ON, "hestia.service": "web"})
    await wait_for(lambda: bool(reg.get("web").conflicts), 2, "the conflict to be noticed")
    svc = reg.get("web")
    assert svc.instance_id == first.id
    assert "b" in svc.conflicts


async def test_config_names_another_instance_than_the_label_claim(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    backend.add("real", labels={})
    backend.add("impostor", labels={**ON, "hestia.service": "db"})
    reg = await make_registry({"services": {"db": {"container": "real", "backend": "memory"}}})
    svc = reg.get("db")
    assert svc.status()["container"] == "real"
    assert "impostor" in svc.conflicts


async def _recreate(
    backend: MemoryBackend, name: str, lineage: str, labels: dict[str, str], start: bool = True
) -> Any:
    """What `docker compose up -d` does to a changed service: stop, rename, create, start,
    remove."""
    old = backend.get(name)
    await backend.stop_by_hand(old.id)
    backend.rename(old.id, f"{old.id[-12:].rjust(12, '0')}_{name}")
    new = backend.add(name, labels=labels, lineage=lineage)
    if start:
        await backend.start_by_hand(new.id)
    await backend.remove(old.id)
    return new


async def test_compose_recreate_is_a_replacement_and_requests_are_held(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    lineage = "compose:proj/web/1"
    labels = {**ON, "hestia.service": "web", "hestia.max_concurrency": "1"}
    old = backend.add("proj-web-1", labels=labels, lineage=lineage)
    reg = await make_registry()
    svc = reg.get("web")
    await svc.acquire()
    svc.release()
    assert svc.state is State.READY
    # a steady stream of requests during the recreate: none is refused, none is lost
    results: list[Any] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(svc.acquire(), 5)
            except Exception as exc:
                results.append(exc)
                continue
            results.append("ok")
            svc.release()
            await asyncio.sleep(0.01)

    clients = [asyncio.create_task(client()) for _ in range(3)]
    new_labels = {**labels, "hestia.max_concurrency": "3"}
    new = await _recreate(backend, "proj-web-1", lineage, new_labels)
    await wait_for(lambda: svc.instance_id == new.id and svc.state is State.READY, 5, "new one")
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*clients)
    assert reg.get("web") is svc  # the same service, never removed
    assert [r for r in results if r != "ok"] == []
    assert svc.config.max_concurrency == 3  # the new labels apply at once
    assert old.starts == 1  # the replaced instance was never started again


async def test_stopped_compose_container_is_restarted_after_the_grace(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    old = backend.add("proj-db-1", labels=ON, lineage="compose:proj/db/1")
    reg = await make_registry()
    svc = reg.get("proj-db-1")
    await svc.acquire()
    svc.release()
    await backend.stop_by_hand(old.id)  # `docker compose stop`: no replacement follows
    await wait_for(lambda: svc.state is State.STOPPED, 2, "the stop to be noticed")
    await asyncio.wait_for(svc.acquire(), 5)  # held over the grace, then started again
    svc.release()
    assert old.starts == 2


async def test_renamed_config_instance_stays_managed(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    inst = backend.add("files")
    reg = await make_registry({"services": {"files": {"container": "files", "backend": "memory"}}})
    svc = reg.get("files")
    await svc.acquire()
    svc.release()
    backend.rename(inst.id, "files-renamed")
    await asyncio.sleep(0.1)
    assert svc.instance_id == inst.id  # still its own: the idle timer will still stop it
    replacement = backend.add("files")  # an instance of the configured name appears
    await wait_for(lambda: svc.instance_id == replacement.id, 2, "the configured name to win")


async def test_gone_labelled_service_is_held_briefly_then_removed(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    inst = backend.add("solo", labels=ON)
    reg = await make_registry()
    svc = reg.get("solo")
    held = asyncio.create_task(svc.acquire())
    await asyncio.sleep(0)
    await backend.remove(inst.id)
    with pytest.raises(ServiceRemoved):
        await asyncio.wait_for(held, 5)
    assert "solo" not in reg


async def test_gone_labelled_service_replaced_within_the_grace_serves_held_requests(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    inst = backend.add("solo", labels=ON)
    reg = await make_registry()
    svc = reg.get("solo")
    await backend.remove(inst.id)
    held = asyncio.create_task(svc.acquire())
    await wait_for(lambda: svc.waiting == 1, 2, "a held request")
    fresh = backend.add("solo", labels=ON)
    up = await asyncio.wait_for(held, 5)
    assert up.port == fresh.port and reg.get("solo") is svc
    svc.release()


def test_scoped_instances_belong_to_their_gateway_only() -> None:
    from hestia.config import label_enabled

    scoped = {**ON, "hestia.scope": "lab"}
    assert not label_enabled(scoped)  # a gateway without a scope leaves it alone
    assert label_enabled(scoped, "lab")
    assert not label_enabled(ON, "lab")


async def test_scoped_instance_is_not_managed_without_the_scope(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    backend.add("theirs", labels={**ON, "hestia.scope": "other-project"})
    backend.add("ours", labels=ON)
    reg = await make_registry()
    assert "ours" in reg and "theirs" not in reg


async def test_unreachable_backend_refuses_with_its_reason_and_recovers(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    backend.add("svc", labels=ON)
    reg = await make_registry()
    svc = reg.get("svc")
    backend.disconnect("engine socket closed")
    await wait_for(lambda: not svc.status()["backend_reachable"], 2, "unreachable")
    with pytest.raises(BackendUnreachable, match="engine socket closed") as exc:
        await svc.acquire()
    assert exc.value.status == 503 and exc.value.code == "backend_unreachable"
    backend.reconnect()
    await wait_for(lambda: svc.status()["backend_reachable"], 2, "reachable again")
    await asyncio.wait_for(svc.acquire(), 5)
    svc.release()


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"services\.a\.backend: unknown backend 'kubernetes'"):
        parse_config({"services": {"a": {"container": "a", "backend": "kubernetes"}}})


def test_disabled_backend_is_a_config_error_naming_the_key() -> None:
    cfg = parse_config({"services": {"a": {"container": "a"}}})
    with pytest.raises(ConfigError, match=r"services\.a\.backend: the 'docker' backend is not"):
        Registry(cfg, {})


async def test_host_table_follows_labels_recreates_and_removals(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    published: list[dict[str, str]] = []
    lineage = "compose:proj/lab/1"
    labels = {**ON, "hestia.service": "lab", "hestia.host": "lab.example, LAB2.example."}
    backend.add("proj-lab-1", labels=labels, lineage=lineage)
    reg = await make_registry({"routing": {"subdomains": True}})
    reg._on_routes = lambda hosts, keep: published.append(hosts)
    assert reg.hosts == {
        "lab.example": "lab",
        "lab2.example": "lab",
        "lab.localhost": "lab",
    }
    # `docker compose up -d` after a label change: the new host names apply at once
    relabelled = {**labels, "hestia.host": "notebooks.example", "hestia.strip_prefix": "false"}
    await _recreate(backend, "proj-lab-1", lineage, relabelled, start=False)
    await wait_for(lambda: "notebooks.example" in reg.hosts, 5, "the new host name")
    assert reg.hosts == {"notebooks.example": "lab", "lab.localhost": "lab"}
    assert reg._keep_prefix == {"lab"}
    assert published[-1] == reg.hosts
    # removed with no replacement: its host names go with it (after the grace)
    inst = backend.get(reg.get("lab").instance_id)
    await backend.remove(inst.id)
    await wait_for(lambda: "lab" not in reg, 5, "the removal")
    assert reg.hosts == {} and published[-1] == {}


async def test_two_labelled_services_claiming_one_host_name_conflict(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    backend.add("a", labels={**ON, "hestia.host": "shared.example, a.example"})
    reg = await make_registry({"routing": {"subdomains": True}})
    backend.add("b", labels={**ON, "hestia.host": "shared.example"})
    await wait_for(lambda: "b" in reg, 2, "the second service")
    # the one that has it keeps it; the other is told why, in its status
    assert reg.hosts["shared.example"] == "a"
    assert reg.hosts["b.localhost"] == "b"  # the rest of b's names still work
    conflicts = reg.get("b").status()["conflicts"]
    assert [c["instance"] for c in conflicts] == ["host shared.example"]
    assert "which service 'a' has" in conflicts[0]["reason"]
    assert reg.get("a").status()["conflicts"] == []
    # a goes: b gets the name, and its conflict is gone
    await backend.remove("a")
    await wait_for(lambda: reg.hosts.get("shared.example") == "b", 5, "b to take the name")
    assert reg.get("b").status()["conflicts"] == []


async def test_config_host_beats_a_label_and_a_label_beats_a_subdomain_name(
    backend: MemoryBackend, make_registry: Callable[..., Any]
) -> None:
    backend.add("squatter", labels={**ON, "hestia.host": "lab.example, web.localhost"})
    reg = await make_registry(
        {
            "routing": {"subdomains": True},
            "services": {
                "lab": {"url": "http://127.0.0.1:1", "hosts": ["lab.example"]},
                "web": {"url": "http://127.0.0.1:2"},
            },
        }
    )
    assert reg.hosts["lab.example"] == "lab"
    assert reg.hosts["web.localhost"] == "squatter"  # an explicit name over a derived one
    assert {c["instance"] for c in reg.get("squatter").status()["conflicts"]} == {
        "host lab.example"
    }
    assert {c["instance"] for c in reg.get("web").status()["conflicts"]} == {"host web.localhost"}
