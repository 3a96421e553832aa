"""hestia_config.yml and hestia.* labels: pydantic models, loaded and validated once.

Precedence, key by key: the service's entry under `services:` > its container's `hestia.*`
labels > `defaults:` > built-in defaults. So when config and labels both name a service, the
config file wins for each key it sets, and labels fill in the rest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
)

from hestia.errors import ConfigError

DEFAULT_CONFIG_PATH = "hestia_config.yml"
LABEL_PREFIX = "hestia."

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_duration(value: Any) -> float:
    """`30s`, `10m`, `1h`, `250ms`, `1d` or a number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("a duration cannot be true/false; write e.g. 30s, 10m, 1h or seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 10m, 1h or seconds")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 10m, 1h or seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthConfig(_Strict):
    # auto: the container's Docker HEALTHCHECK if it has one, else an HTTP probe of `path`.
    type: Literal["auto", "docker", "http", "tcp"] = "auto"
    path: str = "/"
    # None: any status below 500 means up (a 401/404 on `/` must not keep a service starting).
    status: int | None = Field(default=None, ge=100, le=599)
    interval: Duration = 0.05


def _check_url(value: str | None) -> str | None:
    if value is None:
        return None
    parsed = urlsplit(value)
    if parsed.scheme != "http" or not parsed.hostname:
        raise ValueError(
            f"{value!r} is not an http:// URL with a host (https upstreams are not supported yet)"
        )
    return value


class ServiceConfig(_Strict):
    """A fully resolved service (after defaults and labels are merged)."""

    name: str
    container: str | None = None
    url: Annotated[str | None, AfterValidator(_check_url)] = None
    port: int | None = Field(default=None, ge=1, le=65535)
    idle_timeout: Duration = 600.0
    startup_timeout: Duration = 120.0
    health: HealthConfig = HealthConfig()
    # At most this many requests (and WebSockets) at once go to the service; more wait in
    # line (FIFO, at most startup_timeout, then 503 service_busy). None: no limit.
    max_concurrency: int | None = Field(default=None, ge=1)

    @property
    def managed(self) -> bool:
        """True when Hestia starts and stops it; False for a plain, always-on proxied URL."""
        return self.container is not None


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib)?\s*$", re.IGNORECASE)
_KIB, _MIB = 1024, 1 << 20
_UNIT_BYTES = {"b": 1, "k": _KIB, "kb": _KIB, "kib": _KIB, "m": _MIB, "mb": _MIB, "mib": _MIB}


