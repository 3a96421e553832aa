"""The `hestia` commands that talk to a running gateway (`status`, `start`, `stop`, `events`,
`config reload`) over its control API with httpx, and the ones that only read a file
(`config check`, `config schema`).

The gateway: `--url`, else $HESTIA_URL, else http://127.0.0.1:8080. The key, when auth is on:
$HESTIA_API_KEY (never an argument: it would show in `ps`). Output goes to stdout; an error is
one line on stderr, `hestia: ...`, and the exit code says which kind (EXIT_CODES).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"

OK = 0
FAILED = 1  # the gateway answered with an error (a start failed, ...); an invalid config
USAGE = 2  # bad arguments; `serve` could not load its config
UNREACHABLE = 3  # no answer from the gateway (not running, wrong --url, timeout)
NOT_FOUND = 4  # no such service
DENIED = 5  # auth: no key, a wrong key, or a key without the scope

EXIT_CODES: dict[int, str] = {
    OK: "success",
    FAILED: "the gateway answered with an error (a start failed or timed out, a stop failed), "
    "or the config file is invalid",
    USAGE: "bad arguments; or `serve` could not load its config",
    UNREACHABLE: "the gateway cannot be reached (not running, wrong --url or HESTIA_URL, timeout)",
    NOT_FOUND: "no such service",
    DENIED: "refused by auth: no key (set HESTIA_API_KEY), a wrong key, or a key without the scope",
}


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _fail(message: str, code: int) -> CommandError:
    return CommandError(message, code)


class Control:
    """One gateway's control API."""

    def __init__(self, url: str | None, out: TextIO = sys.stdout) -> None:
        self.url = (url or os.environ.get("HESTIA_URL") or DEFAULT_URL).rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "hestia-cli"}
        key = os.environ.get("HESTIA_API_KEY")
        if key:
            headers["X-API-Key"] = key.strip()
        # no proxy from the environment: the gateway is usually on this machine or network
        self.client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0), trust_env=False
        )
        self.out = out

    async def __aenter__(self) -> Control:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def call(self, method: str, path: str, *, patient: bool = False, **params: Any) -> Any:
        """`patient`: no read timeout (an answer that waits for a stop)."""
        try:
            r = await self.client.request(
                method,
                path,
                params=params or None,
                timeout=httpx.Timeout(30.0, read=None) if patient else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException:
            raise _fail(f"{self.url} did not answer {method} {path} in time", UNREACHABLE) from None
        except httpx.TransportError as exc:
            raise _fail(f"cannot reach the gateway at {self.url}: {exc}", UNREACHABLE) from None
        return self._answer(r)

    def _answer(self, r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.is_success:
            return body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") or f"HTTP {r.status_code}"
        code = {401: DENIED, 403: DENIED, 404: NOT_FOUND}.get(r.status_code, FAILED)
        if r.status_code == 401 and not os.environ.get("HESTIA_API_KEY"):
            message += " (set HESTIA_API_KEY)"
        raise _fail(message, code)

    async def events(self, service: str | None) -> AsyncGenerator[tuple[str, dict[str, Any]]]:
        """The gateway's Server-Sent Events, as (event, data)."""
        params = {"service": service} if service else None
        try:
            async with self.client.stream(
                "GET",
                "/v1/events",
                params=params,
                headers={"Accept": "text/event-stream"},
                timeout=httpx.Timeout(30.0, read=None),
            ) as r:
                if not r.is_success:
                    await r.aread()
                    self._answer(r)
                event = ""
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        yield event, json.loads(line[6:])
        except httpx.TransportError as exc:
            raise _fail(f"cannot reach the gateway at {self.url}: {exc}", UNREACHABLE) from None
        raise _fail("the gateway ended the event stream (it is shutting down)", FAILED)

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


# ------------------------------------------------------------------------- commands
async def status(ctl: Control, name: str | None, as_json: bool) -> int:
    if name:
        services = [await ctl.call("GET", f"/v1/services/{name}/status")]
    else:
        services = (await ctl.call("GET", "/v1/services"))["services"]
    if as_json:
        ctl.print(json.dumps(services[0] if name else {"services": services}, indent=2))
        return OK
    rows = [
        [
            s["name"],
            s["state"],
            s["backend"],
            s["upstream"] or "-",
            _ago(s["last_activity"]),
            _seconds(s["idle_deadline_in_s"]),
            str(s["waiting"]),
            str(s["in_flight"]),
            _error(s["last_error"]),
        ]
        for s in services
    ]
    head = ["SERVICE", "STATE", "BACKEND", "UPSTREAM", "ACTIVE", "IDLE STOP", "WAIT", "FLIGHT"]
    ctl.print(_table([[*head, "LAST ERROR"], *rows]))
    if not services:
        ctl.print("(no services)")
    return OK


async def start(ctl: Control, name: str, wait: bool, timeout: float | None) -> int:
    if not wait:
        s = await ctl.call("POST", f"/v1/services/{name}/start")
        ctl.print(f"{name}: {s['state']}")
        return OK
    # follow the feed first, then ask: no state change can fall in between
    async with contextlib.aclosing(ctl.events(name)) as feed:
        kind, first = await anext(feed)
        services = first.get("services") if kind == "services" else None
        current = services[0]["state"] if services else "?"
        ctl.print(f"{name}: {current}")
        if current == "ready":
            return OK
        s = await ctl.call("POST", f"/v1/services/{name}/start")
        limit = timeout if timeout is not None else float(s["startup_timeout_s"]) + 5
        try:
            return await asyncio.wait_for(_follow_start(ctl, name, feed), limit)
        except TimeoutError:
            raise _fail(f"service {name!r} was not ready within {limit:g}s", FAILED) from None


async def _follow_start(
    ctl: Control, name: str, feed: AsyncIterator[tuple[str, dict[str, Any]]]
) -> int:
    async for kind, data in feed:
        if kind != "transition":
            continue
        new = data["to_state"]
        reason = f": {data['reason']}" if data.get("reason") else ""
        ctl.print(f"{name}: {data['from_state']} -> {new} ({data['cause']}){reason}")
        if new == "ready":
            return OK
        if new == "failed":
            err = data["status"].get("last_error") or {}
            raise _fail(
                f"service {name!r} failed to start: {_error(err) or 'see its events'}", FAILED
            )
    return FAILED


async def stop(ctl: Control, name: str, wait: bool) -> int:
    s = await ctl.call("POST", f"/v1/services/{name}/stop", patient=wait, wait=wait)
    ctl.print(f"{name}: {s['state']}")
    return OK


async def events(ctl: Control, name: str | None, follow: bool, limit: int, as_json: bool) -> int:
    params: dict[str, Any] = {"limit": limit}
    if name:
        await ctl.call("GET", f"/v1/services/{name}/status")  # 404 for an unknown name
        params["service"] = name
    recent = (await ctl.call("GET", "/v1/events/recent", **params))["events"]
    for event in reversed(recent):
        ctl.print(json.dumps(event) if as_json else _event_line(event))
    if not follow:
        return OK
    async with contextlib.aclosing(ctl.events(name)) as feed:
        async for kind, data in feed:
            if kind == "transition":
                data = {k: v for k, v in data.items() if k not in ("status", "type")}
                ctl.print(json.dumps(data) if as_json else _event_line(data))
    return OK


async def reload(ctl: Control) -> int:
    s = await ctl.call("POST", "/v1/config/reload")
    last = s.get("last_reload") or {}
    changes = ", ".join(f"{k}: {', '.join(v)}" for k, v in (last.get("changes") or {}).items() if v)
    ctl.print(f"{s['file']}: {last.get('result', '?')}" + (f" ({changes})" if changes else ""))
    return OK


def config_check(path: str | None, out: TextIO, err: TextIO) -> int:
    from hestia.config import DEFAULT_CONFIG_PATH, load_config
    from hestia.errors import ConfigError
    from hestia.reload import config_problems

    file = path or os.environ.get("HESTIA_CONFIG") or DEFAULT_CONFIG_PATH
    try:
        config = load_config(file, required=True)
    except ConfigError as exc:
        for problem in config_problems(exc):
            print(f"{file}: {problem['path']}: {problem['reason']}", file=err)
        return FAILED
    print(f"{file}: ok ({len(config.services)} service(s))", file=out)
    return OK


def config_schema(out: TextIO) -> int:
    from hestia.schema import config_schema as schema

    print(json.dumps(schema(), indent=2), file=out)
    return OK


def run(command: Callable[[Control], Any], url: str | None) -> int:
    async def main() -> int:
        async with Control(url) as ctl:
            result: int = await command(ctl)
            return result

    try:
        return asyncio.run(main())
    except CommandError as exc:
        print(f"hestia: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------------- formatting
def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _ago(epoch: float) -> str:
    return _seconds(time.time() - epoch) + " ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    s = max(0, round(value))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def _error(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    message = str(error.get("message") or error.get("code") or error)
    return message if len(message) <= 60 else message[:57] + "..."


def _event_line(e: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
    reason = f": {e['reason']}" if e.get("reason") else ""
    return f"{when}  {e['service']}  {e['from_state']} -> {e['to_state']} ({e['cause']}){reason}"
