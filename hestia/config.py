"""hestia_config.yml and hestia.* labels: pydantic models, loaded and validated once.

Precedence, key by key: the service's entry under `services:` > its instance's `hestia.*`
labels > `defaults:` > built-in defaults. So when config and labels both describe a service,
the config file wins for each key it sets, and labels fill in the rest.

The label vocabulary lives here (`LABELS`), once: the README's table, the compose examples'
check and label parsing all read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import signal
from collections.abc import Callable, Mapping
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
    SecretStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from hestia.errors import ConfigError

DEFAULT_CONFIG_PATH = "hestia_config.yml"
LABEL_PREFIX = "hestia."

# Backends a service may name with `backend:`. A service with a `container` defaults to
# docker; a service with only a `url` has no backend (always on, never started or stopped).
KNOWN_BACKENDS: dict[str, str] = {
    "docker": "a Docker container on a Docker engine (`endpoint`: which one)",
    "memory": "instances simulated in memory (tests and demos)",
    "process": "a host process Hestia runs itself (`command`), in its own process group",
    "semaphore": "a host-level service started and stopped by Semaphore (Ansible) task templates",
    "swarm": "a Docker Swarm service, scaled from 0 to `replicas` and back",
}
# Backends without containers: their one instance per service is known by the service name.
INSTANCE_IS_SERVICE = frozenset({"semaphore", "process"})

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
    "replicas": "swarm: how many tasks a start scales the service to (default 1)",
    "health.path": "readiness: the path of the HTTP probe",
    "health.status": "readiness: the status the probe expects (default: any below 500)",
    "health.type": "readiness: `auto`, `docker`, `http` or `tcp`",
    "timeouts.connect": "how long connecting to the upstream may take",
    "timeouts.response_headers": "how long the upstream may take to start its answer",
    "timeouts.idle_body": "how long the upstream may pause in the middle of a body",
    "queue.max_waiting": "how many requests may wait for a start or a slot (then 503)",
    "queue.timeout": "how long a request may wait in line (then 504)",
    "start.cancel_when_abandoned": "`true`: stop a start when every waiting client has left",
    "strategy": "`auto`, `block` or `page`: what a browser gets while the service starts",
    "keep_warm": "`true`: started with Hestia and never stopped for idleness",
    "warm_schedule": "windows in which it is kept running, `;`-separated",
    "depends_on": "services started first and kept up while this one runs, `,`-separated",
    "exclusive_group": "at most one service of this group runs at a time",
    "wake.ignore_paths": "path globs that never wake the service, `,`-separated",
    "wake.ignore_user_agents": "a User-Agent regex that never wakes the service",
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
_NESTED = ("health", "timeouts", "idle_auto", "queue", "start", "wake")

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


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
    ]
}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]

_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def expand_env(value: Any) -> Any:
    """`${NAME}` in a string -> the value of the environment variable NAME (`$${` writes a
    literal `${`). For secrets that must not sit in the config file; a missing variable is a
    config error naming the key (raised as ValueError inside a pydantic validator)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value

    return _substitute(
        value,
        os.environ,
        "an environment variable reference",
        lambda name: (
            f"the environment variable {name} (referenced as ${{{name}}}) is not set; "
            "set it in Hestia's environment, or write the value here"
        ),
    )


def substitute_vars(value: str, variables: Mapping[str, str]) -> str:
    """`${NAME}` in `value` -> variables[NAME] (`$${` writes a literal `${`); ValueError
    saying which name is missing. The process backend's expansion of `command`, `env`,
    `cwd` and `log_file`, with PORT, the service's `env` and Hestia's environment."""

    return _substitute(
        value,
        variables,
        "a variable reference",
        lambda name: (
            f"${{{name}}} is neither PORT, nor a key of the service's `env`, nor set in "
            "Hestia's environment; define it in `env` or write the value"
        ),
    )


def _substitute(
    value: str, variables: Mapping[str, str], kind: str, missing: Callable[[str], str]
) -> str:
    """`${NAME}` -> variables[NAME], `$${` -> a literal `${`; ValueError saying what is wrong
    (`kind`: what a reference is here; `missing(name)`: the message for an unknown name)."""

    def substitute(m: re.Match[str]) -> str:
        escaped, name = m.group(1), m.group(2)
        if escaped:
            return "${" + name + "}"
        if not _ENV_NAME.match(name):
            raise ValueError(
                f"${{{name}}} is not {kind}; write ${{NAME}} (letters, digits, _), "
                "or $${ for a literal ${"
            )
        if name not in variables:
            raise ValueError(missing(name))
        return variables[name]

    return _ENV_REF.sub(substitute, value)