def parse_size(value: Any) -> int:
    """`8KiB`, `64k`, `1MiB` or a number of bytes -> bytes (k and KB are 1024, as in nginx)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"{value!r} is not a size; write e.g. 8KiB, 64k, 1MiB or bytes")
    return int(m.group(1)) * _UNIT_BYTES[(m.group(2) or "b").lower()]


Size = Annotated[int, BeforeValidator(parse_size)]


class ServerLimits(_Strict):
    """What one client may ask of the server before the gateway sees a request (nginx/Traefik-like
    defaults). A line is counted without its CRLF; the head is the request line and every header
    line with their CRLFs."""

    max_request_line: Size = Field(default=8192, ge=256)  # over: 414
    max_header_line: Size = Field(default=8192, ge=256)  # one header field line; over: 431
    max_header_bytes: Size = Field(default=65536, ge=1024)  # the whole head; over: 431
    max_headers: int = Field(default=100, ge=8)  # header field lines; over: 431
    # Open connections (WebSockets included), in all and from one client address. A browser
    # opens 6-10; behind a TLS proxy every client shares the proxy's address: raise the
    # per-client limit then. Each client connection may hold an upstream connection too.
    max_connections: int = Field(default=2048, ge=1)
    max_connections_per_client: int = Field(default=256, ge=1)


class ServerTimeouts(_Strict):
    # The whole request head must arrive within `header` of the connection's accept (first
    # request) or of its first byte (a later request on a keep-alive connection). Over: 408, or
    # a quiet close when nothing at all arrived.
    header: Duration = Field(default=10.0, gt=0)
    # While a request body is incomplete and Hestia is reading it: a byte at least this often.
    body: Duration = Field(default=30.0, gt=0)
    # An idle keep-alive connection between requests is closed after this.
    keep_alive: Duration = Field(default=30.0, gt=0)


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    shutdown_grace: Duration = 30.0
    limits: ServerLimits = ServerLimits()
    timeouts: ServerTimeouts = ServerTimeouts()


class DockerConfig(_Strict):
    enabled: bool = True
    reconcile_interval: Duration = 30.0
    # Hestia running in a container: its own container id, found automatically when unset.
    self_container: str | None = None
    # Several gateways on one engine: when set, only containers labelled hestia.scope=<scope>
    # are managed by this one.
    scope: str | None = None


class LoggingConfig(_Strict):
    format: Literal["json", "text"] = "json"
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access: bool = True  # one line per proxied request


class DatabaseConfig(_Strict):
    # Any SQLAlchemy URL; HESTIA_DATABASE_URL overrides it.
    url: str = "sqlite:///data/hestia.db"


# Keys a service may set; `defaults:` takes the same keys except name/container/url.
class _ServiceEntry(_Strict):
    container: str | None = None
    url: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    idle_timeout: Duration | None = None
    startup_timeout: Duration | None = None
    max_concurrency: int | None = None
    health: dict[str, Any] | None = None


class _Defaults(_Strict):
    idle_timeout: Duration | None = None
    startup_timeout: Duration | None = None
    max_concurrency: int | None = None
    health: dict[str, Any] | None = None


class HestiaConfig(_Strict):
    server: ServerConfig = ServerConfig()
    docker: DockerConfig = DockerConfig()
    logging: LoggingConfig = LoggingConfig()
    database: DatabaseConfig = DatabaseConfig()
    defaults: _Defaults = _Defaults()
    services: dict[str, _ServiceEntry] = {}
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        return self._source

    def database_url(self) -> str:
        return os.environ.get("HESTIA_DATABASE_URL") or self.database.url

    def resolve(
        self, name: str, labels: dict[str, str] | None = None, container: str | None = None
    ) -> ServiceConfig:
        """Merge built-ins < defaults < labels < service entry, key by key, and validate.

        `container`: the labelled container this service was discovered on, if any.
        """
        merged: dict[str, Any] = {"name": name}
        if container is not None:
            merged["container"] = container
        health: dict[str, Any] = {}
        layers: list[dict[str, Any]] = [self.defaults.model_dump(exclude_none=True)]
        if labels:
            layers.append(labels_to_settings(labels))
        if name in self.services:
            layers.append(self.services[name].model_dump(exclude_none=True))
        for layer in layers:
            health.update(layer.pop("health", {}) or {})
            merged.update(layer)
        merged["health"] = health
        where = f"services.{name}" if name in self.services else f"labels of service {name!r}"
        try:
            return ServiceConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, self.source or "labels", where), service=name) from exc

    def static_services(self) -> dict[str, ServiceConfig]:
        return {name: self.resolve(name) for name in self.services}


_LABEL_KEYS = {
    "url": "url",
    "port": "port",
    "idle_timeout": "idle_timeout",
    "startup_timeout": "startup_timeout",
    "max_concurrency": "max_concurrency",
    "health.path": "health.path",
    "health.status": "health.status",
    "health.type": "health.type",
}


def labels_to_settings(labels: dict[str, str]) -> dict[str, Any]:
    """hestia.* labels -> partial service settings (unknown hestia.* keys are ignored)."""
    out: dict[str, Any] = {}
    for key, value in labels.items():
        if not key.startswith(LABEL_PREFIX):
            continue
        field = _LABEL_KEYS.get(key[len(LABEL_PREFIX) :])
        if field is None:
            continue
        if field.startswith("health."):
            out.setdefault("health", {})[field[len("health.") :]] = value
        else:
            out[field] = value
    return out


def label_enabled(labels: dict[str, str], scope: str | None = None) -> bool:
    """The container opted in (hestia.enable=true), and into this gateway's scope if it has one."""
    if labels.get("hestia.enable", "").strip().lower() not in ("true", "1", "yes", "on"):
        return False
    return scope is None or labels.get("hestia.scope") == scope


def service_name_from_labels(labels: dict[str, str], container_name: str) -> str:
    return (
        labels.get("hestia.service")
        or labels.get("com.docker.compose.service")
        or container_name.lstrip("/")
    )


def valid_service_name(name: str) -> bool:
    return bool(_NAME.match(name))


def _describe(exc: ValidationError, source: str, prefix: str = "") -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        problems.append(f"{path or '(top level)'}: {err['msg']}")
    return f"invalid config in {source}: " + "; ".join(problems)


def load_config(
    path: str | os.PathLike[str] | None = None, *, required: bool = False
) -> HestiaConfig:
    """Load and validate the config file; a missing default file means labels only."""
    explicit = path is not None or "HESTIA_CONFIG" in os.environ
    p = Path(path or os.environ.get("HESTIA_CONFIG") or DEFAULT_CONFIG_PATH)
    if not p.exists():
        if required or explicit:
            raise ConfigError(f"config file {p} does not exist; create it or pass --config PATH")
        return HestiaConfig()
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {p}: {exc}") from exc
    return parse_config(raw, source=str(p))


def parse_config(raw: Any, source: str = "<config>") -> HestiaConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config in {source}: the top level must be a mapping")
    try:
        cfg = HestiaConfig.model_validate(raw)
        cfg._source = source
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
    for name in cfg.services:
        if not valid_service_name(name):
            raise ConfigError(
                f"invalid config in {source}: services.{name}: a service name uses letters, "
                "digits, '_', '.', '-' (at most 63 characters)"
            )
        entry = cfg.services[name]
        if entry.container is None and entry.url is None:
            raise ConfigError(
                f"invalid config in {source}: services.{name}: needs `container` (a Docker "
                "container Hestia starts on demand) or `url` (an always-on upstream), or both"
            )
        cfg.resolve(name)  # validates merged values (health keys, durations) up front
    return cfg
