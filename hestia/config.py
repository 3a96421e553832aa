"""hestia_config.yml and hestia.* labels: pydantic models, loaded and validated once.

Precedence, key by key: the service's entry under `services:` > its instance's `hestia.*`
labels > `defaults:` > built-in defaults. So when config and labels both describe a service,
the config file wins for each key it sets, and labels fill in the rest.

The label vocabulary lives here (`LABELS`), once: the README's table, the compose examples'
check and label parsing all read it.
"""

from __future__ import annotations

import math
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
    model_validator,
)

from hestia.errors import ConfigError

DEFAULT_CONFIG_PATH = "hestia_config.yml"
LABEL_PREFIX = "hestia."

# Backends a service may name with `backend:`. A service with a `container` defaults to
# docker; a service with only a `url` has no backend (always on, never started or stopped).
KNOWN_BACKENDS: dict[str, str] = {
    "docker": "a Docker container on the local engine",
    "memory": "instances simulated in memory (tests and demos)",
}

# Every hestia.* label, with what it means. Settings labels map to the service key of the
# same name (`health.path` -> health: {path: ...}).
LABELS: dict[str, str] = {
    "enable": "required opt-in (`true`); Hestia never starts, stops or proxies to a container "
    "without it (or a `services:` entry naming it)",
    "service": "service name (default: the compose service name, else the container name)",
    "scope": "which gateway manages the container (see `docker.scope`); a container with a "
    "scope is managed only by the gateway of that scope",
    "port": "the container port to proxy to (default: the only exposed port, else 80)",
    "url": "upstream base URL, overriding the address rule (may carry a path)",
    "idle_timeout": "stop after this long without requests (`0`: never)",
    "startup_timeout": "how long a request may wait for a start",
    "stop_timeout": "how long a stop waits before the engine kills the container",
    "max_concurrency": "at most this many requests at once; more wait in line",
    "on_start_failure": "`stop` (default) or `leave` what a failed start started",
    "health.path": "readiness: the path of the HTTP probe",
    "health.status": "readiness: the status the probe expects (default: any below 500)",
    "health.type": "readiness: `auto`, `docker`, `http` or `tcp`",
    "timeouts.connect": "how long connecting to the upstream may take",
    "timeouts.response_headers": "how long the upstream may take to start its answer",
    "timeouts.idle_body": "how long the upstream may pause in the middle of a body",
    "host": "host names the service is reached by, comma-separated (`jupyter.home.arpa`): "
    "every path on them goes to the service",
    "preserve_host": "`true`: send the client's Host upstream instead of the upstream's address",
    "strip_prefix": "`false`: send the full `/services/<name>/...` path upstream (apps with a "
    "base URL setting); default `true`",
}
# labels whose settings key is named otherwise
_LABEL_KEYS = {"host": "hosts"}
_IDENTITY_LABELS = frozenset({"enable", "service", "scope"})
# service settings that are mappings, merged key by key across the layers
_NESTED = ("health", "timeouts")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# a DNS host name (RFC 1123 labels; an IPv4 address passes too), lower case, no trailing dot
_HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


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
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration; write e.g. 30s, 10m, 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def normalize_host(value: str) -> str:
    """A host name as routing compares it: lower case, without a trailing dot; ValueError
    (saying what to write) for anything else, such as a port, a scheme or a path."""
    host = value.strip().lower().removesuffix(".")
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(
            f"{value!r} is not a host name; write a name such as jupyter.home.arpa or "
            "jupyter.localhost (letters, digits, '-', dots; no scheme, port or path)"
        )
    return host