def in_container() -> bool:
    """Hestia runs in its own Docker image, which sets HESTIA_IN_CONTAINER=1 (see
    `ProcessConfig.enabled`)."""
    return os.environ.get("HESTIA_IN_CONTAINER", "").strip().lower() not in ("", "0", "false")


def read_secret_file(value: Any) -> Any:
    """A path (`${ENV}` allowed) -> the file's text without its trailing newline: the
    `*_file` convention of Docker/Kubernetes secrets. Read once, at load time."""
    if not isinstance(value, str):
        return value
    path = Path(expand_env(value))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"the file {path} does not exist; create it or fix the path") from None
    except PermissionError:
        raise ValueError(
            f"the file {path} cannot be read (permission denied); make it readable by the user "
            "Hestia runs as"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"the file {path} cannot be read: {exc}") from None
    secret = text.strip()
    if not secret:
        raise ValueError(f"the file {path} is empty")
    return secret


# A secret written in the config (`${ENV}` references expanded) or read from a file; either
# way kept out of reprs and logs.
def _not_empty(value: SecretStr) -> SecretStr:
    if not value.get_secret_value().strip():
        raise ValueError("is empty (if it names an environment variable, that variable is empty)")
    return value


EnvSecret = Annotated[SecretStr, BeforeValidator(expand_env), AfterValidator(_not_empty)]
FileSecret = Annotated[SecretStr, BeforeValidator(read_secret_file)]


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


Hosts = Annotated[
    tuple[str, ...],
    BeforeValidator(_parse_hosts),
    WithJsonSchema({"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]}),
]


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


def _split_list(value: Any) -> Any:
    """A label's `a,b` (or a config list) -> a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _split_schedule(value: Any) -> Any:
    """A label's `Mon-Fri 08:00-18:00; Sat 10:00-12:00` (or a config list) -> a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(";") if part.strip()]
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    return value


def _check_window(value: str) -> str:
    from hestia.schedule import parse_window

    parse_window(value)  # raises ValueError with what is wrong
    return value


_LIST_SCHEMA = {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]}
StrList = Annotated[list[str], BeforeValidator(_split_list), WithJsonSchema(_LIST_SCHEMA)]


class QueueConfig(_Strict):
    """Requests held while the service starts or waits for a max_concurrency slot."""

    max_waiting: int = Field(default=100, ge=0)  # over it: 503 queue_full with Retry-After
    timeout: Duration | None = None  # how long one may wait; None: startup_timeout


class StartConfig(_Strict):
    # when every request waiting for a start has gone (the clients left), stop the start
    cancel_when_abandoned: bool = False


class WakeConfig(_Strict):
    """Requests that must not wake a stopped service (bots, uptime checks, favicons): they
    get 503 at once; to a running service they pass (and, unless `touch`, do not count as
    activity for the idle timer)."""

    ignore_paths: StrList = []  # globs on the path after the service prefix: /favicon.ico
    ignore_user_agents: Annotated[
        list[Annotated[str, AfterValidator(_check_regex)]], BeforeValidator(_split_list)
    ] = []  # regexes, searched in the User-Agent
    touch: bool = False


class IdleAutoConfig(_Strict):
    """`idle_timeout: auto`: the timeout follows the service's recent use (see README)."""

    min: Duration = 600.0
    max: Duration = 7200.0


def _idle_timeout(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_duration(value)


IdleTimeout = Annotated[
    float | Literal["auto"],
    BeforeValidator(_idle_timeout),
    WithJsonSchema({"anyOf": [*_DURATION_SCHEMA["anyOf"], {"const": "auto"}]}),
]


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


def _check_template(value: Any) -> Any:
    if isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise ValueError("a Semaphore template is its id (a number) or its name")
    return value


def _argv(value: Any) -> Any:
    """`command:` is an argv list, never a shell string; numbers become their text."""
    if isinstance(value, str):
        raise ValueError(
            "a list of arguments (argv), e.g. [llama-server, --port, '${PORT}']; it never runs "
            "through a shell (for a pipeline, write [sh, -c, '...'] yourself)"
        )
    if isinstance(value, list | tuple):
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise ValueError(f"item {i} ({item!r}) is not a string")
            out.append(str(item))
        if not out or not out[0].strip():
            raise ValueError("needs at least the program to run")
        return out
    return value


def _env_values(value: Any) -> Any:
    """`env:` values as text: numbers become their text; true/false must be quoted (is it
    1, true or yes for the program?)."""
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ValueError(f"{key!r} is not an environment variable name (letters, digits, _)")
        if key == "PORT":
            raise ValueError(
                "PORT is Hestia's to set (the port in `url`, or a free one); set the port in "
                "`url` instead"
            )
        if isinstance(item, bool):
            raise ValueError(f"{key}: quote the value ('true', '1', 'yes': what the program reads)")
        out[key] = str(item) if isinstance(item, int | float) else item
    return out


# signals that do not end a process: a stop with them would always end in SIGKILL
_NOT_STOP_SIGNALS = frozenset({"SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGCONT", "SIGCHLD"})


def _check_signal(value: Any) -> Any:
    if value is None:
        return None
    name = ""
    if isinstance(value, int) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            name = signal.Signals(value).name
    elif isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__ or name in _NOT_STOP_SIGNALS:
        raise ValueError(
            f"{value!r} is not a signal that ends a process; write e.g. SIGTERM, SIGINT or SIGQUIT"
        )
    return name


Url = Annotated[str | None, AfterValidator(_check_url)]
Argv = Annotated[
    list[str] | None,
    BeforeValidator(_argv),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": {"type": "string"}},
                {"type": "string"},
                {"type": "null"},
            ]
        }
    ),
]
EnvMap = Annotated[
    dict[str, str] | None,
    BeforeValidator(_env_values),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "number", "boolean"]},
                },
                {"type": "null"},
            ]
        }
    ),
]
StopSignal = Annotated[str | None, BeforeValidator(_check_signal)]
# the URL a process service answers at by default (PORT: a free port Hestia picks)
DEFAULT_PROCESS_URL = "http://127.0.0.1:${PORT}"
# a Semaphore task template: its id, or its name (looked up in the project's templates)
TemplateRef = Annotated[int | str | None, BeforeValidator(_check_template)]
BackendName = Annotated[str | None, AfterValidator(_check_backend)]
Source = Literal["config", "labels", "config+labels"]


