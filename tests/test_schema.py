"""The JSON Schema of hestia_config.yml: generated from the models, every key described, the copy
in examples/ up to date, and every config file in the repository valid under it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from hestia.schema import config_schema, undescribed

REPO = Path(__file__).resolve().parent.parent
COPY = REPO / "examples" / "hestia_config.schema.json"
REGENERATE = "python -m hestia config schema > examples/hestia_config.schema.json"


def test_every_key_has_a_description() -> None:
    assert undescribed(config_schema()) == [], "describe them in hestia/schema.py DESCRIPTIONS"


def test_the_copy_in_examples_is_current() -> None:
    kept = json.loads(COPY.read_text())
    assert kept == config_schema(), f"examples/ has an old schema: run `{REGENERATE}`"


def test_the_command_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hestia", "config", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(out) == config_schema()
    assert out == COPY.read_text()


def test_every_config_in_the_repository_is_valid_under_it() -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    files = [REPO / "hestia_config.yml", *sorted((REPO / "examples").glob("*.yml"))]
    assert len(files) > 5
    for path in files:
        errors = [
            f"{'.'.join(str(p) for p in e.path)}: {e.message}"
            for e in validator.iter_errors(yaml.safe_load(path.read_text()))
        ]
        assert errors == [], path


def test_the_schema_catches_mistakes_editors_should_flag() -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    wrong = {
        "server": {"port": "eighty"},
        "services": {"a": {"container": "a", "idle_timeout": "soon", "colour": "red"}},
    }
    paths = sorted(".".join(str(p) for p in e.path) for e in validator.iter_errors(wrong))
    assert paths == ["server.port", "services.a", "services.a.idle_timeout"]
    right = {"services": {"a": {"container": "a", "idle_timeout": "10m", "health": {"path": "/"}}}}
    assert list(validator.iter_errors(right)) == []
