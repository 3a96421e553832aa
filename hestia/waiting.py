"""The waiting page: what a person's browser gets while a service starts (programs are held
and then answered by the service, and never get this page).

A browser's page load (`strategy: auto`: a GET that prefers text/html, or any request with
`strategy: page`) to a service that is not ready starts it and gets this small page at once:
status 503 with Retry-After, the service's name and state, no external assets. The page polls
its own URL with the header `X-Hestia-Wait: 1`, which Hestia answers with the service's state
as JSON (never proxied, never starting anything, the same auth as the service itself), and
reloads when the service is ready: the browser then lands on the service's own page. Without
JavaScript it reloads itself every few seconds.
"""

from __future__ import annotations

import html
import json
from typing import Any

from hestia.types import Scope

PROBE_HEADER = b"x-hestia-wait"
RETRY_AFTER_S = 3

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="{retry}"></noscript>
<title>Starting {name}</title>
<style>
body{{font:16px/1.5 system-ui,sans-serif;margin:0;min-height:100vh;display:flex;
align-items:center;justify-content:center;background:#f6f5f2;color:#222}}
main{{max-width:32rem;padding:2rem;text-align:center}}
h1{{font-size:1.4rem;margin:0 0 .5rem}}
.state{{display:inline-block;padding:.1rem .6rem;border-radius:1rem;background:#e8e4da}}
.failed{{background:#f5d5d0}}
.spin{{width:2rem;height:2rem;margin:1.5rem auto;border:3px solid #ddd;
border-top-color:#c46a2b;border-radius:50%;animation:s 1s linear infinite}}
@keyframes s{{to{{transform:rotate(360deg)}}}}
#error{{white-space:pre-wrap;text-align:left;font:13px monospace;color:#8a2a1d}}
</style></head>
<body><main>
<h1>{name}</h1>
<p>Hestia is starting this service: <span id="state" class="state">{state}</span></p>
<div class="spin" id="spin"></div>
<p id="note">This page opens the service as soon as it is ready.</p>
<div id="error"></div>
</main>
<script>
(function () {{
  var state = document.getElementById("state"), error = document.getElementById("error");
  function poll() {{
    fetch(location.href, {{headers: {{"X-Hestia-Wait": "1"}}, cache: "no-store",
                           credentials: "same-origin"}})
      .then(function (r) {{
        if (!r.headers.get("x-hestia-wait")) {{ location.reload(); return null; }}
        return r.json();
      }})
      .then(function (s) {{
        if (!s) return;
        state.textContent = s.state;
        if (s.state === "ready") {{ location.reload(); return; }}
        if (s.state === "failed") {{
          state.className = "state failed";
          document.getElementById("spin").style.display = "none";
          error.textContent = (s.last_error && s.last_error.message) || "";
          document.getElementById("note").textContent =
            "The service failed to start. Reload this page to try again.";
          return;
        }}
        setTimeout(poll, 700);
      }})
      .catch(function () {{ setTimeout(poll, 2000); }});
  }}
  setTimeout(poll, 500);
}})();
</script>
</body></html>
"""


def wants_page(scope: Scope, strategy: str) -> bool:
    """Does this request get the waiting page (rather than being held)?"""
    if strategy == "block" or scope["method"] not in ("GET", "HEAD"):
        return False
    if strategy == "page":
        return True
    accept = b""
    for key, value in scope["headers"]:
        if key == b"sec-fetch-mode":
            if value != b"navigate":
                return False  # a fetch() or XHR from a page: a program, held like any other
        elif key == b"accept":
            accept = value
    return _prefers_html(accept)


def _prefers_html(accept: bytes) -> bool:
    best_html = best_other = -1.0
    for part in accept.decode("latin-1").split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in ("text/html", "application/xhtml+xml"):
            best_html = max(best_html, q)
        elif media and media != "*/*":
            best_other = max(best_other, q)
    return best_html > 0 and best_html >= best_other


def is_probe(scope: Scope) -> bool:
    return any(key == PROBE_HEADER for key, _ in scope["headers"])


def page(name: str, state: str) -> bytes:
    return _PAGE.format(
        name=html.escape(name), state=html.escape(state), retry=RETRY_AFTER_S
    ).encode()


def probe_answer(status: dict[str, Any]) -> bytes:
    keep = ("name", "state", "waiting", "in_flight", "last_error", "started_at")
    return json.dumps({k: status.get(k) for k in keep}).encode()
