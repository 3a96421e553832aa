"""Services that depend on each other, and services that exclude each other.

- `depends_on: [db, cache]`: starting a service first starts its dependencies and waits for
  them to be ready (in the start's own time budget); a dependency is not stopped for
  idleness while a dependent runs. A cycle is refused: in the config file at load time, among
  labelled services when the start would follow it.
- `exclusive_group: gpu`: at most one service of the group runs. Starting one stops the
  others first, each after its requests in flight have finished (a personal AI box with one
  GPU swapping models); requests for a stopped one wait as usual and swap it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from loguru import logger

from hestia.errors import HestiaError, ServiceStartFailed
from hestia.lifecycle import Coordinator, Service, State

_RUNNING = (State.READY, State.STARTING)


def find_cycle(graph: Mapping[str, list[str]]) -> list[str] | None:
    """A dependency cycle (as a path a -> b -> a) in `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in list(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


class Groups(Coordinator):
    def __init__(self, services: Mapping[str, Service]) -> None:
        self._services = services

    def needed(self, svc: Service) -> bool:
        return any(
            other.state in _RUNNING and svc.name in other.config.depends_on
            for other in self._services.values()
            if other is not svc
        )

    async def before_start(self, svc: Service) -> None:
        if svc.config.depends_on:
            graph = {name: list(s.config.depends_on) for name, s in self._services.items()}
            cycle = find_cycle({n: graph[n] for n in _reachable(graph, svc.name)})
            if cycle:
                raise ServiceStartFailed(
                    f"service {svc.name!r} cannot start: its dependencies form a cycle "
                    f"({' -> '.join(cycle)}); fix depends_on",
                    service=svc.name,
                )
            await asyncio.gather(*(self._dependency(svc, name) for name in svc.config.depends_on))
        group = svc.config.exclusive_group
        if group:
            await self._make_room(svc, group)

    async def _dependency(self, svc: Service, name: str) -> None:
        dep = self._services.get(name)
        if dep is None:
            raise ServiceStartFailed(
                f"service {svc.name!r} depends on {name!r}, which is not a known service; "
                "fix depends_on or add it",
                service=svc.name,
            )
        if dep.state is State.READY:
            return
        result = await asyncio.shield(dep.ensure_started("dependency"))
        if isinstance(result, HestiaError):
            raise ServiceStartFailed(
                f"service {svc.name!r} cannot start: its dependency {name!r} failed to start: "
                f"{result.message}",
                service=svc.name,
                detail={"dependency": name},
            )

    async def _make_room(self, svc: Service, group: str) -> None:
        stops = []
        for other in self._services.values():
            if other is svc or other.config.exclusive_group != group:
                continue
            if other.state in (State.STOPPED, State.FAILED):
                continue
            logger.info(
                "service {} starts: stopping {} (exclusive_group {}) once its requests end",
                svc.name,
                other.name,
                group,
            )
            task = other.request_stop("exclusive", drain=True)
            if task is not None:
                stops.append(task)
        if stops:
            await asyncio.gather(*(asyncio.shield(t) for t in stops))


def _reachable(graph: Mapping[str, list[str]], start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
