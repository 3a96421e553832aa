"""Wake filters: requests that must not wake a stopped service (favicon fetches, robots,
uptime checkers, crawlers). To a stopped service they get 503 `not_woken` at once; to a
running one they pass, and (unless `wake.touch`) do not reset its idle clock."""

from __future__ import annotations

import fnmatch
import re

from hestia.config import WakeConfig
from hestia.types import Scope


class WakeFilter:
    __slots__ = ("_agents", "_paths", "touch")

    def __init__(self, config: WakeConfig) -> None:
        self._paths = (
            re.compile("|".join(fnmatch.translate(g) for g in config.ignore_paths))
            if config.ignore_paths
            else None
        )
        self._agents = (
            re.compile("|".join(f"(?:{r})" for r in config.ignore_user_agents))
            if config.ignore_user_agents
            else None
        )
        self.touch = config.touch

    @staticmethod
    def build(config: WakeConfig) -> WakeFilter | None:
        """None when nothing is filtered (the proxy then does no work at all)."""
        if not config.ignore_paths and not config.ignore_user_agents:
            return None
        return WakeFilter(config)

    def ignores(self, path: bytes, scope: Scope) -> bool:
        if self._paths is not None and self._paths.match(path.decode("latin-1")):
            return True
        if self._agents is not None:
            for key, value in scope["headers"]:
                if key == b"user-agent":
                    return self._agents.search(value.decode("latin-1")) is not None
        return False
