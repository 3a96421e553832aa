"""The state store under faults of its SQLite file: a damaged -shm file, a read-only database,
corrupt rows, a garbage file, a foreign schema, a file deleted or switched to WAL mode while
Hestia runs. Real files in tmp dirs; anything that could crash runs in a child process.

"Read-only" must hold for root (CI runs tests as root, and root ignores permission bits): the
`read_only` fixture sets the immutable attribute (`chattr +i`, which binds root too), falls back
to a read-only bind mount, and chmods when not root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger

from hestia.store import (
    SCHEMA_VERSION,
    EventRow,
    ServiceRow,
    Store,
    StoredService,
    StoreError,
    StoreUnavailable,
)
from tests.conftest import free_port, wait_for

# A writer in a child process: "wal" is the old store's SQLite setup (WAL mode, SQLite's default
# mmap), "store" is hestia.store. Both write continuously; the child reports to a status file.
_CHILD = r"""
import asyncio, json, os, sqlite3, sys, time
mode, db, status = sys.argv[1:4]

def report(**data):
    with open(status + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(status + ".tmp", status)

if mode == "wal":
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    n = 0
    while True:
        n += 1
        conn.execute("INSERT INTO t VALUES (?)", (n,))
        if n % 20 == 0:
            conn.execute("SELECT count(*) FROM t").fetchall()
            report(n=n)
        time.sleep(0.002)

from hestia.store import EventRow, ServiceRow, Store, StoreError

async def main():
    store = Store("sqlite:///" + db, retry_every=0.1)
    store.migrate()
    store.start()
    n = 0
    while True:
        n += 1
        store.record_event(EventRow(service="a", at=time.time(), from_state="ready",
                                    to_state="ready", cause="test", reason=str(n)))
        store.snapshot_service(ServiceRow(name="a", state="ready", last_activity=time.time()))
        if n % 20 == 0:
            try:
                await asyncio.to_thread(store.events, "a", 5)
            except StoreError:
                pass
            maps = [l for l in open("/proc/self/maps") if os.path.basename(db) in l]
            report(n=n, health=store.health(), maps=maps)
        await asyncio.sleep(0.005)

asyncio.run(main())
"""


# Another program switching the file to WAL; retried, since a lock upgrade that meets the
# store's lock fails at once (SQLite skips the busy handler where waiting could deadlock).
_SWITCH_TO_WAL = """
import sqlite3, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        with sqlite3.connect(sys.argv[1]) as conn:
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        break
    except sqlite3.OperationalError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.01)
"""


class Child:
    def __init__(self, tmp: Path, mode: str, db: Path) -> None:
        script = tmp / "child.py"
        script.write_text(_CHILD)
        self.status_file = tmp / f"status-{mode}.json"
        self.stderr = tmp / f"stderr-{mode}.txt"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), mode, str(db), str(self.status_file)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def count(self) -> int:
        return int(self.status().get("n", 0))

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def writes_on(self, more: int = 60) -> None:
        """Wait until the child has done `more` further writes (and is still alive)."""
        start = self.count()
        await wait_for(
            lambda: not self.alive() or self.count() >= start + more, 15, "the child to write on"
        )
        assert self.alive(), f"child died: {self.proc.returncode}\n{self.stderr.read_text()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _damage_shm(db: Path) -> None:
    """What the tester did to a running Hestia: truncate the -shm file, then make it read-only."""
    shm = Path(f"{db}-shm")
    if not shm.exists():  # nothing of ours uses it; damage one anyway, as a program might
        shm.write_bytes(b"\0" * 32768)
    os.truncate(shm, 0)
    shm.chmod(0o444)


async def test_wal_shm_damage_kills_a_writer_control(tmp_path: Path) -> None:
    """The failure as found, with the old store's SQLite setup: SIGBUS, nothing logged."""
    db = tmp_path / "wal.db"
    child = Child(tmp_path, "wal", db)
    try:
        await wait_for(lambda: child.count() > 0 or not child.alive(), 15, "the writer")
        assert _exists(f"{db}-shm")
        os.truncate(f"{db}-shm", 0)
        await wait_for(lambda: not child.alive(), 10, "the writer to die")
        assert child.proc.returncode == -signal.SIGBUS
    finally:
        child.stop()