def backend_key(backend: str | None, endpoint: str | None) -> str | None:
    """The name a backend goes by in the gateway (its `backends` mapping, the registry, the
    status): `docker` for the default Docker endpoint, `docker@gpu` for the endpoint `gpu`,
    `swarm`, `memory`. None: no backend (a plain url)."""
    if backend is None:
        return None
    return f"{backend}@{endpoint}" if endpoint else backend


class ServiceConfig(_Strict):
    """A fully resolved service (after defaults, labels and its config entry are merged)."""

    name: str
    # Which backend runs it; None: a plain always-on `url`, never started or stopped.
    backend: BackendName = None
    # The instance the backend knows it by (a container name for docker).
    container: str | None = None
    url: Url = None
    port: int | None = Field(default=None, ge=1, le=65535)
    # seconds without requests before an idle stop (0: never), or "auto" (follows use)
    idle_timeout: IdleTimeout = 600.0
    idle_auto: IdleAutoConfig = IdleAutoConfig()
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
    queue: QueueConfig = QueueConfig()
    start: StartConfig = StartConfig()
    # how a not-ready service answers a browser: auto (a waiting page for a browser's page
    # load, held for everyone else), block (always held), page (always the waiting page)
    strategy: Literal["auto", "block", "page"] = "auto"
    keep_warm: bool = False  # started with Hestia and never stopped for idleness
    # windows in which it is started ahead of use and not stopped: "Mon-Fri 08:00-18:00"
    warm_schedule: Annotated[
        list[Annotated[str, AfterValidator(_check_window)]], BeforeValidator(_split_schedule)
    ] = []
    depends_on: StrList = []  # started first (and kept up while this one runs)
    exclusive_group: str | None = None  # at most one service of the group runs at a time
    wake: WakeConfig = WakeConfig()
    # backend semaphore: the task templates that start and stop the service, and extra vars
    # sent with both tasks (the task's `environment`)
    start_template: TemplateRef = None
    stop_template: TemplateRef = None
    environment: dict[str, Any] | None = None
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
    # backend docker: which Docker engine (a name under docker.endpoints); None: the default
    # endpoint (the first one listed, or the local engine when none is listed).
    endpoint: str | None = None
    # backend swarm: how many tasks a start scales the service to.
    replicas: int = Field(default=1, ge=1)
    # backend process: the argv it runs (never a shell), its working directory, variables
    # added to Hestia's environment, the signal a stop sends its process group (then SIGKILL
    # after stop_timeout; None: SIGTERM), and a file for its output (None: one Hestia keeps
    # under process.state_dir). `${...}` in them: PORT, `env`, Hestia's environment.
    command: Argv = None
    cwd: str | None = None
    env: EnvMap = None
    stop_signal: StopSignal = None
    log_file: str | None = None
    # backend process: its `url:` as written (${PORT} allowed; default DEFAULT_PROCESS_URL).
    # The port is known only when the process starts, so `url` stays None and the backend
    # reports the URL of each run (InstanceInfo.url).
    process_url: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _process_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") == "process" and "url" in data:
            data = dict(data)
            data["process_url"] = data.pop("url")
        return data

    @model_validator(mode="after")
    def _backend_has_an_instance(self) -> ServiceConfig:
        if self.backend == "process":
            self._check_process()
        else:
            for key in ("command", "cwd", "env", "stop_signal", "log_file"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key}: only for services with `backend: process` (this one's "
                        f"backend is {self.backend or 'none: a plain url'})"
                    )
        if self.backend == "semaphore":
            missing = [
                f"`{key}`"
                for key in ("url", "start_template", "stop_template")
                if getattr(self, key) is None
            ]
            if missing:
                raise ValueError(
                    f"backend 'semaphore' needs {', '.join(missing)} (where the running service "
                    "answers, and the Semaphore task templates that start and stop it)"
                )
            if self.container is not None:
                raise ValueError(
                    "container: a semaphore service has no container; remove it, or use "
                    "backend: docker"
                )
            if self.health.type == "docker":
                raise ValueError(
                    "health.type: `docker` needs a Docker HEALTHCHECK; use http or tcp for a "
                    "semaphore service"
                )
        else:
            for key in ("start_template", "stop_template", "environment"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key}: only for services with `backend: semaphore` (this one's "
                        f"backend is {self.backend or 'none: a plain url'})"
                    )
        if self.backend is not None and self.instance is None:
            raise ValueError(
                f"backend {self.backend!r} needs `container` (the instance to start and stop)"
            )
        if self.endpoint is not None and self.backend != "docker":
            raise ValueError(
                "`endpoint` is for backend docker only (the swarm backend talks to swarm.endpoint)"
            )
        return self

    def _check_process(self) -> None:
        if self.command is None:
            raise ValueError(
                "backend 'process' needs `command` (the program and its arguments, a list: "
                "[llama-server, -m, model.gguf, --port, '${PORT}'])"
            )
        if self.container is not None:
            raise ValueError("container: a process service has no container; remove it")
        if self.port is not None:
            raise ValueError(
                "port: a process service's port is in `url` (default "
                f"{DEFAULT_PROCESS_URL}: a free port Hestia picks at each start)"
            )
        if self.health.type == "docker":
            raise ValueError("health.type: `docker` needs a Docker HEALTHCHECK; use http or tcp")
        url = self.process_url or DEFAULT_PROCESS_URL
        if "${" in url.replace("${PORT}", ""):
            raise ValueError(f"url: {url!r}: only ${{PORT}} is substituted in a process's url")
        if "${PORT}" in url and not urlsplit(url).netloc.endswith(":${PORT}"):
            raise ValueError(f"url: {url!r}: ${{PORT}} goes in the port (http://HOST:${{PORT}})")
        try:
            _check_url(url.replace("${PORT}", "1"))
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        # every ${NAME} must be known now: a missing one would fail every start
        variables = {**os.environ, "PORT": "1"}
        for key, value in (self.env or {}).items():
            variables[key] = _substituted(value, variables, f"env.{key}")
        for i, arg in enumerate(self.command):
            _substituted(arg, variables, f"command[{i}]")
        for key in ("cwd", "log_file"):
            value = getattr(self, key)
            if value is not None:
                _substituted(value, variables, key)

    @property
    def backend_key(self) -> str | None:
        """The name of the backend that runs it in the gateway (see `backend_key()`)."""
        return backend_key(self.backend, self.endpoint)

    @property
    def managed(self) -> bool:
        """True when Hestia starts and stops it; False for a plain, always-on proxied URL."""
        return self.backend is not None

    @property
    def instance(self) -> str | None:
        """The name the backend knows the instance by: the container, or the service's own
        name for a backend without containers."""
        if self.container is not None:
            return self.container
        return self.name if self.backend in INSTANCE_IS_SERVICE else None


