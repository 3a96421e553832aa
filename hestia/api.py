"""The /v1 control API (FastAPI). Not on the data path: the proxy never goes through here."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from hestia import __version__
from hestia.auth import Authenticator
from hestia.errors import (
    ConfigError,
    HestiaError,
    NoConfigFile,
    ServiceStartTimeout,
    StartCancelled,
    error_body,
)
from hestia.feed import Feed
from hestia.lifecycle import State
from hestia.metrics import Metrics, PrometheusCollector
from hestia.registry import Registry
from hestia.reload import ConfigReloader
from hestia.store import Store, StoreError
from hestia.ui import mount_ui


class ErrorDetail(BaseModel):
    code: str
    message: str
    service: str | None = None
    detail: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Conflict(BaseModel):
    instance: str
    reason: str


class ServiceStatus(BaseModel):
    name: str
    state: str
    backend: str
    source: str
    container: str | None
    upstream: str | None
    last_activity: float
    idle_timeout_s: float
    startup_timeout_s: float
    stop_timeout_s: float
    in_flight: int
    workers_in_flight: int = 0  # requests in flight in data-plane workers (server.workers)
    waiting: int
    peak_waiting: int
    queued: int
    max_concurrency: int | None
    last_error: dict[str, Any] | None
    last_stop: dict[str, Any] | None
    started_at: float | None
    backend_reachable: bool
    conflicts: list[Conflict]
    idle_deadline_in_s: float | None
    max_waiting: int
    queue_timeout_s: float
    refused: dict[str, int]
    strategy: str
    depends_on: list[str]
    exclusive_group: str | None
    warmth: dict[str, Any]


class ServiceList(BaseModel):
    services: list[ServiceStatus]


class StoreHealth(BaseModel):
    status: str
    url: str
    error: str | None
    since: float | None
    pending_events: int
    dropped_events: int
    failed_writes: int
    recreated: int
    last_write: float | None


class Health(BaseModel):
    status: str  # "ok", or "degraded" when the state store cannot write (proxying goes on)
    version: str
    services: int
    store: StoreHealth


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "unknown service"},
    409: {"model": ErrorBody, "description": "a stop cancelled the start being waited on"},
    502: {"model": ErrorBody, "description": "backend (Docker) refused"},
    503: {"model": ErrorBody, "description": "start failed"},
    504: {"model": ErrorBody, "description": "start timed out"},
}


class Event(BaseModel):
    at: float
    from_state: str
    to_state: str
    cause: str
    reason: str
    duration_ms: float | None


class EventList(BaseModel):
    service: str
    events: list[Event]


class ServiceEvent(Event):
    service: str


class RecentEvents(BaseModel):
    events: list[ServiceEvent]


class ConfigProblem(BaseModel):
    path: str  # key path in the file, e.g. services.ollama.idle_timeout
    reason: str


class ConfigErrorInfo(BaseModel):
    file: str | None
    message: str
    errors: list[ConfigProblem]
    at: float
    hash: str | None  # of the refused version


class ReloadInfo(BaseModel):
    result: str  # applied, unchanged or invalid
    cause: str  # file changed, SIGHUP, api
    at: float
    hash: str | None
    error: ConfigErrorInfo | None
    changes: dict[str, list[str]]


class ConfigStatus(BaseModel):
    file: str | None  # None: started without a config file (labels only)
    hash: str | None  # sha256 of the running version's text
    loaded_at: float
    watching: bool
    error: ConfigErrorInfo | None  # the last refused version, until a valid one loads
    last_reload: ReloadInfo | None
    restart_required: list[str]  # sections changed in the file that need a restart


class KeyInfo(BaseModel):
    name: str
    scopes: list[str]


class CallerKey(KeyInfo):
    via: str  # "key" (a header) or "cookie" (a browser session from /login)


class AuthStatus(BaseModel):
    enabled: bool
    header: str  # "both" (Authorization: Bearer or X-API-Key) or "x-api-key"
    public_metrics: bool
    you: CallerKey | None  # the key this request was authenticated with
    keys: list[KeyInfo]  # names and scopes, never a key


def build_api(
    registry: Registry,
    metrics: Metrics,
    store: Store,
    auth: Authenticator | None = None,
    reloader: ConfigReloader | None = None,
    feed: Feed | None = None,
) -> FastAPI:
    prometheus = CollectorRegistry(auto_describe=True)
    prometheus.register(PrometheusCollector(metrics))
    api = FastAPI(
        title="Hestia control API",
        version=__version__,
        description="Status and control of the services behind the Hestia gateway. "
        "The proxy itself lives at /services/{name}/{path}.",
        # Starlette's slash redirect builds an absolute Location from the request's Host
        # header (Host: evil.example -> Location: http://evil.example/...): no redirects
        redirect_slashes=False,
        # served from the swagger-ui-bundle package below: no CDN, works offline
        docs_url=None,
        redoc_url=None,
    )

    @api.exception_handler(HestiaError)
    async def _hestia_error(_: Request, exc: HestiaError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = "no such endpoint; the API is under /v1 and services under /services/NAME/"
            if request.url.path.endswith("/") and request.url.path != "/":
                message += f" (without the trailing slash: {request.url.path.rstrip('/')})"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # every route of this path counts (HEAD /v1/health is a route of its own)
            allowed = sorted(
                {
                    method
                    for route in api.routes
                    if isinstance(route, APIRoute) and route.path_regex.match(request.url.path)
                    for method in route.methods or ()
                }
            )
            headers["Allow"] = ", ".join(allowed)
            message = (
                f"{request.method} is not allowed on {request.url.path}; use {headers['Allow']}"
            )
        response = _raw(exc.status_code, error_body(exc.status_code, code, message))
        for key, value in headers.items():
            response.headers[key] = value
        return response

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _raw(422, error_body(422, "invalid_request", problems))

    @api.head("/v1/health", include_in_schema=False)
    async def health_head() -> Response:
        """HEAD-based health checks (uptime monitors) get the status without a body."""
        ok = store.health()["status"] == "ok"
        return Response(status_code=200, headers={"x-hestia-status": "ok" if ok else "degraded"})

    @api.get("/v1/health", response_model=Health)
    async def health() -> Health:
        """Gateway liveness; `degraded` when the state store cannot write (proxying goes on)."""
        store_health = store.health()
        return Health(
            status="ok" if store_health["status"] == "ok" else "degraded",
            version=__version__,
            services=len(registry.services),
            store=StoreHealth(**store_health),
        )

    @api.get("/v1/auth", response_model=AuthStatus)
    async def auth_status(request: Request) -> dict[str, Any]:
        """Authentication settings, the caller's key and every key's name and scopes."""
        if auth is None:
            return {
                "enabled": False,
                "header": "both",
                "public_metrics": False,
                "you": None,
                "keys": [],
            }
        return auth.describe(request.scope)

    @api.get("/v1/services", response_model=ServiceList)
    async def list_services() -> dict[str, Any]:
        return {"services": [registry.services[n].status() for n in sorted(registry.services)]}

    @api.get("/v1/metrics")
    async def metrics_json() -> dict[str, Any]:
        """Per service: requests by status class, errors, bytes, cold starts, start durations,
        time spent waiting for starts, waiting and in flight now, uptime share; and totals."""
        if metrics.sync is not None:
            await metrics.sync()
        return metrics.snapshot()

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics_prometheus() -> Response:
        """The same numbers in Prometheus text format (hestia_* with a `service` label)."""
        if metrics.sync is not None:
            await metrics.sync()
        return Response(generate_latest(prometheus), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/services/{name}/events", response_model=EventList, responses=_ERRORS)
    async def service_events(
        name: str, limit: int = Query(100, ge=1, le=10000, description="newest first")
    ) -> dict[str, Any]:
        """The service's lifecycle history, newest first."""
        if name not in registry.services:
            registry.get(name)  # raises the 404
        with contextlib.suppress(StoreError):
            await store.flush()  # a store that cannot write may still read
        rows = await asyncio.to_thread(store.events, name, limit)
        return {"service": name, "events": [row.model_dump() for row in rows]}

    @api.get("/v1/services/{name}/status", response_model=ServiceStatus, responses=_ERRORS)
    async def service_status(name: str) -> dict[str, Any]:
        svc = registry.get(name)
        if metrics.sync is not None:  # the workers' requests in flight, as of now
            await metrics.sync()
        return svc.status()

    @api.post("/v1/services/{name}/start", response_model=ServiceStatus, responses=_ERRORS)
    async def start_service(
        name: str, wait: bool = Query(False, description="block until the service is ready")
    ) -> dict[str, Any]:
        svc = registry.get(name)
        if svc.state is not State.READY:
            task = svc.ensure_started("api")
            if wait:
                timeout = svc.config.startup_timeout
                try:
                    result = await asyncio.wait_for(asyncio.shield(task), timeout)
                except TimeoutError:
                    raise ServiceStartTimeout(
                        f"service {name!r} was not ready within {timeout:g}s", service=name
                    ) from None
                except asyncio.CancelledError:
                    if not task.cancelled():
                        raise  # this request itself is being cancelled
                    closing = svc.closing_error()
                    if closing is not None:
                        raise closing from None
                    raise StartCancelled(
                        f"the start of service {name!r} was cancelled (a stop, a replaced "
                        "instance or Hestia shutting down); its state is now "
                        f"{svc.state.value}",
                        service=name,
                        detail={"state": svc.state.value},
                    ) from None
                if result is not None:
                    raise result.fresh()
        return svc.status()

    @api.post("/v1/services/{name}/stop", response_model=ServiceStatus, responses=_ERRORS)
    async def stop_service(
        name: str, wait: bool = Query(False, description="block until the service is stopped")
    ) -> dict[str, Any]:
        svc = registry.get(name)
        task = svc.request_stop("api", drain=True)
        if wait and task is not None:
            await asyncio.shield(task)
        return svc.status()

    @api.get("/v1/config", response_model=ConfigStatus)
    async def config_status() -> dict[str, Any]:
        """The running config file: its hash and load time, whether it is watched, and the
        last reload; `error` holds a refused version's problems until a valid one loads."""
        if reloader is None:
            raise ConfigError("this gateway has no config reloader")
        return reloader.describe()

    @api.post(
        "/v1/config/reload",
        response_model=ConfigStatus,
        responses={
            409: {"model": ErrorBody, "description": "Hestia runs without a config file"},
            422: {"model": ErrorBody, "description": "the file is invalid; the running one stays"},
        },
    )
    async def config_reload() -> Any:
        """Read the config file again now (as a file change or SIGHUP does). Invalid: 422
        with every problem's key path, and the running configuration stays."""
        if reloader is None or reloader.path is None:
            raise NoConfigFile(
                "Hestia was started without a config file (labels only): there is nothing to "
                "reload; start it with --config PATH or HESTIA_CONFIG"
            )
        outcome = await reloader.reload("api")
        if outcome.result == "invalid" and outcome.error is not None:
            return JSONResponse(
                {
                    "error": {
                        "code": "config_invalid",
                        "message": outcome.error["message"]
                        + "; the running configuration stays (GET /v1/config)",
                        "detail": {"errors": outcome.error["errors"]},
                    }
                },
                status_code=422,
            )
        return reloader.describe()

    @api.get("/v1/events/recent", response_model=RecentEvents)
    async def recent_events(
        limit: int = Query(50, ge=1, le=10000, description="newest first"),
        service: str | None = Query(None, description="only this service's"),
    ) -> dict[str, Any]:
        """Lifecycle events of every service (or one), newest first."""
        with contextlib.suppress(StoreError):
            await store.flush()
        rows = await asyncio.to_thread(store.events, service, limit)
        return {"events": [row.model_dump(exclude={"id"}) for row in rows]}

    @api.get(
        "/v1/events",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}},
            404: {"model": ErrorBody, "description": "unknown service"},
        },
    )
    async def live_events(
        service: str | None = Query(None, description="only this service's events"),
    ) -> Response:
        """Server-Sent Events: `transition` (a lifecycle change, with the service's status),
        `config` (a reload applied or refused, as in `last_reload` of GET /v1/config), and
        `services` (every service's status, at once and every 2 s)."""
        if feed is None:
            raise ConfigError("this gateway has no event feed")
        if service is not None:
            registry.get(service)  # 404 for an unknown name
        return StreamingResponse(
            feed.stream(service),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.get("/", include_in_schema=False)
    async def root(request: Request) -> Response:
        # a browser is shown the dashboard; anything else gets the API's 404 as before
        if "text/html" not in request.headers.get("accept", ""):
            raise StarletteHTTPException(404)
        return RedirectResponse("/ui", status_code=303)

    mount_ui(api)
    _docs(api)
    _document(api, auth)
    return api


def _docs(api: FastAPI) -> None:
    """/docs with Swagger UI's files from the swagger-ui-bundle-v2 package (nothing from a
    CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    api.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="swagger-assets")

    @api.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Hestia control API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )


# The routes anyone may call with auth on (see hestia/auth.py)
_OPEN = {("/v1/health", "get"), ("/v1/health", "head")}
_AUTH_ERRORS = {
    "401": "no key, or a wrong one (WWW-Authenticate: Bearer)",
    "403": "the key lacks the scope; or a cross-origin request signed in by the session cookie",
    "429": "too many wrong keys from this address (Retry-After)",
}


def _document(api: FastAPI, auth: Authenticator | None) -> None:
    """Make /openapi.json say what the gateway answers: errors in the one JSON shape (422
    too, not FastAPI's own), and with auth on, the key schemes and 401/403/429 on every
    protected operation. Auth can change at runtime: one document per auth setting."""
    plain = api.openapi
    docs: dict[tuple[bool, bool, bool], dict[str, Any]] = {}
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}

    def openapi() -> dict[str, Any]:
        enabled = auth is not None and auth.enabled
        public = auth is not None and auth.public_metrics
        bearer = auth is None or auth.bearer
        key = (enabled, public, bearer)
        if key in docs:
            return docs[key]
        doc = copy.deepcopy(plain())
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorBody"] = error_schema
        for schema_name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(schema_name, None)
        schemes: dict[str, Any] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
        if bearer:
            schemes["bearer"] = {"type": "http", "scheme": "bearer"}
        if enabled:
            doc["components"]["securitySchemes"] = schemes
        for path, operations in doc.get("paths", {}).items():
            for method, op in operations.items():
                responses = op.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {
                        "description": "invalid parameters",
                        "content": {"application/json": {"schema": error_ref}},
                    }
                if not enabled or (path, method) in _OPEN or (path == "/metrics" and public):
                    continue
                op["security"] = [{name: []} for name in schemes]
                for status, what in _AUTH_ERRORS.items():
                    responses[status] = {
                        "description": what,
                        "content": {"application/json": {"schema": error_ref}},
                    }
        docs[key] = doc
        return doc

    api.openapi = openapi  # type: ignore[method-assign]


def _raw(status: int, body: bytes) -> Response:
    return Response(body, status_code=status, media_type="application/json")
