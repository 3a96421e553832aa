#!/usr/bin/env bash
# Build the Hestia image (the real Dockerfile) on a machine that cannot pull images or reach
# PyPI from inside a build: the base image is made locally (scripts/build-base-image.sh) and
# the wheels are built on the host, then sent in the build context as .wheels/.
#
#   scripts/build-offline-image.sh [TAG]        (default TAG: hestia:local)
#
# BASE_IMAGE (default hestia-test-base:bookworm, built when missing) must have the same
# python3 minor version as PYTHON (default python3), which builds the wheels: binary wheels
# (httptools, uvloop, pydantic-core, ...) are made for one CPython version.
# On a machine with a registry and PyPI, plain `docker build .` does the same job.
set -euo pipefail

TAG="${1:-hestia:local}"
DEFAULT_BASE="hestia-test-base:bookworm"
BASE_IMAGE="${BASE_IMAGE:-$DEFAULT_BASE}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf 'build-offline-image: %s\n' "$*" >&2; }

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ $BASE_IMAGE == "$DEFAULT_BASE" ]]; then
        bash "$ROOT/scripts/build-base-image.sh" "$BASE_IMAGE"
    else
        docker pull "$BASE_IMAGE" >&2
    fi
fi

py_version='import sys; print("%d.%d" % sys.version_info[:2])'
image_py="$(docker run --rm --entrypoint python3 "$BASE_IMAGE" -c "$py_version")"
host_py="$("$PYTHON" -c "$py_version")"
if [[ $image_py != "$host_py" ]]; then
    log "$BASE_IMAGE has Python $image_py but $PYTHON is $host_py: set PYTHON=python$image_py"
    exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The project, its runtime dependencies and its build backend (so that the builder stage can
# build the project from source with --no-index).
# The project's own wheel is dropped: it differs at every build (timestamps), which would
# defeat Docker's layer cache, and the builder builds the project from source anyway.
{
    read -r project
    mapfile -t build_requires
} < <("$PYTHON" -c '
import re, sys, tomllib
with open(sys.argv[1], "rb") as fh:
    pyproject = tomllib.load(fh)
print(re.sub(r"[-_.]+", "_", pyproject["project"]["name"]).lower())
print("\n".join(pyproject["build-system"]["requires"]))
' "$ROOT/pyproject.toml")
log "building wheels with $PYTHON (Python $host_py)"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check \
    --wheel-dir "$WORK/.wheels" "$ROOT" "${build_requires[@]}"
rm -f "$WORK/.wheels/$project"-*.whl

# Build context = the project's files (what git tracks or would track) + .wheels/, streamed
# as a tar so that nothing is written into the work tree.
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            if [[ -e $ROOT/$f ]]; then printf '%s\0' "$f"; fi
        done >"$WORK/files"
else
    (cd "$ROOT" && find . -path ./.git -prune -o -type f -print0) >"$WORK/files"
fi

log "building $TAG on $BASE_IMAGE"
previous="$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)"
tar -c --null -C "$ROOT" -T "$WORK/files" -C "$WORK" .wheels |
    docker build --force-rm --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$TAG" -f Dockerfile - >&2
log "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
# Tidy up after ourselves: the image that TAG named before, if nothing else uses it, and the
# builder stages of earlier builds, which the classic builder keeps as untagged images (~90 MB
# over the base each). The newest stays: it is the layer cache of the next identical build.
if [[ -n $previous && $previous != "$(docker image inspect -f '{{.Id}}' "$TAG")" ]]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
fi
docker images -q --filter dangling=true --filter label=hestia-build-stage=builder |
    tail -n +2 | xargs -r docker rmi >/dev/null 2>&1 || true
