"""Numbers about every service: a recorder the proxy and the lifecycle write to with plain
integer updates (no locks, no prometheus-client objects on the request path), shown as JSON at
/v1/metrics and in Prometheus text form at /metrics, built at scrape time."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Requests for names that are not services share one series: junk names must not each
# become a metrics series of their own.
UNKNOWN_SERVICE = "<unknown>"

# in flight, waiting, peak waiting, state, refusals by reason
Live = tuple[int, int, int, str, dict[str, int]]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class ServiceMetrics:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cold_starts",
        "errors",
        "ready_s",
        "ready_since",
        "requests",
        "start_durations",
        "upstream_errors",
        "wait_count",
        "wait_total_s",
    )

    def __init__(self) -> None:
        self.requests = [0, 0, 0, 0, 0]  # by status class 1xx..5xx
        self.errors = 0  # answers made by Hestia itself because something failed (502/503/504)
        self.upstream_errors = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.cold_starts = 0
        self.start_durations: deque[float] = deque(maxlen=1000)
        self.wait_count = 0
        self.wait_total_s = 0.0
        self.ready_s = 0.0
        self.ready_since: float | None = None

    def record(self, status: int, bytes_in: int, bytes_out: int) -> None:
        index = status // 100 - 1
        if 0 <= index < 5:
            self.requests[index] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def record_wait(self, seconds: float) -> None:
        self.wait_count += 1
        self.wait_total_s += seconds

    def ready_seconds(self, now: float) -> float:
        return self.ready_s + (now - self.ready_since if self.ready_since is not None else 0.0)


class Metrics:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.services: dict[str, ServiceMetrics] = {}
        self._live: Callable[[], dict[str, Live]] = dict
        # with data-plane workers: brings their counters up to date before a read (the API
        # awaits it before it answers /v1/metrics, /metrics and a service's status)
        self.sync: Callable[[], Awaitable[None]] | None = None
        # with data-plane workers: {"configured", "running", "restarts"} (Controller.info)
        self.workers: Callable[[], dict[str, int]] | None = None

    def service(self, name: str) -> ServiceMetrics:
        m = self.services.get(name)
        if m is None:
            m = self.services[name] = ServiceMetrics()
        return m

    def bind_live(self, live: Callable[[], dict[str, Live]]) -> None:
        """`live()` -> {service: (in_flight, waiting, peak_waiting, state, refused by reason)},
        read at scrape time."""
        self._live = live

    def on_transition(self, name: str, old: str, new: str, duration_s: float | None) -> None:
        m = self.service(name)
        now = time.monotonic()
        if new == "ready":
            m.ready_since = now
            if old == "starting" and duration_s is not None:
                m.cold_starts += 1
                m.start_durations.append(duration_s)
        elif old == "ready" and m.ready_since is not None:
            m.ready_s += now - m.ready_since
            m.ready_since = None

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        uptime = max(now - self.started, 1e-9)
        live = self._live()
        services: dict[str, Any] = {}
        totals = {"requests": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0, "cold_starts": 0}
        for name in sorted(set(self.services) | set(live)):
            m = self.service(name)
            in_flight, waiting, peak_waiting, state, refused = live.get(
                name, (0, 0, 0, "unknown", {})
            )
            durations = list(m.start_durations)
            requests = dict(zip(_CLASSES, m.requests, strict=True))
            services[name] = {
                "state": state,
                "requests": requests,
                "requests_total": sum(m.requests),
                "errors": m.errors,
                "upstream_errors": m.upstream_errors,
                "bytes_in": m.bytes_in,
                "bytes_out": m.bytes_out,
                "cold_starts": m.cold_starts,
                "start_duration_s": {
                    "p50": _percentile(durations, 0.5),
                    "p95": _percentile(durations, 0.95),
                    "max": max(durations) if durations else None,
                    "count": len(durations),
                },
                "wait_s": {
                    "count": m.wait_count,
                    "total": m.wait_total_s,
                    "mean": m.wait_total_s / m.wait_count if m.wait_count else None,
                },
                "waiting": waiting,
                "peak_waiting": max(peak_waiting, waiting),
                "in_flight": in_flight,
                # requests turned away without reaching the service, by reason: queue_full,
                # queue_timeout, start_timeout, client_gone, not_woken
                "refused": dict(refused),
                "uptime_share": min(1.0, m.ready_seconds(now) / uptime),
            }
            totals["requests"] += sum(m.requests)
            totals["errors"] += m.errors
            totals["bytes_in"] += m.bytes_in
            totals["bytes_out"] += m.bytes_out
            totals["cold_starts"] += m.cold_starts
        snap: dict[str, Any] = {"uptime_s": uptime, "totals": totals, "services": services}
        if self.workers is not None:
            snap["workers"] = self.workers()
        return snap


class PrometheusCollector(Collector):
    """The same numbers as /v1/metrics, with hestia_ names and a `service` label."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        snap = self.metrics.snapshot()
        svc = ["service"]
        requests = CounterMetricFamily(
            "hestia_requests", "Proxied requests by status class", labels=["service", "class"]
        )
        counters = {
            "errors": CounterMetricFamily(
                "hestia_errors", "Requests answered with an error of Hestia's own", labels=svc
            ),
            "bytes_in": CounterMetricFamily("hestia_bytes_in", "Request body bytes", labels=svc),
            "bytes_out": CounterMetricFamily("hestia_bytes_out", "Response body bytes", labels=svc),
            "cold_starts": CounterMetricFamily("hestia_cold_starts", "Starts", labels=svc),
        }
        gauges = {
            "in_flight": GaugeMetricFamily("hestia_in_flight", "Requests in flight", labels=svc),
            "waiting": GaugeMetricFamily("hestia_waiting", "Requests held for a start", labels=svc),
            "peak_waiting": GaugeMetricFamily(
                "hestia_peak_waiting", "Most requests held at once", labels=svc
            ),
            "uptime_share": GaugeMetricFamily(
                "hestia_uptime_share", "Share of Hestia's uptime the service was ready", labels=svc
            ),
        }
        ready = GaugeMetricFamily("hestia_service_ready", "1 when ready", labels=svc)
        start = SummaryMetricFamily(
            "hestia_start_duration_seconds", "Time from start to ready", labels=svc
        )
        wait = SummaryMetricFamily(
            "hestia_wait_seconds", "Time requests spent waiting for a start", labels=svc
        )
        refused = CounterMetricFamily(
            "hestia_refused",
            "Requests turned away before reaching the service, by reason",
            labels=["service", "reason"],
        )
        for name, s in snap["services"].items():
            for reason, count in s["refused"].items():
                refused.add_metric([name, reason], count)
            for cls, count in s["requests"].items():
                requests.add_metric([name, cls], count)
            for key, counter in counters.items():
                counter.add_metric([name], s[key])
            for key, gauge in gauges.items():
                gauge.add_metric([name], s[key])
            ready.add_metric([name], 1.0 if s["state"] == "ready" else 0.0)
            m = self.metrics.service(name)
            start.add_metric([name], len(m.start_durations), sum(m.start_durations))
            wait.add_metric([name], m.wait_count, m.wait_total_s)
        yield requests
        yield from counters.values()
        yield from gauges.values()
        yield from (ready, start, wait, refused)
        yield GaugeMetricFamily("hestia_uptime_seconds", "Seconds since start", snap["uptime_s"])
        workers = snap.get("workers")
        if workers is not None:
            yield GaugeMetricFamily(
                "hestia_workers", "Data-plane workers running", workers["running"]
            )
            yield GaugeMetricFamily(
                "hestia_workers_configured", "Data-plane workers configured", workers["configured"]
            )
            yield CounterMetricFamily(
                "hestia_worker_restarts",
                "Data-plane workers started again after one died",
                workers["restarts"],
            )
