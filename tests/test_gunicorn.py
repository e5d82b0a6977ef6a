"""Real gunicorn (sync, gthread, UvicornWorker) with numareuse, under wrk, workers recycling.

Every request is a new connection (``Connection: close``), so each one is a
steering decision and every reset shows as a wrk socket error. Two wrk
processes, one pinned to each CPU, count the responses by the worker that
sent them (the app answers with its pid and the CPUs it may run on): with
domains "0;1" a client on CPU c must only be served by workers pinned to c.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import need, pinned

from bench import free_port

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
WRK = shutil.which("wrk")
DOMAINS = "0;1"
ONE_LINE = "from numareuse.integrations.gunicorn import enable\nenable(globals(), domains={domains!r})\n"

# Per wrk thread: responses counted by (worker cpus, worker pid, status); printed by done().
LUA = r"""
counts = {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  local cpus = headers["X-Worker-Cpus"] or headers["x-worker-cpus"] or "-"
  local pid = headers["X-Worker-Pid"] or headers["x-worker-pid"] or "-"
  local key = cpus .. " " .. pid .. " " .. status
  counts[key] = (counts[key] or 0) + 1
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for key, n in pairs(t:get("counts")) do io.write("COUNT " .. key .. " " .. n .. "\n") end
  end
end
"""


def cpus_of(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


@dataclass
class Load:
    """What the pinned wrk clients saw."""

    requests: int
    errors: dict[str, int]
    non2xx: int
    served: dict[int, collections.Counter]  # client cpu -> {(worker cpus, pid, status): responses}

    @property
    def socket_errors(self) -> int:
        return sum(self.errors.values())

    def pids(self) -> set[str]:
        return {pid for c in self.served.values() for _cpus, pid, _status in c}

    def foreign(self, domains: list[set[int]]) -> dict[int, int]:
        """Per client CPU: responses from a worker whose CPUs are not all in the client's domain."""
        out = {}
        for cpu, counts in self.served.items():
            (dom,) = [d for d in domains if cpu in d]
            out[cpu] = sum(n for (cpus, _pid, _st), n in counts.items() if cpus == "-" or not cpus_of(cpus) <= dom)
        return out

    def summary(self) -> str:
        return (
            f"{self.requests} requests, socket errors {self.errors}, non-2xx {self.non2xx}, workers {len(self.pids())}"
        )


class Server:
    """One gunicorn master bound to a free loopback port, its log in ``tmp``."""

    def __init__(self, tmp: Path, name: str, args: list[str], conf: str | None = None, env: dict | None = None):
        self.port = free_port()
        self.log_path = tmp / f"{name}.log"
        # gunicorn 27's control socket is one path per user (~/.gunicorn/gunicorn.ctl) for every gunicorn
        # --graceful-timeout: gunicorn loses a SIGTERM that reaches a worker before it set its handlers
        # (a boot race); the arbiter then kills that worker after this timeout
        cmd = [GUNICORN, "-b", f"127.0.0.1:{self.port}", "--pythonpath", str(ROOT / "examples"), "--no-control-socket"]
        cmd += ["--graceful-timeout", "5"]
        if conf is not None:
            path = tmp / f"{name}.conf.py"
            path.write_text(conf)
            cmd += ["-c", str(path)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd + args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})), cwd=tmp
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def recycled(self, workers: int) -> int:
        """Workers booted after the first ``workers`` (from the log)."""
        return self.log().count("Booting worker with pid") - workers

    def get(self) -> dict[str, str]:
        """One request; the response's X-Worker-* headers."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):
                data += chunk
        return {k.decode().lower(): v.decode() for k, v in re.findall(rb"(?im)^(x-worker-\w+): (\S+)", data)}

    def wait_ready(self, workers: int, old: set[str] = frozenset()) -> set[str]:
        """Until ``workers`` distinct workers, none of ``old``, have answered (within 30 s); their pids.

        The client takes each CPU in turn: a steered server sends a client's
        connections to its own CPU's domain only, and an unpinned client
        may stay on one CPU for long while a hog runs on the other.
        """
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        cpus = itertools.cycle((0, 1))
        while len(seen - old) < workers:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            try:
                with pinned(next(cpus)):
                    seen.add(self.get()["x-worker-pid"])
            except (OSError, KeyError):
                time.sleep(0.1)
        return seen - old

    def cpus_serving(self, cpu: int, n: int = 20) -> set[str]:
        """X-Worker-Cpus of the workers that answer ``n`` requests from a client pinned to ``cpu``."""
        with pinned(cpu):
            return {self.get()["x-worker-cpus"] for _ in range(n)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0, self.log()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def start_load(port: int, seconds: int, script: Path) -> list[tuple[int, subprocess.Popen]]:
    """Two wrk clients, one pinned to each of CPUs 0 and 1, 8 connections each."""
    cmd = [WRK, "-t1", "-c8", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), "-H", "Connection: close"]
    clients = []
    for cpu in (0, 1):
        for _attempt in range(50):
            with pinned(cpu):  # wrk and its threads inherit the affinity; their SYNs are processed on `cpu`
                proc = subprocess.Popen(
                    cmd + [f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            try:
                proc.wait(0.3)
            except subprocess.TimeoutExpired:
                break
            # wrk gives up when its first connect is refused: plain gunicorn, between two worker generations
            assert "unable to connect" in proc.stderr.read(), proc.communicate()
        clients.append((cpu, proc))
    return clients


def run_load(ports: list[int], script: Path, least: float, most: float, enough) -> list[Load]:
    """Load on each port for ``least`` to ``most`` seconds, stopped once ``enough()`` holds.

    Recycling goes at the machine's speed (a uvicorn worker's boot takes
    seconds on a busy machine), so a run lasts until the workers were
    recycled often enough rather than a fixed time. SIGINT stops wrk, which
    then reports as at its end.
    """
    groups = [start_load(port, int(most), script) for port in ports]
    procs = [proc for clients in groups for _cpu, proc in clients]
    start = time.monotonic()
    while any(proc.poll() is None for proc in procs):
        if time.monotonic() - start >= least and enough():
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    return [finish_load(clients) for clients in groups]


def finish_load(clients) -> Load:
    load = Load(0, {k: 0 for k in ("connect", "read", "write", "timeout")}, 0, {})
    for cpu, proc in clients:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (proc.returncode, out, err)
        load.requests += int(re.search(r"(\d+) requests in", out).group(1))
        if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
            for k, v in zip(("connect", "read", "write", "timeout"), m.groups()):
                load.errors[k] += int(v)
        if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
            load.non2xx += int(m.group(1))
        load.served[cpu] = collections.Counter(
            {(c, p, s): int(n) for c, p, s, n in re.findall(r"^COUNT (\S+) (\S+) (\d+) (\d+)$", out, re.M)}
        )
    return load


@pytest.fixture
def wrk_script(tmp_path, kernel, two_cpus):
    need(WRK is not None, "wrk is not installed")
    need(os.path.exists(GUNICORN), "gunicorn is not installed in this venv (pip install -e '.[test]')")
    path = tmp_path / "count.lua"
    path.write_text(LUA)
    return path


def assert_clean_and_local(load: Load, workers: int, recycles: int) -> None:
    """No reset, no error status, every response counted, from the client's own domain."""
    assert load.socket_errors == 0 and load.non2xx == 0, load.summary()
    assert sum(sum(c.values()) for c in load.served.values()) == load.requests, load.summary()
    assert {s for c in load.served.values() for _cpus, _pid, s in c} == {"200"}, load.served
    assert len(load.pids()) - workers >= recycles, load.summary()  # workers were recycled that often
    assert load.foreign([{0}, {1}]) == {0: 0, 1: 0}, load.served


