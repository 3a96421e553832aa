"""The JSON access line (`hestia.proxy.JsonAccessLog`): built by a format string, not a JSON
encoder, so it is checked with a parser: hypothesis drives it with any text in every string
field, and a real `hestia serve` is sent hostile paths and headers over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hestia.proxy import JsonAccessLog
from tests.conftest import free_port

FIELDS = [
    "ts",
    "level",
    "msg",
    "logger",
    "event",
    "request_id",
    "service",
    "method",
    "path",
    "status",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "waited_ms",
    "cold_start",
    "client",
]

# every code point, surrogates included (a str from elsewhere may carry them)
ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=300)
MS = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)


@contextlib.contextmanager
def captured_stdout() -> Iterator[io.StringIO]:
    out = io.StringIO()
    saved = sys.stdout
    sys.stdout = out
    try:
        yield out
    finally:
        sys.stdout = saved


@settings(max_examples=300, deadline=None)
@given(
    request_id=ANY_TEXT,
    service=ANY_TEXT,
    method=ANY_TEXT,
    path=ANY_TEXT | st.text(max_size=20_000, min_size=10_000),
    status=st.integers(0, 999),
    duration_ms=MS,
    bytes_in=st.integers(0, 1 << 62),
    bytes_out=st.integers(0, 1 << 62),
    waited_ms=MS,
    cold_start=st.booleans(),
    client=st.none() | ANY_TEXT,
)
def test_every_line_parses_back_to_its_fields(
    request_id: str,
    service: str,
    method: str,
    path: str,
    status: int,
    duration_ms: float,
    bytes_in: int,
    bytes_out: int,
    waited_ms: float,
    cold_start: bool,
    client: str | None,
) -> None:
    writer = JsonAccessLog()
    with captured_stdout() as out:  # no running loop: written at once
        writer.access(
            request_id,
            service,
            method,
            path,
            status,
            duration_ms,
            bytes_in,
            bytes_out,
            waited_ms,
            cold_start,
            client,
        )
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, whatever the path held
    assert text.isascii()
    line = json.loads(text)
    assert list(line) == FIELDS
    assert line["msg"] == f"{method} {path} -> {status}"
    assert (line["level"], line["logger"], line["event"]) == ("info", "hestia.proxy", "access")
    expected = (request_id, service, method, path, status, bytes_in, bytes_out, cold_start, client)
    got = tuple(
        line[k]
        for k in (
            "request_id",
            "service",
            "method",
            "path",
            "status",
            "bytes_in",
            "bytes_out",
            "cold_start",
            "client",
        )
    )
    assert got == expected
    assert math.isclose(line["duration_ms"], duration_ms, abs_tol=5e-4)
    assert math.isclose(line["waited_ms"], waited_ms, abs_tol=5e-4)


def test_lines_are_batched_in_a_loop_and_keep_their_order() -> None:
    async def main() -> str:
        writer = JsonAccessLog()
        with captured_stdout() as out:
            for i in range(600):  # over the 256-line batch: written in several pieces
                writer.access(str(i), "s", "GET", f"/{i}", 200, 0.5, 0, 2, 0.0, False, None)
            assert out.getvalue().count("\n") == 512  # two full batches, the rest waits
            for _ in range(200):  # the timer writes the rest within its 10 ms
                if out.getvalue().count("\n") == 600:
                    break
                await asyncio.sleep(0.005)
            return out.getvalue()

    text = asyncio.run(main())
    assert [json.loads(line)["request_id"] for line in text.splitlines()] == [
        str(i) for i in range(600)
    ]


def test_timestamp_is_local_iso_with_microseconds() -> None:
    from datetime import datetime

    writer = JsonAccessLog()
    before = datetime.now().astimezone()
    with captured_stdout() as out:
        writer.access("r", "s", "GET", "/", 200, 0.0, 0, 0, 0.0, False, None)
    after = datetime.now().astimezone()
    ts = datetime.fromisoformat(json.loads(out.getvalue())["ts"])
    assert ts.utcoffset() == before.utcoffset()
    assert before.replace(microsecond=0) <= ts <= after


# ------------------------------------------------------------------ through a real gateway
def _upstream() -> tuple[socket.socket, threading.Event]:
    """An upstream that answers every request `200 ok`, on blocking threads."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, stop


