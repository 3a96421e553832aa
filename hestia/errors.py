"""Hestia's error tree, and the one place that turns an error into an HTTP status and JSON body.

HestiaError
 +-- ConfigError              invalid hestia_config.yml or labels (start-up refuses to run)
 |    +-- NoConfigFile        409  no_config_file    (a reload asked of a gateway without one)
 +-- ServiceNotFound          404  service_not_found
 +-- ServiceStartFailed       503  start_failed      (container exited, health check failed, ...)
 +-- ServiceStartTimeout      504  start_timeout     (not ready within startup_timeout)
 +-- InstanceExited           503  instance_exited   (a ready host process exited non-zero)
 +-- ServiceUnavailable       503  service_unavailable
 |    +-- ShuttingDown        503  shutting_down     (Hestia is stopping)
 |    +-- ServiceRemoved      503  service_removed   (its container/config entry went away)
 |    +-- BackendUnreachable  503  backend_unreachable (the engine that runs it is unreachable)
 +-- StartCancelled           409  start_cancelled   (a stop cancelled the start being waited on)
 +-- QueueFull                503  queue_full        (queue.max_waiting reached; Retry-After)
 +-- QueueTimeout             504  queue_timeout     (no max_concurrency slot within queue.timeout)
 +-- NotWoken                 503  not_woken         (a request the wake filter ignores)
 +-- ClientGone               499  client_gone       (the client left while waiting)
 +-- UpstreamUnreachable      502  upstream_unreachable (refused, reset, bad response)
 +-- UpstreamBadAnswer        502  upstream_bad_response (malformed, odd status, head too big)
 +-- UpstreamTimeout          504  upstream_timeout  (connect / response head / body too slow)
 +-- BackendError             502  backend_error     (Docker said no)
 +-- BadRequest               400  bad_request
 +-- Unauthorized             401  unauthorized      (no gateway key, or a wrong one)
 +-- Forbidden                403  forbidden         (a valid key without the scope; CSRF)
 +-- TooManyAttempts          429  too_many_attempts (repeated failed keys from one address)

An error shared by many waiters (one failed start, 200 held requests) is raised as a fresh copy
per waiter (`fresh()`), so no instance collects every waiter's traceback.
"""

from __future__ import annotations

import json
from typing import Any

from hestia.types import Send


class HestiaError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        detail: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.service = service
        self.detail = detail or {}
        self.retry_after = retry_after  # seconds, sent as Retry-After

    def fresh(self) -> HestiaError:
        """A new exception of the same kind and content, to raise in one more place."""
        return type(self)(
            self.message,
            service=self.service,
            detail=dict(self.detail),
            retry_after=self.retry_after,
        )

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.service is not None:
            body["service"] = self.service
        if self.detail:
            body["detail"] = self.detail
        return {"error": body}

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


class ConfigError(HestiaError):
    status = 500
    code = "config_invalid"


class NoConfigFile(ConfigError):
    status = 409
    code = "no_config_file"


class ServiceNotFound(HestiaError):
    status = 404
    code = "service_not_found"


class ServiceStartFailed(HestiaError):
    status = 503
    code = "start_failed"


class ServiceStartTimeout(HestiaError):
    status = 504
    code = "start_timeout"


class InstanceExited(HestiaError):
    """A ready instance exited on its own with a failure (a host process's non-zero exit);
    kept in `last_error`, the next request starts it again."""

    status = 503
    code = "instance_exited"


class ServiceUnavailable(HestiaError):
    status = 503
    code = "service_unavailable"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class ServiceRemoved(ServiceUnavailable):
    code = "service_removed"


class BackendUnreachable(ServiceUnavailable):
    code = "backend_unreachable"


class StartCancelled(HestiaError):
    status = 409
    code = "start_cancelled"


class QueueFull(HestiaError):
    status = 503
    code = "queue_full"


class QueueTimeout(HestiaError):
    status = 504
    code = "queue_timeout"


class NotWoken(HestiaError):
    status = 503
    code = "not_woken"


class ClientGone(HestiaError):
    status = 499  # nginx's word for "client closed the request"; never sent, only logged
    code = "client_gone"


class UpstreamUnreachable(HestiaError):
    status = 502
    code = "upstream_unreachable"


class UpstreamBadAnswer(HestiaError):
    status = 502
    code = "upstream_bad_response"


class UpstreamTimeout(HestiaError):
    status = 504
    code = "upstream_timeout"


class BackendError(HestiaError):
    status = 502
    code = "backend_error"


class BadRequest(HestiaError):
    status = 400
    code = "bad_request"


class Unauthorized(HestiaError):
    status = 401
    code = "unauthorized"


class Forbidden(HestiaError):
    status = 403
    code = "forbidden"


class TooManyAttempts(HestiaError):
    status = 429
    code = "too_many_attempts"


async def send_error(
    send: Send,
    err: HestiaError,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    *,
    asgi_prefix: str = "http",
) -> None:
    """Answer an ASGI request with the error's status and JSON body.

    `asgi_prefix="websocket.http"` answers a refused WebSocket handshake the same way.
    """
    body = err.to_json_bytes()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or ()),
    ]
    if err.retry_after is not None:
        headers.append((b"retry-after", str(err.retry_after).encode()))
    await send({"type": f"{asgi_prefix}.response.start", "status": err.status, "headers": headers})
    await send({"type": f"{asgi_prefix}.response.body", "body": body})


def error_body(status: int, code: str, message: str, service: str | None = None) -> bytes:
    """JSON body of the common shape, for errors that are not HestiaErrors (e.g. FastAPI's)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if service is not None:
        err["service"] = service
    return json.dumps({"error": err}).encode()
