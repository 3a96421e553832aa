"""A reusable events pump for engine-style backends (Docker today, Swarm and more Docker hosts
next): follows a blocking event stream on a thread of its own, hands the events to the event
loop, and when the stream breaks reconnects with a capped back-off, resuming from the time of
the last event it saw, so nothing is lost.

It also reports the connection itself: a `disconnected` event when the stream breaks (with the
reason) and a `reconnected` event when it is back, so the registry can mark the backend's
services unreachable meanwhile and reconcile afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generic, TypeVar

from loguru import logger

from hestia.backends.base import BackendEvent

Raw = TypeVar("Raw")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


class EventPump(Generic[Raw]):
    def __init__(
        self,
        backend: str,
        open_stream: Callable[[Any], Iterable[Raw]],
        convert: Callable[[Raw], BackendEvent | None],
        time_of: Callable[[Raw], Any],
        close_stream: Callable[[Iterable[Raw]], None] = lambda _: None,
        now: Callable[[], Any] = lambda: None,
    ) -> None:
        """`open_stream(since)` opens the blocking stream (since=None: from now);
        `convert(raw)` makes a BackendEvent of a raw event (None: not of interest);
        `time_of(raw)` is what to resume from; `close_stream(stream)` unblocks a reader;
        `now()` is the `since` of a subscription made now."""
        self._now = now
        self._backend = backend
        self._open = open_stream
        self._convert = convert
        self._time_of = time_of
        self._close_stream = close_stream
        self._streams: list[Iterable[Raw]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def events(self) -> AsyncIterator[BackendEvent]:
        """Subscribe now: events from this moment on are delivered, even those that happen
        before the first iteration (the stream is opened with `since` = now)."""
        return self._follow(self._now())

    async def _follow(self, subscribed: Any) -> AsyncIterator[BackendEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[BackendEvent] = asyncio.Queue()
        stop = threading.Event()

        def put(ev: BackendEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        def pump() -> None:
            since: Any = subscribed
            delay = BACKOFF_FIRST_S
            broken = False
            while not (stop.is_set() or self._closed.is_set()):
                try:
                    stream = self._open(since)
                    with self._lock:
                        self._streams.append(stream)
                    if broken:
                        logger.info("{} events stream is back", self._backend)
                        put(BackendEvent("reconnected", "", ""))
                        broken = False
                    delay = BACKOFF_FIRST_S
                    for raw in stream:
                        since = self._time_of(raw) or since
                        ev = self._convert(raw)
                        if ev is not None:
                            put(ev)
                    if stop.is_set() or self._closed.is_set():
                        return
                    raise ConnectionError("the stream ended")
                except Exception as exc:
                    if stop.is_set() or self._closed.is_set():
                        return
                    if not broken:
                        broken = True
                        put(BackendEvent("disconnected", "", "", reason=str(exc)))
                    logger.warning(
                        "{} events stream broke ({}); reconnecting in {:g}s",
                        self._backend,
                        exc,
                        delay,
                    )
                    stop.wait(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                finally:
                    self._forget_streams()

        thread = threading.Thread(target=pump, name=f"hestia-{self._backend}-events", daemon=True)
        thread.start()
        try:
            while True:
                yield await queue.get()
        finally:
            stop.set()
            self._forget_streams(close=True)

    def _forget_streams(self, close: bool = False) -> None:
        with self._lock:
            streams, self._streams = self._streams, []
        if close:
            for stream in streams:
                try:
                    self._close_stream(stream)
                except Exception:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._forget_streams(close=True)
