"""Tiny upstreams for the benchmark, one thread per connection, keep-alive HTTP/1.1.

    python bench/upstreams.py PORT

GET /ndjson?n=1000&ms=10   n NDJSON lines, one chunk each, `ms` apart on an absolute schedule
                           (chunked transfer-encoding; the line carries the send time)
POST /sink                 reads the whole body (content-length or chunked), answers its size
GET /                      "ok"

Blocking sockets in threads on purpose: time.sleep() to an absolute deadline keeps this
server's own timing jitter far below a millisecond, so the gaps the client sees are the
proxy's, and recv_into() on a 1 MB buffer releases the GIL and sinks several GB/s.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

_BUF = 1 << 20


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_until(self, sep: bytes, limit: int = 65536) -> bytes | None:
        while sep not in self.buf:
            if len(self.buf) > limit:
                return None
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(sep)
        return line

    def discard(self, n: int, scratch: memoryview) -> int:
        """Read and drop n body bytes; returns how many were read."""
        got = min(n, len(self.buf))
        self.buf = self.buf[got:]
        while got < n:
            r = self.sock.recv_into(scratch, min(len(scratch), n - got))
            if r == 0:
                break
            got += r
        return got


def _respond(sock: socket.socket, status: str, body: bytes, ctype: bytes = b"text/plain") -> None:
    sock.sendall(
        b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (status.encode(), ctype, len(body), body)
    )


def _ndjson(sock: socket.socket, n: int, interval: float) -> None:
    sock.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
    )
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        line = b'{"i":%d,"t":%.6f}\n' % (i, time.time())
        sock.sendall(b"%x\r\n%s\r\n" % (len(line), line))
    sock.sendall(b"0\r\n\r\n")


def _handle(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = _Conn(sock)
    scratch = memoryview(bytearray(_BUF))
    try:
        while True:
            head = conn.read_until(b"\r\n\r\n")
            if head is None:
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = {}
            for raw in lines[1:]:
                k, _, v = raw.partition(b":")
                headers[k.strip().lower()] = v.strip()
            url = urlsplit(target.decode("latin-1"))
            if method == b"POST":
                if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    total = 0
                    while True:
                        size_line = conn.read_until(b"\r\n")
                        if size_line is None:
                            return
                        size = int(size_line.split(b";")[0], 16)
                        if size == 0:
                            conn.read_until(b"\r\n")
                            break
                        total += conn.discard(size, scratch)
                        conn.read_until(b"\r\n")
                else:
                    total = conn.discard(int(headers.get(b"content-length", b"0")), scratch)
                _respond(sock, "200 OK", b"%d" % total)
            elif url.path == "/ndjson":
                q = parse_qs(url.query)
                _ndjson(sock, int(q.get("n", ["1000"])[0]), float(q.get("ms", ["10"])[0]) / 1000)
            else:
                _respond(sock, "200 OK", b"ok")
            if headers.get(b"connection", b"").lower() == b"close":
                return
    except (OSError, ValueError):
        return
    finally:
        sock.close()


def serve(port: int) -> None:
    srv = socket.create_server(("127.0.0.1", port), backlog=1024)
    print(f"upstreams listening on 127.0.0.1:{port}", flush=True)
    while True:
        sock, _ = srv.accept()
        threading.Thread(target=_handle, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