def recycling(n: int, jitter: int, workers: int = 2) -> list[str]:
    return ["-w", str(workers), "--max-requests", str(n), "--max-requests-jitter", str(jitter)]


def test_sync_recycling_no_reset_and_local_side_by_side_with_plain_gunicorn(tmp_path, wrk_script):
    """The brief's run: -w 2 --reuse-port, recycling, 15 s of wrk; plain gunicorn next to it."""
    args = ["--reuse-port", *recycling(100, 10), "gunicorn_app:app"]
    steered = Server(tmp_path, "numareuse", args, conf=ONE_LINE.format(domains=DOMAINS))
    plain = Server(tmp_path, "plain", args)
    try:
        steered.wait_ready(2)
        plain.wait_ready(2)
        with_numareuse, without = run_load(
            [steered.port, plain.port], wrk_script, 15, 25, lambda: min(steered.recycled(2), plain.recycled(2)) >= 12
        )
    finally:
        steered.stop()
        plain.stop()
    print(f"\nsync with numareuse:    {with_numareuse.summary()}, other domain {with_numareuse.foreign([{0}, {1}])}")
    print(f"sync without numareuse: {without.summary()}, other domain {without.foreign([{0}, {1}])}")
    assert "numareuse: workers spread over domains 0;1" in steered.log()
    assert_clean_and_local(with_numareuse, workers=2, recycles=10)
    assert len(without.pids()) - 2 >= 10, without.summary()  # the plain run recycled as often: like for like


