"""The `hestia` commands as real processes against a running gateway (memory backend): status,
start --wait with its progress, stop, events (--follow), config check and reload, auth and the
documented exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from hestia.backends.memory import MemoryBackend
from hestia.control import DENIED, FAILED, NOT_FOUND, OK, UNREACHABLE
from tests.conftest import free_port

ON = {"hestia.enable": "true"}
KEY = "cli-admin-key-0123456789abcdef"


async def hestia(
    *args: str, url: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Run `python -m hestia ARGS` (with --url when given) and return (code, stdout, stderr)."""
    full = [*args, "--url", url] if url is not None else list(args)
    clean = {k: v for k, v in os.environ.items() if k not in ("HESTIA_URL", "HESTIA_API_KEY")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hestia",
        *full,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hestia: ")
    return lines[0]


async def test_status_start_stop_and_events(gateway_factory: Any) -> None:
    backend = MemoryBackend()
    web = backend.add("web", labels=ON, start_delay=0.3)
    backend.add("broken", labels=ON, fail_exit=3)
    gw = await gateway_factory({"docker": {"reconcile_interval": 0}}, {"memory": backend})

    code, out, _ = await hestia("status", url=gw.url)
    assert code == OK
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["SERVICE", "STATE", "BACKEND"]
    assert [r.split()[:3] for r in rows] == [
        ["broken", "stopped", "memory"],
        ["web", "stopped", "memory"],
    ]

    # start --wait: the state changes as they happen, then 0
    code, out, err = await hestia("start", "web", "--wait", url=gw.url)
    assert code == OK, err
    lines = out.splitlines()
    assert lines[0] == "web: stopped"
    assert lines[1].startswith("web: stopped -> starting (api")
    assert lines[2].startswith("web: starting -> ready (api): ready after ")
    assert web.running

    code, out, _ = await hestia("status", "web", "--json", url=gw.url)
    assert code == OK
    status = json.loads(out)
    assert status["name"] == "web" and status["state"] == "ready" and status["upstream"]

    # a start that fails: 1 and one line on stderr saying why
    code, out, err = await hestia("start", "broken", "--wait", url=gw.url)
    assert code == FAILED
    assert "failed to start" in one_line(err)
    assert "-> failed" in out

    code, out, _ = await hestia("stop", "web", url=gw.url)
    assert code == OK and out.strip() == "web: stopped"
    assert not web.running

    code, out, _ = await hestia("events", "web", url=gw.url)
    assert code == OK
    transitions = [line.split("  ")[2].split(" (")[0] for line in out.splitlines()]
    assert transitions == [
        "stopped -> starting",
        "starting -> ready",
        "ready -> stopping",
        "stopping -> stopped",
    ]

    # events --follow: new ones as they come
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hestia",
        "events",
        "web",
        "--follow",
        "--limit",
        "1",
        "--json",
        "--url",
        gw.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        old = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert old["to_state"] == "stopped"
        code, _, _ = await hestia("start", "web", url=gw.url)
        assert code == OK
        new = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert (new["service"], new["from_state"], new["to_state"]) == (
            "web",
            "stopped",
            "starting",
        )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)

    # unknown service: 4
    code, _, err = await hestia("status", "nope", url=gw.url)
    assert code == NOT_FOUND
    assert "no service named 'nope'" in one_line(err)
    await backend.close()


async def test_auth_and_an_unreachable_gateway(gateway_factory: Any) -> None:
    backend = MemoryBackend()
    backend.add("web", labels=ON)
    gw = await gateway_factory(
        {
            "docker": {"reconcile_interval": 0},
            "auth": {"enabled": True, "keys": [{"name": "me", "key": KEY, "scopes": ["admin"]}]},
        },
        {"memory": backend},
    )
    code, _, err = await hestia("status", url=gw.url)
    assert code == DENIED
    assert "HESTIA_API_KEY" in one_line(err)
    code, _, err = await hestia("status", url=gw.url, env={"HESTIA_API_KEY": "wrong"})
    assert code == DENIED
    # HESTIA_URL and HESTIA_API_KEY from the environment
    code, out, err = await hestia("status", env={"HESTIA_URL": gw.url, "HESTIA_API_KEY": KEY})
    assert code == OK, err
    assert out.splitlines()[1].split()[:2] == ["web", "stopped"]

    code, _, err = await hestia("status", url=f"http://127.0.0.1:{free_port()}")
    assert code == UNREACHABLE
    assert "cannot reach the gateway" in one_line(err)
    await backend.close()


async def test_config_check_and_reload(gateway_factory: Any, tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text("services:\n  web:\n    url: http://127.0.0.1:9\n")
    code, out, err = await hestia("config", "check", str(good))
    assert code == OK and out.strip() == f"{good}: ok (1 service(s))", err

    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  web:\n    url: http://127.0.0.1:9\n    idle_timeout: soon\n")
    code, out, err = await hestia("config", "check", str(bad))
    assert code == FAILED and out == ""
    assert err.strip() == (
        f"{bad}: services.web.idle_timeout: 'soon' is not a duration; write e.g. 30s, 10m, 1h "
        "or seconds"
    )
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  web: [\n")
    code, _, err = await hestia("config", "check", str(broken))
    assert code == FAILED and err.startswith(f"{broken}: line ")

    code, _, err = await hestia("config", "check", str(tmp_path / "missing.yml"))
    assert code == FAILED and "does not exist" in err

    # reload: a running gateway reads its file again
    path = tmp_path / "hestia_config.yml"
    gw = await gateway_factory(
        {"reload": {"watch": False}, "services": {"web": {"url": "http://127.0.0.1:9"}}},
        config_path=path,
    )
    path.write_text(path.read_text().replace("web:", "site:"))
    code, out, err = await hestia("config", "reload", url=gw.url)
    assert code == OK, err
    assert out.strip() == f"{path}: applied (added: site, removed: web)"
    assert sorted(gw.gateway.registry.services) == ["site"]
    path.write_text(path.read_text().replace("site:", "site: 5\n  x:"))
    code, _, err = await hestia("config", "reload", url=gw.url)
    assert code == FAILED
    assert "the running configuration stays" in one_line(err)
