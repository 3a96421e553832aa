"""Several Docker engines and the swarm backend in the config (endpoints, backend keys, errors
naming the key), how backends are built from it (nothing connects: an engine that is down
does not stop start-up), and the registry's side on the memory backend: a backend that
cannot be listed at start-up, and an instance its backend refuses to manage. The real engines
are in test_endpoints_docker.py and test_swarm_docker.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from hestia.backends import build_backends
from hestia.backends.base import InstanceInfo
from hestia.backends.memory import MemoryBackend, MemoryInstance
from hestia.config import backend_key, parse_config
from hestia.errors import BackendError, BackendUnreachable, ConfigError, ServiceStartFailed
from hestia.registry import Registry
from tests.conftest import wait_for

ON = {"hestia.enable": "true"}
ENDPOINTS = {
    "local": "unix:///var/run/docker.sock",
    "gpu": "ssh://user@gpubox",
    "nas": {
        "url": "tcp://nas:2376",
        "tls": {"ca": "/certs/ca.pem", "cert": "/certs/cert.pem", "key": "/certs/key.pem"},
    },
}


def _cfg(**services: Any) -> dict[str, Any]:
    return {"docker": {"endpoints": dict(ENDPOINTS)}, "services": services}


def test_endpoints_and_backend_keys() -> None:
    cfg = parse_config(
        _cfg(
            here={"container": "here"},
            also_here={"container": "x", "endpoint": "local"},
            ollama={"container": "ollama", "endpoint": "gpu"},
            media={"container": "jellyfin", "endpoint": "nas"},
        )
    )
    assert cfg.default_endpoint == "local"  # the first one listed
    assert cfg.docker.endpoints["gpu"].url == "ssh://user@gpubox"
    nas = cfg.docker.endpoints["nas"]
    assert nas.tls is not None and nas.tls.cert == "/certs/cert.pem"
    keys = {name: spec.backend_key for name, spec in cfg.static_services().items()}
    # the default endpoint is plain `docker`, however it is named
    assert keys == {
        "here": "docker",
        "also_here": "docker",
        "ollama": "docker@gpu",
        "media": "docker@nas",
    }
    # a labelled instance found on an endpoint carries it
    found = cfg.resolve("llm", ON, instance="llm-1", backend="docker@gpu")
    assert (found.backend, found.endpoint, found.backend_key) == ("docker", "gpu", "docker@gpu")
    assert backend_key("swarm", None) == "swarm" and backend_key(None, None) is None
    # without endpoints: the local engine, named `local`
    assert parse_config({}).default_endpoint == "local"


def test_unknown_endpoint_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"services\.a\.endpoint: unknown endpoint 'gpu2'; endpoints: local, gpu"
    ):
        parse_config(_cfg(a={"container": "a", "endpoint": "gpu2"}))
    with pytest.raises(ConfigError, match=r"swarm\.endpoint: unknown endpoint 'mgr'"):
        parse_config({**_cfg(), "swarm": {"enabled": True, "endpoint": "mgr"}})


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {"docker": {"endpoints": {"x": "http//oops"}}},
            r"docker\.endpoints\.x\.url: 'http//oops' is not a Docker engine address",
        ),
        (
            {"docker": {"endpoints": {"x": {"url": "tcp://h:2376", "tls": {"cert": "c"}}}}},
            r"docker\.endpoints\.x\.tls: .*`cert` and `key` go together",
        ),
        (
            {"docker": {"endpoints": {"bad name": "tcp://h:2375"}}},
            r"docker\.endpoints\.bad name: an endpoint name uses letters",
        ),
        (
            {
                "docker": {"endpoints": {"a": "tcp://a:2375", "b": "tcp://b:2375"}},
                "services": {"s": {"container": "s", "backend": "swarm", "endpoint": "b"}},
            },
            r"services\.s: `endpoint` is for backend docker only",
        ),
    ],
)
def test_endpoint_config_errors(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_swarm_service_config() -> None:
    cfg = parse_config(
        {
            "swarm": {"enabled": True},
            "services": {"web": {"backend": "swarm", "container": "stack_web", "replicas": 2}},
        }
    )
    spec = cfg.static_services()["web"]
    assert (spec.backend_key, spec.instance, spec.replicas) == ("swarm", "stack_web", 2)
    labelled = cfg.resolve("api", {**ON, "hestia.replicas": "3"}, instance="s", backend="swarm")
    assert labelled.replicas == 3


async def test_build_backends_connects_to_nothing() -> None:
    """Endpoints that cannot answer (nothing listens there) still make backends: start-up
    goes on and their services are unreachable until they answer."""
    cfg = parse_config(
        {
            "docker": {"endpoints": {"one": "tcp://127.0.0.1:9", "two": "tcp://127.0.0.1:7"}},
            "swarm": {"enabled": True, "endpoint": "two"},
        }
    )
    backends = build_backends(cfg)
    try:
        assert sorted(backends) == ["docker", "docker@two", "swarm"]
        assert backends["docker@two"].name == "docker@two"
        with pytest.raises(BackendError, match=r"cannot reach Docker endpoint 'one'"):
            await backends["docker"].discover()
        with pytest.raises(BackendError, match=r"cannot reach Docker endpoint 'two'"):
            await backends["swarm"].discover()
    finally:
        for b in backends.values():
            await b.close()
    assert build_backends(parse_config({"docker": {"enabled": False}})) == {}


class _Flaky(MemoryBackend):
    """A memory backend whose listing fails while `down` (an engine down at start-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.down: str | None = "connection refused"
        self.refuse: dict[str, str] = {}

    async def discover(self) -> list[InstanceInfo]:
        if self.down:
            raise BackendError(f"listing labelled containers failed: {self.down}")
        return await super().discover()

    def _info(self, inst: MemoryInstance) -> InstanceInfo:
        info = super()._info(inst)
        return replace(info, refused=self.refuse.get(inst.name, ""))

    async def start(self, ref: str, spec: Any) -> None:
        why = self.refuse.get(self.get(ref).name)
        if why:
            raise ServiceStartFailed(why, service=spec.name)
        await super().start(ref, spec)


@pytest.fixture
async def flaky() -> AsyncIterator[_Flaky]:
    b = _Flaky()
    yield b
    await b.close()


async def test_backend_down_at_start_up_does_not_stop_the_registry(flaky: _Flaky) -> None:
    flaky.add("web", labels=ON)
    raw = {
        "docker": {"reconcile_interval": 0},
        "services": {
            "named": {"backend": "memory", "container": "named"},
            "plain": {"url": "http://127.0.0.1:9"},
        },
    }
    flaky.add("named")
    reg = Registry(parse_config(raw), {"memory": flaky})
    try:
        await asyncio.wait_for(reg.start(), 5)  # no raise: started without the backend
        named = reg.get("named")
        assert not named.status()["backend_reachable"]
        assert reg.get("plain").status()["backend_reachable"]
        with pytest.raises(BackendUnreachable, match="connection refused") as exc:
            await named.acquire()
        assert exc.value.status == 503
        assert "web" not in reg  # its labels are not known yet
        flaky.down = None
        flaky.reconnect()  # what the events pump says when the engine answers again
        await wait_for(lambda: "web" in reg, 3, "the labelled instance, once listed")
        assert named.status()["backend_reachable"]
        assert reg.get("web").status()["backend_reachable"]
        # a failed listing later (the periodic reconcile) marks them again, a good one clears
        flaky.down = "timed out"
        with pytest.raises(BackendError):
            await reg.reconcile("memory")
        assert not reg.get("web").status()["backend_reachable"]
        flaky.down = None
        await reg.reconcile("memory")
        assert reg.get("web").status()["backend_reachable"]
    finally:
        await reg.close()


async def test_refused_instance_shows_why_and_is_never_started(flaky: _Flaky) -> None:
    flaky.down = None
    why = "Swarm service g runs in global mode: ... it is not managed"
    flaky.refuse["g"] = why
    flaky.add("g", labels=ON)
    reg = Registry(parse_config({"docker": {"reconcile_interval": 0}}), {"memory": flaky})
    try:
        await reg.start()
        svc = reg.get("g")
        assert svc.status()["conflicts"] == [{"instance": "g", "reason": why}]
        with pytest.raises(ServiceStartFailed, match="global mode") as exc:
            await asyncio.wait_for(svc.acquire(), 5)
        assert exc.value.status == 503
        assert flaky.count("start") == 0 and not flaky.get("g").running
    finally:
        await reg.close()
