"""Debian's HAProxy 2.6, unmodified: one process, a thread per CPU, a listener per thread.

`bind ... shards by-thread` gives each of the `nbthread` threads its own
SO_REUSEPORT socket in its own epoll, and `cpu-map auto:1/1-2 0-1` pins
thread 1 to CPU 0 and thread 2 to CPU 1. The process's main thread is
thread 1, so the process rule alone would put both sockets on CPU 0's
domain; `numareuse attach` gives each socket to its thread.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from conftest import need, pinned
from test_cli import N, cli, env  # noqa: F401  (fixture)
from test_nginx import free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

# %[thread] is the sample fetch of the calling thread's number, 0 .. nbthread-1; with
# shards by-thread a connection stays on the thread whose listener accepted it
CONF = """
global
    nbthread 2
    cpu-map auto:1/1-2 0-1
defaults
    mode http
    timeout client 5s
    timeout server 5s
    timeout connect 5s
frontend fe
    bind 127.0.0.1:{port} shards by-thread
    http-request return status 200 content-type text/plain lf-string "%[thread]\\n"
"""


def listeners(port: int) -> int:
    local = f":{port:04X} "
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f if local in line and line.split()[3] == "0A")


@pytest.fixture
def haproxy(tmp_path, two_cpus):
    need(os.path.exists(HAPROXY), "haproxy (Debian haproxy) is not installed")
    port = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(CONF.format(port=port))
    # -db: foreground, no daemon, no master process; our own process, no system service
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    tasks: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            tasks = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
            cpus = [os.sched_getaffinity(t) for t in tasks]
        except OSError:
            cpus = []
        if len(tasks) == 2 and cpus == [{0}, {1}] and listeners(port) == 2:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"haproxy did not start: {proc.communicate()[1]}")
    # ready when both threads serve (each its own listener, picked by the kernel's hash):
    # on a loaded machine a thread may still be starting up when its listener is bound
    served: set[int] = set()
    while served != {0, 1} and time.monotonic() < deadline + 20:
        served.add(thread_of(port))
    assert served == {0, 1}, served
    yield port, proc.pid, tasks
    proc.terminate()
    proc.wait(10)


def thread_of(port: int) -> int:
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    c.close()
    assert data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200"), data
    return int(data.split(b"\r\n\r\n", 1)[1])


def test_haproxy_threads_get_their_cpus_connections(env, haproxy):  # noqa: F811
    port, pid, tids = haproxy
    rep = json.loads(cli("attach", "-p", port, "-d", "cpu", "--json").stdout)
    owners = {o["tid"]: s["domain"] for s in rep["sockets"] for o in s["owners"]}
    assert owners == {tids[0]: 0, tids[1]: 1}, rep["sockets"]  # thread 1 (the main one) on CPU 0
    assert {o["pid"] for s in rep["sockets"] for o in s["owners"]} == {pid}
    for cpu in (0, 1):
        with pinned(cpu):
            got = [thread_of(port) for _ in range(N)]
        assert got == [cpu] * N  # HAProxy's thread `cpu` (0-based) runs on CPU `cpu`
    st = json.loads(cli("stats", "--json").stdout)[0]
    assert st["counters"]["local"] == 2 * N and st["locality"] == 1.0
    human = cli("status").stdout
    assert f"owner={pid}/{tids[0]} haproxy" in human and f"owner={pid}/{tids[1]} haproxy" in human, human
    cli("detach", "-p", port)
    with pinned(0):
        assert set(thread_of(port) for _ in range(40)) == {0, 1}  # the kernel's hash again
