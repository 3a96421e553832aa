"""Shared fixtures: a real Docker engine, a busybox test image built here, a gateway served by a
real uvicorn on 127.0.0.1, and helpers that wait for events with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml

from hestia.config import load_config, parse_config
from hestia.logs import setup_logging
from hestia.server import build_server

TEST_LABEL = "hestia.test"
RUN_ID = uuid.uuid4().hex[:8]

os.environ.setdefault("HESTIA_STRICT", "1")  # an impossible lifecycle transition raises
setup_logging("text", os.environ.get("HESTIA_TEST_LOG_LEVEL", "WARNING"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `predicate` every 20 ms until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_http_ok(client: Any, path: str, timeout: float = 30.0) -> None:
    """Wait until `GET path` answers 200 (a gateway process coming up)."""
    import httpx

    async def ok() -> bool:
        try:
            return bool((await client.get(path)).status_code == 200)
        except httpx.TransportError:
            return False

    await wait_for(ok, timeout, f"GET {path} to answer 200")


# ------------------------------------------------------------------ docker
_STREAM_CGI = """#!/bin/sh
echo "Content-Type: application/x-ndjson"
echo ""
i=0
n=${QUERY_STRING:-5}
while [ $i -lt $n ]; do echo "{\\"i\\":$i}"; i=$((i+1)); sleep 0.2; done
"""

_ENTRY = """#!/bin/sh
# DELAY: seconds before the web server listens; EXIT_CODE: exit instead of serving
sleep "${DELAY:-0}"
if [ -n "$EXIT_CODE" ]; then echo "simulated failure, exiting $EXIT_CODE"; exit "$EXIT_CODE"; fi
touch /tmp/up
exec httpd -f -p "${PORT:-80}" -h /www
"""


def _docker_client() -> Any:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Docker is required in CI and is not reachable: {exc}")
        pytest.skip(f"Docker not reachable: {exc}")
    return client


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    client = _docker_client()
    yield client
    for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"}):
        c.remove(force=True)
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: Any) -> str:
    """FROM scratch + Debian's static busybox: httpd with a start delay, and a streaming CGI."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        pytest.fail("busybox-static is not installed (apt-get install busybox-static)")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp)
        shutil.copy(busybox, ctx / "busybox")
        (ctx / "www" / "cgi-bin").mkdir(parents=True)
        (ctx / "www" / "index.html").write_text("hello from busybox\n")
        (ctx / "www" / "cgi-bin" / "stream").write_text(_STREAM_CGI)
        (ctx / "www" / "cgi-bin" / "stream").chmod(0o755)
        (ctx / "entry.sh").write_text(_ENTRY)
        (ctx / "entry.sh").chmod(0o755)
        (ctx / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            'RUN ["/bin/mkdir", "-p", "/tmp"]\n'
            "COPY www /www\n"
            "COPY entry.sh /entry.sh\n"
            f'LABEL {TEST_LABEL}="image"\n'
            "EXPOSE 80\n"
            "STOPSIGNAL SIGKILL\n"
            'CMD ["/entry.sh"]\n'
        )
        digest = hashlib.sha256(
            b"".join(p.read_bytes() for p in sorted(ctx.rglob("*")) if p.is_file())
        ).hexdigest()[:12]
        tag = f"hestia-test-busybox:{digest}"
        try:
            docker_client.images.get(tag)
        except Exception:
            docker_client.images.build(path=str(ctx), tag=tag, rm=True)
    return tag


def new_scope() -> str:
    """A fresh `docker.scope` for one test: the gateway manages only what carries it, so
    leftovers of earlier runs on the engine are never touched."""
    return "t-" + uuid.uuid4().hex[:8]


def scoped_labels(scope: str, name: str, port: str | None = "80", **extra: str) -> dict[str, str]:
    """Labels that opt a test container in as service `name` of gateway `scope`; `extra`
    keys are label names after `hestia.`, with `__` for a dot (`idle__auto`)."""
    labels = {"hestia.enable": "true", "hestia.scope": scope, "hestia.service": name}
    if port is not None:
        labels["hestia.port"] = port
    labels.update({f"hestia.{k.replace('__', '.')}": v for k, v in extra.items()})
    return labels


