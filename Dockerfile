# Hestia gateway image.
#
#   docker build -t hestia:local .
#
# BASE_IMAGE: any Debian-like image with python3 (>= 3.11) and its venv module; both stages
# use it, so the venv built in the first is valid in the second.
# Offline builds: put wheels of the dependencies (and of the build backend, setuptools and
# wheel) in .wheels/ in the build context and nothing is fetched from an index;
# scripts/build-offline-image.sh does exactly that. Without .wheels/ pip uses PyPI.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# Lets scripts/build-offline-image.sh prune the builder images that the classic builder leaves.
LABEL hestia-build-stage=builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
# Wheels of the project and of every runtime dependency go to /wheels; the gateway's venv is
# then installed from /wheels alone (--no-index), which proves the set is complete.
# /docs serves Swagger UI's bundle, CSS and icons: its source maps and other builds are dropped.
RUN set -eu; \
    if ls .wheels/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links /src/.wheels; \
    else \
        set --; \
    fi; \
    python3 -m venv /opt/build; \
    /opt/build/bin/pip wheel "$@" --wheel-dir /wheels /src; \
    python3 -m venv /opt/hestia; \
    /opt/hestia/bin/pip install --no-index --find-links /wheels hestia; \
    /opt/hestia/bin/pip uninstall --yes pip setuptools; \
    find /opt/hestia -path '*/swagger_ui_bundle/vendor/*' \
        \( -name '*.map' -o -name 'swagger-ui-es-*' -o -name 'swagger-ui.js' \
           -o -name 'swagger-ui-standalone-preset.js' \) -delete; \
    /opt/hestia/bin/hestia --version

# Final stage: the base image plus the venv; no wheels, no pip cache, no build tools.
FROM ${BASE_IMAGE}
COPY --from=builder /opt/hestia /opt/hestia
# HESTIA_IN_CONTAINER: the `process` backend is off by default here (its processes would run
# inside this container, not on the host); `process.enabled: true` turns it on anyway.
ENV PATH=/opt/hestia/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HESTIA_DATABASE_URL=sqlite:////data/hestia.db \
    HESTIA_IN_CONTAINER=1
# The config is ./hestia_config.yml relative to here: mount one at
# /config/hestia_config.yml, or mount nothing and Hestia runs on container labels alone.
WORKDIR /config
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v1/health', timeout=4)"]
# Runs as root: the Docker socket it needs is root-equivalent anyway (see README, Security).
ENTRYPOINT ["hestia"]
CMD ["serve"]