async def test_store_survives_shm_damage_and_maps_nothing(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    # a database an older Hestia left in WAL mode, killed mid-run: -wal with content, -shm
    old = Child(tmp_path, "wal", db)
    try:
        await wait_for(lambda: old.count() > 0 or not old.alive(), 15, "the old writer")
    finally:
        old.stop()
    assert _header(db) == b"\x02\x02" and _exists(f"{db}-shm")
    child = Child(tmp_path, "store", db)
    try:
        await wait_for(lambda: child.count() > 0 or not child.alive(), 15, "the store to write")
        await child.writes_on()
        assert _header(db) == b"\x01\x01"  # switched out of WAL at start-up
        _damage_shm(db)
        await child.writes_on()
        # another program switches the file to WAL while the store runs; the store switches it
        # back before its next batch, and its connection never maps the new -shm
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", _SWITCH_TO_WAL, str(db)], check=True, timeout=30
        )
        await wait_for(lambda: _header(db) == b"\x01\x01" or not child.alive(), 15, "switch-back")
        _damage_shm(db)
        await child.writes_on()
        status = child.status()
        assert status["maps"] == []  # nothing of the database is mapped into the process
        assert status["health"]["status"] == "ok", status["health"]
    finally:
        child.stop()
    with sqlite3.connect(db) as conn:  # and what it wrote is there
        assert conn.execute("SELECT count(*) FROM hestia_event").fetchone()[0] > 100


