"""Backends run service instances; `build_backends()` makes the ones the config enables.

Each backend module is imported only when it is enabled, so a gateway without Docker never
imports docker-py (nor one without a `semaphore:` section httpx and tenacity).
"""

from __future__ import annotations

from hestia.backends.base import Backend
from hestia.config import HestiaConfig


def build_backends(config: HestiaConfig) -> dict[str, Backend]:
    """The backends the config enables, by name. Raises BackendError when one cannot start
    (e.g. the Docker engine is unreachable)."""
    backends: dict[str, Backend] = {}
    if config.docker.enabled:
        from hestia.backends.docker import DockerBackend

        backends["docker"] = DockerBackend(self_container=config.docker.self_container)
    if config.semaphore is not None:
        from hestia.backends.semaphore import SemaphoreBackend

        backends["semaphore"] = SemaphoreBackend(config.semaphore)
    return backends
