"""The bundled pre-fork server on the real kernel: real processes, real HTTP over loopback.

Two workers pinned to CPU 0 and CPU 1 with virtual domains "cpu" (one domain
per CPU) and clients pinned to a CPU give exact, deterministic answers on a
one-node machine: a client on CPU n is always answered by worker n.
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
from collections import Counter

import pytest
from conftest import need, pinned
from prefork_client import Server, control_socket_of, http_get, read_response

from numareuse import _sys
from numareuse.examples.prefork import parse_affinity

N = 30  # requests per CPU


@pytest.fixture
def server(kernel, two_cpus):
    """Factory: a started server with the given CLI arguments; every process is gone at the end."""
    made: list[Server] = []

    def start(*args: str, **kw) -> Server:
        s = Server(*args, **kw)
        made.append(s)
        return s.start()

    yield start
    for s in made:
        s.stop()


def answers(cpu: int, srv: Server, n: int = N, host: str = "127.0.0.1") -> list[dict]:
    with pinned(cpu):
        return [http_get(host, srv.port) for _ in range(n)]


def status_fields(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.rstrip("\n").split(":\t", 1) for ln in f if ":\t" in ln)


def test_affinity_parsing():
    assert parse_affinity("auto", 3, [0, 1]) == [{0}, {1}, {0}]
    assert parse_affinity("01 10", 2, [0, 1]) == [{0}, {1}]  # nginx masks: rightmost bit is CPU 0
    assert parse_affinity("0011 1100", 3, [0, 1, 2, 3]) == [{0, 1}, {2, 3}, {2, 3}]  # last mask repeats
    assert parse_affinity("0-1;3", 2, [0, 1, 2, 3]) == [{0, 1}, {3}]
    assert parse_affinity("2", 1, [0, 1, 2]) == [{2}]  # not a mask: a CPU list
    assert parse_affinity("none", 2, [0, 1]) == [None, None]
    for bad in ("00", "0-1;7", "x", ""):
        with pytest.raises(ValueError):
            parse_affinity(bad, 2, [0, 1, 2, 3])


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_pinned_clients_answered_by_their_worker(server, host):
    srv = server("--host", host, "--workers", "2", "--affinity", "auto", "--domains", "cpu")
    for cpu in (0, 1):
        got = answers(cpu, srv, host=host)
        assert Counter(a["pid"] for a in got) == {srv.workers[cpu]: N}
        assert {(a["index"], a["cpu"], a["domain"], a["registered"]) for a in got} == {(cpu, cpu, str(cpu), "direct")}


def test_without_numareuse_the_kernel_hash_spreads(server):
    """The control: the same server without the program; a client on CPU 0 reaches both workers."""
    srv = server("--workers", "2", "--domains", "cpu", "--no-numareuse")
    assert srv.prog_id == 0
    got = Counter(a["index"] for a in answers(0, srv, 40))
    assert got[0] and got[1], got  # all 40 on one worker by chance: p = 2**-39


def _assert_unprivileged(srv: Server) -> None:
    for pid in srv.workers.values():
        st = status_fields(pid)
        assert st["Uid"].split()[0] != "0" and st["Gid"].split()[0] != "0"
        assert int(st["CapEff"], 16) == 0
        assert st["Groups"].strip() == ""


def test_unprivileged_worker_registers_through_inherited_fds(server):
    srv = server("--workers", "2", "--domains", "cpu", "--user", "nobody")
    paths = set(re.findall(r"registered=(\w+) uid=", "\n".join(srv.lines)))
    need(paths == {"direct"}, "this kernel refuses bpf() map updates to unprivileged processes (before ~6.5)")
    _assert_unprivileged(srv)
    for cpu in (0, 1):
        got = answers(cpu, srv)
        assert Counter(a["pid"] for a in got) == {srv.workers[cpu]: N}
        assert {a["registered"] for a in got} == {"direct"}


def test_unprivileged_worker_registers_through_the_master(server):
    """The path for kernels that refuse bpf() to unprivileged workers, forced."""
    srv = server("--workers", "2", "--domains", "cpu", "--user", "nobody", "--registration", "master")
    _assert_unprivileged(srv)
    for cpu in (0, 1):
        got = answers(cpu, srv)
        assert Counter(a["pid"] for a in got) == {srv.workers[cpu]: N}
        assert {(a["domain"], a["registered"]) for a in got} == {(str(cpu), "master")}


def test_connections_queued_on_a_dead_workers_socket_go_to_its_replacement(server):
    """Deterministic: with the master stopped, worker 1 dies and nobody can replace it yet.

    Its socket (held by the master) stays in the group and in its slot, so
    connections from CPU 1 are still accepted by the kernel and queue on it;
    the replacement accepts and answers every one of them.
    """
    srv = server("--workers", "2", "--domains", "cpu")
    old, mark = srv.workers[1], len(srv.lines)
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while status_fields(old)["State"][0] != "Z":  # dead, not reaped: the master is stopped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # worker 0 serves on while the master is stopped
        assert {a["pid"] for a in answers(0, srv, 5)} == {srv.workers[0]}
        queued = []
        with pinned(1):
            for _ in range(10):
                c = socket.create_connection(("127.0.0.1", srv.port), timeout=5)  # not refused
                c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                queued.append(c)
        time.sleep(0.1)
        for c in queued:  # nobody has answered: no worker has the socket
            c.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.recv(1)
            c.settimeout(5)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    try:
        got = [read_response(c) for c in queued]
    finally:
        for c in queued:
            c.close()
    new = int(srv.wait_for(r"^worker 1 pid=(\d+) cpus=1 domain=1 registered=direct", start=mark).group(1))
    assert new != old
    assert Counter(a["pid"] for a in got) == {new: 10}
    assert Counter(a["pid"] for a in answers(1, srv, 10)) == {new: 10}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "crash"])
def test_worker_restart_under_a_client_loop(server, sig):
    srv = server("--workers", "2", "--domains", "cpu")
    old = srv.workers[1]
    stop = threading.Event()
    results = {0: Counter(), 1: Counter()}
    failures = {0: [], 1: []}

    def client(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only
        deadline = time.monotonic() + 15  # bounded even if the test body fails
        while not stop.is_set() and time.monotonic() < deadline:
            stage = "connect"
            try:
                family = socket.AF_INET
                with socket.socket(family) as c:
                    c.settimeout(5)
                    c.connect(("127.0.0.1", srv.port))
                    stage = "request"
                    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    results[cpu][read_response(c)["pid"]] += 1
            except (OSError, AssertionError, KeyError, ValueError) as e:
                failures[cpu].append((stage, repr(e)))

    threads = [threading.Thread(target=client, args=(cpu,)) for cpu in (0, 1)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        mark = len(srv.lines)
        os.kill(old, sig)
        new = int(srv.wait_for(r"^worker 1 pid=(\d+) cpus=1 domain=1 registered=direct", start=mark).group(1))
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    why = f"failures {failures}, answers {results}, server:\n" + "\n".join(srv.lines)
    assert not failures[0], why
    assert [f for f in failures[1] if f[0] == "connect"] == [], why  # never refused
    if sig == signal.SIGTERM:
        assert failures[1] == [], why  # graceful: it finished what it had accepted
    else:
        # a crash loses only what the worker had already accepted: this client's one request in flight
        assert len(failures[1]) <= 1, why
    assert set(results[0]) == {srv.workers[0]}, why
    assert set(results[1]) == {old, new} and results[1][new] > 0, why  # steering survives the restart


def test_sigterm_stops_everything(server):
    srv = server("--workers", "2", "--domains", "cpu")
    pids = [srv.proc.pid, *srv.workers.values()]
    os.close(_sys.prog_fd_by_id(srv.prog_id))  # the program is loaded (and attached)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(15) == 0
    srv.wait_for(r"^stopped detached=yes")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    deadline = time.monotonic() + 3  # the kernel frees the program after an RCU grace period
    while True:
        try:
            os.close(_sys.prog_fd_by_id(srv.prog_id))
        except OSError:
            break
        assert time.monotonic() < deadline, "the program outlived the server"
        time.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        http_get("127.0.0.1", srv.port)


def test_sigterm_during_startup_exits_cleanly(kernel):
    """A stop while the workers are still starting is a clean exit 0 (the master catches
    signals from before the program loads, so no moment of start-up kills it outright)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "numareuse.examples.prefork", "--port", "0", "--domains", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert p.stdout.readline().startswith("master pid=")  # printed after the program loaded
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=15)
        assert p.returncode == 0, out
        assert out.rstrip().endswith("stopped detached=yes"), out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_bad_user_fails_with_one_line(kernel):
    p = subprocess.run(
        [sys.executable, "-m", "numareuse.examples.prefork", "--port", "0", "--user", "no-such-user-here"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 1
    assert p.stderr.strip() == "Error: prefork: no such user 'no-such-user-here'"


@pytest.mark.parametrize("flood", [False, True], ids=["garbage", "unread-replies"])
def test_a_hostile_worker_is_killed_not_obeyed(server, flood):
    """A worker (maybe unprivileged, maybe compromised) cannot crash or block the master."""
    srv = server("--workers", "2", "--domains", "cpu", "--affinity", "auto")
    ctl = control_socket_of(srv.workers[0])
    ctl.setblocking(False)
    try:
        if flood:  # register requests whose replies nobody reads
            # with the master stopped it reads none while they queue (as on a loaded machine):
            # it then has as much room for replies as the worker had for requests, so a full
            # send buffer never tells it; the unread reply does
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    for _ in range(5000):
                        ctl.send(b'{"op": "register", "domain": 0}')
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
        else:
            for msg in (b"not json", b"[]", b'{"op": "ready"}'):
                with contextlib.suppress(ConnectionError):
                    ctl.send(msg)
    finally:
        ctl.close()
    srv.wait_for(r"bad control message .*; killing it")
    srv.wait_for(r"^worker 0 pid=\d+ exited .*restarting")
    m = srv.wait_for(r"^worker 0 pid=(\d+) cpus", start=len(srv.lines) - 1, timeout=20)
    assert int(m.group(1)) != srv.workers[0]
    assert {a["index"] for a in answers(0, srv, 10)} == {0}  # the replacement serves
    assert {a["index"] for a in answers(1, srv, 10)} == {1}  # and the master never stopped


# Runs in the master instead of ``-m numareuse.examples.prefork``: the first worker 1 started while
# the file $NUMAREUSE_TEST_STOP exists moves its socket itself (to the wildcard: a move
# writes the maps) and stops (SIGSTOP) at the first map access it makes while it holds a
# file lock: in the middle of register(), holding the selector's lock.
STOPS_HOLDING_THE_LOCK = """
import os, signal, sys
from numareuse import WILDCARD, _sys
from numareuse.examples import prefork

trigger = os.environ["NUMAREUSE_TEST_STOP"]
register = prefork._Worker._register
ACCESS = ("_bpf", "map_lookup", "map_update", "map_update_u64key", "map_delete")


def holds_a_lock():
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open("/proc/self/fdinfo/" + fd) as f:
                if any(line.startswith("lock:") for line in f):
                    return True
        except OSError:
            pass
    return False


def _register(self):
    if self.index == 1 and os.path.exists(trigger):
        os.unlink(trigger)
        real = {name: getattr(_sys, name) for name in ACCESS}

        def stopping(name):
            def access(*a, **kw):
                if holds_a_lock():
                    for n, fn in real.items():
                        setattr(_sys, n, fn)
                    os.kill(os.getpid(), signal.SIGSTOP)
                return real[name](*a, **kw)
            return access

        for name in ACCESS:
            setattr(_sys, name, stopping(name))
        self.sel.register(self.sock, WILDCARD)
    register(self)


prefork._Worker._register = _register
sys.exit(prefork.main(sys.argv[1:]))
"""


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def _holds_a_lock(pid: int) -> bool:
    """Whether any file lock (POSIX, OFD or flock) of ``pid`` is listed in its fdinfo."""
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
            if any(line.startswith("lock:") for line in f):
                return True
    return False


@pytest.mark.timeout(90)
def test_a_worker_stopped_holding_the_lock_does_not_hang_the_master(server, tmp_path):
    """A worker stopped inside register() holds the selector's lock; the master, registering
    another worker's socket, must give up on the lock, survive, and still stop on SIGTERM."""
    trigger = tmp_path / "stop"
    srv = server(
        "--workers", "2", "--domains", "cpu", "--affinity", "auto", "--registration", "master",
        hook=STOPS_HOLDING_THE_LOCK, env={"NUMAREUSE_TEST_STOP": str(trigger)},
    )  # fmt: skip
    trigger.touch()
    os.kill(srv.workers[1], signal.SIGKILL)  # its replacement stops holding the lock
    deadline = time.monotonic() + 20
    while True:
        new = _children(srv.proc.pid) - {srv.workers[0], srv.workers[1]}
        if new and status_fields(min(new))["State"][0] == "T" and _holds_a_lock(min(new)):
            break
        assert time.monotonic() < deadline, f"no stopped worker 1 holding a lock; output:\n{srv.lines}"
        time.sleep(0.05)
    mark = len(srv.lines)
    os.kill(srv.workers[0], signal.SIGKILL)  # its replacement asks the master to register it
    # the master gives up on the lock, answers with an error, and goes on: it reaps and restarts
    srv.wait_for(r"^worker 0 pid=\d+ exited \(status 1\); restarting", start=mark, timeout=20)
    assert srv.proc.poll() is None, "the master died"
    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("the master did not stop on SIGTERM; output:\n" + "\n".join(srv.lines))
    assert code == 0, srv.lines
    srv.wait_for(r"^stopped detached=yes")


def test_negative_content_length_is_refused(server):
    srv = server("--workers", "1", "--domains", "cpu", "--affinity", "auto")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
        c.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -48\r\n\r\n")
        assert read_response_status(c) == "400"
    assert http_get("127.0.0.1", srv.port)["index"] == 0  # the worker is not spinning


def read_response_status(c: socket.socket) -> str:
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    return data.split(b" ", 2)[1].decode()


def test_stop_refuses_new_connections_at_once(server):
    """During a graceful stop a new client is refused, not accepted and reset seconds later."""
    srv = server("--workers", "1", "--domains", "cpu", "--affinity", "auto")
    # a request half sent keeps its worker draining (it waits for the rest, up to 5 s)
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    idle.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
    time.sleep(0.2)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the master acts on it at once; its worker drains for up to 5 s
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        http_get("127.0.0.1", srv.port)
    assert time.monotonic() - t0 < 1
    idle.close()
    assert srv.proc.wait(15) == 0