# ------------------------------------------------------------------ read-only
class ReadOnly:
    """Makes files and directories read-only for this process, root included; undoes it."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def make(self, *paths: Path) -> None:
        paths = tuple(p for p in paths if p.exists())
        if os.geteuid() != 0:
            for p in paths:
                mode = p.stat().st_mode
                p.chmod(mode & ~0o222)
                self._undo.append(lambda p=p, mode=mode: p.chmod(mode))  # type: ignore[misc]
            return
        chattr = shutil.which("chattr")
        if chattr is not None:
            done = subprocess.run([chattr, "+i", *map(str, paths)], capture_output=True)
            if done.returncode == 0:
                self._undo.append(lambda: self._run(chattr, "-i", *map(str, paths)))
                return
            self._run(chattr, "-i", *map(str, paths))
        # no immutable attribute here (e.g. overlayfs): a read-only bind mount of the directory
        directory = next(p for p in paths if p.is_dir())
        done = subprocess.run(["mount", "--bind", str(directory), str(directory)])
        if done.returncode != 0:
            pytest.skip("as root, neither chattr +i nor a read-only bind mount is possible here")
        self._undo.append(lambda: self._run("umount", "--lazy", str(directory)))
        self._run("mount", "-o", "remount,bind,ro", str(directory))

    @staticmethod
    def _run(*argv: str) -> None:
        subprocess.run(argv, capture_output=True, check=False)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@pytest.fixture
def read_only() -> Iterator[ReadOnly]:
    ro = ReadOnly()
    try:
        yield ro
    finally:
        ro.undo()


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    """Every loguru record from the store, INFO and up."""
    records: list[Any] = []
    sink = logger.add(
        lambda m: records.append(m.record),
        level="INFO",
        filter=lambda r: r["name"] == "hestia.store",
    )
    try:
        yield records
    finally:
        logger.remove(sink)


def _event(n: int, service: str = "a") -> EventRow:
    return EventRow(
        service=service, at=float(n), from_state="ready", to_state="ready", cause="t", reason=str(n)
    )


def _warnings(logs: list[Any]) -> list[Any]:
    return [r for r in logs if r["level"].name == "WARNING"]


def _db_files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-journal"), db.parent]


async def test_read_only_database_degrades_keeps_rows_and_recovers(
    tmp_path: Path, read_only: ReadOnly, logs: list[Any]
) -> None:
    db = tmp_path / "d" / "h.db"
    store = Store(f"sqlite:///{db}", max_pending_events=10, retry_every=0.05, warn_every=3600)
    store.migrate()
    store.start()
    for n in range(3):
        store.record_event(_event(n))
    await store.flush()
    assert store.health()["status"] == "ok"
    read_only.make(*_db_files(db))
    for n in range(3, 28):
        store.record_event(_event(n))
    await wait_for(lambda: store.health()["failed_writes"] >= 3, 10, "three failed writes")
    warned = len(_warnings(logs))
    await wait_for(lambda: store.health()["failed_writes"] >= 10, 10, "ten failed writes")
    health = store.health()
    assert health["status"] == "degraded"
    assert str(db) in health["error"] and "read-only" in health["error"]
    assert health["since"] is not None and health["url"] == f"sqlite:///{db}"
    assert health["pending_events"] == 10 and health["dropped_events"] == 15
    # one line when it broke (maybe two: an I/O error, then read-only on reopening), one when
    # the cap was hit; none per retry, and never a traceback
    assert 1 <= len(_warnings(logs)) == warned <= 3
    assert all(r["exception"] is None for r in logs)
    with pytest.raises(StoreUnavailable) as caught:
        await store.flush()
    assert caught.value.status == 503 and caught.value.code == "store_unavailable"
    assert str(db) in caught.value.message and "writable" in caught.value.message
    assert caught.value.to_dict()["error"]["code"] == "store_unavailable"
    # reading still works on a read-only file
    assert [e.reason for e in await asyncio.to_thread(store.events, "a")] == ["2", "1", "0"]

    read_only.undo()
    await wait_for(lambda: store.health()["status"] == "ok", 10, "the store to recover")
    await store.close()
    with sqlite3.connect(db) as conn:
        reasons = [r for (r,) in conn.execute("SELECT reason FROM hestia_event ORDER BY id")]
    # the three written before, then the ten newest of those queued while it was read-only
    assert reasons == [str(n) for n in [0, 1, 2, *range(18, 28)]]
    assert any("works again" in r["message"] for r in logs if r["level"].name == "INFO")
    health = store.health()
    assert health["error"] is None and health["dropped_events"] == 15


async def test_read_only_at_start_starts_degraded(tmp_path: Path, read_only: ReadOnly) -> None:
    db = tmp_path / "d" / "h.db"
    first = Store(f"sqlite:///{db}")
    first.migrate()
    first.start()
    first.snapshot_service(ServiceRow(name="a", state="ready", last_activity=5.0))
    await first.close()
    read_only.make(*_db_files(db))
    store = Store(f"sqlite:///{db}")
    store.migrate()  # the state can be read: Hestia starts, and says it cannot save
    assert store.load_service_states()["a"].last_activity == 5.0
    health = store.health()
    assert health["status"] == "degraded" and "read-only" in health["error"]
    await store.close()  # never raises

    fresh = tmp_path / "d" / "new.db"  # a database that cannot even be created: refused
    with pytest.raises(StoreError) as caught:
        Store(f"sqlite:///{fresh}").migrate()
    assert str(fresh) in caught.value.message


async def test_bad_database_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="not a database URL"):
        Store("not a url")


# ------------------------------------------------------------------ bad content
def _stored(db: Path) -> Store:
    store = Store(f"sqlite:///{db}")
    store.migrate()
    return store


def test_corrupt_rows_are_skipped_and_named(tmp_path: Path, logs: list[Any]) -> None:
    db = tmp_path / "h.db"
    _stored(db).engine.dispose()
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO hestia_service (name, state, last_activity, started_at, last_error, "
            "requests_by_class, errors, cold_starts, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            [
                ("good", "ready", 10.0, 9.0, '{"message": "x"}', "[1, 2, 3, 4, 5]", 1, 2, 11.0),
                ("badjson", "ready", 10.0, None, "{'message': 'x'}", "[0,0,0,0,0]", 0, 0, 1.0),
                ("notdict", "ready", 10.0, None, "[1]", "[0,0,0,0,0]", 0, 0, 1.0),
                ("counts", "ready", 10.0, None, None, '{"a": 1}', 0, 0, 1.0),
                ("clock", "ready", "yesterday", None, None, "[0,0,0,0,0]", 0, 0, 1.0),
                ("short", "stopped", 3, None, "", "[7]", 0, 0, 4),
            ],
        )
    store = Store(f"sqlite:///{db}")
    store.migrate()
    loaded = store.load_service_states()
    assert loaded == {
        "good": StoredService(
            "good", "ready", 10.0, 9.0, {"message": "x"}, [1, 2, 3, 4, 5], 1, 2, 11.0
        ),
        "short": StoredService("short", "stopped", 3.0, None, None, [7, 0, 0, 0, 0], 0, 0, 4.0),
    }
    skipped = {
        r["message"].split("(service ")[1].split(")")[0]: r["message"]
        for r in logs
        if "skipping row" in r["message"]
    }
    assert set(skipped) == {"'badjson'", "'notdict'", "'counts'", "'clock'"}
    assert all(str(db) in m and "row " in m for m in skipped.values())
    assert "last_error is not JSON (Expecting property name" in skipped["'badjson'"]
    assert "last_activity is 'yesterday'" in skipped["'clock'"]
    assert store.load_service_states()["good"].last_error == {"message": "x"}
    store.engine.dispose()


def test_garbage_file_is_refused_at_migrate(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    db.write_bytes(b"this is not a database, just some text someone saved here\n" * 100)
    with pytest.raises(StoreError) as caught:
        Store(f"sqlite:///{db}").migrate()
    message = caught.value.message
    assert str(db) in message and "not a SQLite database" in message
    assert f"mv {db} {db}.bad" in message


def test_damaged_database_is_refused_at_migrate(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    _stored(db).engine.dispose()
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page, header kept
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError) as caught:
        Store(f"sqlite:///{db}").migrate()
    assert str(db) in caught.value.message and "move the file away" in caught.value.message


def test_foreign_schema_is_refused_at_migrate(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE hestia_service (name TEXT PRIMARY KEY, colour TEXT)")
    with pytest.raises(StoreError) as caught:
        Store(f"sqlite:///{db}").migrate()
    message = caught.value.message
    assert str(db) in message and "table hestia_service lacks state, last_activity" in message

    bad_version = tmp_path / "v.db"
    _stored(bad_version).engine.dispose()
    with sqlite3.connect(bad_version) as conn:
        conn.execute("UPDATE hestia_meta SET value='one' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 'one', not a number"):
        Store(f"sqlite:///{bad_version}").migrate()


# ------------------------------------------------------------------ the file changes underneath
async def test_deleted_database_is_recreated_with_the_current_state(
    tmp_path: Path, logs: list[Any]
) -> None:
    db = tmp_path / "d" / "h.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    store.snapshot_service(ServiceRow(name="a", state="ready", last_activity=1.0))
    store.snapshot_service(ServiceRow(name="b", state="stopped", last_activity=2.0))
    store.record_event(_event(1))
    await store.flush()
    shutil.rmtree(db.parent)  # the file and its directory
    store.snapshot_service(ServiceRow(name="a", state="stopped", last_activity=3.0))
    store.record_event(_event(2))
    await store.flush()
    with sqlite3.connect(db) as conn:
        services = conn.execute("SELECT name, state FROM hestia_service ORDER BY name").fetchall()
        events = conn.execute("SELECT reason FROM hestia_event").fetchall()
        version = conn.execute("SELECT value FROM hestia_meta").fetchall()
    assert services == [("a", "stopped"), ("b", "stopped")]  # b: its latest state, rewritten
    assert events == [("2",)] and version == [(str(SCHEMA_VERSION),)]
    assert store.health()["recreated"] == 1 and store.health()["status"] == "ok"
    store.record_event(_event(3))
    await store.flush()
    deleted = [r["message"] for r in _warnings(logs) if "was deleted" in r["message"]]
    assert len(deleted) == 1 and str(db) in deleted[0]  # noticed once, not at every write
    await store.close()


async def test_replaced_by_garbage_reads_fail_clearly_until_it_is_moved_away(
    tmp_path: Path,
) -> None:
    db = tmp_path / "h.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    store.snapshot_service(ServiceRow(name="a", state="ready", last_activity=1.0))
    await store.flush()
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00garbage" * 1000)
    os.replace(garbage, db)
    with pytest.raises(StoreUnavailable) as caught:
        await asyncio.to_thread(store.events, "a")
    assert str(db) in caught.value.message and "not a SQLite database" in caught.value.message
    assert store.health()["status"] == "degraded"
    db.rename(tmp_path / "h.db.bad")  # what the message says to do
    store.record_event(_event(1))
    await store.flush()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM hestia_service").fetchall() == [("a",)]
    assert store.health()["status"] == "ok"
    await store.close()


def _header(db: Path) -> bytes:
    """The file format's read/write versions: 1 for a rollback journal, 2 for WAL."""
    return db.read_bytes()[18:20]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _mapped(db: Path) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(db) in line]