USER_HOOKS = """
import os

def _mark(*words):
    with open({marks!r}, "a") as f:
        f.write(" ".join(map(str, words)) + "\\n")

def when_ready(server):
    _mark("when_ready")

def pre_fork(server, worker):
    _mark("pre_fork")

def post_fork(server, worker):
    _mark("post_fork", ",".join(map(str, sorted(os.sched_getaffinity(0)))), len(worker.sockets), worker.pid)

def pre_request(worker, req):
    if worker.nr == 0:
        _mark("pre_request")

def worker_exit(server, worker):
    _mark("worker_exit", worker.pid)

def child_exit(server, worker):
    _mark("child_exit", worker.pid)

def on_exit(server):
    _mark("on_exit", *sorted(server.WORKERS))  # the workers the stop killed and did not reap

"""


def test_gthread_keeps_the_users_hooks_through_a_reload(tmp_path, wrk_script):
    marks = tmp_path / "marks"
    conf = USER_HOOKS.format(marks=str(marks)) + ONE_LINE.format(domains=DOMAINS)
    server = Server(
        tmp_path,
        "gthread",
        ["--reuse-port", "-k", "gthread", "--threads", "4", *recycling(50, 5)] + ["gunicorn_app:app"],
        conf,
    )
    try:
        server.wait_ready(2)
        hup = [time.monotonic() + 3]  # a reload too: it runs the config again and forks new workers

        def enough() -> bool:
            if hup and time.monotonic() >= hup[0]:
                server.proc.send_signal(signal.SIGHUP)
                hup.clear()
            return not hup and server.recycled(2) >= 14

        (load,) = run_load([server.port], wrk_script, 6, 15, enough)
    finally:
        server.stop()
    print(f"\ngthread with numareuse, a reload included: {load.summary()}")
    assert "Handling signal: hup" in server.log()
    assert_clean_and_local(load, workers=2, recycles=10)
    lines = [line.split() for line in marks.read_text().splitlines()]
    hooks = collections.Counter(words[0] for words in lines)
    assert hooks["when_ready"] == 1 and hooks["on_exit"] == 1, hooks
    pids = {name: [words[-1] for words in lines if words[0] == name] for name in hooks}
    forked = set(pids["post_fork"])
    assert len(forked) == hooks["post_fork"] == hooks["pre_fork"] >= 12, hooks
    # The master reaps (child_exit) every worker that exits while it runs; at its stop it waits
    # --graceful-timeout, then SIGKILLs the rest and leaves them unreaped in server.WORKERS, which
    # on_exit recorded: exactly those miss child_exit. A worker that a signal killed misses
    # worker_exit (one killed before it set its handlers, in a boot race with the reload or the
    # stop; one killed after its hook ran has it); the master logs each one it reaps as "was sent SIG...".
    reaped = set(pids["child_exit"])
    (unreaped,) = [set(words[1:]) for words in lines if words[0] == "on_exit"]
    assert len(reaped) == hooks["child_exit"] and forked - reaped == unreaped, (forked - reaped, unreaped)
    signalled = set(re.findall(r"Worker \(pid:(\d+)\) was sent SIG", server.log()))
    exited = set(pids["worker_exit"])
    print(
        f"workers {len(forked)}: not reaped at the stop {len(unreaped)}, killed by a signal {len(signalled)}, "
        f"without worker_exit {len(forked - exited)}"
    )
    assert exited <= forked and forked - exited <= signalled | unreaped, (forked - exited, signalled, unreaped)
    assert hooks["pre_request"] >= len(forked) - 2, hooks  # each worker served (the last two may not have)
    # the user's post_fork runs after numareuse's: it sees its worker pinned, with one socket
    forks = {tuple(words[1:3]) for words in lines if words[0] == "post_fork"}
    assert forks == {("0", "1"), ("1", "1")}, forks


