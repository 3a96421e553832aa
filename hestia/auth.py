"""Optional authentication: who may reach which service and which part of the control API.

One place decides. `Gateway.__call__` hands every HTTP request and WebSocket handshake, with
the router's `Route` (None: the control API), to `Authenticator.admit` before the proxy or the
API sees it; with `auth.enabled: false` the gateway skips it on one attribute check. `admit`

- lets `GET/HEAD /v1/health` (and `/metrics` with `public_metrics`) through,
- answers `/login` and `/logout` itself (the browser's signed session cookie), and sends a
  browser without a session that opens the dashboard (`/`, `/ui`) there first,
- finds the credential: `X-API-Key`, `Authorization: Bearer` (unless `header: x-api-key`) or
  the session cookie. A presented key is hashed once (SHA-256) and the digest compared in
  constant time with every configured digest, without stopping at a match, so the answer's
  timing tells neither whether nor which key matched; keys are kept only as digests,
- checks the scope: `service:<name>`/`service:*`/`admin` for a service; `read` for GET/HEAD
  on the API and `admin` for anything else; and, for a request authenticated by the cookie, that
  a state-changing API request or a WebSocket handshake comes from the gateway's own origin
  (SameSite=Lax does not cover another port of the same host),
- removes the gateway's credential from the headers (X-API-Key; Authorization when it carried a
  gateway key; the session cookie) before anything is forwarded: no service ever sees it,
- answers 401 (with `WWW-Authenticate: Bearer realm="hestia"`), 403 and 429 in the one JSON
  error shape, and logs failures with the key's name or "unknown key" and the client address,
  never a key.

Repeated wrong keys from one address block it for a while (429 with Retry-After): during the
block no key from it is even checked (no oracle), only a valid session cookie goes through.

Data-plane workers (`server.workers`, hestia/workers.py) admit service requests themselves
with `admits_quietly`, from the key set the controller sends them (`worker_state`): it says
only yes (the same yes `admit` would give, credential stripped the same way); anything else is
handed to the controller, whose `admit` answers it, logs it and counts the failure, so the
failure limiter sees every wrong key. An address with failures on record is handed off for
the limiter's window (`FailureLimiter.suspects`), so a block covers the workers too.

`reconfigure(auth_config)` swaps the whole key set in one assignment (live reload of the
config). A session cookie names its key and carries a fingerprint of it, so changing or
removing a key ends its sessions at their next request; scopes are always the current ones.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loguru import logger

from hestia.config import AuthConfig
from hestia.errors import (
    BadRequest,
    Forbidden,
    HestiaError,
    TooManyAttempts,
    Unauthorized,
    send_error,
)
from hestia.headers import TrustedProxies
from hestia.router import Route
from hestia.types import Receive, Scope, Send

COOKIE = "hestia_session"
_COOKIE_B = COOKIE.encode()
_COOKIE_EQ = _COOKIE_B + b"="
# A browser session lasts this long, or until the key it was made with changes, or, without
# `auth.session_secret`, until Hestia restarts.
SESSION_TTL_S = 7 * 86400
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="hestia"')
_MAX_FORM_BYTES = 8192
_MAX_KEY_BYTES = 4096
# pages of the gateway's own that a browser without a session is sent to /login for
_PAGES = frozenset({"/", "/ui"})


class MethodNotAllowed(HestiaError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(HestiaError):
    status = 413
    code = "payload_too_large"


@dataclass(frozen=True, slots=True)
class Key:
    """One configured key as the gateway keeps it: a digest, never the key."""

    name: str
    digest: bytes
    scopes: tuple[str, ...]
    admin: bool
    read: bool  # GET/HEAD on the control API
    all_services: bool
    services: frozenset[str]
    fingerprint: str  # bound into its session cookies (hex): a changed key ends them

    def may_use(self, service: str) -> bool:
        return self.all_services or service in self.services


@dataclass(frozen=True, slots=True)
class _State:
    """Everything a request reads, swapped as a whole by `reconfigure`."""

    enabled: bool
    keys: tuple[Key, ...]
    by_name: dict[str, Key]
    bearer: bool  # Authorization: Bearer counts (header: both)
    public_metrics: bool
    session_key: bytes


class FailureLimiter:
    """Failed key attempts per client address: `limit` within `window` seconds block the
    address for `block` seconds. Bounded: at most `max_addresses` are remembered."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        limit: int = 10,
        window: float = 60.0,
        block: float = 60.0,
        max_addresses: int = 10000,
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.block = block
        self.max_addresses = max_addresses
        # address -> [failures in the window, window start, blocked until]
        self._seen: dict[str, list[float]] = {}

    def retry_after(self, client: str) -> float | None:
        """Seconds left on the address's block, or None when it is not blocked."""
        entry = self._seen.get(client)
        if entry is None or entry[2] == 0.0:
            return None
        left = entry[2] - self.clock()
        if left > 0:
            return left
        del self._seen[client]
        return None

    def failed(self, client: str) -> bool:
        """Count a failure; True when it starts a block."""
        now = self.clock()
        entry = self._seen.get(client)
        if entry is None or now - entry[1] > self.window:
            if entry is None and len(self._seen) >= self.max_addresses:
                self._prune(now)
            entry = self._seen[client] = [0.0, now, 0.0]
        entry[0] += 1
        if entry[0] >= self.limit:
            entry[2] = now + self.block
            return True
        return False

    def suspects(self) -> list[str]:
        """The addresses with failures in the current window or a block (sorted): a worker
        hands their requests to the controller, which knows their count."""
        now = self.clock()
        return sorted(a for a, e in self._seen.items() if now - e[1] <= self.window or e[2] > now)

    def _prune(self, now: float) -> None:
        for addr in [a for a, e in self._seen.items() if now - e[1] > self.window and e[2] < now]:
            del self._seen[addr]
        while len(self._seen) >= self.max_addresses:  # all recent: forget the oldest
            del self._seen[next(iter(self._seen))]