async def test_switched_to_wal_by_another_program_is_switched_back(
    tmp_path: Path, logs: list[Any]
) -> None:
    db = tmp_path / "h.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "print(c.execute('PRAGMA journal_mode=WAL').fetchone()[0], flush=True); "
        "c.execute('SELECT 1 FROM hestia_meta').fetchall(); sys.stdin.read()",
        str(db),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert (await holder.stdout.readline()).strip() == b"wal"
        store.record_event(_event(1))
        with pytest.raises(StoreUnavailable, match="in WAL mode and another program has it open"):
            await store.flush()
        assert _mapped(db) == []
    finally:
        holder.stdin.close()
        await asyncio.wait_for(holder.wait(), 10)
    await store.flush()  # the other program is gone: switched back, written
    assert _header(db) == b"\x01\x01" and _mapped(db) == []
    assert any("switched it back" in r["message"] for r in _warnings(logs))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT reason FROM hestia_event").fetchall() == [("1",)]
    await store.close()


async def test_close_with_a_broken_database_logs_what_is_lost(
    tmp_path: Path, read_only: ReadOnly, logs: list[Any]
) -> None:
    db = tmp_path / "d" / "h.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    store.start()
    read_only.make(*_db_files(db))
    store.record_event(_event(1))
    await store.close()  # does not raise
    errors = [r["message"] for r in logs if r["level"].name == "ERROR"]
    assert len(errors) == 1 and "1 event(s)" in errors[0] and str(db) in errors[0]


