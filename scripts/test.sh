#!/usr/bin/env bash
# Installs Hestia with its test extras and runs every check: lint, format, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
shellcheck scripts/*.sh .ci/run
ruff check .
ruff format --check .
mypy
python3 -m pytest -q "$@"
