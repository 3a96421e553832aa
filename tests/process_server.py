"""A small HTTP server that tests run as a `backend: process` command (with sys.executable).

    process_server.py --port PORT --tag TAG [--name NAME]

TAG is a marker in its command line (and its children's) that the tests' reaper finds it by.
Behaviour from the environment:
  DELAY=seconds      wait this long before listening (a model loading)
  EXIT_CODE=n        print EXIT_MESSAGE on stderr and exit with n instead of serving
  IGNORE_TERM=1      ignore SIGTERM (only SIGKILL ends it)
  SPAWN_CHILD=1      start a child process in its process group (a model server's worker)
  SPAWN_LOG=path     append "<pid> <port>" to this file when it starts
  RELEASE=path       GET /stream sends a line every 50 ms until this file exists, then "done"
Endpoints: GET / (JSON: name, pid, port, child, argv, environment T_* and PORT), GET /stream,
GET /exit/<code> (answers, then exits with code).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--name", default="proc")
    args = parser.parse_args()
    env = os.environ
    pid = os.getpid()
    print(f"{args.name}: loading (pid {pid}, port {args.port})", file=sys.stderr, flush=True)
    if env.get("SPAWN_LOG"):
        with open(env["SPAWN_LOG"], "a") as f:
            f.write(f"{os.getpid()} {args.port}\n")
    if env.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = None
    if env.get("SPAWN_CHILD"):
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)", args.tag],
            stdin=subprocess.DEVNULL,
        )
    time.sleep(float(env.get("DELAY", "0")))
    if env.get("EXIT_CODE"):
        print(env.get("EXIT_MESSAGE", "failing on purpose"), file=sys.stderr, flush=True)
        sys.exit(int(env["EXIT_CODE"]))
    release = env.get("RELEASE")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/stream":
                self._stream()
            elif self.path.startswith("/exit/"):
                self._send(b"bye\n")
                self.wfile.flush()
                os._exit(int(self.path.rsplit("/", 1)[1]))
            else:
                info = {
                    "name": args.name,
                    "pid": os.getpid(),
                    "port": args.port,
                    "child": child.pid if child is not None else None,
                    "argv": sys.argv[1:],
                    "cwd": os.getcwd(),
                    "env": {k: v for k, v in env.items() if k.startswith("T_") or k == "PORT"},
                }
                self._send(json.dumps(info).encode(), "application/json")

        def _send(self, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            deadline = time.monotonic() + 60
            while not (release and Path(release).exists()) and time.monotonic() < deadline:
                self._chunk(f"{args.name} tick\n".encode())
                time.sleep(0.05)
            self._chunk(f"{args.name} done\n".encode())
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    server = Server(("127.0.0.1", args.port), Handler)
    print(f"{args.name}: listening on {args.port}", file=sys.stderr, flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if env.get("IGNORE_TERM"):
        threading.Event().wait()  # only SIGKILL ends it
    _wait_for_term()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # 100 connections at once must not overflow the backlog


def _wait_for_term() -> None:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    print("got SIGTERM, exiting", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
