"""Where a service answers: host, port, base path and the Host header to send."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int
    base_path: bytes  # path prefix from the url, without a trailing slash (b'' for none)
    host_header: bytes

    @property
    def display(self) -> str:
        return f"http://{self.host_header.decode('latin-1')}{self.base_path.decode('latin-1')}"

    @property
    def origin(self) -> tuple[str, int]:
        return self.host, self.port


def _netloc(host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return host if port == 80 else f"{host}:{port}"


def upstream_from_url(url: str) -> Upstream:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    return Upstream(host, port, parts.path.rstrip("/").encode(), _netloc(host, port).encode())


def upstream_from_address(host: str, port: int) -> Upstream:
    return Upstream(host, port, b"", _netloc(host, port).encode())
