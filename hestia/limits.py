"""Server-wide guards against a client exhausting the gateway: connection caps, a coarse clock
with one sweep for every connection's timeouts, and warnings at most once per interval.

The per-request cost is what the protocol in `hestia.server` pays: a timestamp copied from
`ConnectionGuard.now` at each phase change. No timer is armed per request or per connection;
`tick()` runs from uvicorn's main loop (every 0.1 s) and, every `sweep_every` seconds, asks each
connection whether one of its deadlines has passed. Deadlines are therefore kept to within one
sweep (at most 1 s, or a quarter of the shortest timeout).
"""

from __future__ import annotations

import resource
import time
from typing import Protocol

from loguru import logger

from hestia.config import ServerLimits, ServerTimeouts

# A refused connection's last bytes are read (and dropped) this long before it is closed, so
# that a client still sending its oversized request reads the answer instead of a reset.
LINGER_S = 2.0
# Warnings of one kind (e.g. "per-client connection cap") come out at most this often.
LOG_EVERY_S = 10.0


class Sweepable(Protocol):
    def check_timeouts(self, now: float) -> None: ...


class ConnectionGuard:
    """Counts open connections, in all and per client address, and sweeps their timeouts."""

    def __init__(
        self,
        limits: ServerLimits,
        timeouts: ServerTimeouts,
        *,
        log_every: float = LOG_EVERY_S,
    ) -> None:
        self.limits = limits
        self.timeouts = timeouts
        self.log_every = log_every
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.conns: set[Sweepable] = set()
        # a head shorter than every head limit needs no line-by-line check
        self.scan_from = min(limits.max_request_line, limits.max_header_line)
        self.scan_from = min(self.scan_from, limits.max_header_bytes)
        self.now = time.monotonic()
        shortest = min(timeouts.header, timeouts.body, timeouts.keep_alive)
        self.sweep_every = min(1.0, max(0.05, shortest / 4))
        self._next_sweep = self.now + self.sweep_every
        self._last_warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    # ------------------------------------------------------------------ connections
    def admit(self, client: str) -> str | None:
        """Take a slot for a new connection from `client`; the reason when there is none."""
        lim = self.limits
        if self.total >= lim.max_connections:
            self.warn(
                "max_connections",
                f"refused a connection from {client}: {self.total} connections are open "
                f"(server.limits.max_connections is {lim.max_connections})",
            )
            return (
                f"the gateway has {self.total} open connections, its limit "
                "(server.limits.max_connections); try again shortly"
            )
        n = self.per_client.get(client, 0)
        if n >= lim.max_connections_per_client:
            self.warn(
                "max_connections_per_client",
                f"refused a connection from {client}: it has {n} open "
                f"(server.limits.max_connections_per_client is {lim.max_connections_per_client}"
                "; behind a TLS proxy every client shares its address: raise it)",
            )
            return (
                f"{client} has {n} open connections to the gateway, its limit per client "
                "(server.limits.max_connections_per_client); close some and try again"
            )
        self.per_client[client] = n + 1
        self.total += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        n = self.per_client[client] - 1
        if n:
            self.per_client[client] = n
        else:
            del self.per_client[client]

    # ------------------------------------------------------------------ time
    def tick(self) -> None:
        """Advance the clock; sweep the connections' deadlines when a sweep is due."""
        now = self.now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_every
        for conn in list(self.conns):
            conn.check_timeouts(now)
        if self._suppressed:
            self._flush_suppressed(now)

    # ------------------------------------------------------------------ warnings
    def warn(self, kind: str, message: str) -> None:
        """Log `message` unless one of this kind was logged less than `log_every` ago; those
        are counted and summed up in the next one (or by the sweep once the interval is over)."""
        now = self.now
        last = self._last_warned.get(kind)
        if last is not None and now - last < self.log_every:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_warned[kind] = now
        more = self._suppressed.pop(kind, 0)
        if more:
            message += f" (and {more} more like it in the last {self.log_every:g}s)"
        logger.bind(limit=kind).warning("{}", message)

    def _flush_suppressed(self, now: float) -> None:
        for kind, n in list(self._suppressed.items()):
            if now - self._last_warned[kind] >= self.log_every:
                del self._suppressed[kind]
                self._last_warned[kind] = now
                logger.bind(limit=kind).warning(
                    "{} more refusal(s) of kind {} in the last {:g}s", n, kind, self.log_every
                )


def raise_nofile_limit(max_connections: int) -> int:
    """Raise this process's open-file soft limit to its hard limit; return the limit in force.

    Every client connection can hold an upstream connection as well, so the gateway needs about
    two descriptors per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            new = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit {} to {}: {}", soft, target, exc)
    if new != soft:
        logger.info("open-file limit raised from {} to {} (the hard limit)", soft, new)
    else:
        logger.info("open-file limit: {}", new)
    need = 2 * max_connections + 64
    if new != resource.RLIM_INFINITY and new < need:
        logger.warning(
            "server.limits.max_connections is {} but the open-file limit is {}: about {} are "
            "needed (a client and an upstream connection each); raise the limit (ulimit -n, "
            "docker --ulimit nofile=) or lower max_connections",
            max_connections,
            new,
            need,
        )
    return new
