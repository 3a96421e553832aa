"""`python tests/reaper.py CMD...`: run CMD as a child subreaper, for the browser and
Jupyter tests.

PID 1 in the test containers does not reap orphans, and Chromium (zygote, GPU, renderers)
and Jupyter (kernels in sessions of their own) leave some when they are stopped. Started with
`start_new_session=True`, this wrapper leads a process group with CMD in it; orphaned
descendants of CMD, whatever their session, become its children (PR_SET_CHILD_SUBREAPER).
On SIGTERM it passes the signal on to CMD; once CMD has exited it stops (SIGTERM, then
SIGKILL after a grace) and reaps every descendant left, then exits with CMD's status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 5.0


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == me:
            out.append(int(entry))
    return out


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("reaper: prctl(PR_SET_CHILD_SUBREAPER) failed", file=sys.stderr)
    child = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: child.send_signal(signal.SIGTERM))
    code = child.wait()
    deadline = time.monotonic() + GRACE_S
    told: set[int] = set()
    while True:
        _reap_all()
        left = _children()
        if not left:
            return code if code >= 0 else 128 - code
        late = time.monotonic() > deadline
        for pid in left:
            if late or pid not in told:
                told.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