class Authenticator:
    def __init__(
        self,
        config: AuthConfig,
        trusted: TrustedProxies | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._trusted = trusted or TrustedProxies()
        self._generated_secret = secrets.token_bytes(32)
        self.limiter = FailureLimiter(clock)
        self.wall = wall
        self.enabled = False
        self._state: _State
        self.reconfigure(config)

    # ---------------------------------------------------------------- configuration
    def reconfigure(self, config: AuthConfig) -> None:
        """Use this auth config from the next request on (live reload). A ConfigError (a
        missing ${ENV} or key_file) leaves the current key set in place."""
        digests = config.key_digests()
        session_key = config.session_key() or self._generated_secret
        keys = tuple(
            _build_key(k.name, d, tuple(k.scopes), session_key)
            for k, d in zip(config.keys, digests, strict=True)
        )
        self._state = _State(
            enabled=config.enabled,
            keys=keys,
            by_name={k.name: k for k in keys},
            bearer=config.header == "both",
            public_metrics=config.public_metrics,
            session_key=session_key,
        )
        self.enabled = config.enabled

    @property
    def public_metrics(self) -> bool:
        return self._state.public_metrics

    @property
    def bearer(self) -> bool:
        """Authorization: Bearer is a gateway credential (header: both)."""
        return self._state.bearer

    def identify(self, presented: bytes) -> Key | None:
        """The configured key `presented` is, compared in constant time with every one."""
        digest = hashlib.sha256(presented).digest()
        found: Key | None = None
        for key in self._state.keys:
            # every digest is compared, also after a match
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found

    def describe(self, scope: Scope) -> dict[str, Any]:
        """For GET /v1/auth: the settings, the caller's key and every key's name and scopes."""
        st = self._state
        key: Key | None = scope.get("hestia.key")
        return {
            "enabled": st.enabled,
            "header": "both" if st.bearer else "x-api-key",
            "public_metrics": st.public_metrics,
            "you": None
            if key is None
            else {"name": key.name, "scopes": list(key.scopes), "via": scope.get("hestia.via")},
            "keys": [{"name": k.name, "scopes": list(k.scopes)} for k in st.keys],
        }

    # ---------------------------------------------------------------- the check
    async def admit(self, scope: Scope, receive: Receive, send: Send, route: Route | None) -> bool:
        """True: the request goes on (without the gateway's credential in its headers).
        False: it was answered here (401/403/429, or /login and /logout)."""
        st = self._state
        if not st.enabled:
            return True
        is_ws = scope["type"] == "websocket"
        method: str = "GET" if is_ws else scope["method"]
        if route is None:
            path: str = scope["path"]
            if path == "/v1/health" and method in ("GET", "HEAD"):
                return True
            if path == "/metrics" and st.public_metrics and method in ("GET", "HEAD"):
                return True
            if not is_ws and (path == "/login" or path == "/logout"):
                await self._session_endpoint(scope, receive, send, st, path, method)
                return False

        headers: list[tuple[bytes, bytes]] = scope["headers"]
        api_key, bearer, cookie = _credentials(st, headers)

        client = self._client(scope)
        session = self._verify_session(st, cookie) if cookie is not None else None
        blocked = self.limiter.retry_after(client)
        if blocked is not None and (session is None or api_key is not None or bearer is not None):
            await self._too_many(scope, send, route, client, blocked)
            return False

        strip_bearer = False
        key: Key | None
        if api_key is not None:
            key = self.identify(api_key[:_MAX_KEY_BYTES])
            via = "key"
            if key is None:
                await self._wrong_key(scope, send, route, client)
                return False
            if bearer is not None:
                strip_bearer = self.identify(bearer[:_MAX_KEY_BYTES]) is not None
        elif bearer is not None:
            key = self.identify(bearer[:_MAX_KEY_BYTES])
            via = "key"
            if key is not None:
                strip_bearer = True
            elif session is not None:
                # a browser signed in to the gateway, sending a service's own token
                key, via = session, "cookie"
            else:
                await self._wrong_key(scope, send, route, client)
                return False
        elif session is not None:
            key, via = session, "cookie"
        else:
            if route is None and method == "GET" and scope["path"] in _PAGES and _wants_html(scope):
                # a person opening the dashboard: to the sign-in page, and back after it
                await _send(send, 303, b"", [(b"location", b"/login?next=/ui")])
                return False
            if cookie is not None:
                message = "your session has expired or its key changed; sign in again"
            else:
                message = "a key is required"
            await self._refuse(
                scope,
                send,
                route,
                Unauthorized(_with_hint(message, scope, route), service=_svc(route)),
            )
            return False

        if route is not None:
            if not key.may_use(route.service):
                await self._forbidden(
                    scope,
                    send,
                    route,
                    client,
                    key,
                    f"key {key.name!r} may not use service {route.service!r}: add "
                    f'"service:{route.service}" to its scopes in auth.keys',
                )
                return False
        elif not (key.admin or (key.read and method in _SAFE_METHODS)):
            needs = "read" if method in _SAFE_METHODS else "admin"
            await self._forbidden(
                scope,
                send,
                route,
                client,
                key,
                f"key {key.name!r} may not {method} {scope['path']}: that needs the "
                f'"{needs}" scope',
            )
            return False
        if via == "cookie" and (is_ws or (route is None and method not in _SAFE_METHODS)):
            if not self._same_origin(scope, headers):
                await self._forbidden(
                    scope,
                    send,
                    route,
                    client,
                    key,
                    "cross-origin request refused: a request signed in by the session cookie "
                    "must come from a page of this gateway (Origin does not match Host); "
                    "scripts send the key in a header instead",
                )
                return False

        _admitted(scope, key, via, api_key is not None, bearer if strip_bearer else None, cookie)
        return True

    # ---------------------------------------------------------------- data-plane workers
    def worker_state(self) -> dict[str, Any] | None:
        """The key set as a data-plane worker needs it to admit service requests (sent over
        the controller's private Unix socket): None when auth is off."""
        st = self._state
        if not st.enabled:
            return None
        return {
            "keys": [[k.name, k.digest.hex(), list(k.scopes)] for k in st.keys],
            "bearer": st.bearer,
            "session_key": st.session_key.hex(),
        }

    def use_worker_state(self, state: dict[str, Any] | None) -> None:
        """In a worker: the controller's key set (`worker_state`) from now on."""
        if state is None:
            self._state = _State(False, (), {}, False, False, self._generated_secret)
            self.enabled = False
            return
        session_key = bytes.fromhex(state["session_key"])
        keys = tuple(
            _build_key(name, bytes.fromhex(digest), tuple(scopes), session_key)
            for name, digest, scopes in state["keys"]
        )
        self._state = _State(
            enabled=True,
            keys=keys,
            by_name={k.name: k for k in keys},
            bearer=bool(state["bearer"]),
            public_metrics=False,
            session_key=session_key,
        )
        self.enabled = True

    def client_address(self, scope: Scope) -> str:
        """The address failures are counted for (a trusted proxy's X-Forwarded-For)."""
        return self._client(scope)

    def admits_quietly(self, scope: Scope, route: Route) -> bool:
        """For a data-plane worker and a service request: True when `admit` would let it
        through (the gateway's credential is then stripped, as `admit` does); False for
        anything else, with nothing answered, logged or counted: the worker hands the request
        to the controller, whose `admit` does all three. The caller has already handed off
        an address in `FailureLimiter.suspects`."""
        st = self._state
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        api_key, bearer, cookie = _credentials(st, headers)
        strip_bearer = False
        key: Key | None = None
        via = "key"
        if api_key is not None:
            key = self.identify(api_key[:_MAX_KEY_BYTES])
            if key is not None and bearer is not None:
                strip_bearer = self.identify(bearer[:_MAX_KEY_BYTES]) is not None
        elif bearer is not None:
            key = self.identify(bearer[:_MAX_KEY_BYTES])
            if key is not None:
                strip_bearer = True
            elif cookie is not None:
                key, via = self._verify_session(st, cookie), "cookie"
        elif cookie is not None:
            key, via = self._verify_session(st, cookie), "cookie"
        if key is None or not key.may_use(route.service):
            return False
        if via == "cookie" and scope["type"] == "websocket":
            if not self._same_origin(scope, headers):
                return False
        _admitted(scope, key, via, api_key is not None, bearer if strip_bearer else None, cookie)
        return True

    # ---------------------------------------------------------------- answers
    async def _wrong_key(self, scope: Scope, send: Send, route: Route | None, client: str) -> None:
        self._unknown_key(scope, client)
        err = Unauthorized(
            _with_hint("the key is not valid (wrong, or no longer in the config)", scope, route),
            service=_svc(route),
        )
        await self._refuse(scope, send, route, err)

    async def _forbidden(
        self, scope: Scope, send: Send, route: Route | None, client: str, key: Key, message: str
    ) -> None:
        self._log_failure(scope, client, f"key {key.name!r}", message)
        await self._refuse(scope, send, route, Forbidden(message, service=_svc(route)))

    async def _too_many(
        self, scope: Scope, send: Send, route: Route | None, client: str, left: float
    ) -> None:
        seconds = max(1, math.ceil(left))
        err = TooManyAttempts(
            f"too many wrong keys from {client}: try again in {seconds}s",
            service=_svc(route),
            detail={"retry_after_s": seconds},
        )
        await self._refuse(scope, send, route, err, [(b"retry-after", str(seconds).encode())])

    def _unknown_key(self, scope: Scope, client: str) -> None:
        """A wrong key: logged, and counted against the client's rate limit."""
        self._log_failure(scope, client, "unknown key")
        if self.limiter.failed(client):
            logger.warning(
                "authentication: {} failed {} times: refused (429) for {:g}s",
                client,
                self.limiter.limit,
                self.limiter.block,
            )

    def _log_failure(self, scope: Scope, client: str, who: str, why: str = "") -> None:
        method = "WEBSOCKET" if scope["type"] == "websocket" else scope["method"]
        logger.bind(event="auth_failed", client=client, key=who).warning(
            "authentication failed: {} from {} ({} {}){}",
            who,
            client,
            method,
            scope["path"],
            f": {why}" if why else "",
        )

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        route: Route | None,
        err: HestiaError,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = list(extra or ())
        if err.status == 401:
            headers.append(_WWW_AUTHENTICATE)
        if scope["type"] != "websocket":
            await send_error(send, err, headers)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send_error(send, err, headers, asgi_prefix="websocket.http")
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})

    # ---------------------------------------------------------------- helpers
    def _client(self, scope: Scope) -> str:
        peer = scope.get("client")
        ip: str = peer[0] if peer else "unknown"
        if self._trusted and self._trusted.trusts(ip):
            # the address the trusted proxy saw: the last one it appended
            for name, value in scope["headers"]:
                if name == b"x-forwarded-for":
                    last = value.rsplit(b",", 1)[-1].strip()
                    if last:
                        ip = last.decode("latin-1")
        return ip

    def _external(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> tuple[str, str]:
        """(scheme, host) the client used: a trusted proxy's X-Forwarded-Proto/-Host count."""
        scheme: str = scope.get("scheme", "http")
        scheme = "https" if scheme in ("https", "wss") else "http"
        host = b""
        peer = scope.get("client")
        trusted = bool(self._trusted) and self._trusted.trusts(peer[0] if peer else None)
        fwd_host = b""
        for name, value in headers:
            if name == b"host":
                host = value
            elif trusted and name == b"x-forwarded-proto":
                scheme = value.split(b",")[0].strip().decode("latin-1").lower()
            elif trusted and name == b"x-forwarded-host":
                fwd_host = value.split(b",")[0].strip()
        return scheme, (fwd_host or host).decode("latin-1").lower()

    def _same_origin(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> bool:
        origin = b""
        referer = b""
        for name, value in headers:
            if name == b"origin":
                origin = value
            elif name == b"referer":
                referer = value
        claimed = (origin or referer).decode("latin-1").strip()
        if not claimed or claimed == "null":
            return False
        parts = urlsplit(claimed)
        scheme, host = self._external(scope, headers)
        return _netloc(parts.scheme, parts.netloc.lower()) == _netloc(scheme, host)

    # ---------------------------------------------------------------- sessions
    def issue_session(self, key: Key) -> str:
        """A signed cookie value naming `key`, valid for SESSION_TTL_S:
        `1|<expiry>|<key fingerprint>|<key name>|<MAC of the rest>`, all of it
        characters a cookie may carry as they are (key names are [A-Za-z0-9_.@-])."""
        st = self._state
        expires = int(self.wall()) + SESSION_TTL_S
        payload = f"1|{expires}|{key.fingerprint}|{key.name}".encode()
        sig = _sign(st.session_key, payload)
        return f"{payload.decode()}|{sig}"

    def _verify_session(self, st: _State, value: bytes) -> Key | None:
        payload, bar, sig = value.rpartition(b"|")
        if not bar:
            return None
        expected = _sign(st.session_key, payload).encode()
        if not hmac.compare_digest(sig, expected):
            return None
        try:
            version, expires, fingerprint, name = payload.decode("ascii").split("|", 3)
            if version != "1" or int(expires) < self.wall():
                return None
        except ValueError:
            return None
        key = st.by_name.get(name)
        if key is None or not hmac.compare_digest(fingerprint, key.fingerprint):
            return None
        return key

    def _cookie_attrs(self, scope: Scope) -> str:
        scheme, _ = self._external(scope, scope["headers"])
        return "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if scheme == "https" else "")

    async def _session_endpoint(
        self, scope: Scope, receive: Receive, send: Send, st: _State, path: str, method: str
    ) -> None:
        if path == "/logout":
            if method != "POST":
                err = MethodNotAllowed(f"{method} is not allowed on /logout; use POST")
                await send_error(send, err, [(b"allow", b"POST")])
                return
            if _has_origin(scope) and not self._same_origin(scope, scope["headers"]):
                await send_error(send, Forbidden("cross-origin sign-out refused"))
                return
            cookie = f"{COOKIE}=; Max-Age=0{self._cookie_attrs(scope)}".encode()
            if _wants_html(scope):
                await _send(send, 303, b"", [(b"location", b"/login"), (b"set-cookie", cookie)])
            else:
                await _send(send, 204, b"", [(b"set-cookie", cookie)])
            return
        nxt = _safe_next(_query_param(scope, "next"))
        if method in ("GET", "HEAD"):
            session = _cookie_value_in(scope["headers"])
            signed_in = self._verify_session(st, session) if session is not None else None
            page = _login_page(nxt, signed_in=signed_in)
            await _send_html(send, 200, page, head_only=method == "HEAD")
            return
        if method != "POST":
            err = MethodNotAllowed(f"{method} is not allowed on /login; use GET or POST")
            await send_error(send, err, [(b"allow", b"GET, HEAD, POST")])
            return
        await self._login(scope, receive, send, nxt)

    async def _login(self, scope: Scope, receive: Receive, send: Send, nxt: str) -> None:
        html_wanted = _wants_html(scope)
        client = self._client(scope)
        if _has_origin(scope) and not self._same_origin(scope, scope["headers"]):
            await send_error(send, Forbidden("cross-origin sign-in refused"))
            return
        try:
            form = await _read_form(scope, receive)
        except HestiaError as bad:
            await send_error(send, bad)
            return
        nxt = _safe_next(form.get("next")) if "next" in form else nxt
        blocked = self.limiter.retry_after(client)
        if blocked is not None:
            seconds = max(1, math.ceil(blocked))
            message = f"too many wrong keys from {client}: try again in {seconds}s"
            retry = [(b"retry-after", str(seconds).encode())]
            if html_wanted:
                await _send_html(send, 429, _login_page(nxt, error=message), extra=retry)
            else:
                limited = TooManyAttempts(message, detail={"retry_after_s": seconds})
                await send_error(send, limited, retry)
            return
        presented = form.get("key", "").strip().encode("utf-8", "replace")
        key = self.identify(presented[:_MAX_KEY_BYTES]) if presented else None
        if key is None:
            if presented:
                self._unknown_key(scope, client)
            message = "that key is not valid" if presented else "enter a key"
            if html_wanted:
                page = _login_page(nxt, error=message)
                await _send_html(send, 401, page, extra=[_WWW_AUTHENTICATE])
            else:
                await send_error(send, Unauthorized(message), [_WWW_AUTHENTICATE])
            return
        value = self.issue_session(key)
        cookie = f"{COOKIE}={value}; Max-Age={SESSION_TTL_S}{self._cookie_attrs(scope)}"
        logger.info("signed in: key {!r} from {} (browser session)", key.name, client)
        await _send(
            send,
            303,
            b"",
            [(b"location", nxt.encode()), (b"set-cookie", cookie.encode())],
        )


def _build_key(name: str, digest: bytes, scopes: tuple[str, ...], session_key: bytes) -> Key:
    admin = "admin" in scopes
    return Key(
        name=name,
        digest=digest,
        scopes=scopes,
        admin=admin,
        read=admin or "read" in scopes,
        all_services=admin or "service:*" in scopes,
        services=frozenset(s[8:] for s in scopes if s.startswith("service:")),
        fingerprint=hmac.digest(session_key, b"key:" + digest, "sha256")[:16].hex(),
    )


def _sign(session_key: bytes, payload: bytes) -> str:
    """The session cookie's MAC: keyed BLAKE2b (a MAC by design, and four times cheaper than
    HMAC-SHA256 here: it is computed on every request a browser makes)."""
    return hashlib.blake2b(
        payload, key=session_key, digest_size=32, person=b"hestia-session"
    ).hexdigest()


def _svc(route: Route | None) -> str | None:
    return route.service or None if route is not None else None


def _with_hint(message: str, scope: Scope, route: Route | None) -> str:
    hint = 'send "Authorization: Bearer <key>" or "X-API-Key: <key>"'
    if route is not None and scope["type"] != "websocket":
        hint += ", or sign in at /login in a browser"
    return f"{message}: {hint}"


def _netloc(scheme: str, netloc: str) -> str:
    default = ":443" if scheme in ("https", "wss") else ":80"
    return netloc[: -len(default)] if netloc.endswith(default) else netloc


def _admitted(
    scope: Scope,
    key: Key,
    via: str,
    had_api_key: bool,
    gateway_bearer: bytes | None,
    cookie: bytes | None,
) -> None:
    """An admitted request: the gateway's credential out of its headers, and who it is."""
    if had_api_key or gateway_bearer is not None or cookie is not None:
        scope["headers"] = _strip(scope["headers"], gateway_bearer, cookie is not None)
    scope["hestia.key"] = key
    scope["hestia.via"] = via


def _credentials(
    st: _State, headers: list[tuple[bytes, bytes]]
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(X-API-Key, Bearer token when it counts, the session cookie's value) as presented."""
    api_key: bytes | None = None
    bearer: bytes | None = None
    cookie: bytes | None = None
    for name, value in headers:
        if name == b"x-api-key":
            if api_key is None:
                api_key = value.strip()
        elif name == b"authorization":
            if st.bearer and bearer is None and value[:7].lower() == b"bearer ":
                bearer = value[7:].strip()
        elif name == b"cookie" and _COOKIE_B in value:
            cookie = _cookie_value(value) or cookie
    return api_key, bearer, cookie


def _cookie_value(header: bytes) -> bytes | None:
    for part in header.split(b";"):
        part = part.lstrip()
        if part.startswith(_COOKIE_EQ):
            return part[len(_COOKIE_EQ) :].strip().strip(b'"')
    return None


def _cookie_value_in(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    found = None
    for name, value in headers:
        if name == b"cookie" and _COOKIE_B in value:
            found = _cookie_value(value) or found
    return found


def _strip(
    headers: list[tuple[bytes, bytes]], bearer: bytes | None, session: bool
) -> list[tuple[bytes, bytes]]:
    """The headers without the gateway's credential: X-API-Key, the Authorization that carried
    `bearer` (a gateway key) and, with `session`, the session cookie; the rest in order."""
    if bearer is None:
        out = [h for h in headers if h[0] != b"x-api-key"]
    else:
        out = [
            h
            for h in headers
            if h[0] != b"x-api-key"
            and (
                h[0] != b"authorization"
                or h[1][:7].lower() != b"bearer "
                or h[1][7:].strip() != bearer
            )
        ]
    if session:
        emptied = False
        for i, (name, value) in enumerate(out):
            if name == b"cookie" and _COOKIE_B in value:
                # "a=1; hestia_session=x; b=2" -> "a=1; b=2"
                rest = b";".join(
                    p for p in value.split(b";") if not p.lstrip().startswith(_COOKIE_EQ)
                ).lstrip()
                out[i] = (name, rest)
                emptied = emptied or not rest
        if emptied:
            out = [h for h in out if h[0] != b"cookie" or h[1]]
    return out


def _has_origin(scope: Scope) -> bool:
    return any(n in (b"origin", b"referer") for n, _ in scope["headers"])


def _wants_html(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"accept":
            return b"text/html" in value
    return False


def _query_param(scope: Scope, name: str) -> str | None:
    query: bytes = scope.get("query_string", b"")
    values = parse_qs(query.decode("latin-1")).get(name)
    return values[0] if values else None


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this gateway only (never another site)."""
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x21 or ord(c) > 0x7E for c in value)
    ):
        return "/login"
    return value


async def _read_form(scope: Scope, receive: Receive) -> dict[str, str]:
    ctype = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            ctype = value.split(b";")[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded":
        raise BadRequest(
            "POST /login takes a form (application/x-www-form-urlencoded) with `key`; "
            "scripts send the key in a header on every request instead"
        )
    body = b""
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            raise BadRequest("the client went away while sending the form")
        body += msg.get("body", b"")
        if len(body) > _MAX_FORM_BYTES:
            raise PayloadTooLarge(f"the sign-in form is larger than {_MAX_FORM_BYTES} bytes")
        if not msg.get("more_body", False):
            break
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


async def _send(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    head_only: bool = False,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head_only else body})


_PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    # the page loads nothing: no scripts, no images, no fonts, no frames around it
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # a form POST carries Origin only when the policy lets the origin through
    (b"referrer-policy", b"same-origin"),
]


async def _send_html(
    send: Send,
    status: int,
    page: bytes,
    *,
    head_only: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await _send(send, status, page, [*_PAGE_HEADERS, *(extra or ())], head_only=head_only)


_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;margin:0;min-height:100vh;display:flex;
align-items:center;justify-content:center;background:#f4f1ec;color:#222}
main{background:#fff;padding:2rem 2.5rem;border-radius:8px;box-shadow:0 1px 4px #0002;
max-width:24rem;width:100%}
h1{font-size:1.3rem;margin:0 0 1rem}
label{display:block;margin-bottom:.3rem}
input[type=password]{width:100%;box-sizing:border-box;padding:.5rem;font:inherit;
border:1px solid #999;border-radius:4px}
button{margin-top:1rem;padding:.5rem 1.2rem;font:inherit;border:0;border-radius:4px;
background:#b5461b;color:#fff;cursor:pointer}
.error{color:#a00;margin:0 0 1rem}
p.small{font-size:.85rem;color:#555}
"""


def _login_page(nxt: str, *, error: str = "", signed_in: Key | None = None) -> bytes:
    esc = html.escape
    if signed_in is not None:
        body = (
            f"<h1>Hestia</h1><p>Signed in as <strong>{esc(signed_in.name)}</strong> "
            f"({esc(', '.join(signed_in.scopes))}).</p>"
            f'<p><a href="{esc(nxt)}">Continue</a></p>'
            '<form method="post" action="/logout"><button type="submit">Sign out</button></form>'
        )
    else:
        err = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
        body = (
            f"<h1>Sign in to Hestia</h1>{err}"
            '<form method="post" action="/login">'
            '<label for="key">Key</label>'
            '<input type="password" id="key" name="key" autocomplete="current-password" '
            "required autofocus>"
            f'<input type="hidden" name="next" value="{esc(nxt)}">'
            '<button type="submit">Sign in</button></form>'
            '<p class="small">One of the keys in the gateway\'s <code>auth.keys</code>. '
            f"The session lasts {SESSION_TTL_S // 86400} days, or until the key changes.</p>"
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>Hestia: sign in</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    ).encode()
