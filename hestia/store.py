"""State that survives restarts: SQLModel tables, the few queries on them, and their writer.

Nothing here runs on the request path, and no fault of the database may stop the gateway:

- Nothing is memory-mapped. In WAL mode SQLite maps the `-shm` file; truncating or damaging it
  while mapped kills the whole process with SIGBUS, nothing logged. So SQLite files use a
  rollback journal (`journal_mode=TRUNCATE`) and `mmap_size=0`: plain reads and writes only.
  A connection follows a file that someone else switched to WAL, so before each open and each
  batch the file is checked; a WAL database is switched back under `locking_mode=EXCLUSIVE`,
  where SQLite keeps the WAL index in heap memory and never opens `-shm`. (Exclusive locking
  for good would avoid the check, but would lock every other reader out of the file.)
- One connection, one lock, one writer thread. Events and snapshots are queued in memory and
  written in batches; a clean shutdown flushes what was queued.
- Faults become StoreUnavailable (503), saying which database, what is wrong and what to do.
  The writer keeps the queued rows (events capped: the oldest are dropped and counted), retries
  every `retry_every` seconds, logs one WARNING per `warn_every` seconds, and `health()` says so.
- A database deleted or replaced while Hestia runs is noticed by its device and inode, created
  again, and the latest state of every service written to it again.
- At start-up, migrate() refuses a file that is not a database or whose schema Hestia cannot
  use (StoreError); a bad row is skipped with a warning naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from loguru import logger
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, Session, SQLModel, create_engine, select

from hestia.errors import HestiaError

SCHEMA_VERSION = 1
DEFAULT_DATABASE_URL = "sqlite:///data/hestia.db"
MAX_PENDING_EVENTS = 10_000
RETRY_EVERY_S = 5.0
WARN_EVERY_S = 60.0
_BUSY_TIMEOUT_S = 5.0
_SQLITE_MAGIC = b"SQLite format 3\x00"


class StoreError(HestiaError):
    """The state database cannot be used (not a database, a schema Hestia cannot use, a bad
    database.url). Raised at start-up; the message names the file and what to do."""

    status = 500
    code = "store_error"


class StoreUnavailable(StoreError):
    """A read or write failed now (read-only, disk full, locked, I/O error, file gone).
    The gateway runs on; queued writes are kept and retried."""

    status = 503
    code = "store_unavailable"


class MetaRow(SQLModel, table=True):
    __tablename__ = "hestia_meta"
    key: str = Field(primary_key=True)
    value: str


class ServiceRow(SQLModel, table=True):
    __tablename__ = "hestia_service"
    name: str = Field(primary_key=True)
    state: str
    last_activity: float  # wall clock (epoch seconds)
    started_at: float | None = None
    last_error: str | None = None  # JSON
    requests_by_class: str = "[0, 0, 0, 0, 0]"  # JSON: 1xx..5xx
    errors: int = 0
    cold_starts: int = 0
    updated_at: float = 0.0


class EventRow(SQLModel, table=True):
    __tablename__ = "hestia_event"
    id: int | None = Field(default=None, primary_key=True)
    service: str = Field(index=True)
    at: float  # wall clock
    from_state: str
    to_state: str
    cause: str  # request, api, idle, adopted, external, shutdown, ...
    reason: str
    duration_ms: float | None = None  # time spent in from_state


@dataclass(frozen=True, slots=True)
class StoredService:
    """A service's state as stored, checked and decoded."""

    name: str
    state: str
    last_activity: float  # wall clock
    started_at: float | None
    last_error: dict[str, Any] | None
    requests_by_class: list[int]  # five counts: 1xx..5xx
    errors: int
    cold_starts: int
    updated_at: float

    def to_row(self) -> ServiceRow:
        return ServiceRow(
            name=self.name,
            state=self.state,
            last_activity=self.last_activity,
            started_at=self.started_at,
            last_error=error_json(self.last_error),
            requests_by_class=json.dumps(self.requests_by_class),
            errors=self.errors,
            cold_starts=self.cold_starts,
            updated_at=self.updated_at,
        )


