"""Debian's nginx, unmodified (reuseport + worker_cpu_affinity), steered by `numareuse attach`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
from conftest import assert_runs, handshake, need, pinned
from test_cli import cli, env  # noqa: F401  (fixture)

from bench import free_port
from bench.nginx import conf as nginx_conf

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk")


@pytest.fixture
def nginx(tmp_path, two_cpus):
    need(os.path.exists(NGINX), "nginx (Debian nginx-light) is not installed")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, port, workers=2, affinity="01 10"))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-e", str(tmp_path / "error.log")])
    import psutil

    deadline = time.monotonic() + 10
    workers = []
    while time.monotonic() < deadline:
        try:
            workers = psutil.Process(proc.pid).children()
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            # ready when both workers exist and have applied worker_cpu_affinity
            if len(workers) == 2 and all(len(w.cpu_affinity()) == 1 for w in workers):
                break
        except (OSError, psutil.Error):
            pass
        time.sleep(0.05)
    assert len(workers) == 2, (tmp_path / "error.log").read_text()
    cpu_of = {w.pid: w.cpu_affinity() for w in workers}
    yield port, cpu_of
    proc.terminate()
    proc.wait(10)


def served_by(port: int) -> tuple[int, int]:
    """(pid of the nginx worker that answered one request, SYNs the client re-sent for it)."""
    c = socket.socket()
    try:
        syns = handshake(c, ("127.0.0.1", port))
        c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    finally:
        c.close()
    return int(re.search(rb"X-Worker-Pid: (\d+)", data).group(1)), syns


def worker_pid(port: int) -> int:
    return served_by(port)[0]


def test_nginx_workers_get_their_cpus_connections(env, nginx):  # noqa: F811
    port, cpu_of = nginx
    assert sorted(tuple(c) for c in cpu_of.values()) == [(0,), (1,)]  # worker_cpu_affinity 01 10
    rep = json.loads(cli("attach", "-p", port, "-d", "cpu", "--json").stdout)
    owners = {o["pid"]: s["domain"] for s in rep["sockets"] for o in s["owners"]}
    assert owners == {pid: cpus[0] for pid, cpus in cpu_of.items()}  # each worker polls its own socket
    syns = 0
    for cpu in (0, 1):
        with pinned(cpu):
            got = [served_by(port) for _ in range(20)]
        assert {pid for pid, _ in got} == {pid for pid, cpus in cpu_of.items() if cpus == [cpu]}
        syns += sum(n for _, n in got)
    st = json.loads(cli("stats", "--json").stdout)[0]
    assert_runs(st["counters"]["local"], 40, syns, "local")
    assert st["locality"] == 1.0
    cli("detach", "-p", port)
    with pinned(0):
        assert {worker_pid(port) for _ in range(40)} == set(cpu_of)  # kernel balance again


def test_no_failed_request_while_attach_and_detach_run_under_wrk(env, nginx):  # noqa: F811
    need(WRK is not None, "wrk is not installed")
    port, _ = nginx
    # Connection: close makes every request a new connection, so each one is steered
    wrk = subprocess.Popen(
        [WRK, "-t2", "-c16", "-d6s", "-H", "Connection: close", f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE,
        text=True,
    )
    cycles = 0
    errors = []

    def flip():
        nonlocal cycles
        time.sleep(0.5)
        while wrk.poll() is None and cycles < 10:
            for args in (("attach", "-p", port, "-d", "cpu"), ("detach", "-p", port)):
                r = cli(*args, ok=False)
                if r.exit_code:
                    errors.append(r.stderr)
            cycles += 1

    t = threading.Thread(target=flip)
    t.start()
    out, _ = wrk.communicate(timeout=60)
    t.join()
    assert not errors, errors
    assert cycles >= 2, out
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    assert requests > 100, out
    assert "Socket errors" not in out, out
    assert "Non-2xx" not in out, out
