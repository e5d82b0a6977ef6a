"""Client side of the bundled pre-fork server, shared by tests/test_prefork.py and tests/vm.

``Server`` runs ``python -m numareuse.examples.prefork`` in its own session and collects
its output line by line; ``http_get`` makes one request on a new connection
(so every request is a new steering decision) and returns its X-Worker headers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import handshake

from numareuse import _sys


def http_get(host: str, port: int, timeout: float = 5.0) -> dict:
    """One request on a new connection (so every request is a new steering decision).

    Its X-Worker headers, and ``resent``: the SYNs this connection sent again
    (measured, see conftest.handshake). The server closes first, so its
    TIME_WAIT, not its listener, meets whatever of the connection comes late.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as c:
        syns = handshake(c, (host, port), timeout)
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = read_response(c)
    answer["resent"] = syns
    return answer


def read_response(c: socket.socket) -> dict:
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, _ = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), data
    h = dict(ln.split(": ", 1) for ln in lines[1:])
    return {"pid": int(h["X-Worker-Pid"]), "index": int(h["X-Worker-Index"]), "cpu": int(h["X-Worker-Cpu"]),
            "domain": h["X-Worker-Domain"], "registered": h["X-Worker-Registered"]}  # fmt: skip


def control_socket_of(worker_pid: int) -> socket.socket:
    """A duplicate of a worker's end of its control socketpair (as a hostile worker holds it)."""
    for fd in os.listdir(f"/proc/{worker_pid}/fd"):
        dup = _sys.pidfd_getfd(worker_pid, int(fd))
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        if s.family == socket.AF_UNIX and s.type == socket.SOCK_SEQPACKET:
            return s
        s.close()
    raise AssertionError(f"no control socket in worker {worker_pid}")


class Server:
    """``python -m numareuse.examples.prefork`` in its own session, its output collected line by line.

    ``hook``: Python source run instead of ``-m numareuse.examples.prefork``; it patches what a
    test needs, then calls ``numareuse.examples.prefork.main(sys.argv[1:])``.
    """

    def __init__(self, *args: str, hook: str | None = None, env: dict | None = None):
        how = ["-c", hook] if hook else ["-m", "numareuse.examples.prefork"]
        self.proc = subprocess.Popen(
            [sys.executable, *how, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one process group to clean up, even on failure
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self.lines.append("<eof>")
            self._cv.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match:
        """The first output line from ``start`` on matching ``pattern``; fails the test on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines[start:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<eof>"):
                    pytest.fail(f"server never printed {pattern!r}; output:\n" + "\n".join(self.lines))
                self._cv.wait(left)

    def start(self, timeout: float = 20.0) -> Server:
        m = self.wait_for(r"^ready port=(\d+) .* prog_id=(\d+)", timeout)
        self.port, self.prog_id = int(m.group(1)), int(m.group(2))
        self.workers = {
            int(i): int(p) for i, p in re.findall(r"^worker (\d+) pid=(\d+) cpus", "\n".join(self.lines), re.M)
        }
        return self

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)  # in case a test left the master stopped
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