def _raw_request(port: int, target: bytes, headers: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
        s.sendall(head + b"".join(h + b"\r\n" for h in headers) + b"\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


class _Gateway:
    """`hestia serve` as a child process, its stdout kept for the lines."""

    def __init__(self, tmp_path: Path, up_port: int) -> None:
        cfg = tmp_path / "hestia_config.yml"
        cfg.write_text(
            "docker: {enabled: false}\n"
            f"database: {{url: 'sqlite:///{tmp_path}/h.db'}}\n"
            f"services:\n  ok:\n    url: http://127.0.0.1:{up_port}\n"
        )
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hestia",
                "serve",
                "--config",
                str(cfg),
                "--port",
                str(self.port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "HESTIA_LOG_FORMAT"},
        )
        until = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "the gateway exited"
            with contextlib.suppress(OSError):
                if b" 200 " in _raw_request(self.port, b"/v1/health", [])[:20]:
                    return
            assert time.monotonic() < until, "the gateway did not come up"
            time.sleep(0.05)

    def lines(self) -> list[dict[str, Any]]:
        """Stops the gateway; its lines, each parsed (a line that does not parse fails)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=20)
        return [json.loads(line) for line in out.splitlines()]


HOSTILE_TARGETS = [
    b'/services/ok/a"b\\c',
    b"/services/ok/%22%5C%00%01%07%08%09%0A%0D%1B%1F%7F",
    b"/services/ok/%FF%FE%C3%28%ED%A0%80",  # not UTF-8, and an encoded surrogate
    b"/services/ok/%E2%80%A8%E2%80%A9%F0%9F%98%80",  # U+2028, U+2029, an emoji
    b"/services/ok/" + b"x" * 7000,
    b"/services/ok/%" + b"%".join(b"%02X" % i for i in range(32)),
    b"/services/%22nope%5C/x",  # an unknown service: the error line goes through loguru
]


def test_hostile_paths_and_headers_give_valid_lines(tmp_path: Path) -> None:
    listener, stop = _upstream()
    answers: dict[str, bytes] = {}
    hostile_headers = [  # what the HTTP parser lets through (control characters get a 400)
        b'X-Request-ID: "\\\t\xff' + b"i" * 200,  # insane: replaced by a generated id
        b"User-Agent: \xff\xfe\"'\\" + b"u" * 6000,
        b'X-Forwarded-For: "1.2.3.4\\',
        b"Referer: \xc3\x28\xed\xa0\x80",
    ]
    try:
        gateway = _Gateway(tmp_path, listener.getsockname()[1])
        try:
            for i, target in enumerate(HOSTILE_TARGETS):
                rid = f"hostile-{i}"
                answers[rid] = _raw_request(gateway.port, target, [f"X-Request-ID: {rid}".encode()])
                answers[f"h{rid}"] = _raw_request(gateway.port, target, hostile_headers)
        finally:
            lines = gateway.lines()  # every line parses
    finally:
        stop.set()
        listener.close()
    access = [line for line in lines if line.get("event") == "access"]
    # one access line per request, two per target (the hostile-header ones included)
    assert len(access) == 2 * len(HOSTILE_TARGETS)
    by_id = {line["request_id"]: line for line in access}
    for i, target in enumerate(HOSTILE_TARGETS):
        line = by_id[f"hostile-{i}"]
        assert list(line)[: len(FIELDS)] == FIELDS
        assert line["path"] == unquote(target.decode("ascii"))
        assert line["status"] == int(answers[f"hostile-{i}"].split(b" ", 2)[1])
        assert line["status"] == (404 if b"nope" in target else 200)
    generated = [line for line in access if not line["request_id"].startswith("hostile-")]
    assert len(generated) == len(HOSTILE_TARGETS)
    assert all(len(line["request_id"]) == 16 for line in generated)


@pytest.mark.parametrize("target", [b"/services/ok/\xff\xfe", b"/services/ok/a\x7fb"])
def test_raw_bytes_in_the_target_are_refused_or_logged_validly(
    tmp_path: Path, target: bytes
) -> None:
    """Bytes HTTP does not allow in a request target: whatever the parser does with them, no
    line that cannot be parsed comes out."""
    listener, stop = _upstream()
    try:
        gateway = _Gateway(tmp_path, listener.getsockname()[1])
        try:
            answer = _raw_request(gateway.port, target, [b"X-Request-ID: raw-1"])
        finally:
            lines = gateway.lines()
    finally:
        stop.set()
        listener.close()
    status = int(answer.split(b" ", 2)[1]) if answer else 0
    access = [line for line in lines if line.get("request_id") == "raw-1"]
    if status == 200:
        assert len(access) == 1
    else:
        assert status in (0, 400) and not access
