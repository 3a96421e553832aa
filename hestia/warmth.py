"""Hot standby for one service: `keep_warm`, `warm_schedule` and `idle_timeout: auto`.

`idle_timeout: auto` (the rule, also in the README): Hestia remembers the recent gaps between
uses of the service (a gap is the time from the end of one request to the start of the next,
counted when it is at least a minute: shorter pauses are one session), the last 20 of them
within a day. The idle timeout is 1.5 x the median gap, kept between `idle_auto.min` and
`idle_auto.max`; with no gap on record yet it is `idle_auto.min`. A service used every 20
minutes thus gets 30 minutes and is not stopped between uses; one used twice a day falls
back to the floor.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import Any

from hestia.config import ServiceConfig
from hestia.schedule import Schedule

GAP_MIN_S = 60.0
GAP_MEMORY_S = 86400.0
GAPS_KEPT = 20
AUTO_FACTOR = 1.5

Clock = Callable[[], datetime]


class Warmth:
    def __init__(self, config: ServiceConfig, tz: tzinfo | None, clock: Clock) -> None:
        self.keep_warm = config.keep_warm
        self.schedule = Schedule(config.warm_schedule, tz)
        self.auto = config.idle_timeout == "auto"
        self.fixed = 0.0 if config.idle_timeout == "auto" else float(config.idle_timeout)
        self.floor = config.idle_auto.min
        self.ceiling = config.idle_auto.max
        self.clock = clock
        self.gaps: deque[tuple[float, float]] = deque(maxlen=GAPS_KEPT)  # (when, seconds)

    @property
    def wanted(self) -> bool:
        """Something keeps this service warm (so the gateway starts it ahead of use)."""
        return self.keep_warm or bool(self.schedule)

    def keep_running(self) -> bool:
        return self.keep_warm or (bool(self.schedule) and self.schedule.active(self.clock()))

    def note_gap(self, seconds: float) -> None:
        if seconds >= GAP_MIN_S:
            self.gaps.append((time.time(), seconds))

    def idle_timeout(self) -> float:
        if not self.auto:
            return self.fixed
        cutoff = time.time() - GAP_MEMORY_S
        recent = [s for when, s in self.gaps if when >= cutoff]
        if not recent:
            return self.floor
        return min(max(AUTO_FACTOR * statistics.median(recent), self.floor), self.ceiling)

    def adopt_history(self, previous: Warmth) -> None:
        """Keep what was learned across a reconfigure."""
        self.gaps = previous.gaps

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keep_warm": self.keep_warm}
        if self.schedule:
            now = self.clock()
            out["schedule_active"] = self.schedule.active(now)
            out["schedule_changes_at"] = self.schedule.next_change(now).isoformat()
        if self.auto:
            out["idle_timeout_rule"] = (
                f"auto: {AUTO_FACTOR:g} x the median of {len(self.gaps)} recent gap(s) "
                f"between uses, between {self.floor:g}s and {self.ceiling:g}s"
            )
        return out
