"""The one place that decides where a request goes."""

from __future__ import annotations

import pytest

from hestia.router import Route, Router, remove_dot_segments


def _scope(raw: bytes) -> dict[str, object]:
    return {"type": "http", "path": raw.decode("latin-1"), "raw_path": raw}


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
