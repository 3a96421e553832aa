"""A FIFO concurrency limit that can be resized while requests hold and wait for its slots.

`max_concurrency` of a service: at most `capacity` holders at once, the rest wait in arrival
order. A waiter that gives up (timeout, client gone: cancellation) leaves the line at once and
never leaks a slot, even when it was handed one in the same instant. `resize()` applies a new
limit to the next request: more room wakes waiters now; less room lets the current holders
finish. `capacity=None` means no limit (holders are still counted, so a limit set later knows
how many are in).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Limiter:
    __slots__ = ("_waiters", "capacity", "in_use")

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def try_acquire(self) -> bool:
        if self.capacity is None or (self.in_use < self.capacity and not self._waiters):
            self.in_use += 1
            return True
        return False

    async def acquire(self, timeout: float | None) -> None:
        """Take a slot, waiting in line at most `timeout` seconds (TimeoutError after)."""
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot as we gave up: pass it on
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        self.in_use -= 1
        if self._waiters:
            self._wake()

    def resize(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and (self.capacity is None or self.in_use < self.capacity):
            fut = waiters.popleft()
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)