# ------------------------------------------------------------------ through the gateway
async def _http_ok_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    port = free_port()
    return await asyncio.start_server(handle, "127.0.0.1", port), port


async def test_store_fault_leaves_the_proxy_alone_and_api_answers_503_json(
    tmp_path: Path, gateway_factory: Any
) -> None:
    server, port = await _http_ok_server()
    db = tmp_path / "gw.db"
    try:
        gw = await gateway_factory(
            {
                "services": {"up": {"url": f"http://127.0.0.1:{port}"}},
                "database": {"url": f"sqlite:///{db}"},
            }
        )
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            assert (await client.get("/services/up/")).status_code == 200
            garbage = tmp_path / "garbage"
            garbage.write_bytes(b"not a database " * 500)
            os.replace(garbage, db)
            answer = await client.get("/v1/services/up/events")
            assert answer.status_code == 503
            assert answer.headers["content-type"] == "application/json"
            error = answer.json()["error"]
            assert error["code"] == "store_unavailable" and str(db) in error["message"]
            for _ in range(20):
                assert (await client.get("/services/up/")).text == "ok"
            assert gw.gateway.store.health()["status"] == "degraded"
            health = await client.get("/v1/health")
            assert health.status_code == 200  # the gateway itself is alive and proxying
            assert health.json()["status"] == "degraded"
            assert health.json()["store"]["status"] == "degraded"
            assert str(db) in health.json()["store"]["error"]
        await gw.stop()
    finally:
        server.close()
        await server.wait_closed()


def test_health_is_plain_data_without_io(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/h.db")  # nothing opened yet
    assert store.health() == {
        "status": "ok",
        "url": f"sqlite:///{tmp_path}/h.db",
        "error": None,
        "since": None,
        "pending_events": 0,
        "dropped_events": 0,
        "failed_writes": 0,
        "recreated": 0,
        "last_write": None,
    }
    assert not (tmp_path / "h.db").exists()
    json.dumps(store.health())
