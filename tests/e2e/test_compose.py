"""The image and the root docker-compose.yml, end to end on the real Docker engine.

What a person does after `docker compose up -d`, done by the test: the image is built from the
real Dockerfile (offline: a debootstrapped base image and wheels built on the host, see
scripts/build-offline-image.sh), the root compose file runs with an override that only swaps
the images, the host port and the demo's idle timeout, and every check goes through the
gateway's port. Waits poll with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
ROOT_COMPOSE = REPO / "docker-compose.yml"
COMPOSE_FILES = [ROOT_COMPOSE, *sorted((REPO / "compose").glob("*.yml"))]
# The secrets that some compose/ variants refuse to start without.
COMPOSE_SECRETS = {
    "JUPYTER_TOKEN": "e2e",
    "SEMAPHORE_ADMIN_PASSWORD": "e2e",
    "SEMAPHORE_ACCESS_KEY_ENCRYPTION": "e2e",
    "SEMAPHORE_DB_PASSWORD": "e2e",
}
BASE_IMAGE = os.environ.get("HESTIA_E2E_BASE_IMAGE", "hestia-test-base:bookworm")
IMAGE = "hestia:e2e"
DEMO_IMAGE = "hestia-e2e-demo:latest"
DEMO = "whoami"  # the demo service of docker-compose.yml
OLLAMA = "ollama"
DEMO_IDLE_S = 3
PROJECT_LABEL = "com.docker.compose.project"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def run(cmd: list[str], timeout: float = 120, **kwargs: Any) -> str:
    """Run a command; on failure, fail with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{output}")
    return str(proc.stdout)


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, why: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{why()}")
        time.sleep(0.1)


def host_port() -> int:
    """8080 as in the README when it is free, else any free port."""
    for port in (8080, 0):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise AssertionError("no free port")


