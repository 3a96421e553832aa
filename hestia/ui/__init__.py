"""The dashboard: one page of plain HTML, CSS and JavaScript in this folder, served as files (no
build step, nothing from the network). It reads /v1/services and /v1/events/recent once and
then follows the Server-Sent Events of /v1/events; its buttons call the control API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

HERE = Path(__file__).parent
_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def mount_ui(api: FastAPI) -> None:
    @api.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        # browsers ask for it on every page of the gateway's own
        return FileResponse(HERE / "favicon.svg", media_type="image/svg+xml")

    @api.get("/ui", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(
            HERE / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    for name, media_type in _FILES.items():
        _serve_file(api, name, media_type)


def _serve_file(api: FastAPI, name: str, media_type: str) -> None:
    async def asset() -> FileResponse:
        return FileResponse(
            HERE / name, media_type=media_type, headers={"Cache-Control": "no-cache"}
        )

    api.add_api_route(f"/ui/{name}", asset, methods=["GET"], include_in_schema=False)
