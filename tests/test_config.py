from __future__ import annotations

from pathlib import Path

import pytest

from hestia.config import (
    label_enabled,
    labels_to_settings,
    load_config,
    parse_config,
    parse_duration,
    service_name_from_labels,
)
from hestia.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h", 3600), ("250ms", 0.25), (45, 45), ("1.5m", 90), ("0", 0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["ten minutes", "-5s", "5x", True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_invalid_file_names_file_key_and_problem(tmp_path: Path) -> None:
    f = tmp_path / "hestia_config.yml"
    f.write_text("services:\n  ollama:\n    container: ollama\n    idle_timeout: soon\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    msg = exc.value.message
    assert str(f) in msg
    assert "services.ollama.idle_timeout" in msg
    assert "not a duration" in msg


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("services:\n  a:\n    container: a\n    idle_timout: 5m\n")
    with pytest.raises(ConfigError, match=r"services\.a\.idle_timout: Extra inputs"):
        load_config(f)


def test_service_needs_container_or_url() -> None:
    with pytest.raises(ConfigError, match="needs `container`"):
        parse_config({"services": {"a": {"idle_timeout": "1m"}}})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("services: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml")


def test_missing_default_file_means_labels_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HESTIA_CONFIG", raising=False)
    assert load_config().services == {}


def test_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "x.yml"
    f.write_text("services:\n  nas:\n    url: http://127.0.0.1:5000/base\n")
    monkeypatch.setenv("HESTIA_CONFIG", str(f))
    cfg = load_config()
    nas = cfg.resolve("nas")
    assert nas.url == "http://127.0.0.1:5000/base"
    assert not nas.managed


def test_defaults_and_builtins() -> None:
    cfg = parse_config(
        {
            "defaults": {"idle_timeout": "5m", "health": {"path": "/healthz"}},
            "services": {"a": {"container": "a"}, "b": {"container": "b", "idle_timeout": 0}},
        }
    )
    a, b = cfg.resolve("a"), cfg.resolve("b")
    assert a.idle_timeout == 300 and a.startup_timeout == 120
    assert a.health.path == "/healthz" and a.health.status is None
    assert b.idle_timeout == 0


def test_config_wins_over_labels_key_by_key() -> None:
    cfg = parse_config(
        {
            "defaults": {"startup_timeout": "3m"},
            "services": {"ollama": {"container": "ollama", "idle_timeout": "30m"}},
        }
    )
    labels = {
        "hestia.enable": "true",
        "hestia.idle_timeout": "1m",  # config names it: config wins
        "hestia.startup_timeout": "5m",  # config's service entry does not: label beats defaults
        "hestia.port": "11434",
        "hestia.health.path": "/api/tags",
    }
    s = cfg.resolve("ollama", labels, instance="ollama-1", backend="docker")
    assert s.idle_timeout == 1800
    assert s.startup_timeout == 300
    assert s.port == 11434
    assert s.health.path == "/api/tags"
    assert s.container == "ollama"  # the config's container key wins too


def test_labels() -> None:
    labels = {
        "hestia.enable": "True",
        "hestia.port": "8888",
        "hestia.health.status": "200",
        "hestia.unknown": "x",
        "other": "y",
    }
    assert label_enabled(labels)
    assert not label_enabled({"hestia.enable": "false"})
    assert not label_enabled({})
    assert label_enabled({**labels, "hestia.scope": "a"}, scope="a")
    assert not label_enabled(labels, scope="a")
    assert labels_to_settings(labels) == {"port": "8888", "health": {"status": "200"}}
    assert service_name_from_labels({"hestia.service": "jup"}, "/x") == "jup"
    assert service_name_from_labels({"com.docker.compose.service": "web"}, "/p-web-1") == "web"
    assert service_name_from_labels({}, "/plain") == "plain"


def test_bad_label_value_is_a_config_error_naming_the_service() -> None:
    cfg = parse_config({})
    with pytest.raises(ConfigError, match=r"labels of service 'x'.*port"):
        cfg.resolve("x", {"hestia.port": "eighty"}, instance="x", backend="docker")


def test_invalid_service_name() -> None:
    with pytest.raises(ConfigError, match="service name"):
        parse_config({"services": {"a/b": {"url": "http://127.0.0.1:1"}}})


def test_https_url_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="https upstreams are not supported"):
        parse_config({"services": {"a": {"url": "https://example.invalid"}}})