class ContainerFactory:
    def __init__(self, client: Any, image: str) -> None:
        self.client = client
        self.image = image
        self.created: list[Any] = []

    def name(self, hint: str) -> str:
        return f"hestia-t-{RUN_ID}-{hint}-{uuid.uuid4().hex[:6]}"

    def create(
        self,
        hint: str = "svc",
        *,
        labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        healthcheck: dict[str, Any] | None = None,
        publish: bool = True,
        start: bool = False,
    ) -> Any:
        all_labels = {TEST_LABEL: RUN_ID, **(labels or {})}
        container = self.client.containers.create(
            self.image,
            name=self.name(hint),
            labels=all_labels,
            environment=env or {},
            healthcheck=healthcheck,
            ports={"80/tcp": ("127.0.0.1", None)} if publish else None,
        )
        self.created.append(container)
        if start:
            container.start()
        return container

    def state(self, container: Any) -> str:
        container.reload()
        return str(container.attrs["State"]["Status"])

    def cleanup(self) -> None:
        for c in self.created:
            try:
                c.remove(force=True)
            except Exception:
                pass


@pytest.fixture
def containers(docker_client: Any, busybox_image: str) -> Iterator[ContainerFactory]:
    factory = ContainerFactory(docker_client, busybox_image)
    try:
        yield factory
    finally:
        factory.cleanup()


# ------------------------------------------------------------------ gateway
class RunningGateway:
    def __init__(
        self, gateway: Any, server: uvicorn.Server, task: asyncio.Task[None], port: int
    ) -> None:
        self.gateway = gateway
        self.server = server
        self.task = task
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """A clean shutdown, as on SIGTERM."""
        self.gateway.begin_shutdown()
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 20)

    def service(self, name: str) -> Any:
        return self.gateway.registry.get(name)


@pytest.fixture
async def gateway_factory(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Start a real gateway (uvicorn on 127.0.0.1:random) with a config dict and a backend.

    Each gateway gets its own SQLite file in the test's tmp_path unless the config names one."""
    from hestia.app import Gateway

    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(
        raw_config: dict[str, Any], backend: Any = None, config_path: Path | None = None
    ) -> RunningGateway:
        """`backend`: a backend, a {name: backend} mapping, or None (plain urls only).
        `config_path`: the config is written there as YAML and the gateway watches it."""
        raw_config.setdefault("docker", {}).setdefault("enabled", backend is not None)
        raw_config.setdefault("database", {"url": f"sqlite:///{tmp_path}/hestia-{len(running)}.db"})
        if config_path is not None:
            config_path.write_text(yaml.safe_dump(raw_config))  # noqa: ASYNC240 - tiny, once
            config = load_config(config_path)
        else:
            config = parse_config(raw_config, source="test")
        gateway = Gateway(config, backend, config_path=config_path)
        port = free_port()
        # the same server and protocol class as `hestia serve` (loop choice aside: the test's
        # event loop is used)
        server = build_server(gateway, "127.0.0.1", port, shutdown_grace=5)
        task = asyncio.create_task(server.serve())
        running.append((server, task))
        await wait_for(lambda: server.started or task.done(), 20, "the gateway to listen")
        if task.done():
            task.result()
        return RunningGateway(gateway, server, task, port)

    yield start
    for server, _ in running:
        server.should_exit = True
    for _, task in running:
        if task.done():
            continue
        try:
            await asyncio.wait_for(task, 15)
        except Exception:
            task.cancel()


@pytest.fixture
def docker_backend(docker_client: Any) -> Iterator[Any]:
    from hestia.backends.docker import DockerBackend

    backend = DockerBackend()
    yield backend


def tagged_pids(tag: str) -> list[int]:
    """The processes (other than this one) whose command line carries `tag`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if tag.encode() in cmdline:
                pids.append(int(entry))
    return pids


@pytest.fixture
def tag(tmp_path: Path) -> Iterator[str]:
    """A marker for a test's host processes (put it in their command line); whatever still
    carries it at the end is killed."""
    marker = f"hestia-test-{tmp_path.name}-{os.getpid()}"
    yield marker
    for pid in tagged_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[int]:
    """`app` served by uvicorn on 127.0.0.1 while in the block; yields its port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started, 10, "upstream server")
    try:
        yield port
    finally:
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Any, int]]:
    """tests/test_proxy.py's recording `UpstreamApp` served by uvicorn on 127.0.0.1."""
    from tests.test_proxy import UpstreamApp

    app = UpstreamApp()
    async with serve_asgi(app) as port:
        yield app, port
