"""The bundled pre-fork server (numareuse.prefork) with workers on every node of a real NUMA machine.

Workers pinned one per CPU register ``CURRENT`` under ``--domains numa``, as
nginx workers with ``worker_cpu_affinity auto`` would: every request from a
client on node n must be answered by a worker of node n (full locality).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from conftest import pinned

N = 24  # requests per CPU, each on a new connection: a new steering decision


class Prefork:
    """``python -m numareuse.prefork`` with its output collected line by line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "numareuse.prefork", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
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

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """The first output line matching ``pattern`` (a bcc compile under emulation takes a while)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.lines[-1:] == ["<eof>"]:
                    pytest.fail(f"prefork never printed {pattern!r}; output:\n" + "\n".join(self.lines))
                self._cv.wait(left)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


@pytest.fixture
def prefork():
    made: list[Prefork] = []

    def start(*args: str) -> Prefork:
        made.append(Prefork(*args))
        return made[-1]

    yield start
    for p in made:
        p.stop()


def answered_by(port: int) -> dict[str, str]:
    """One HTTP request on a new connection; the X-Worker-* headers of its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0].startswith("HTTP/1.1 200"), data
    return {k[len("X-Worker-") :].lower(): v for k, v in (ln.split(": ", 1) for ln in head[1:]) if k.startswith("X-")}


def test_workers_on_every_node_serve_only_their_node(nodes, prefork):
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    srv = prefork("--workers", str(len(node_of)), "--affinity", "auto", "--domains", "numa")
    port = int(srv.wait_for(r"^ready port=(\d+) .*numareuse=on").group(1))
    workers = {int(i): (set(map(int, cpus.split(","))), d) for i, cpus, d in re.findall(
        r"^worker (\d+) pid=\d+ cpus=([\d,]+) domain=(\S+)", "\n".join(srv.lines), re.M)}  # fmt: skip
    # worker i is pinned to CPU i and registered in that CPU's node
    assert {i: d for i, (_, d) in workers.items()} == {cpu: str(node_of[cpu]) for cpu in node_of}
    for cpu, node in sorted(node_of.items()):
        with pinned(cpu):
            got = [answered_by(port) for _ in range(N)]
        assert {a["domain"] for a in got} == {str(node)}, f"client on CPU {cpu} (node {node}): {got}"
        assert {node_of[int(a["cpu"])] for a in got} == {node}  # and the answering worker ran there
        by_worker = Counter(int(a["index"]) for a in got)
        assert set(by_worker) == {i for i, (cpus, _) in workers.items() if node_of[min(cpus)] == node}, (
            f"client on CPU {cpu}: every worker of node {node} should answer some: {dict(by_worker)}"
        )
    srv.stop()
    stats = srv.wait_for(r"^stats local=(\d+) wildcard=(\d+) fallback=(\d+)")
    assert tuple(map(int, stats.groups())) == (N * len(node_of), 0, 0)
    srv.wait_for(r"^stopped detached=yes")
