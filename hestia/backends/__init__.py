"""Backends run service instances; `build_backends()` makes the ones the config enables.

Each backend module is imported only when it is enabled, so a gateway without Docker never
imports docker-py (nor one without a `semaphore:` section httpx and tenacity).

Names (the keys of the gateway's backends mapping, see `config.backend_key`): `docker` runs
containers on the default Docker endpoint, `docker@NAME` on the endpoint NAME of
`docker.endpoints`, `swarm` runs Swarm services through `swarm.endpoint`, `semaphore` host
services through Semaphore task templates, `process` host processes Hestia runs itself (built
when a service uses it, or `process.enabled` is true; never when the process backend is off).
One engine connection per endpoint is shared by its Docker and Swarm backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hestia.backends.base import Backend
from hestia.config import HestiaConfig, backend_key

if TYPE_CHECKING:
    from hestia.backends.docker import DockerEngine


def build_backends(config: HestiaConfig) -> dict[str, Backend]:
    """The backends the config enables, by name. Nothing connects here: an engine that is
    down at start-up is retried in the background (its services answer 503
    backend_unreachable meanwhile)."""
    backends: dict[str, Backend] = {}
    if config.semaphore is not None:
        from hestia.backends.semaphore import SemaphoreBackend

        backends["semaphore"] = SemaphoreBackend(config.semaphore)
    wanted = config.process.enabled or any(
        entry.backend == "process" for entry in config.services.values()
    )
    if wanted and config.process.active:
        from hestia.backends.process import ProcessBackend

        backends["process"] = ProcessBackend(config.process, config.process_state_dir())
    if not (config.docker.enabled or config.swarm.enabled):
        return backends
    from hestia.backends.docker import DockerBackend, DockerEngine

    default = config.default_endpoint
    engines: dict[str, DockerEngine] = {}

    def engine(name: str) -> DockerEngine:
        if name not in engines:
            ep = config.docker.endpoints.get(name)
            engines[name] = DockerEngine(
                name,
                ep.url if ep is not None else None,
                tls=ep.tls if ep is not None else None,
                host=ep.host if ep is not None else None,
                self_container=config.docker.self_container,
            )
        return engines[name]

    if config.docker.enabled:
        for name in config.docker.endpoints or [default]:
            key = backend_key("docker", None if name == default else name)
            assert key is not None
            backends[key] = DockerBackend(engine=engine(name), name=key)
    if config.swarm.enabled:
        from hestia.backends.swarm import SwarmBackend

        backends["swarm"] = SwarmBackend(engine(config.swarm.endpoint or default))
    return backends
