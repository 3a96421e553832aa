"""Every shipped example config loads, and every hestia.* label in the compose files is one
Hestia knows, with a value it accepts. No Docker needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hestia.config import LABELS, HestiaConfig, label_enabled, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yml"))
COMPOSE_FILES = [REPO / "docker-compose.yml", *sorted((REPO / "compose").glob("*.yml"))]
KNOWN_LABELS = {f"hestia.{key}" for key in LABELS}


def test_readme_label_table_is_the_label_vocabulary() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Labels", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(hestia\.[a-z_.]+)`", section, re.MULTILINE))
    assert documented == KNOWN_LABELS


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_published_ports_are_on_loopback_by_default(path: Path) -> None:
    services = (yaml.safe_load(path.read_text()) or {}).get("services") or {}
    for name, spec in services.items():
        for port in spec.get("ports") or []:
            if path.name.endswith("-stack.yml"):
                # Swarm cannot publish on loopback only: there, only Hestia publishes, on its
                # own node (mode: host), and the file says to firewall it
                assert name == "hestia", f"{path.name}: {name} publishes a port"
                assert isinstance(port, dict) and port.get("mode") == "host", path.name
                assert "firewall" in path.read_text(), path.name
                continue
            assert str(port).startswith("${HESTIA_BIND:-127.0.0.1}:"), f"{path.name}: {name}"


def test_the_examples_are_there() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "minimal.yml",
        "ollama.yml",
        "mixed.yml",
        "semaphore.yml",
        "process.yml",
    }
    assert (REPO / "examples" / "hestia.service").exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMAPHORE_TOKEN", "example-token")  # examples/semaphore.yml's ${...}
    config = load_config(path)
    assert config.services, f"{path.name} declares no service"
    for name, service in config.static_services().items():
        assert service.container or service.url or service.command, name


def _labelled_services(path: Path) -> list[tuple[str, dict[str, str]]]:
    services = (yaml.safe_load(path.read_text()) or {}).get("services") or {}
    out = []
    for name, spec in services.items():
        # a stack file labels the Swarm service under deploy.labels
        labels = spec.get("labels") or (spec.get("deploy") or {}).get("labels") or {}
        if isinstance(labels, list):  # the `- key=value` form
            labels = dict(item.split("=", 1) for item in labels)
        labels = {str(k): str(v) for k, v in labels.items()}
        if any(k.startswith("hestia.") for k in labels):
            out.append((name, labels))
    return out


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_compose_labels_are_known_and_valid(path: Path) -> None:
    for service, labels in _labelled_services(path):
        unknown = {k for k in labels if k.startswith("hestia.")} - KNOWN_LABELS
        assert not unknown, f"{path.name}: {service}: unknown labels {sorted(unknown)}"
        assert label_enabled(labels), f"{path.name}: {service}: hestia.enable is not true"
        name = labels.get("hestia.service", service)
        resolved = HestiaConfig().resolve(name, labels, instance=name, backend="docker")
        assert resolved.port or resolved.url, f"{path.name}: {service}: no hestia.port/url"
