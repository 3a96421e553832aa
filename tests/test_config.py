from __future__ import annotations

from pathlib import Path

import pytest

from hestia.config import (
    label_enabled,
    labels_to_settings,
    load_config,
    parse_config,
    parse_config_text,
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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("database: {url: 'not a url'}\n", "database.url: 'not a url' is not a database URL"),
        (
            "database: {url: 'postgresql://u@h/db'}\n",
            "database.url: 'postgresql://u@h/db': the Python driver for 'postgresql'",
        ),
        (
            "services: {a: {url: 'http://127.0.0.1:99999'}}\n",
            "services.a.url: 'http://127.0.0.1:99999' has a port outside 1-65535",
        ),
        ("defaults: {startup_timeout: .nan}\n", "defaults.startup_timeout: nan is not a finite"),
        (
            "services:\n  a: {url: 'http://127.0.0.1:1'}\n  a: {url: 'http://127.0.0.1:2'}\n",
            "duplicate key 'a' (first on line 2)",
        ),
        ("server: {trusted_proxies: [lan]}\n", "server.trusted_proxies.0: 'lan' is not an IP"),
    ],
)
def test_config_edge_cases_are_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "hestia_config.yml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert str(f) in exc.value.message
    assert expected in exc.value.message
    assert "\n" not in exc.value.message


def test_config_file_that_is_not_a_text_file(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"\x7fELF\x00\x01\x02")
    with pytest.raises(ConfigError, match="is not a text file"):
        load_config(binary)
    latin = tmp_path / "latin.yml"
    latin.write_bytes(b"services: {caf\xe9: {url: 'http://x'}}")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin)


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    # what a bind mount of a file that is missing on the host creates
    (tmp_path / "hestia_config.yml").mkdir()
    with pytest.raises(ConfigError, match=r"is a directory, not a file .*create the file"):
        load_config(tmp_path / "hestia_config.yml")


def test_unreadable_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "secret.yml"
    f.write_text("services: {}\n")

    def denied(self: Path) -> bytes:  # root reads any file: the refusal is simulated
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"cannot be read \(permission denied\)"):
        load_config(f)


def test_cli_exits_2_with_one_line_for_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hestia.cli import main

    (tmp_path / "dir.yml").mkdir()
    assert main(["serve", "--config", str(tmp_path / "dir.yml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hestia: config path") and "directory" in err[0]


def _web(**entry: object) -> dict[str, object]:
    return {"url": "http://127.0.0.1:8888", **entry}


def test_routing_keys_and_labels() -> None:
    cfg = parse_config(
        {
            "routing": {"subdomains": True, "domain": "Home.Arpa."},
            "defaults": {"preserve_host": True},
            "services": {
                "jupyter": _web(hosts=["Lab.Example.", "lab.example"], strip_prefix=False),
                "plain": _web(),
            },
        }
    )
    assert cfg.routing.domain == "home.arpa"
    jupyter = cfg.resolve("jupyter")
    assert jupyter.hosts == ("lab.example",)  # normalized, once
    assert (jupyter.strip_prefix, jupyter.preserve_host) == (False, True)
    plain = cfg.resolve("plain")
    assert (plain.hosts, plain.strip_prefix) == ((), True)
    assert cfg.routing.subdomain_hosts("Plain") == ("plain.localhost", "plain.home.arpa")
    labelled = cfg.resolve(
        "grafana",
        {"hestia.host": "grafana.home.arpa, Dash.Example", "hestia.strip_prefix": "false"},
    )
    assert labelled.hosts == ("grafana.home.arpa", "dash.example")
    assert (labelled.strip_prefix, labelled.preserve_host) == (False, True)
    # the config entry wins key by key over labels, hosts included
    assert cfg.resolve("jupyter", {"hestia.host": "other.example"}).hosts == ("lab.example",)


def test_no_subdomain_names_unless_asked() -> None:
    cfg = parse_config({"services": {"a": _web()}})
    assert cfg.routing.subdomain_hosts("a") == ()
    # a service name that is no host label (it has a dot) gets none either
    on = parse_config({"routing": {"subdomains": True}})
    assert on.routing.subdomain_hosts("a.b") == ()


@pytest.mark.parametrize(
    "bad", ["http://lab.example", "lab.example:8080", "lab.example/x", "a..b", "-a.example", "a b"]
)
def test_bad_host_names_name_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"services\.jupyter\.hosts.*not a host name"):
        parse_config({"services": {"jupyter": _web(hosts=[bad])}})


def test_bad_routing_domain_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"routing\.domain.*not a host name"):
        parse_config({"routing": {"subdomains": True, "domain": "https://home.arpa"}})


def test_a_bad_host_label_is_a_config_error_for_that_service() -> None:
    with pytest.raises(ConfigError, match=r"labels of service 'web'.*hosts.*not a host name"):
        parse_config({}).resolve("web", {"hestia.host": "web.example:80"})


def test_two_services_claiming_one_host_name_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"services\.b\.hosts: 'lab\.example' is already in "):
        parse_config(
            {"services": {"a": _web(hosts=["lab.example"]), "b": _web(hosts=["LAB.example"])}}
        )
    with pytest.raises(ConfigError, match=r"services\.a\.hosts: 'b\.localhost' is service 'b'"):
        parse_config(
            {
                "routing": {"subdomains": True},
                "services": {"a": _web(hosts=["b.localhost"]), "b": _web()},
            }
        )


def test_hosts_are_per_service_only() -> None:
    with pytest.raises(ConfigError, match=r"defaults\.hosts"):
        parse_config({"defaults": {"hosts": ["x.example"]}})


def test_the_readme_config_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMAPHORE_TOKEN", "t")  # the example's ${ENV} secrets
    monkeypatch.setenv("HESTIA_ADMIN_KEY", "k" * 32)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config_text(example, source="README.md")
    assert cfg.routing.subdomains is False
    jupyter = cfg.resolve("jupyter")
    assert (jupyter.hosts, jupyter.strip_prefix) == (("jupyter.home.arpa",), False)