def _substituted(value: str, variables: Mapping[str, str], key: str) -> str:
    try:
        return substitute_vars(value, variables)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


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


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^\s*\d+\s*[A-Za-z]*$"}]}
    ),
]


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


def _parse_busy_poll(value: Any) -> str | float:
    """`server.busy_poll`: auto, off (YAML's unquoted off is false) or a duration <= 10ms."""
    if value is False or value == "off":
        return "off"
    if value is True or value == "auto":  # (YAML's unquoted on is true)
        return "auto"
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a busy-poll setting; write auto, off, or a duration up to 10ms "
            "such as 0.2ms"
        ) from None
    if seconds > 0.01:
        raise ValueError(
            f"{value!r} is too long to busy-poll (at most 10ms): the event loop would spin "
            "that long after every request"
        )
    return seconds


BusyPollSetting = Annotated[
    str | float,
    BeforeValidator(_parse_busy_poll),
    WithJsonSchema({"anyOf": [{"enum": ["auto", "off"]}, *_DURATION_SCHEMA["anyOf"]]}),
]


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    # Data-plane worker processes (hestia/workers.py): `auto` (the default) is one per usable
    # CPU (affinity and the container's CPU quota), at most 8, and one process below 3 CPUs;
    # N > 1 runs N workers on the port and this process as their controller; 1 is one process.
    workers: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = "auto"
    shutdown_grace: Duration = 30.0
    # Busy polling, bounded (HAProxy's `busy-polling`, within limits): after a request arrives
    # or a response ends, while at most one request is in flight, the event loop polls for
    # this long instead of sleeping, so a quick answer or the client's next request is read
    # without waking a sleeping process (50-100 us in a VM). `auto` (the default): 100 us with
    # 2 or more usable CPUs, off with one; `off` or 0: never. Under load it never polls.
    busy_poll: BusyPollSetting = "auto"
    limits: ServerLimits = ServerLimits()
    timeouts: ServerTimeouts = ServerTimeouts()
    # Peers whose X-Forwarded-For/-Proto/-Host are kept (a reverse proxy in front of Hestia);
    # from anyone else they are replaced.
    trusted_proxies: list[Annotated[str, AfterValidator(_check_cidr)]] = []


