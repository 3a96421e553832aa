"""The one place that decides where a request goes."""

from __future__ import annotations

import pytest

from hestia.router import Route, Router, remove_dot_segments


def _scope(raw: bytes) -> dict[str, object]:
    return {"type": "http", "path": raw.decode("latin-1"), "raw_path": raw, "headers": []}


@pytest.mark.parametrize(
    ("raw", "route"),
    [
        (b"/services/ollama/api/tags", Route("ollama", b"/api/tags", b"/services/ollama")),
        (b"/services/ollama/", Route("ollama", b"/", b"/services/ollama")),
        (b"/services/ollama", Route("ollama", b"/", b"/services/ollama")),
        (b"/services/", Route("", b"/", b"/services/")),
        (b"/services/a/b%2Fc", Route("a", b"/b%2Fc", b"/services/a")),  # %2F stays data
        (b"/services/a/../../v1/health", Route("a", b"/v1/health", b"/services/a")),
    ],
)
def test_service_routes(raw: bytes, route: Route) -> None:
    assert Router().resolve(_scope(raw)) == route


@pytest.mark.parametrize(
    "raw",
    [b"/v1/health", b"/", b"/services", b"/%73ervices/u/x", b"/services%2fu/x", b"/SERVICES/a"],
)
def test_everything_else_is_for_the_api(raw: bytes) -> None:
    assert Router().resolve(_scope(raw)) is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/a/b/c", b"/a/b/c"),
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/../../x", b"/x"),
        (b"/a/..", b"/"),
        (b"/a/.", b"/a/"),
        (b"/a/%2e%2E/b", b"/b"),
        (b"/a/.%2e/b", b"/b"),
        (b"/a/%2e/b", b"/a/b"),
        (b"/a/...", b"/a/..."),
        (b"/a/..b/c", b"/a/..b/c"),
        (b"/a//b/../c", b"/a//c"),
    ],
)
def test_remove_dot_segments(path: bytes, expected: bytes) -> None:
    assert remove_dot_segments(path) == expected


def _host_scope(raw: bytes, host: bytes) -> dict[str, object]:
    return {**_scope(raw), "headers": [(b"user-agent", b"t"), (b"host", host)]}


def _routed() -> Router:
    router = Router()
    router.configure(
        {"jupyter.localhost": "jupyter", "grafana.home.arpa": "grafana"}, keep_prefix={"based"}
    )
    return router


@pytest.mark.parametrize(
    "host",
    [
        b"jupyter.localhost",
        b"jupyter.localhost:8080",
        b"JUPYTER.LocalHost:1",
        b"jupyter.localhost.",
    ],
)
def test_host_routing_is_case_port_and_trailing_dot_insensitive(host: bytes) -> None:
    route = _routed().resolve(_host_scope(b"/lab/tree?x=1", host))
    assert route == Route("jupyter", b"/lab/tree", b"", by_host=True)


@pytest.mark.parametrize(
    "raw", [b"/v1/health", b"/v1/services", b"/services/grafana/", b"/services/jupyter/x", b"/"]
)
def test_a_service_host_name_reaches_only_that_service(raw: bytes) -> None:
    # the control API and other services are not reachable on a service's host name: every
    # path there is the app's own
    route = _routed().resolve(_host_scope(raw, b"jupyter.localhost:8080"))
    assert route is not None and route.service == "jupyter" and route.by_host
    assert route.path == raw.partition(b"?")[0]


def test_dot_segments_on_a_host_route_stay_in_the_app() -> None:
    route = _routed().resolve(_host_scope(b"/a/../../v1/health", b"jupyter.localhost"))
    assert route == Route("jupyter", b"/v1/health", b"", by_host=True)


@pytest.mark.parametrize(
    "host",
    [
        b"localhost:8080",
        b"127.0.0.1:8080",
        b"nosuch.localhost",
        b"xjupyter.localhost",
        b"[::1]:8080",
    ],
)
def test_unknown_host_names_keep_path_routing_and_the_api(host: bytes) -> None:
    router = _routed()
    assert router.resolve(_host_scope(b"/v1/health", host)) is None
    assert router.resolve(_host_scope(b"/services/grafana/x", host)) == Route(
        "grafana", b"/x", b"/services/grafana"
    )
    # an unknown service by path is the gateway's own 404 (the proxy's), never another one
    route = router.resolve(_host_scope(b"/services/nosuch/x", host))
    assert route == Route("nosuch", b"/x", b"/services/nosuch")


def test_strip_prefix_false_sends_the_whole_path() -> None:
    router = _routed()
    for raw, path in (
        (b"/services/based/lab?x", b"/services/based/lab"),
        (b"/services/based/", b"/services/based/"),
        (b"/services/based", b"/services/based/"),
        (b"/services/based/a/../../../v1", b"/services/based/v1"),
    ):
        assert router.resolve(_scope(raw)) == Route(
            "based", path, b"/services/based", stripped=False
        )


def test_configure_replaces_the_table_and_forgets_cached_hosts() -> None:
    router = _routed()
    scope = _host_scope(b"/v1/health", b"jupyter.localhost")
    assert router.resolve(scope) is not None
    router.configure({"lab.localhost": "jupyter"})
    assert router.resolve(scope) is None  # gone: the gateway's own host again
    assert router.hosts == {"lab.localhost": "jupyter"}
    assert router.resolve(_host_scope(b"/", b"lab.localhost")) == Route(
        "jupyter", b"/", b"", by_host=True
    )


def test_many_distinct_host_values_stay_bounded() -> None:
    router = _routed()
    for i in range(5000):
        router.resolve(_host_scope(b"/", b"h%d.example" % i))
    assert len(router._seen) <= 1024
    assert router.resolve(_host_scope(b"/", b"jupyter.localhost")) is not None


def test_routes_are_cached_per_path_and_forgotten_on_configure() -> None:
    router = Router()
    scope = _scope(b"/services/based/lab")
    first = router.resolve(scope)
    assert first == Route("based", b"/lab", b"/services/based")
    assert router.resolve(scope) is first  # the cached route
    # strip_prefix: false for the service now: the cached route must not be used again
    router.configure({}, keep_prefix={"based"})
    assert router.resolve(scope) == Route(
        "based", b"/services/based/lab", b"/services/based", stripped=False
    )
    # host names added: they come before any cached path route
    router.configure({"lab.localhost": "jupyter"}, keep_prefix={"based"})
    host_scope = _host_scope(b"/services/based/lab", b"lab.localhost")
    assert router.resolve(host_scope) == Route("jupyter", b"/services/based/lab", b"", by_host=True)


def test_the_route_cache_stays_bounded() -> None:
    router = Router()
    for i in range(3000):
        router.resolve(_scope(b"/services/s/%d" % i))
    router.resolve(_scope(b"/services/s/" + b"x" * 300))  # too long to be kept
    assert len(router._routes) <= 1024
    assert all(len(key) <= 256 for key in router._routes)
