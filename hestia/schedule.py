"""Time windows for `warm_schedule`: "Mon-Fri 08:00-18:00", "Sat,Sun 10:00-14:00",
"daily 22:00-02:00" (a window may run past midnight: it then ends on the next day).

Days: Mon Tue Wed Thu Fri Sat Sun, a range (Mon-Fri, Fri-Mon wraps), a comma list, or
`daily` / `*`. Times: HH:MM, 24 h; `24:00` ends a window at midnight. Evaluated in the
configured time zone (`schedule.timezone`, else the machine's local time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(\S+)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday: the days the window *starts* on
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start: runs past midnight

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        today = when.weekday()
        if self.start < self.end:
            return today in self.days and self.start <= minute < self.end
        # past midnight: the evening part today, or the morning part of yesterday's window
        if today in self.days and minute >= self.start:
            return True
        return (today - 1) % 7 in self.days and minute < self.end


def _day(name: str) -> int:
    try:
        return DAYS.index(name[:3].lower())
    except ValueError:
        raise ValueError(f"{name!r} is not a day; use Mon, Tue, ... Sun") from None


def _days(spec: str) -> frozenset[int]:
    if spec.lower() in ("daily", "*", "every"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        first, dash, last = part.partition("-")
        a = _day(first)
        if not dash:
            days.add(a)
            continue
        b = _day(last)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def parse_window(text: str) -> Window:
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a time window; write e.g. 'Mon-Fri 08:00-18:00' or "
            "'daily 22:00-02:00'"
        )
    h1, m1, h2, m2 = (int(g) for g in m.groups()[1:])
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"{text!r}: a time is out of range (00:00-24:00)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError(f"{text!r}: the window is empty (start equals end)")
    return Window(_days(m.group(1)), start, 0 if end == 24 * 60 else end)


def zone(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a known time zone (e.g. Europe/Berlin, UTC)") from None


class Schedule:
    """A service's warm windows, asked "is it warm now?" and "when does that change?"."""

    def __init__(self, windows: list[str], tz: tzinfo | None = None) -> None:
        self.windows = [parse_window(w) for w in windows]
        self.tz = tz

    def __bool__(self) -> bool:
        return bool(self.windows)

    def local(self, now: datetime) -> datetime:
        return now.astimezone(self.tz) if self.tz is not None else now.astimezone()

    def active(self, now: datetime) -> bool:
        when = self.local(now)
        return any(w.contains(when) for w in self.windows)

    def next_change(self, now: datetime, horizon: timedelta = timedelta(days=8)) -> datetime:
        """The next minute boundary at which `active()` changes (at most `horizon` ahead)."""
        state = self.active(now)
        step = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        end = now + horizon
        # window edges fall on whole minutes: walk to the next edge of any window, not by
        # every minute (a week has 10,080 of them)
        while step < end:
            if self.active(step) != state:
                return step
            step = self._next_edge(step)
        return end

    def _next_edge(self, when: datetime) -> datetime:
        local = self.local(when)
        minute = local.hour * 60 + local.minute
        edges = sorted({w.start for w in self.windows} | {w.end for w in self.windows})
        later = [e for e in edges if e > minute]
        if later:
            return when + timedelta(minutes=later[0] - minute)
        return when + timedelta(minutes=24 * 60 - minute + edges[0])