_DOCKER_SCHEMES = ("unix", "tcp", "ssh", "http", "https", "npipe")


def _check_docker_url(value: str) -> str:
    parsed = urlsplit(value)
    if parsed.scheme not in _DOCKER_SCHEMES or not (parsed.hostname or parsed.path):
        raise ValueError(
            f"{value!r} is not a Docker engine address; write e.g. "
            "unix:///var/run/docker.sock, tcp://HOST:2376 or ssh://USER@HOST"
        )
    return value


class DockerTLS(_Strict):
    ca: str | None = None  # CA certificate file the engine's certificate is checked against
    cert: str | None = None  # client certificate file
    key: str | None = None  # client key file
    verify: bool = True

    @model_validator(mode="after")
    def _pair(self) -> DockerTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("`cert` and `key` go together (the client certificate and its key)")
        return self


def _endpoint_from_url(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


class DockerEndpoint(_Strict):
    url: Annotated[str, AfterValidator(_check_docker_url)]
    tls: DockerTLS | None = None
    # The address of the engine's machine as Hestia reaches it: published ports are reached
    # there. Default: 127.0.0.1 for a unix:// socket, else the URL's host name.
    host: str | None = None


class DockerConfig(_Strict):
    enabled: bool = True
    # Several Docker engines, by name: a URL or {url, tls, host}. The first one listed is the
    # default endpoint (services without `endpoint:`); none listed: the local engine
    # (DOCKER_HOST or /var/run/docker.sock).
    endpoints: dict[str, Annotated[DockerEndpoint, BeforeValidator(_endpoint_from_url)]] = {}
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


def _check_semaphore_url(value: str) -> str:
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{value!r}: Semaphore's URL cannot carry a query or a fragment")
    return value.rstrip("/")


class SemaphoreTimeouts(_Strict):
    connect: Duration = Field(default=5.0, gt=0)
    # one API call (an answer, a write, a free connection in the pool)
    request: Duration = Field(default=30.0, gt=0)
    # how long a stop follows the stop template's task (a start is bounded by the service's
    # startup_timeout); then Hestia asks Semaphore to stop the task
    stop_task: Duration = Field(default=600.0, gt=0)


class SemaphoreConfig(_Strict):
    """Semaphore UI, which runs the Ansible task templates that start and stop host-level
    services (`backend: semaphore`)."""

    # The UI's address; with SEMAPHORE_WEB_ROOT's path if it has one (the API is <url>/api).
    url: Annotated[str, AfterValidator(_check_semaphore_url)]
    # An API token (`${ENV}` references allowed), or token_file: a file holding it.
    token: EnvSecret | None = None
    token_file: FileSecret | None = None
    project_id: int = Field(ge=1)
    timeouts: SemaphoreTimeouts = SemaphoreTimeouts()

    @model_validator(mode="after")
    def _one_token(self) -> SemaphoreConfig:
        if (self.token is None) == (self.token_file is None):
            raise ValueError(
                "give exactly one of `token` (e.g. token: ${SEMAPHORE_TOKEN}) and `token_file` "
                "(a file holding the API token)"
            )
        return self

    def api_token(self) -> str:
        secret = self.token if self.token is not None else self.token_file
        assert secret is not None  # _one_token
        return secret.get_secret_value()


class SwarmConfig(_Strict):
    enabled: bool = False
    # The Docker endpoint of a manager node (a name under docker.endpoints); default: the
    # default endpoint.
    endpoint: str | None = None


class ProcessConfig(_Strict):
    """Host processes started on demand (`backend: process`)."""

    # None: on, unless Hestia runs in its Docker image (which sets HESTIA_IN_CONTAINER=1):
    # there the processes would run inside Hestia's own container
    enabled: bool | None = None
    # Hestia's shutdown stops every process service unless this is true (then a restarted
    # Hestia adopts them from their records)
    keep_on_exit: bool = False
    # Records of running processes (for adoption) and their output files; default: the
    # directory `processes` next to the SQLite database (else ./data/processes)
    state_dir: str | None = None
    # An output file Hestia keeps (no `log_file`) is rotated once it passes this size
    log_max_size: Size = Field(default=10 * _MIB, ge=64 * _KIB)

    @property
    def active(self) -> bool:
        return self.enabled if self.enabled is not None else not in_container()


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


# ------------------------------------------------------------------ authentication
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
_SCOPE = re.compile(r"^(admin|read|service:\*|service:[A-Za-z0-9][A-Za-z0-9_.-]{0,62})$")
# what an HTTP header (and so a key) can carry: visible ASCII, no spaces
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")


def resolve_secret(value: str, key_path: str) -> str:
    """`expand_env()` for a secret outside a pydantic validator: the ConfigError names
    `key_path`, and an empty result is refused (an empty key must never match)."""
    try:
        found = str(expand_env(value))
    except ValueError as exc:
        raise ConfigError(f"{key_path}: {exc}") from None
    if not found.strip():
        raise ConfigError(
            f"{key_path}: is empty (if it names an environment variable, that variable is empty)"
        )
    return found


def read_secret_at(path: str, key_path: str) -> str:
    """`read_secret_file()` outside a pydantic validator: the ConfigError names `key_path`."""
    try:
        return str(read_secret_file(path))
    except ValueError as exc:
        raise ConfigError(f"{key_path}: {exc}") from None


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class AuthKeyConfig(_Strict):
    """One key: its name (in logs and status, never the key), exactly one way to give the key,
    and what it may do."""

    name: str
    key: str | None = None  # the key itself, or ${ENV}
    key_sha256: str | None = None  # the SHA-256 hex digest of the key
    key_file: str | None = None  # a file holding the key (Docker secrets)
    scopes: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> AuthKeyConfig:
        if not _KEY_NAME.match(self.name):
            raise ValueError(
                f"key name {self.name!r}: use letters, digits, '_', '.', '@', '-' (at most 63)"
            )
        given = [k for k in ("key", "key_sha256", "key_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"key {self.name!r}: give exactly one of key, key_sha256, key_file"
                + (f" (it has {', '.join(given)})" if given else "")
            )
        if self.key_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.key_sha256):
            raise ValueError(
                f"key {self.name!r}: key_sha256 must be 64 hex digits (printf %s KEY | sha256sum)"
            )
        for scope in self.scopes:
            if not _SCOPE.match(scope):
                raise ValueError(
                    f"key {self.name!r}: unknown scope {scope!r}; scopes are admin, read, "
                    "service:<name> and service:*"
                )
        return self

    def digest(self, key_path: str) -> bytes:
        """SHA-256 of the key, reading the environment or the file now."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        if self.key_file is not None:
            key = read_secret_at(self.key_file, f"{key_path}.key_file")
        else:
            assert self.key is not None
            key = resolve_secret(self.key, f"{key_path}.key")
        if not _HEADER_SAFE.match(key):
            raise ConfigError(
                f"{key_path}: the key has spaces or characters a header cannot carry "
                "(use visible ASCII, e.g. from `openssl rand -hex 32`)"
            )
        return hashlib.sha256(key.encode("ascii")).digest()


class AuthConfig(_Strict):
    enabled: bool = False
    keys: list[AuthKeyConfig] = []
    # `both`: Authorization: Bearer <key> or X-API-Key; `x-api-key`: only X-API-Key, and
    # Authorization always goes to the services untouched (for services that need it)
    header: Annotated[Literal["both", "x-api-key"], BeforeValidator(_lower)] = "both"
    public_metrics: bool = False  # GET /metrics without a key (Prometheus without a token)
    # signs the session cookies of /login; unset: a random one per start (sessions end then)
    session_secret: str | None = None
    _digests: tuple[bytes, ...] | None = PrivateAttr(default=None)
    _session_key: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        names = [k.name for k in self.keys]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"key name(s) used twice: {', '.join(twice)}")
        if self.enabled and not self.keys:
            raise ValueError("enabled is true but keys is empty: nobody could get in; add a key")
        return self

    def load_secrets(self) -> None:
        """Read every key's ${ENV} or file once (a ConfigError names the key); keys are kept
        only as SHA-256 digests."""
        digests = tuple(k.digest(f"auth.keys.{k.name}") for k in self.keys)
        seen: dict[bytes, str] = {}
        for k, d in zip(self.keys, digests, strict=True):
            if d in seen:
                raise ConfigError(f"auth.keys: {seen[d]!r} and {k.name!r} are the same key")
            seen[d] = k.name
        session_key = None
        if self.session_secret is not None:
            secret = resolve_secret(self.session_secret, "auth.session_secret")
            if len(secret) < 16:
                raise ConfigError("auth.session_secret: use at least 16 characters")
            session_key = hashlib.sha256(b"hestia-session:" + secret.encode()).digest()
        self._digests = digests
        self._session_key = session_key

    def key_digests(self) -> tuple[bytes, ...]:
        """SHA-256 of each key in `keys`, in order."""
        if self._digests is None:
            self.load_secrets()
        assert self._digests is not None
        return self._digests

    def session_key(self) -> bytes | None:
        """The cookie signing key from `session_secret`, or None (generate one)."""
        if self._digests is None:
            self.load_secrets()
        return self._session_key


class _Settings(_Strict):
    """Keys a service may set, in `services.<name>` or (all but the instance's identity) in
    `defaults:`."""

    idle_timeout: IdleTimeout | None = None
    startup_timeout: Duration | None = None
    stop_timeout: Duration | None = None
    max_concurrency: int | None = None
    on_start_failure: Literal["stop", "leave"] | None = None
    health: dict[str, Any] | None = None
    timeouts: dict[str, Any] | None = None
    idle_auto: dict[str, Any] | None = None
    queue: dict[str, Any] | None = None
    start: dict[str, Any] | None = None
    strategy: Literal["auto", "block", "page"] | None = None
    wake: dict[str, Any] | None = None
    replicas: int | None = None
    preserve_host: bool | None = None
    strip_prefix: bool | None = None


class _ServiceEntry(_Settings):
    backend: BackendName = None
    container: str | None = None
    endpoint: str | None = None
    url: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    keep_warm: bool | None = None
    warm_schedule: list[str] | str | None = None
    depends_on: list[str] | str | None = None
    exclusive_group: str | None = None
    start_template: TemplateRef = None
    stop_template: TemplateRef = None
    environment: dict[str, Any] | None = None
    hosts: Hosts | None = None
    command: Argv = None
    cwd: str | None = None
    env: EnvMap = None
    stop_signal: StopSignal = None
    log_file: str | None = None


class ScheduleConfig(_Strict):
    # the time zone of warm_schedule windows (IANA name); None: the machine's local time
    timezone: str | None = None

    @model_validator(mode="after")
    def _known_zone(self) -> ScheduleConfig:
        if self.timezone is not None:
            from hestia.schedule import zone

            zone(self.timezone)  # raises ValueError naming the zone
        return self


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


class ReloadConfig(_Strict):
    """Live configuration: how edits of this file are taken up while Hestia runs."""

    watch: bool = Field(
        default=True,
        description="watch the config file's folder and reload on every change (also: SIGHUP, "
        "POST /v1/config/reload); read at start-up",
    )
    on_remove: Literal["leave", "stop"] = Field(
        default="leave",
        description="what happens to the instance of a service removed from the file: `leave` "
        "it as it is, or `stop` it once its requests in flight are done",
    )


class HestiaConfig(_Strict):
    server: ServerConfig = ServerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    docker: DockerConfig = DockerConfig()
    # Present: the semaphore backend runs (services with `backend: semaphore`).
    semaphore: SemaphoreConfig | None = None
    swarm: SwarmConfig = SwarmConfig()
    process: ProcessConfig = ProcessConfig()
    logging: LoggingConfig = LoggingConfig()
    database: DatabaseConfig = DatabaseConfig()
    auth: AuthConfig = AuthConfig()
    routing: RoutingConfig = RoutingConfig()
    reload: ReloadConfig = ReloadConfig()
    defaults: _Settings = _Settings()
    services: dict[str, _ServiceEntry] = {}
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        return self._source

    def database_url(self) -> str:
        return os.environ.get("HESTIA_DATABASE_URL") or self.database.url

    def process_state_dir(self) -> Path:
        """Where the process backend keeps its records and output files."""
        if self.process.state_dir is not None:
            return Path(self.process.state_dir)
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url())
        db = url.database or ""
        if url.get_backend_name() == "sqlite" and db and db != ":memory:":
            return Path(db).parent / "processes"
        return Path("data") / "processes"

    @property
    def default_endpoint(self) -> str:
        """The Docker endpoint of services without `endpoint:`: the first one listed, or
        `local` (the engine of DOCKER_HOST or /var/run/docker.sock) when none is."""
        return next(iter(self.docker.endpoints), "local")

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
        the backend that found it (its key: `docker@gpu` carries the endpoint), if any.
        """
        merged: dict[str, Any] = {"name": name}
        if instance is not None and backend not in INSTANCE_IS_SERVICE:
            merged["container"] = instance  # (the others' instance is the service itself)
        if backend is not None:
            kind, _, endpoint = backend.partition("@")
            merged["backend"] = kind
            if endpoint:
                merged["endpoint"] = endpoint
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
        named = merged.get("endpoint")
        if named == self.default_endpoint:
            del merged["endpoint"]  # one name for the default endpoint's backend: `docker`
        elif named is not None and named not in self.docker.endpoints:
            known = ", ".join(self.docker.endpoints) or "(none: add them under docker.endpoints)"
            raise ConfigError(
                f"invalid config in {self.source or 'labels'}: {where}.endpoint: unknown "
                f"endpoint {named!r}; endpoints: {known}",
                service=name,
            )
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


def validation_problems(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """Each problem pydantic found, as {"path": "services.x.port", "reason": "..."}."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"].removeprefix("Value error, ")
        problems.append({"path": path or "(top level)", "reason": msg})
    return problems


def _describe(exc: ValidationError, source: str, prefix: str = "") -> str:
    problems = validation_problems(exc, prefix)
    return f"invalid config in {source}: " + "; ".join(
        f"{p['path']}: {p['reason']}" for p in problems
    )


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
        place = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        where = f" at {place}" if place else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(
            f"invalid YAML in {source}{where}: {what}",
            detail={"file": source, "errors": [{"path": place or "(YAML)", "reason": what}]},
        ) from None
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
        raise ConfigError(
            _describe(exc, source),
            detail={"file": source, "errors": validation_problems(exc)},
        ) from None
    for name in cfg.docker.endpoints:
        if not valid_service_name(str(name)):
            raise ConfigError(
                f"invalid config in {source}: docker.endpoints.{name}: an endpoint name uses "
                "letters, digits, '_', '.', '-' (at most 63 characters)"
            )
    swarm_endpoint = cfg.swarm.endpoint
    if swarm_endpoint not in (None, cfg.default_endpoint, *cfg.docker.endpoints):
        known = ", ".join(cfg.docker.endpoints) or "(none: add them under docker.endpoints)"
        raise ConfigError(
            f"invalid config in {source}: swarm.endpoint: unknown endpoint {swarm_endpoint!r}; "
            f"endpoints: {known}"
        )
    for name in cfg.services:
        if not valid_service_name(str(name)):
            raise ConfigError(
                f"invalid config in {source}: services.{name}: a service name uses letters, "
                "digits, '_', '.', '-' (at most 63 characters)"
            )
        entry = cfg.services[name]
        if entry.backend == "semaphore" and cfg.semaphore is None:
            raise ConfigError(
                f"invalid config in {source}: services.{name}.backend: `semaphore` needs the "
                "top-level `semaphore:` section (url, token, project_id)"
            )
        if entry.backend == "process" and not cfg.process.active:
            why = (
                "process.enabled is false"
                if cfg.process.enabled is False
                else "Hestia runs in its Docker image (HESTIA_IN_CONTAINER is set), where the "
                "process would run inside Hestia's container, not on the host"
            )
            raise ConfigError(
                f"invalid config in {source}: services.{name}.backend: the process backend is "
                f"off: {why}. Run Hestia on the host (README: Host processes on demand), or "
                "set process.enabled: true"
            )
        if (
            entry.container is None
            and entry.url is None
            and entry.backend not in ("semaphore", "process")
        ):
            raise ConfigError(
                f"invalid config in {source}: services.{name}: needs `container` (a Docker "
                "container Hestia starts on demand) or `url` (an always-on upstream), or both"
            )
        cfg.resolve(name)  # validates merged values (health keys, durations) up front
    from hestia.groups import find_cycle

    graph = {name: list(cfg.resolve(name).depends_on) for name in cfg.services}
    cycle = find_cycle(graph)
    if cycle:
        raise ConfigError(
            f"invalid config in {source}: services.{cycle[0]}.depends_on: the dependencies "
            f"form a cycle ({' -> '.join(cycle)})"
        )
    try:
        cfg.auth.load_secrets()  # a missing ${ENV} or key_file stops start-up here
    except ConfigError as exc:
        raise ConfigError(f"invalid config in {source}: {exc.message}") from None
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