class Store:
    def __init__(
        self,
        url: str,
        *,
        max_pending_events: int = MAX_PENDING_EVENTS,
        retry_every: float = RETRY_EVERY_S,
        warn_every: float = WARN_EVERY_S,
    ) -> None:
        self.url = url
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise StoreError(
                f"database.url {url!r} is not a database URL ({exc}); "
                f"use e.g. {DEFAULT_DATABASE_URL}"
            ) from None
        self.display_url = parsed.render_as_string(hide_password=True)
        self.max_pending_events = max_pending_events
        self.retry_every = retry_every
        self.warn_every = warn_every
        sqlite = parsed.get_backend_name() == "sqlite"
        database = parsed.database or ""
        # the file this store guards; None for other databases and in-memory SQLite
        self.path: Path | None = (
            Path(database) if sqlite and database and database != ":memory:" else None
        )
        if sqlite:
            # one connection, shared under self._lock: nothing in this process can hold a lock
            # that another of its connections waits for
            self.engine: Engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_S},
                poolclass=StaticPool,
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url)
        self._lock = threading.RLock()  # every use of the connection and the file checks
        self._connected = False
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._need_schema = False  # the file was lost: check/create the schema on next open
        self._rewrite_known = False  # ...and write every service's latest row to it again
        self._known: dict[str, ServiceRow] = {}  # latest row per service, written or loaded
        # queue: touched on the event loop only
        self._pending_events: deque[EventRow] = deque()
        self._pending_services: dict[str, ServiceRow] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hestia-store")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._inflight: asyncio.Future[None] | None = None
        # health: written from the loop and from reader threads
        self._health_lock = threading.Lock()
        self._error: str | None = None
        self._since: float | None = None
        self._last_warning = 0.0
        self._warned_drop = False
        self._dropped = 0
        self._failed_writes = 0
        self._recreated = 0
        self._last_write: float | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else self.display_url

    # ---------------------------------------------------------------- schema
    def migrate(self) -> None:
        """Create the schema on first start; upgrade it in place on later versions.

        Raises StoreError when the database cannot be used at all. A database that can be read
        but not written is accepted: the store starts degraded (see health()) and retries."""
        with self._lock:
            with self._mapped("open it"):
                self._check_file()
            self._migrate_locked()
            self._need_schema = False
        try:
            with self._lock, self._mapped("write to it"):
                with self.engine.begin() as conn:
                    # rewrites a row as it is: the cheapest proof that writes work
                    conn.execute(
                        text("UPDATE hestia_meta SET value = value WHERE key = 'schema_version'")
                    )
        except StoreUnavailable as exc:
            self._note_failure(exc)

    def schema_version(self) -> int:
        with self._use("read its schema version"):
            with Session(self.engine) as session:
                return _version_of(session.get(MetaRow, "schema_version"), self.where)

    def tables(self) -> list[str]:
        with self._use("list its tables"):
            return sorted(inspect(self.engine).get_table_names())

    def _migrate_locked(self) -> None:
        with self._mapped("read its schema"):
            insp = inspect(self.engine)
            existing = set(insp.get_table_names())
            version = 0
            if MetaRow.__tablename__ in existing:
                with Session(self.engine) as session:
                    version = _version_of(session.get(MetaRow, "schema_version"), self.where)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"state database {self.where} has schema version {version}, newer than this "
                    f"Hestia ({SCHEMA_VERSION}); upgrade Hestia or point database.url elsewhere"
                )
            problems = []
            for table in SQLModel.metadata.sorted_tables:
                if table.name in existing:
                    have = {column["name"] for column in insp.get_columns(table.name)}
                    missing = [c.name for c in table.columns if c.name not in have]
                    if missing:
                        problems.append(f"table {table.name} lacks {', '.join(missing)}")
            if problems:
                raise StoreError(
                    f"state database {self.where} does not have Hestia's schema "
                    f"({'; '.join(problems)}): it belongs to another program or was edited. "
                    + _move_away(self.where)
                )
        if version == SCHEMA_VERSION and existing >= set(SQLModel.metadata.tables):
            return  # nothing to write: a read-only database still starts
        with self._mapped("create its schema"):
            SQLModel.metadata.create_all(self.engine)
            with Session(self.engine) as session:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS.get(step, []):
                        session.exec(text(statement))  # type: ignore[call-overload]
                session.merge(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
                session.commit()

    # ---------------------------------------------------------------- reads
    def load_service_states(self) -> dict[str, StoredService]:
        """Every stored service, decoded; a row that cannot be used is skipped with a warning."""
        columns = (
            "rowid, name, state, last_activity, started_at, last_error, requests_by_class, "
            "errors, cold_starts, updated_at"
        )
        with self._use("read the stored services"):
            with self.engine.connect() as conn:
                raw = conn.execute(text(f"SELECT {columns} FROM hestia_service")).all()
        services: dict[str, StoredService] = {}
        for row in raw:
            try:
                svc = _decode_service(tuple(row[1:]))
            except ValueError as exc:
                logger.warning(
                    "state database {}: skipping row {} of hestia_service (service {!r}): {}; "
                    "that service starts with a fresh idle clock and counters",
                    self.where,
                    row[0],
                    row[1],
                    exc,
                )
                continue
            services[svc.name] = svc
        with self._lock:
            for name, svc in services.items():
                self._known.setdefault(name, svc.to_row())
        return services

    def events(self, service: str | None, limit: int = 100) -> list[EventRow]:
        """The service's (None: every service's) newest events first. Blocking: call it in a
        thread."""
        with self._use("read the events"):
            with Session(self.engine) as session:
                query = select(EventRow)
                if service is not None:
                    query = query.where(EventRow.service == service)
                query = query.order_by(EventRow.id.desc()).limit(limit)  # type: ignore[union-attr]
                return list(session.exec(query).all())

    # ---------------------------------------------------------------- writes
    def record_event(self, row: EventRow) -> None:
        self._pending_events.append(row)
        self._cap_queue()
        self._wake.set()

    def snapshot_service(self, row: ServiceRow) -> None:
        self._pending_services[row.name] = row
        self._wake.set()

    async def flush(self) -> None:
        """Write what is queued now. Raises StoreUnavailable if it cannot; the rows stay queued."""
        async with self._flush_lock:
            if not self._pending_events and not self._pending_services:
                return
            events = list(self._pending_events)
            self._pending_events.clear()
            services, self._pending_services = self._pending_services, {}
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, self._write, events, services)
            self._inflight = future
            # settles (requeues on failure) even when the caller is cancelled mid-write
            future.add_done_callback(partial(self._settle, events, services))
            try:
                await asyncio.shield(future)
            except StoreError:
                raise
            except Exception as exc:  # a bug, not the database; _settle logged it
                raise StoreUnavailable(
                    f"state database {self.where}: writing failed: {exc!r}"
                ) from exc

    def _write(self, events: list[EventRow], services: dict[str, ServiceRow]) -> None:
        with self._lock, self._mapped("write to it"):
            self._check_file()
            rows = {**self._known, **services} if self._rewrite_known else services
            with Session(self.engine) as session:
                # copies: a failed batch must leave the queued rows as they were (no ids)
                session.add_all(EventRow(**e.model_dump(exclude={"id"})) for e in events)
                for row in rows.values():
                    session.merge(row)
                session.commit()
            self._known.update(rows)
            self._rewrite_known = False

    def _settle(
        self,
        events: list[EventRow],
        services: dict[str, ServiceRow],
        future: asyncio.Future[None],
    ) -> None:
        if future.cancelled():
            exc: BaseException | None = StoreUnavailable(f"a write to {self.where} was cancelled")
        else:
            exc = future.exception()
        if exc is None:
            self._note_success(len(events))
            return
        self._pending_events.extendleft(reversed(events))
        self._cap_queue()
        for name, row in services.items():
            self._pending_services.setdefault(name, row)
        with self._health_lock:
            self._failed_writes += 1
        if not isinstance(exc, StoreError):
            if self._error is None:  # a bug, not the database: its traceback, once
                logger.opt(exception=exc).error("writing to state database {} failed", self.where)
            exc = StoreUnavailable(f"state database {self.where}: writing failed: {exc!r}")
        assert isinstance(exc, StoreError)
        self._note_failure(exc)
        self._wake.set()  # retried by run() after retry_every

    def _cap_queue(self) -> None:
        over = len(self._pending_events) - self.max_pending_events
        if over <= 0:
            return
        for _ in range(over):
            self._pending_events.popleft()
        with self._health_lock:
            self._dropped += over
            first = not self._warned_drop
            self._warned_drop = True
        if first:
            logger.warning(
                "state database {}: {} events wait to be written, the limit; dropping the oldest "
                "until it works again (counted as dropped_events in the health report)",
                self.where,
                self.max_pending_events,
            )

    async def run(self, interval: float = 0.5) -> None:
        """Write what was queued, at most every `interval` seconds (`retry_every` while the
        database fails)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except StoreError:
                pass  # noted, logged and requeued by _settle
            except Exception:  # a bug here must not end the writer
                logger.exception("state store writer for {} failed", self.where)
            await asyncio.sleep(self.retry_every if self._error is not None else interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="hestia-store")

    async def close(self) -> None:
        """Stop the writer and write what is queued; never raises."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight is not None:
            await asyncio.wait({self._inflight})  # its _settle has run: a failure is requeued
        try:
            await self.flush()
        except StoreError as exc:
            logger.error(
                "{}; {} event(s) and {} service snapshot(s) could not be saved before exit",
                exc.message,
                len(self._pending_events),
                len(self._pending_services),
            )
        except Exception:
            logger.exception("writing to state database {} at exit failed", self.where)
        self._executor.shutdown(wait=True)
        with self._lock:
            self.engine.dispose()

    # ---------------------------------------------------------------- health
    def health(self) -> dict[str, Any]:
        """The store's state for /v1/health; never blocks, never raises."""
        with self._health_lock:
            return {
                "status": "ok" if self._error is None else "degraded",
                "url": self.display_url,
                "error": self._error,
                "since": self._since,
                "pending_events": len(self._pending_events),
                "dropped_events": self._dropped,
                "failed_writes": self._failed_writes,
                "recreated": self._recreated,
                "last_write": self._last_write,
            }

    def _note_failure(self, exc: StoreError) -> None:
        now = time.time()
        with self._health_lock:
            first = self._error is None
            due = first or exc.message != self._error or now - self._last_warning >= self.warn_every
            if first:
                self._since = now
            self._error = exc.message
            if due:
                self._last_warning = now
            since = self._since or now
        if not due:
            return
        if first:
            logger.warning(
                "{}. Hestia runs on: state changes wait in memory (at most {} events) and are "
                "written when it works again; retrying every {:g}s",
                exc.message,
                self.max_pending_events,
                self.retry_every,
            )
        else:
            logger.warning(
                "{} (failing for {:.0f}s; {} event(s) waiting, {} dropped)",
                exc.message,
                now - since,
                len(self._pending_events),
                self._dropped,
            )

    def _note_success(self, written: int) -> None:
        now = time.time()
        with self._health_lock:
            self._last_write = now
            was, since = self._error, self._since
            self._error = self._since = None
            self._warned_drop = False
            dropped = self._dropped
        if was is not None:
            logger.info(
                "state database {} works again after {:.0f}s: wrote {} waiting event(s); {} "
                "dropped in all",
                self.where,
                now - (since or now),
                written,
                dropped,
            )

    # ---------------------------------------------------------------- the file
    def _check_file(self) -> None:
        """Before every use (under self._lock): notice a lost or replaced file, never let the
        connection follow the file into WAL mode, and (re)open it."""
        if self.path is None:
            if not self._connected:
                self._open()
            return
        identity = _identity(self.path)
        if self._identity is not None and identity != self._identity:
            how = "deleted" if identity is None else "replaced by another file"
            logger.warning(
                "state database {} was {} while Hestia ran; creating it again and writing the "
                "current state of every service to it (earlier events are lost)",
                self.path,
                how,
            )
            self._drop_connection()
            self._identity = None
            self._need_schema = self._rewrite_known = True
            with self._health_lock:
                self._recreated += 1
        elif self._connected and _in_wal_mode(self.path):
            self._drop_connection()
        if not self._connected:
            self._open()
        if self._need_schema:
            self._migrate_locked()
            self._need_schema = False

    def _open(self) -> None:
        path = self.path
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(
                    f"state database {path}: cannot create its directory {path.parent} "
                    f"({exc.strerror}); create it, writable for Hestia, or point database.url "
                    "elsewhere",
                    detail={"database": str(path)},
                ) from None
            header = _read_header(path)
            if header and not header.startswith(_SQLITE_MAGIC):
                raise StoreUnavailable(
                    f"state database {path} is not a SQLite database (its first bytes are "
                    f"{header[:16]!r}). " + _move_away(str(path)),
                    detail={"database": str(path)},
                )
            if header and _in_wal_mode(path, header):
                self._leave_wal(path)
        with self._mapped("open it"), self.engine.connect():
            pass  # opens the one connection; _sqlite_pragmas runs first
        self._connected = True
        if path is not None:
            self._identity = _identity(path)

    def _leave_wal(self, path: Path) -> None:
        """Switch a WAL database back to a rollback journal without mapping its -shm file."""
        with self._mapped("switch it out of WAL mode"):
            # short: a program that has the file open in WAL mode keeps it so; waiting is moot
            conn = sqlite3.connect(path, timeout=0.5, isolation_level=None)
            try:
                conn.execute("PRAGMA mmap_size=0")
                # before the first access: SQLite keeps the WAL index in heap memory
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")
                try:
                    mode = conn.execute("PRAGMA journal_mode=TRUNCATE").fetchone()[0]
                except sqlite3.OperationalError as exc:
                    if not str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_BUSY"):
                        raise
                    mode = "busy"
                if mode != "truncate":
                    raise StoreUnavailable(
                        f"state database {path} is in WAL mode and another program has it open; "
                        "Hestia does not use WAL (a damaged -shm file crashes every process "
                        "that maps it): close that program",
                        detail={"database": str(path)},
                    )
                conn.execute("PRAGMA locking_mode=NORMAL")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # drops the lock
            finally:
                conn.close()
        with contextlib.suppress(OSError):
            os.unlink(f"{path}-shm")  # left over; nothing uses it now
        logger.warning(
            "state database {} was in WAL mode (an older Hestia or another program set it); "
            "switched it back to a rollback journal",
            path,
        )

    def _drop_connection(self) -> None:
        self.engine.dispose()
        self._connected = False

    @contextlib.contextmanager
    def _use(self, doing: str) -> Iterator[None]:
        """Hold the checked connection for a read; a failure shows in health() too."""
        try:
            with self._lock, self._mapped(doing):
                self._check_file()
                yield
        except StoreError as exc:
            self._note_failure(exc)
            raise

    @contextlib.contextmanager
    def _mapped(self, doing: str) -> Iterator[None]:
        """Turn the database's errors into StoreUnavailable; the next use reconnects."""
        try:
            yield
        except StoreError:
            self._drop_connection()
            raise
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            self._drop_connection()
            raise StoreUnavailable(
                _explain(self.where, doing, exc), detail={"database": self.where}
            ) from exc


