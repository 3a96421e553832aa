"""The swarm backend against this machine's engine in single-node swarm mode, through a real
gateway: a labelled Swarm service with 0 replicas started by a request (scale 0 -> 1) and
scaled back to 0 when idle, a service whose image is missing (a clear 503 at once), a
global-mode service (refused, and said so), and a service labelled after Hestia started
(found through the service events).

The engine joins a swarm only for these tests, and leaves it afterwards, unless it was in one
already: several test runs may share the engine, so the runs that use the swarm register in a
directory under a lock, and the last one out leaves, if a test run made it join. Services are
published in `mode: host` (the ingress routing mesh needs IPVS, which this kernel lacks) from
the locally built busybox image (no registry: the image must be on the node)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hestia.backends.docker import DockerEngine
from hestia.backends.swarm import SwarmBackend
from tests.conftest import RUN_ID, TEST_LABEL, free_port, new_scope, scoped_labels, wait_for

pytestmark = pytest.mark.docker

_STATE = Path(tempfile.gettempdir()) / "hestia-test-swarm"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    _STATE.mkdir(exist_ok=True)
    with open(_STATE / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_our_services(client: Any) -> None:
    for svc in client.services.list(filters={"label": f"{TEST_LABEL}={RUN_ID}"}):
        with contextlib.suppress(Exception):
            svc.remove()


@pytest.fixture(scope="session")
def swarm_mode(docker_client: Any) -> Iterator[None]:
    me = _STATE / f"user-{os.getpid()}"
    with _locked():
        state = docker_client.info()["Swarm"]["LocalNodeState"]
        if state == "inactive":
            had_gwbridge = bool(docker_client.networks.list(names=["docker_gwbridge"]))
            docker_client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
            (_STATE / "joined").write_text(json.dumps({"had_gwbridge": had_gwbridge}))
        elif state != "active":
            pytest.fail(f"the engine's swarm state is {state!r}; expected inactive or active")
        me.touch()
    try:
        yield
    finally:
        _remove_our_services(docker_client)
        with _locked():
            me.unlink(missing_ok=True)
            users = [p for p in _STATE.glob("user-*") if _alive(int(p.name[5:]))]
            joined = _STATE / "joined"
            if not users and joined.exists():
                had_gwbridge = json.loads(joined.read_text())["had_gwbridge"]
                deadline = time.monotonic() + 20
                # a task's container may still be going: leaving under it can fail
                while True:
                    try:
                        docker_client.swarm.leave(force=True)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                joined.unlink()
                if not had_gwbridge:
                    with contextlib.suppress(Exception):
                        for net in docker_client.networks.list(names=["docker_gwbridge"]):
                            net.remove()


class SwarmServices:
    def __init__(self, client: Any, image: str) -> None:
        self.client = client
        self.image = image
        self.created: list[Any] = []

    def create(
        self,
        hint: str,
        labels: dict[str, str],
        *,
        replicas: int | None = 0,
        image: str | None = None,
        publish: int | None = None,
        container_labels: dict[str, str] | None = None,
    ) -> Any:
        import docker.types

        name = f"hestia-t-{RUN_ID}-{hint}-{uuid.uuid4().hex[:6]}"
        mode = (
            docker.types.ServiceMode("replicated", replicas=replicas)
            if replicas is not None
            else docker.types.ServiceMode("global")
        )
        endpoint = (
            docker.types.EndpointSpec(ports={publish: (80, "tcp", "host")})
            if publish is not None
            else None
        )
        svc = self.client.services.create(
            image or self.image,
            name=name,
            labels={TEST_LABEL: RUN_ID, **labels},
            container_labels={TEST_LABEL: RUN_ID, **(container_labels or {})},
            mode=mode,
            endpoint_spec=endpoint,
            # no restart storm of a failing task while the test looks at it
            restart_policy=docker.types.RestartPolicy(condition="on-failure", delay=2_000_000_000),
        )
        self.created.append(svc)
        return svc

    def replicas(self, svc: Any) -> int | None:
        svc.reload()
        replicated = svc.attrs["Spec"]["Mode"].get("Replicated")
        return None if replicated is None else int(replicated.get("Replicas", 0))

    def running_tasks(self, svc: Any) -> int:
        return sum(
            1
            for t in svc.tasks()
            if t["DesiredState"] == "running" and t["Status"]["State"] == "running"
        )

    def live_tasks(self, svc: Any) -> int:
        ended = {"complete", "shutdown", "failed", "rejected", "remove", "orphaned"}
        return sum(1 for t in svc.tasks() if t["Status"]["State"] not in ended)

    def cleanup(self) -> None:
        for svc in self.created:
            with contextlib.suppress(Exception):
                svc.remove()


@pytest.fixture
def swarm_services(
    swarm_mode: None, docker_client: Any, busybox_image: str
) -> Iterator[SwarmServices]:
    made = SwarmServices(docker_client, busybox_image)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def swarm_backend(swarm_mode: None) -> Any:
    return SwarmBackend(DockerEngine())  # the gateway closes it


def _cfg(scope: str, reconcile: str = "1s") -> dict[str, Any]:
    return {
        "docker": {"enabled": False, "scope": scope, "reconcile_interval": reconcile},
        "swarm": {"enabled": True},
    }


async def test_cold_start_by_scaling_up_then_idle_scale_down(
    swarm_services: SwarmServices, gateway_factory: Any, swarm_backend: Any
) -> None:
    scope = new_scope()
    port = free_port()
    svc = swarm_services.create("web", scoped_labels(scope, "web", idle_timeout="2s"), publish=port)
    gw = await gateway_factory(_cfg(scope), {"swarm": swarm_backend})
    assert gw.service("web").state == "stopped"
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
        r = await client.get("/services/web/index.html")
        assert r.status_code == 200, r.text
        assert r.text == "hello from busybox\n"
        assert swarm_services.replicas(svc) == 1
        status = (await client.get("/v1/services/web/status")).json()
        assert status["state"] == "ready" and status["backend"] == "swarm"
        assert status["container"] == svc.name
        assert status["upstream"] == f"http://127.0.0.1:{port}"  # host mode: the node's address
        # idle: scaled back to 0, and its task ends
        await wait_for(lambda: swarm_services.replicas(svc) == 0, 20, "the scale-down to 0")
        await wait_for(lambda: gw.service("web").state == "stopped", 20, "state stopped")
        assert swarm_services.live_tasks(svc) == 0
        assert gw.service("web").last_stop["cause"] == "idle"
        # and the next request scales it up again
        r = await client.get("/services/web/")
        assert r.status_code == 200
        assert swarm_services.running_tasks(svc) == 1


async def test_missing_image_is_a_clear_503(
    swarm_services: SwarmServices, gateway_factory: Any, swarm_backend: Any
) -> None:
    scope = new_scope()
    svc = swarm_services.create(
        "noimg",
        scoped_labels(scope, "noimg", startup_timeout="90s"),
        image=f"hestia-test-missing-{RUN_ID}:none",
        publish=free_port(),
    )
    gw = await gateway_factory(_cfg(scope), {"swarm": swarm_backend})
    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as client:
        t0 = time.monotonic()
        r = await client.get("/services/noimg/")
        took = time.monotonic() - t0
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "start_failed" and err["service"] == "noimg"
        assert "No such image" in err["message"], err["message"]
        assert "scaled it back to 0" in err["message"]
        assert took < 60  # the task's verdict, not the 90 s startup_timeout
        status = (await client.get("/v1/services/noimg/status")).json()
        assert status["state"] == "failed"
        assert "No such image" in status["last_error"]["message"]
    assert swarm_services.replicas(svc) == 0  # Swarm no longer retries it


async def test_global_mode_is_refused_and_said_so(
    swarm_services: SwarmServices, gateway_factory: Any, swarm_backend: Any
) -> None:
    scope = new_scope()
    svc = swarm_services.create(
        "everywhere", scoped_labels(scope, "everywhere", port=None), replicas=None
    )
    version = svc.attrs["Version"]["Index"]
    gw = await gateway_factory(_cfg(scope), {"swarm": swarm_backend})
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        status = (await client.get("/v1/services/everywhere/status")).json()
        [conflict] = status["conflicts"]
        assert conflict["instance"] == svc.name
        assert "global mode" in conflict["reason"] and "not managed" in conflict["reason"]
        r = await client.get("/services/everywhere/")
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "start_failed" and "global mode" in err["message"]
    svc.reload()
    assert svc.attrs["Version"]["Index"] == version  # never touched
    assert "Global" in svc.attrs["Spec"]["Mode"]


async def test_a_tasks_labelled_container_is_left_to_swarm(
    swarm_services: SwarmServices, swarm_mode: None
) -> None:
    """hestia.* labels on a Swarm task's container (`labels:` instead of `deploy.labels`):
    the Docker backend must not start or stop it behind Swarm's back."""
    from hestia.backends.docker import DockerBackend

    scope = new_scope()
    svc = swarm_services.create(
        "tasklabels", {}, replicas=1, container_labels=scoped_labels(scope, "t", port=None)
    )
    await wait_for(lambda: swarm_services.running_tasks(svc) == 1, 30, "a running task")
    backend = DockerBackend()
    try:
        found = await backend.discover()
    finally:
        await backend.close()
    assert not [i for i in found if i.labels.get("hestia.scope") == scope]


async def test_service_labelled_later_is_found_by_its_event(
    swarm_services: SwarmServices, gateway_factory: Any, swarm_backend: Any
) -> None:
    scope = new_scope()
    # no periodic reconcile: only the events can tell
    gw = await gateway_factory(_cfg(scope, reconcile="0"), {"swarm": swarm_backend})
    assert "late" not in gw.gateway.registry
    svc = swarm_services.create("late", scoped_labels(scope, "late"), publish=free_port())
    await wait_for(lambda: "late" in gw.gateway.registry, 10, "the service from its event")
    assert gw.service("late").status()["container"] == svc.name
    svc.remove()
    await wait_for(lambda: "late" not in gw.gateway.registry, 10, "its removal")