def http_get(url: str, timeout: float = 60) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def inspect(ref: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(run(["docker", "inspect", ref]))
    return data[0]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def docker() -> None:
    if shutil.which("docker") is None:
        _unavailable("the docker CLI is not installed")
    proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        _unavailable(f"the Docker engine is not reachable: {proc.stderr.strip()}")


@pytest.fixture(scope="session")
def compose(docker: None) -> list[str]:
    """docker-compose (v1) when installed, else the `docker compose` plugin (v2)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    _unavailable("neither docker-compose nor the docker compose plugin is installed")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def hestia_image(docker: None) -> str:
    """The real Dockerfile, built offline (the base image is cached between runs)."""
    env = {**os.environ, "BASE_IMAGE": BASE_IMAGE, "PYTHON": sys.executable}
    run(["bash", str(REPO / "scripts" / "build-offline-image.sh"), IMAGE], timeout=1200, env=env)
    return IMAGE


@pytest.fixture(scope="session")
def demo_image(docker: None) -> str:
    """A stand-in for traefik/whoami: FROM scratch + Debian's static busybox httpd."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.fail("busybox-static is not installed (apt-get install busybox-static)")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp)
        shutil.copy(busybox, ctx / "busybox")
        (ctx / "www").mkdir()
        (ctx / "www" / "index.html").write_text("hello from the hestia e2e demo\n")
        (ctx / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            "COPY www /www\n"
            "EXPOSE 80\n"
            # httpd as PID 1 ignores SIGTERM: without this every stop waits 10 s for SIGKILL.
            "STOPSIGNAL SIGKILL\n"
            'ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"]\n'
        )
        run(["docker", "build", "-q", "-t", DEMO_IMAGE, str(ctx)], timeout=300)
    return DEMO_IMAGE


class Stack:
    """The root compose file, running under a project name of its own."""

    def __init__(self, compose: list[str], override: Path, port: int) -> None:
        self.project = f"hestia-e2e-{uuid.uuid4().hex[:8]}"
        self.base = [*compose, "-p", self.project, "-f", str(ROOT_COMPOSE), "-f", str(override)]
        self.env = {**os.environ, "HESTIA_PORT": str(port)}
        self.url = f"http://127.0.0.1:{port}"
        self.config_file: Path | None = None

    def compose(self, *args: str, timeout: float = 180) -> str:
        return run([*self.base, *args], timeout=timeout, env=self.env, cwd=REPO)

    def container(self, service: str) -> str:
        ids = run(
            [
                "docker", "ps", "-aq",
                "--filter", f"label={PROJECT_LABEL}={self.project}",
                "--filter", f"label=com.docker.compose.service={service}",
            ]
        ).split()  # fmt: skip
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def state(self, service: str) -> str:
        return str(inspect(self.container(service))["State"]["Status"])

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "60", timeout=60)
        except AssertionError as exc:
            return str(exc)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label={PROJECT_LABEL}={self.project}"
        return {
            "containers": run(["docker", "ps", "-aq", "--filter", label]).split(),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label]).split(),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).split(),
        }

    def remove_leftovers(self) -> None:
        left = self.leftovers()
        for kind, cmd in (
            ("containers", ["docker", "rm", "-f", "-v"]),
            ("networks", ["docker", "network", "rm"]),
            ("volumes", ["docker", "volume", "rm", "-f"]),
        ):
            if left[kind]:
                subprocess.run([*cmd, *left[kind]], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def stack(
    compose: list[str], hestia_image: str, demo_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("compose")
    override = folder / "docker-compose.e2e.yml"
    # the root hestia_config.yml, in a folder of its own that the test may edit (mounted at
    # /config in place of the project folder)
    config_dir = folder / "config"
    config_dir.mkdir()
    shutil.copy(REPO / "hestia_config.yml", config_dir / "hestia_config.yml")
    override.write_text(
        "services:\n"
        "  hestia:\n"
        f"    image: {hestia_image}\n"
        "    volumes:\n"
        f"      - {config_dir}:/config:ro\n"
        f"  {DEMO}:\n"
        f"    image: {demo_image}\n"
        "    labels:\n"
        f"      hestia.idle_timeout: {DEMO_IDLE_S}s\n"
        # a stand-in for ollama/ollama (nothing can be pulled here), on Ollama's port, so
        # that the root file's labels are the ones tested
        f"  {OLLAMA}:\n"
        f"    image: {demo_image}\n"
        '    entrypoint: ["/bin/busybox", "httpd", "-f", "-p", "11434", "-h", "/www"]\n'
    )
    s = Stack(compose, override, host_port())
    s.config_file = config_dir / "hestia_config.yml"
    try:
        s.compose("up", "-d", "--no-build")
        yield s
    finally:
        try:
            s.compose("down", "-v", "--remove-orphans", "--timeout", "5")
        finally:
            s.remove_leftovers()


def _services(stack: Stack) -> list[str]:
    status, body = http_get(f"{stack.url}/v1/services", timeout=5)
    return [svc["name"] for svc in json.loads(body)["services"]] if status == 200 else []


def _gateway_up(stack: Stack) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return http_get(f"{stack.url}/v1/health", timeout=2)[0] == 200
        except OSError:
            return False

    return check


# ------------------------------------------------------------------------------------- image
def test_image_is_lean_and_runs_hestia(hestia_image: str) -> None:
    attrs = inspect(hestia_image)
    config = attrs["Config"]
    assert config["Entrypoint"] == ["hestia"]
    assert config["Cmd"] == ["serve"]
    assert config["WorkingDir"] == "/config"
    assert "/data" in (config.get("Volumes") or {})
    assert "/v1/health" in " ".join(config["Healthcheck"]["Test"])

    base_size = inspect(BASE_IMAGE)["Size"]
    added_mb = (attrs["Size"] - base_size) / 1e6
    print(f"{hestia_image}: {attrs['Size'] / 1e6:.0f} MB, {added_mb:.0f} MB over {BASE_IMAGE}")
    assert added_mb < 80, f"the gateway adds {added_mb:.0f} MB to its base image"

    # Binary wheels built on the host must load in the image (same CPython, compatible glibc);
    # no compiler, pip, pip cache, wheel or source is left behind.
    script = (
        "import shutil, os, httptools, uvloop, pydantic_core, yaml, websockets, watchfiles; "
        "left = [p for p in ('/wheels', '/src', '/root/.cache/pip', '/opt/build') "
        "if os.path.exists(p)]; "
        "left += [t for t in ('gcc', 'cc', 'pip', 'pip3') if shutil.which(t)]; "
        "print(' '.join(left))"
    )
    out = run(["docker", "run", "--rm", "--entrypoint", "python3", hestia_image, "-c", script])
    assert out.strip() == "", f"left in the image: {out.strip()}"
    version = run(["docker", "run", "--rm", hestia_image, "--version"])
    assert version.startswith("hestia ")


# ----------------------------------------------------------------------------------- compose
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_compose_file_is_valid(compose: list[str], path: Path) -> None:
    env = {**os.environ, **COMPOSE_SECRETS}
    run([*compose, "-f", str(path), "config", "-q"], env=env, cwd=REPO)


def test_gateway_answers_health(stack: Stack) -> None:
    wait_until(_gateway_up(stack), 60, "GET /v1/health to answer 200", stack.logs)
    status, body = http_get(f"{stack.url}/v1/health")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    # The image's HEALTHCHECK command, run now rather than after its 30 s interval.
    hestia = stack.container("hestia")
    test = inspect(hestia)["Config"]["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    run(["docker", "exec", hestia, *test[1:]])


def test_demo_answers_through_the_gateway(stack: Stack) -> None:
    wait_until(_gateway_up(stack), 60, "the gateway", stack.logs)
    wait_until(lambda: DEMO in _services(stack), 30, f"{DEMO} in /v1/services", stack.logs)
    status, body = http_get(f"{stack.url}/services/{DEMO}/")
    assert status == 200, (body, stack.logs())
    assert b"hello from the hestia e2e demo" in body


def test_idle_demo_is_stopped_and_the_next_request_starts_it(stack: Stack) -> None:
    wait_until(_gateway_up(stack), 60, "the gateway", stack.logs)
    wait_until(lambda: DEMO in _services(stack), 30, f"{DEMO} in /v1/services", stack.logs)
    wait_until(
        lambda: stack.state(DEMO) == "exited",
        DEMO_IDLE_S + 30,
        f"{DEMO} to be stopped after {DEMO_IDLE_S}s idle",
        stack.logs,
    )
    status, body = http_get(f"{stack.url}/services/{DEMO}/")
    assert status == 200, (body, stack.logs())
    assert b"hello from the hestia e2e demo" in body
    assert stack.state(DEMO) == "running"


def test_demo_status(stack: Stack) -> None:
    wait_until(_gateway_up(stack), 60, "the gateway", stack.logs)
    wait_until(lambda: DEMO in _services(stack), 30, f"{DEMO} in /v1/services", stack.logs)
    status, body = http_get(f"{stack.url}/v1/services/{DEMO}/status")
    assert status == 200, body
    info = json.loads(body)
    assert info["name"] == DEMO
    assert info["state"] in ("stopped", "starting", "ready", "stopping")
    assert info["backend"] == "docker"
    assert info["idle_timeout_s"] == DEMO_IDLE_S


def test_the_quick_start_ollama_status(stack: Stack) -> None:
    """README's quick start: `curl http://localhost:8080/v1/services/ollama/status`."""
    wait_until(_gateway_up(stack), 60, "the gateway", stack.logs)
    wait_until(lambda: OLLAMA in _services(stack), 30, f"{OLLAMA} in /v1/services", stack.logs)
    status, body = http_get(f"{stack.url}/v1/services/{OLLAMA}/status")
    assert status == 200, body
    info = json.loads(body)
    assert info["name"] == OLLAMA and info["backend"] == "docker"
    assert info["idle_timeout_s"] == 1800 and info["startup_timeout_s"] == 300
    assert inspect(stack.container(OLLAMA))["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")
    status, _ = http_get(f"{stack.url}/services/{OLLAMA}/")
    assert status == 200
    status, page = http_get(f"{stack.url}/ui")
    assert status == 200 and b"<title>Hestia</title>" in page


def test_an_edit_of_the_mounted_config_is_live(stack: Stack) -> None:
    """The folder is mounted, so a save by rename (a new inode) is seen in the container."""
    assert stack.config_file is not None
    wait_until(_gateway_up(stack), 60, "the gateway", stack.logs)

    def config() -> dict[str, Any]:
        status, body = http_get(f"{stack.url}/v1/config", timeout=5)
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    wait_until(lambda: config()["watching"], 30, "the config folder to be watched", stack.logs)
    assert config()["file"] == "hestia_config.yml"
    original = stack.config_file.read_text()
    edited = original.replace("services: {}", "services:\n  extra:\n    url: http://127.0.0.1:9")
    assert edited != original
    tmp = stack.config_file.with_name(".hestia_config.yml.swp")
    tmp.write_text(edited)
    os.replace(tmp, stack.config_file)  # as vim saves
    wait_until(lambda: "extra" in _services(stack), 30, "the added service", stack.logs)
    with open(stack.config_file, "w") as f:  # in place (same inode)
        f.write(original)
    wait_until(lambda: "extra" not in _services(stack), 30, "its removal", stack.logs)
    assert config()["error"] is None


# Last in this module: it takes the stack down.
def test_down_leaves_nothing_behind(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans", "--timeout", "5")
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