def error_json(error: dict[str, Any] | None) -> str | None:
    return json.dumps(error) if error else None


def wall(monotonic_ts: float) -> float:
    return time.time() - (time.monotonic() - monotonic_ts)


_MIGRATIONS: dict[int, list[str]] = {
    # version: statements that bring the previous version's schema to this one
    1: [],
}


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA mmap_size=0")
    cursor.execute("PRAGMA journal_mode=TRUNCATE")
    # a rollback journal needs FULL to be safe on power loss; one batch at most every 0.5 s
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _read_header(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(100)
    except FileNotFoundError:
        return None


def _in_wal_mode(path: Path, header: bytes | None = None) -> bool:
    """The header's read/write versions say WAL, or a -wal file with content waits."""
    if header is None:
        header = _read_header(path) or b""
    if len(header) >= 20 and 2 in (header[18], header[19]):
        return True
    try:
        return os.stat(f"{path}-wal").st_size > 0
    except FileNotFoundError:
        return False


def _move_away(where: str) -> str:
    return (
        f"Stop Hestia and move the file away (mv {where} {where}.bad); Hestia then creates a new "
        "one (services keep running; their idle clocks and counters start afresh)"
    )


# SQLite's error name (prefix) -> what is wrong, what to do
_ADVICE: list[tuple[str, str, str]] = [
    (
        "SQLITE_READONLY",
        "it is read-only",
        "make the file and its directory writable for Hestia (permissions, `lsattr`, "
        "a read-only mount)",
    ),
    ("SQLITE_FULL", "the disk is full", "free space on its disk"),
    ("SQLITE_BUSY", "another program holds a lock on it", "close the program that has it open"),
    ("SQLITE_LOCKED", "another program holds a lock on it", "close the program that has it open"),
    (
        "SQLITE_CANTOPEN",
        "it cannot be opened or created",
        "check that its directory exists and is writable for Hestia",
    ),
    ("SQLITE_PERM", "access is denied", "make the file and its directory writable for Hestia"),
    ("SQLITE_NOTADB", "it is not a SQLite database", ""),
    ("SQLITE_CORRUPT", "it is damaged", ""),
    (
        "SQLITE_IOERR",
        "an I/O error",
        "check the disk, and whether the file was changed or removed underneath Hestia",
    ),
]


def _explain(where: str, doing: str, exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    name = str(getattr(orig, "sqlite_errorname", ""))
    said = str(orig).strip() or type(orig).__name__
    what, todo = "", ""
    for prefix, what_, todo_ in _ADVICE:
        if name.startswith(prefix):
            what, todo = what_, todo_ or _move_away(where)
            break
    else:
        if "no such table" in said or "no such column" in said:
            what, todo = "its tables are not Hestia's", _move_away(where)
    if not what:
        return f"state database {where}: cannot {doing}: {said}"
    return f"state database {where}: cannot {doing}: {what} ({said}); {todo}"


def _version_of(row: MetaRow | None, where: str) -> int:
    if row is None:
        return 0
    try:
        return int(row.value)
    except ValueError:
        raise StoreError(
            f"state database {where} has schema version {row.value!r}, not a number. "
            + _move_away(where)
        ) from None


def _decode_service(raw: tuple[Any, ...]) -> StoredService:
    """One hestia_service row as SQLite holds it (any type in any column) -> StoredService."""
    name, state, last_activity, started_at, last_error, requests, errors, cold, updated = raw
    if not isinstance(name, str) or not name:
        raise ValueError(f"name is {name!r}, not a service name")
    if not isinstance(state, str) or not state:
        raise ValueError(f"state is {state!r}, not a state")
    error: dict[str, Any] | None = None
    if last_error:
        try:
            decoded = json.loads(last_error)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"last_error is not JSON ({exc}): {str(last_error)[:80]!r}") from None
        if decoded is not None and not isinstance(decoded, dict):
            raise ValueError(f"last_error is {type(decoded).__name__}, not a JSON object")
        error = decoded
    try:
        counts = json.loads(requests) if requests else [0] * 5
    except (TypeError, ValueError) as exc:
        raise ValueError(f"requests_by_class is not JSON ({exc}): {str(requests)[:80]!r}") from None
    if (
        not isinstance(counts, list)
        or len(counts) > 5
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
    ):
        raise ValueError(f"requests_by_class is {counts!r}, not five counts")
    return StoredService(
        name=name,
        state=state,
        last_activity=_number("last_activity", last_activity),
        started_at=None if started_at is None else _number("started_at", started_at),
        last_error=error,
        requests_by_class=[*counts, *[0] * (5 - len(counts))],
        errors=_count("errors", errors),
        cold_starts=_count("cold_starts", cold),
        updated_at=0.0 if updated is None else _number("updated_at", updated),
    )


def _number(column: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{column} is {value!r}, not a time")
    return float(value)


def _count(column: str, value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{column} is {value!r}, not a count")
    return value
