"""State that survives restarts: SQLModel tables and the few queries on them.

Nothing here runs on the request path. Lifecycle events and service snapshots are queued in
memory and written in batches by one background task on a thread of its own; a clean shutdown
flushes everything that was queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loguru import logger
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, create_engine, select

SCHEMA_VERSION = 1
DEFAULT_DATABASE_URL = "sqlite:///data/hestia.db"


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


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, connect_args=_connect_args(url))
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._pending_events: list[EventRow] = []
        self._pending_services: dict[str, ServiceRow] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hestia-store")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ---------------------------------------------------------------- schema
    def migrate(self) -> None:
        """Create the schema on first start; upgrade it in place on later versions."""
        SQLModel.metadata.create_all(self.engine)
        with Session(self.engine) as session:
            row = session.get(MetaRow, "schema_version")
            current = int(row.value) if row else 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database {self.url} has schema version {current}, newer than this Hestia "
                    f"({SCHEMA_VERSION}); upgrade Hestia or point database.url elsewhere"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(version, []):
                    session.exec(text(statement))  # type: ignore[call-overload]
            session.merge(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            session.commit()

    def schema_version(self) -> int:
        with Session(self.engine) as session:
            row = session.get(MetaRow, "schema_version")
            return int(row.value) if row else 0

    def tables(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    # ---------------------------------------------------------------- reads
    def load_services(self) -> dict[str, ServiceRow]:
        with Session(self.engine) as session:
            return {row.name: row for row in session.exec(select(ServiceRow)).all()}

    def events(self, service: str, limit: int = 100) -> list[EventRow]:
        with Session(self.engine) as session:
            query = (
                select(EventRow)
                .where(EventRow.service == service)
                .order_by(EventRow.id.desc())  # type: ignore[union-attr]
                .limit(limit)
            )
            return list(session.exec(query).all())

    # ---------------------------------------------------------------- writes
    def record_event(self, row: EventRow) -> None:
        self._pending_events.append(row)
        self._wake.set()

    def snapshot_service(self, row: ServiceRow) -> None:
        self._pending_services[row.name] = row
        self._wake.set()

    def _write(self, events: list[EventRow], services: list[ServiceRow]) -> None:
        with Session(self.engine) as session:
            session.add_all(events)
            for row in services:
                session.merge(row)
            session.commit()

    async def flush(self) -> None:
        events, self._pending_events = self._pending_events, []
        services = list(self._pending_services.values())
        self._pending_services = {}
        if not events and not services:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write, events, services)
        except Exception:
            logger.exception(
                "writing {} event(s) to {} failed; they are kept and retried",
                len(events),
                self.url,
            )
            self._pending_events[:0] = events
            for row in services:
                self._pending_services.setdefault(row.name, row)
            raise

    async def run(self, interval: float = 0.5) -> None:
        """Write what was queued, at most every `interval` seconds."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            with contextlib.suppress(Exception):
                await self.flush()
            await asyncio.sleep(interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="hestia-store")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def error_json(error: dict[str, Any] | None) -> str | None:
    return json.dumps(error) if error else None


def wall(monotonic_ts: float) -> float:
    return time.time() - (time.monotonic() - monotonic_ts)


_MIGRATIONS: dict[int, list[str]] = {
    # version: statements that bring the previous version's schema to this one
    1: [],
}


def _connect_args(url: str) -> dict[str, Any]:
    return {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
