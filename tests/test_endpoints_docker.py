"""Two Docker endpoints that are really separate: this machine's engine, and a second `dockerd`
started here with its own data root, socket, containerd and bridge, reached over TCP through a
small relay the test can cut (the endpoint goes away: its events stream breaks and every call
fails) and restore.

Checked through a real gateway built by `build_backends` from `docker.endpoints`: a service on
each engine starts on demand; with the second endpoint cut off its services report unreachable
(status and 503 backend_unreachable for one that must be started) while the first keeps
answering; restored, it works again. And an endpoint that is down when Hestia starts does not
stop it: its services are unreachable until it answers, then found.

The second daemon gets a bridge of its own (`-b`), never `--bridge=none`: a daemon without a
bridge deletes the host's `docker0`, which the first engine's containers use."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hestia.backends import build_backends
from hestia.config import parse_config
from tests.conftest import (
    RUN_ID,
    TEST_LABEL,
    ContainerFactory,
    free_port,
    new_scope,
    scoped_labels,
    wait_for,
)

pytestmark = pytest.mark.docker


class Relay:
    """127.0.0.1:port -> a unix socket; `cut()` closes the port and every connection through
    it (as a host going away), `restore()` listens on the same port again."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class SecondEngine:
    """A second dockerd: its own data root, exec root, socket, pid file, containerd and bridge;
    no iptables (published ports go through its userland proxy)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hestia-d2-"))
        self.socket = str(self.root / "docker.sock")
        self.bridge = f"hst{RUN_ID[:6]}{uuid.uuid4().hex[:4]}"  # at most 15 characters
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None

    def _free_subnet(self) -> str:
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        for _ in range(50):
            subnet = f"10.213.{random.randrange(1, 250)}"
            if f"{subnet}." not in routes:
                return subnet
        raise RuntimeError("no free 10.213.x.0/24 for the second engine's bridge")

    def start(self) -> None:
        import docker

        if shutil.which("dockerd") is None:
            pytest.fail("dockerd is not installed; the second engine needs it")
        subnet = self._free_subnet()
        for cmd in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{subnet}.1/24", "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        (self.root / "daemon.json").write_text("{}")  # not /etc/docker/daemon.json
        options = {
            "--config-file": self.root / "daemon.json",
            "--data-root": self.root / "data",
            "--exec-root": self.root / "exec",
            "--pidfile": self.root / "docker.pid",
            "--host": f"unix://{self.socket}",
            "--bridge": self.bridge,
            "--log-level": "warn",
        }
        args = [f"{key}={value}" for key, value in options.items()]
        no_firewall = ["--iptables=false", "--ip6tables=false", "--ip-masq=false"]
        with open(self.root / "dockerd.log", "wb") as log:  # the daemon keeps its own copy
            self.proc = subprocess.Popen(["dockerd", *args, *no_firewall], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        # docker-py leaks the socket of a refused connect: knock with one of our own first
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"the second dockerd did not come up:\n{tail}")
            time.sleep(0.2)
        self.client = docker.DockerClient(base_url=f"unix://{self.socket}", timeout=30)
        self.client.ping()

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket)
            except OSError:
                return False
            probe.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return probe.recv(64).startswith(b"HTTP/1.")

    def load(self, source: Any, tag: str) -> None:
        data = b"".join(source.images.get(tag).save(named=True))
        self.client.images.load(data)

    def stop(self) -> None:
        if self.client is not None:
            for c in self.client.containers.list(all=True):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
            self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        mounts = Path("/proc/mounts").read_text().splitlines()
        for mount in sorted((m.split()[1] for m in mounts), reverse=True):
            if mount.startswith(str(self.root)):
                subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def second_engine(docker_client: Any, busybox_image: str) -> Iterator[SecondEngine]:
    if os.geteuid() != 0:
        pytest.skip("a second dockerd needs root")
    engine = SecondEngine()
    try:
        engine.start()
        engine.load(docker_client, busybox_image)
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def relay(second_engine: SecondEngine) -> Iterator[Relay]:
    r = Relay(second_engine.socket)
    try:
        yield r
    finally:
        r.cut()


def _far(engine: SecondEngine, image: str, scope: str, name: str) -> Any:
    return engine.client.containers.create(
        image,
        name=f"hestia-t-{RUN_ID}-{name}-{uuid.uuid4().hex[:6]}",
        labels={TEST_LABEL: RUN_ID, **scoped_labels(scope, name)},
        ports={"80/tcp": ("127.0.0.1", None)},
    )


def _config(scope: str, relay: Relay, **services: Any) -> dict[str, Any]:
    return {
        "docker": {
            "scope": scope,
            "reconcile_interval": "1s",
            "endpoints": {
                "local": "unix:///var/run/docker.sock",
                "far": f"tcp://127.0.0.1:{relay.port}",
            },
        },
        "services": services,
    }


async def _status(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get(f"/v1/services/{name}/status")).json()
    return body


async def test_one_endpoint_cut_off_the_other_keeps_answering(
    containers: ContainerFactory,
    second_engine: SecondEngine,
    relay: Relay,
    busybox_image: str,
    gateway_factory: Any,
) -> None:
    scope = new_scope()
    near = containers.create("near", labels=scoped_labels(scope, "near"))
    far_web = _far(second_engine, busybox_image, scope, "far-web")
    far_cold = _far(second_engine, busybox_image, scope, "far-cold")
    relay.restore()
    raw = _config(scope, relay)
    backends = build_backends(parse_config(raw))
    assert sorted(backends) == ["docker", "docker@far"]
    gw = await gateway_factory(raw, backends)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
        for name in ("near", "far-web"):
            r = await client.get(f"/services/{name}/")
            assert r.status_code == 200, (name, r.text)
        far_status = await _status(client, "far-web")
        assert far_status["backend"] == "docker@far"  # found by its labels, on that endpoint
        assert far_status["container"] == far_web.name
        far_web.reload()
        assert far_web.status == "running"  # on the second engine, not this one
        assert (await _status(client, "near"))["backend"] == "docker"
        assert (await _status(client, "far-cold"))["state"] == "stopped"

        relay.cut()

        async def far_unreachable() -> bool:
            statuses = [await _status(client, n) for n in ("far-web", "far-cold")]
            return not any(s["backend_reachable"] for s in statuses)

        await wait_for(far_unreachable, 20, "the far endpoint's services to be unreachable")
        assert (await _status(client, "near"))["backend_reachable"]
        r = await client.get("/services/far-cold/")
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "backend_unreachable" and err["service"] == "far-cold"
        assert "docker@far" in err["message"]
        # the other endpoint goes on: a ready service, and a start
        assert (await client.get("/services/near/")).status_code == 200
        stop = await client.post("/v1/services/near/stop")
        assert stop.status_code == 200
        await wait_for(lambda: containers.state(near) == "exited", 20, "near to stop")
        r = await client.get("/services/near/")
        assert r.status_code == 200, r.text

        relay.restore()

        async def far_back() -> bool:
            return bool((await _status(client, "far-cold"))["backend_reachable"])

        await wait_for(far_back, 30, "the far endpoint to be reachable again")
        r = await client.get("/services/far-cold/")
        assert r.status_code == 200, r.text
        far_cold.reload()
        assert far_cold.status == "running"


async def test_endpoint_down_at_start_up_does_not_stop_hestia(
    second_engine: SecondEngine, relay: Relay, busybox_image: str, gateway_factory: Any
) -> None:
    scope = new_scope()
    late = _far(second_engine, busybox_image, scope, "late")
    # the relay does not listen yet: the endpoint is down when the gateway starts
    # a config-named container (no labels of this scope) on the far endpoint
    named = _far(second_engine, busybox_image, "other-scope", "named")
    raw = _config(scope, relay, named={"container": named.name, "endpoint": "far", "port": 80})
    gw = await gateway_factory(raw, build_backends(parse_config(raw)))
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
        status = await _status(client, "named")
        assert status["backend"] == "docker@far" and not status["backend_reachable"]
        r = await client.get("/services/named/")
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unreachable"
        assert "late" not in gw.gateway.registry  # its labels cannot be read yet
        relay.restore()
        await wait_for(lambda: "late" in gw.gateway.registry, 30, "the labelled container")
        assert (await _status(client, "named"))["backend_reachable"]
        r = await client.get("/services/named/")
        assert r.status_code == 200, r.text
        r = await client.get("/services/late/")
        assert r.status_code == 200, r.text
        late.reload()
        assert late.status == "running"