def _parse_hosts(value: Any) -> Any:
    """`hosts:` as a list, or a label's comma-separated string -> normalized, de-duplicated."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        return value  # pydantic says what is wrong
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a host name")
        host = normalize_host(item)
        if host not in out:
            out.append(host)
    return tuple(out)


Hosts = Annotated[tuple[str, ...], BeforeValidator(_parse_hosts)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthConfig(_Strict):
    # auto: the instance's own health check (Docker HEALTHCHECK) if it has one, else HTTP.
    type: Literal["auto", "docker", "http", "tcp"] = "auto"
    path: str = "/"
    # None: any status below 500 means up (a 401/404 on `/` must not keep a service starting).
    status: int | None = Field(default=None, ge=100, le=599)
    interval: Duration = 0.05


class UpstreamTimeoutsConfig(_Strict):
    """How long the gateway waits on a service's upstream; each ends in 504 upstream_timeout
    when nothing was sent to the client yet, or a cut connection when it was."""

    connect: Duration = 10.0
    # the first byte of the answer: generous, a model may think (or load) for minutes
    response_headers: Duration | None = 600.0
    # no byte for this long in the middle of a body; None: no limit (SSE streams may idle)
    idle_body: Duration | None = None


def _check_url(value: str | None) -> str | None:
    if value is None:
        return None
    parsed = urlsplit(value)
    if parsed.scheme != "http" or not parsed.hostname:
        raise ValueError(
            f"{value!r} is not an http:// URL with a host (https upstreams are not supported yet)"
        )
    try:
        parsed.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError(f"{value!r} has a port outside 1-65535") from None
    if parsed.port == 0:
        raise ValueError(f"{value!r} has a port outside 1-65535")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{value!r}: an upstream URL cannot carry a query or a fragment")
    return value


def _check_backend(value: str | None) -> str | None:
    if value is not None and value not in KNOWN_BACKENDS:
        raise ValueError(
            f"unknown backend {value!r}; known backends: {', '.join(sorted(KNOWN_BACKENDS))}"
        )
    return value


Url = Annotated[str | None, AfterValidator(_check_url)]
BackendName = Annotated[str | None, AfterValidator(_check_backend)]
Source = Literal["config", "labels", "config+labels"]


class ServiceConfig(_Strict):
    """A fully resolved service (after defaults, labels and its config entry are merged)."""

    name: str
    # Which backend runs it; None: a plain always-on `url`, never started or stopped.
    backend: BackendName = None
    # The instance the backend knows it by (a container name for docker).
    container: str | None = None
    url: Url = None
    port: int | None = Field(default=None, ge=1, le=65535)
    idle_timeout: Duration = 600.0
    startup_timeout: Duration = 120.0
    # How long a stop waits before the backend kills the instance (Docker's `stop -t`).
    stop_timeout: Duration = 10.0
    health: HealthConfig = HealthConfig()
    # At most this many requests (and WebSockets) at once go to the service; more wait in
    # line (FIFO, at most startup_timeout, then 503 service_busy). None: no limit.
    max_concurrency: int | None = Field(default=None, ge=1)
    # What a failed start does to what it started: stop it (default) or leave it running
    # (for debugging a container that never becomes ready).
    on_start_failure: Literal["stop", "leave"] = "stop"
    timeouts: UpstreamTimeoutsConfig = UpstreamTimeoutsConfig()
    # Host names that route to this service, every path (beside /services/<name>/).
    hosts: Hosts = ()
    # Send the client's Host upstream (the app then sees the name the browser used) instead of
    # the upstream's own address; Origin and Referer are left as the browser sent them.
    preserve_host: bool = False
    # Path routing: strip /services/<name> (true), or send the full path for apps that are
    # configured with that base URL (Jupyter base_url, Grafana root_url).
    strip_prefix: bool = True
    # Where the settings came from: the config file, labels, or both (config wins key by key).
    source: Source = "config"

    @model_validator(mode="after")
    def _backend_has_an_instance(self) -> ServiceConfig:
        if self.backend is not None and self.instance is None:
            raise ValueError(
                f"backend {self.backend!r} needs `container` (the instance to start and stop)"
            )
        return self

    @property
    def managed(self) -> bool:
        """True when Hestia starts and stops it; False for a plain, always-on proxied URL."""
        return self.backend is not None

    @property
    def instance(self) -> str | None:
        """The name the backend knows the instance by."""
        return self.container


def _check_cidr(value: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR (e.g. 172.16.0.0/12)") from None
    return value


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
    # Peers whose X-Forwarded-For/-Proto/-Host are kept (a reverse proxy in front of Hestia);
    # from anyone else they are replaced.
    trusted_proxies: list[Annotated[str, AfterValidator(_check_cidr)]] = []


class DockerConfig(_Strict):
    enabled: bool = True
    reconcile_interval: Duration = 30.0
    # Hestia running in a container: its own container id, found automatically when unset.
    self_container: str | None = None
    # Several gateways on one engine: when set, only containers labelled hestia.scope=<scope>
    # are managed by this one; without it, containers with any hestia.scope are left alone.
    scope: str | None = None
    # After a container stops outside Hestia, a start waits this long for a replacement
    # (`docker compose up -d` recreates: stop, rename, create, start) before starting the
    # old container again.
    recreate_grace: Duration = 2.0


class LoggingConfig(_Strict):
    format: Literal["json", "text"] = "json"
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access: bool = True  # one line per proxied request


def _check_database_url(value: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(
            f"{value!r} is not a database URL; write e.g. sqlite:////data/hestia.db"
        ) from None
    try:
        dialect = url.get_dialect()
        dialect.import_dbapi()
    except NoSuchModuleError:
        raise ValueError(f"{value!r}: unknown database kind {url.drivername!r}") from None
    except ImportError as exc:
        raise ValueError(
            f"{value!r}: the Python driver for {url.drivername!r} is not installed "
            f"({exc.name or exc}); install it or use sqlite:///PATH"
        ) from None
    return value


class DatabaseConfig(_Strict):
    # Any SQLAlchemy URL; HESTIA_DATABASE_URL overrides it.
    url: Annotated[str, AfterValidator(_check_database_url)] = "sqlite:///data/hestia.db"


class _Settings(_Strict):
    """Keys a service may set, in `services.<name>` or (all but the instance's identity) in
    `defaults:`."""

    idle_timeout: Duration | None = None
    startup_timeout: Duration | None = None
    stop_timeout: Duration | None = None
    max_concurrency: int | None = None
    on_start_failure: Literal["stop", "leave"] | None = None
    health: dict[str, Any] | None = None
    timeouts: dict[str, Any] | None = None
    preserve_host: bool | None = None
    strip_prefix: bool | None = None


class _ServiceEntry(_Settings):
    backend: BackendName = None
    container: str | None = None
    url: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    hosts: Hosts | None = None


def _check_domain(value: str | None) -> str | None:
    return None if value is None else normalize_host(value)


class RoutingConfig(_Strict):
    # Every service is also reachable as <name>.localhost (browsers resolve *.localhost to
    # loopback) and, with `domain`, as <name>.<domain>.
    subdomains: bool = False
    domain: Annotated[str | None, AfterValidator(_check_domain)] = None

    def subdomain_hosts(self, name: str) -> tuple[str, ...]:
        """The host names `subdomains: true` gives service `name` (none when it is off, or
        when the name is not a valid host label, e.g. with a dot)."""
        label = name.lower()
        if not self.subdomains or not _HOST_LABEL.match(label):
            return ()
        if self.domain is None:
            return (f"{label}.localhost",)
        return (f"{label}.localhost", f"{label}.{self.domain}")


class HestiaConfig(_Strict):
    server: ServerConfig = ServerConfig()
    docker: DockerConfig = DockerConfig()
    logging: LoggingConfig = LoggingConfig()
    database: DatabaseConfig = DatabaseConfig()
    routing: RoutingConfig = RoutingConfig()
    defaults: _Settings = _Settings()
    services: dict[str, _ServiceEntry] = {}
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        return self._source

    def database_url(self) -> str:
        return os.environ.get("HESTIA_DATABASE_URL") or self.database.url

    def resolve(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        *,
        instance: str | None = None,
        backend: str | None = None,
    ) -> ServiceConfig:
        """Merge built-ins < defaults < labels < service entry, key by key, and validate.

        `instance` and `backend`: the labelled instance this service was discovered on, and
        the backend that found it, if any.
        """
        merged: dict[str, Any] = {"name": name}
        if instance is not None:
            merged["container"] = instance
        if backend is not None:
            merged["backend"] = backend
        nested: dict[str, dict[str, Any]] = {key: {} for key in _NESTED}
        layers: list[dict[str, Any]] = [self.defaults.model_dump(exclude_none=True)]
        if labels:
            layers.append(labels_to_settings(labels))
        entry = self.services.get(name)
        if entry is not None:
            layers.append(entry.model_dump(exclude_none=True))
        for layer in layers:
            for key in _NESTED:  # merged key by key too: health.path from a label, ...
                nested[key].update(layer.pop(key, {}) or {})
            merged.update(layer)
        merged.update(nested)
        if merged.get("container") is not None and "backend" not in merged:
            merged["backend"] = "docker"
        merged["source"] = (
            ("config+labels" if labels else "config") if entry is not None else "labels"
        )
        where = f"services.{name}" if entry is not None else f"labels of service {name!r}"
        try:
            return ServiceConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, self.source or "labels", where), service=name) from exc

    def static_services(self) -> dict[str, ServiceConfig]:
        return {name: self.resolve(name) for name in self.services}


def labels_to_settings(labels: dict[str, str]) -> dict[str, Any]:
    """hestia.* labels -> partial service settings (unknown hestia.* keys are ignored)."""
    out: dict[str, Any] = {}
    for key, value in labels.items():
        if not key.startswith(LABEL_PREFIX):
            continue
        field = key[len(LABEL_PREFIX) :]
        if field not in LABELS or field in _IDENTITY_LABELS:
            continue
        field = _LABEL_KEYS.get(field, field)
        group, dot, key = field.partition(".")
        if dot:
            out.setdefault(group, {})[key] = value
        else:
            out[field] = value
    return out


def label_enabled(labels: dict[str, str], scope: str | None = None) -> bool:
    """The instance opted in (hestia.enable=true) for this gateway.

    A labelled `hestia.scope` belongs to the gateway of that scope only: a gateway without a
    scope leaves scoped instances alone (two compose projects, each with its own Hestia, must
    not stop each other's services).
    """
    if labels.get("hestia.enable", "").strip().lower() not in ("true", "1", "yes", "on"):
        return False
    return labels.get("hestia.scope") == scope


def service_name_from_labels(labels: dict[str, str], instance_name: str) -> str:
    return (
        labels.get("hestia.service")
        or labels.get("com.docker.compose.service")
        or instance_name.lstrip("/")
    )


def valid_service_name(name: str) -> bool:
    return bool(_NAME.match(name))


def _describe(exc: ValidationError, source: str, prefix: str = "") -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{path or '(top level)'}: {msg}")
    return f"invalid config in {source}: " + "; ".join(problems)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with the same key twice (YAML would keep the last
    one silently: two `ollama:` entries would merge into a surprise)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def read_config_text(p: Path) -> str:
    """The file's text, or a ConfigError that names the file and says what to do."""
    if p.is_dir():
        raise ConfigError(
            f"config path {p} is a directory, not a file (a bind mount of a file that did "
            "not exist on the host creates a directory): create the file on the host, or "
            "point --config / HESTIA_CONFIG at the file"
        )
    try:
        data = p.read_bytes()
    except PermissionError:
        raise ConfigError(
            f"config file {p} cannot be read (permission denied); make it readable by the "
            "user Hestia runs as"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise ConfigError(f"config file {p} is not a text file (it contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None


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
    return parse_config_text(read_config_text(p), source=str(p))


def parse_config_text(text: str, source: str = "<config>") -> HestiaConfig:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"invalid YAML in {source}{where}: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {source}: {exc}") from None
    return parse_config(raw, source=source)


def parse_config(raw: Any, source: str = "<config>") -> HestiaConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config in {source}: the top level must be a mapping")
    try:
        cfg = HestiaConfig.model_validate(raw)
        cfg._source = source
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    for name in cfg.services:
        if not valid_service_name(str(name)):
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
    _check_unique_hosts(cfg, source)
    return cfg


def _check_unique_hosts(cfg: HestiaConfig, source: str) -> None:
    """One host name, one service: two `services:` entries claiming one is an error (labels
    that do are conflicts, see the registry)."""
    owner: dict[str, str] = {}
    for name, entry in cfg.services.items():
        for host in entry.hosts or ():
            if host in owner:
                raise ConfigError(
                    f"invalid config in {source}: services.{name}.hosts: {host!r} is already in "
                    f"services.{owner[host]}.hosts; a host name routes to one service"
                )
            owner[host] = name
    for name in cfg.services:
        for host in cfg.routing.subdomain_hosts(name):
            other = owner.get(host)
            if other is not None and other != name:
                raise ConfigError(
                    f"invalid config in {source}: services.{other}.hosts: {host!r} is service "
                    f"{name!r}'s own name under routing.subdomains; a host name routes to one "
                    "service"
                )
