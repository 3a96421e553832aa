"""The JSON Schema of hestia_config.yml (`hestia config schema`, and its copy in
examples/hestia_config.schema.json), generated from the pydantic models in hestia/config.py,
with a description for every key.

The descriptions live here, keyed by model and field, so that the models keep their short
comments; a `Field(description=...)` on a model wins. tests/test_schema.py fails when a key has
none, and when the copy in examples/ is not what this module generates.

The service settings that are mappings (`health`, `timeouts`, `queue`, ...) are typed loosely in
the file's models (labels merge into them key by key before validation): the schema describes
them with the models they are validated against in the end.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from hestia.config import (
    LABELS,
    HealthConfig,
    HestiaConfig,
    IdleAutoConfig,
    QueueConfig,
    StartConfig,
    UpstreamTimeoutsConfig,
    WakeConfig,
)

SCHEMA_ID = "https://hestia.invalid/hestia_config.schema.json"

_SERVICE = {
    "idle_timeout": "stop the service after this long without requests (`0`: never; `auto`: "
    "follows its recent use, see idle_auto); a duration such as `90s`, `10m`, `2h`",
    "startup_timeout": "how long a request may wait for the service to start (then 504)",
    "stop_timeout": "how long a stop waits before the backend kills the instance",
    "max_concurrency": "at most this many requests (and WebSockets) at once; more wait in line",
    "on_start_failure": "what a failed start does to what it started: `stop` it, or `leave` it "
    "running (for debugging)",
    "health": "readiness: how Hestia decides the service is ready",
    "timeouts": "how long Hestia waits on the service's upstream (then 504)",
    "idle_auto": "bounds of `idle_timeout: auto`",
    "queue": "requests held while the service starts or waits for a max_concurrency slot",
    "start": "how starts behave",
    "strategy": "what a browser gets while the service starts: `auto` (a waiting page for a "
    "page load, held otherwise), `block` (always held) or `page` (always the waiting page)",
    "wake": "requests that must not wake a stopped service (bots, uptime checks)",
    "replicas": "swarm: how many tasks a start scales the service to",
    "preserve_host": "send the client's Host upstream instead of the upstream's address",
    "strip_prefix": "strip /services/<name> from the path sent upstream (`false`: apps "
    "configured with that base URL)",
    "backend": "what runs the service: `docker` (default with `container`), `swarm`, "
    "`semaphore`, `process`, `memory`; none with only a `url` (always on)",
    "container": "the instance Hestia starts and stops (a Docker container or swarm service name)",
    "endpoint": "docker: which engine (a name under docker.endpoints); default: the first one",
    "url": "the upstream's base URL (may carry a path); with a container, overrides the address "
    "Hestia finds; alone, an always-on service",
    "port": "the container port to proxy to (default: the only exposed port, else 80)",
    "keep_warm": "start with Hestia and never stop for idleness",
    "warm_schedule": "windows in which the service is kept running, e.g. `Mon-Fri 08:00-18:00` "
    "(schedule.timezone)",
    "depends_on": "services started first and kept up while this one runs",
    "exclusive_group": "at most one service of this group runs at a time (starting one stops "
    "the other)",
    "start_template": "semaphore: the task template (id or name) that starts the service",
    "stop_template": "semaphore: the task template (id or name) that stops the service",
    "environment": "semaphore: extra variables sent with the start and stop tasks",
    "hosts": "host names that route to this service (every path), beside /services/<name>/",
    "command": "process: the argv Hestia runs (a list, or a string split like a shell, never "
    "run by one); `${PORT}` is the port it should listen on",
    "cwd": "process: its working directory",
    "env": "process: variables added to Hestia's environment for it",
    "stop_signal": "process: the signal a stop sends its process group (default SIGTERM; "
    "SIGKILL after stop_timeout)",
    "log_file": "process: a file for its output (default: one Hestia keeps and rotates)",
}

DESCRIPTIONS: dict[str, dict[str, str]] = {
    "HestiaConfig": {
        "server": "where and how Hestia listens (a change needs a restart)",
        "schedule": "time settings of warm_schedule windows",
        "docker": "the Docker backend: engines, scope, reconciling (a change needs a restart)",
        "semaphore": "Semaphore UI, for `backend: semaphore` services (a change needs a restart)",
        "swarm": "the Docker Swarm backend (a change needs a restart)",
        "process": "host processes started on demand, `backend: process` (a change needs a "
        "restart)",
        "logging": "log format and level (a change needs a restart)",
        "database": "where Hestia keeps service state and lifecycle events (a change needs a "
        "restart)",
        "auth": "optional API keys for the gateway, the control API and the dashboard",
        "routing": "extra ways to reach services: host names",
        "reload": "live configuration: how edits of this file are taken up",
        "defaults": "settings every service gets unless its labels or its entry set them",
        "services": "services by name: a container started on demand, a plain URL, a host "
        "process, ... (labels can add more)",
    },
    "ServerConfig": {
        "host": "address to listen on",
        "port": "port to listen on",
        "workers": "data-plane worker processes: auto (default: one per usable CPU, the "
        "container's CPU quota counted, at most 8; one process below 3 CPUs) or N serve ready "
        "services in workers beside this controller; 1 is one process (restart to change)",
        "shutdown_grace": "how long a shutdown lets requests in flight finish",
        "busy_poll": "poll instead of sleeping for this long after a request arrives or a "
        "response ends, while at most one request is in flight (lower latency at low "
        "concurrency): auto (default: 0.1ms with 2 or more CPUs, off with one), off, or a "
        "duration up to 10ms (e.g. 0.2ms)",
        "limits": "what one client may ask of the server",
        "timeouts": "client connection timeouts",
        "trusted_proxies": "addresses or CIDRs of reverse proxies whose X-Forwarded-* headers "
        "are kept",
    },
    "ServerLimits": {
        "max_request_line": "longest request line (over: 414)",
        "max_header_line": "longest header field line (over: 431)",
        "max_header_bytes": "largest request head (over: 431)",
        "max_headers": "most header field lines (over: 431)",
        "max_connections": "open connections in all (WebSockets included)",
        "max_connections_per_client": "open connections from one client address",
    },
    "ServerTimeouts": {
        "header": "the whole request head must arrive within this (over: 408)",
        "body": "a request body must send a byte at least this often",
        "keep_alive": "an idle keep-alive connection is closed after this",
    },
    "ScheduleConfig": {
        "timezone": "IANA time zone of warm_schedule windows (default: the machine's)",
    },
    "DockerConfig": {
        "enabled": "run the Docker backend",
        "endpoints": "several Docker engines by name: a URL or {url, tls, host}; the first is "
        "the default (none: the local engine, DOCKER_HOST or /var/run/docker.sock)",
        "reconcile_interval": "how often the engines are listed again in case an event was "
        "missed (`0`: never)",
        "self_container": "Hestia's own container id when it runs in one (found when unset)",
        "scope": "only manage containers labelled hestia.scope=<scope> (several gateways on "
        "one engine)",
        "recreate_grace": "after a container stops outside Hestia, how long a start waits for "
        "a replacement (docker compose up -d)",
    },
    "DockerEndpoint": {
        "url": "the engine's URL: unix://, tcp://, ssh://, http(s)://",
        "tls": "client certificates for a tcp:// engine",
        "host": "the engine's machine as Hestia reaches it (published ports); default: "
        "127.0.0.1 for unix://, else the URL's host",
    },
    "DockerTLS": {
        "ca": "CA certificate file",
        "cert": "client certificate file",
        "key": "client key file",
        "verify": "verify the engine's certificate",
    },
    "SemaphoreConfig": {
        "url": "Semaphore UI's address (the API is <url>/api)",
        "token": "an API token (`${ENV}` references allowed)",
        "token_file": "a file holding the API token (instead of token)",
        "project_id": "the Semaphore project of the task templates",
        "timeouts": "timeouts of calls to Semaphore",
    },
    "SemaphoreTimeouts": {
        "connect": "connecting to Semaphore",
        "request": "one API call",
        "stop_task": "how long a stop follows the stop template's task",
    },
    "SwarmConfig": {
        "enabled": "run the Swarm backend",
        "endpoint": "the Docker endpoint of a manager node (default: the default endpoint)",
    },
    "ProcessConfig": {
        "enabled": "run the process backend (default: on, unless Hestia runs in its image)",
        "keep_on_exit": "leave process services running when Hestia stops (adopted at the "
        "next start)",
        "state_dir": "records of running processes and their output files (default: "
        "`processes` next to the SQLite database)",
        "log_max_size": "an output file Hestia keeps is rotated past this size",
    },
    "LoggingConfig": {
        "format": "`json` (one object a line) or `text`",
        "level": "the lowest level logged",
        "access": "one line per proxied request",
    },
    "DatabaseConfig": {
        "url": "SQLAlchemy URL of the state store (HESTIA_DATABASE_URL wins)",
    },
    "AuthConfig": {
        "enabled": "require a key for everything but GET /v1/health",
        "keys": "the keys: a name, one of key/key_sha256/key_file, and scopes",
        "header": "`both` (Authorization: Bearer or X-API-Key) or `x-api-key` (Bearer is left "
        "to the services)",
        "public_metrics": "let /metrics through without a key",
        "session_secret": "signs the browser's login cookie (default: a new one at every "
        "start, which signs everyone out)",
    },
    "AuthKeyConfig": {
        "name": "shown in logs and status, never the key",
        "key": "the key itself (`${ENV}` references allowed)",
        "key_sha256": "the key's SHA-256 in hex, instead of the key",
        "key_file": "a file holding the key",
        "scopes": "`admin`, `read`, `service:<name>` or `service:*`",
    },
    "RoutingConfig": {
        "subdomains": "every service is also reachable as <name>.localhost (and <name>.<domain>)",
        "domain": "with subdomains: also <name>.<domain>",
    },
    "ReloadConfig": {},
    "_Settings": dict(_SERVICE),
    "_ServiceEntry": dict(_SERVICE),
    "HealthConfig": {
        "type": "`auto` (the instance's own health check if it has one, else HTTP), `docker`, "
        "`http` or `tcp`",
        "path": "the path of the HTTP probe",
        "status": "the status the probe expects (default: any below 500)",
        "interval": "how often a starting service is probed",
    },
    "UpstreamTimeoutsConfig": {
        "connect": "connecting to the upstream",
        "response_headers": "the first byte of the answer (`null`: no limit)",
        "idle_body": "no byte for this long in the middle of a body (`null`: no limit, for "
        "streams that idle)",
    },
    "QueueConfig": {
        "max_waiting": "how many requests may wait (over: 503 queue_full)",
        "timeout": "how long one may wait (default: startup_timeout)",
    },
    "StartConfig": {
        "cancel_when_abandoned": "stop a start when every waiting client has left",
    },
    "WakeConfig": {
        "ignore_paths": "path globs that never wake the service (`/favicon.ico`)",
        "ignore_user_agents": "User-Agent regexes that never wake the service",
        "touch": "ignored requests to a running service still count as activity",
    },
    "IdleAutoConfig": {
        "min": "the shortest idle timeout `auto` picks",
        "max": "the longest idle timeout `auto` picks",
    },
}

# service settings that are loose mappings in the file's models, and what validates them
_NESTED_MODELS: dict[str, type[BaseModel]] = {
    "health": HealthConfig,
    "timeouts": UpstreamTimeoutsConfig,
    "idle_auto": IdleAutoConfig,
    "queue": QueueConfig,
    "start": StartConfig,
    "wake": WakeConfig,
}


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of hestia_config.yml."""
    schema = copy.deepcopy(HestiaConfig.model_json_schema(mode="validation"))
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    for model in _NESTED_MODELS.values():
        sub = model.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[model.__name__] = sub
    for entry in ("_Settings", "_ServiceEntry"):
        props = defs[entry]["properties"]
        for key, model in _NESTED_MODELS.items():
            if key in props:
                props[key] = {
                    "anyOf": [{"$ref": f"#/$defs/{model.__name__}"}, {"type": "null"}],
                    "default": None,
                }
    _describe(schema, "HestiaConfig")
    for name, sub in defs.items():
        _describe(sub, name)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "hestia_config.yml",
        "description": "Configuration of Hestia, the on-demand service gateway. Precedence, "
        "key by key: a service's entry > its instance's hestia.* labels > defaults > "
        "built-in defaults.",
    }


def _describe(schema: dict[str, Any], model: str) -> None:
    texts = DESCRIPTIONS.get(model, {})
    for key, prop in schema.get("properties", {}).items():
        if "description" not in prop:
            text = texts.get(key) or LABELS.get(key)
            if text:
                prop["description"] = text


def undescribed(schema: dict[str, Any]) -> list[str]:
    """Every key (as Model.key) without a description."""
    missing = [
        f"(top).{k}" for k, v in schema.get("properties", {}).items() if "description" not in v
    ]
    for name, sub in schema.get("$defs", {}).items():
        missing += [
            f"{name}.{k}" for k, v in sub.get("properties", {}).items() if "description" not in v
        ]
    return missing