def test_uvicorn_worker_with_the_ready_config(tmp_path, wrk_script):
    need(importlib.util.find_spec("uvicorn_worker") is not None, "uvicorn-worker is not installed")
    args = ["-c", "python:numareuse.gunicorn", "-k", "uvicorn_worker.UvicornWorker", *recycling(40, 4)]
    server = Server(tmp_path, "uvicorn", args + ["gunicorn_app:asgi"], env={"NUMAREUSE_DOMAINS": DOMAINS})
    try:
        server.wait_ready(2)
        (load,) = run_load([server.port], wrk_script, 6, 15, lambda: server.recycled(2) >= 12)
    finally:
        server.stop()
    print(f"\nUvicornWorker with numareuse: {load.summary()}")
    assert "held sockets" in server.log()  # the ready config turned reuse_port on
    assert_clean_and_local(load, workers=2, recycles=10)


def test_without_reuse_port_one_warning_and_nothing_changed(tmp_path, kernel, two_cpus):
    server = Server(tmp_path, "shared", ["-w", "2", "gunicorn_app:app"], conf=ONE_LINE.format(domains=DOMAINS))
    try:
        server.wait_ready(2)
        with pinned(0):
            answers = [server.get() for _ in range(20)]
        server.proc.send_signal(signal.SIGHUP)  # a reload reads the config again: still one warning
        server.wait_ready(2)
    finally:
        server.stop()
    log = server.log()
    assert log.count("without --reuse-port") == 1, log
    assert "numareuse: workers" not in log and "numareuse: off" not in log, log
    assert all(cpus_of(a["x-worker-cpus"]) == os.sched_getaffinity(0) for a in answers), answers  # not pinned


def test_own_sockets_steer_and_are_attached_again_when_every_worker_was_replaced(tmp_path, kernel, two_cpus):
    """sockets="own": each worker registers the socket gunicorn made for it, in its domain."""
    conf = "from numareuse.integrations.gunicorn import enable\nenable(globals(), domains='0;1', sockets='own')\n"
    server = Server(tmp_path, "own", ["--reuse-port", "-w", "2", "gunicorn_app:app"], conf)
    try:
        first = server.wait_ready(2)
        assert server.cpus_serving(0) == {"0"} and server.cpus_serving(1) == {"1"}
        for pid in first:  # every worker at once: their sockets close, the next ones form a new group
            os.kill(int(pid), signal.SIGTERM)
        server.wait_ready(2, old=first)
        assert server.cpus_serving(0) == {"0"} and server.cpus_serving(1) == {"1"}
    finally:
        server.stop()
    assert "own sockets" in server.log() and "unsteered" not in server.log(), server.log()
