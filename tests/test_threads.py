"""Threaded servers: one process, a thread per CPU, each with its own SO_REUSEPORT socket.

The owner of a socket is then a thread (the one blocked in epoll_wait on an
epoll watching it, or in accept() on it), and the socket's domain follows
that thread's affinity. Sockets polled through one epoll shared by several
threads, or held by a process with a thread never seen blocked, keep the
process rule (the main thread's affinity): here that is the wildcard.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import need
from test_cli import N, ask, cli, env  # noqa: F401  (fixture)

from numareuse import _sys

SERVER = r"""
import os, selectors, socket, sys, threading
mode = sys.argv[1]  # epoll | poll | select | accept | shared | spin
cpus = sorted(os.sched_getaffinity(0))
socks, port = [], 0
for _ in cpus:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(512)
    port = s.getsockname()[1]
    socks.append(s)
kinds = {"epoll": selectors.EpollSelector, "poll": selectors.PollSelector, "select": selectors.SelectSelector}
shared = selectors.EpollSelector() if mode == "shared" else None
if shared:
    for s in socks:
        s.setblocking(False)
        shared.register(s, selectors.EVENT_READ)
ready = threading.Barrier(len(cpus) + 1)
tids = [0] * len(cpus)

def serve(i, cpu, s):
    os.sched_setaffinity(0, {cpu})  # inside a thread: this thread only
    tids[i] = threading.get_native_id()
    sel = kinds[mode]() if mode in kinds else None
    if sel:
        sel.register(s, selectors.EVENT_READ)
    ready.wait()
    while True:
        ready_socks = [k.fileobj for k, _ in (sel or shared).select()] if (sel or shared) else [s]
        for r in ready_socks:
            try:
                c, _ = r.accept()
            except BlockingIOError:
                continue  # another thread of the shared epoll took it
            c.setblocking(True)
            c.sendall(b"%d %d\n" % (threading.get_native_id(), socks.index(r)))
            c.close()

for i, (cpu, s) in enumerate(zip(cpus, socks)):
    threading.Thread(target=serve, args=(i, cpu, s), daemon=True).start()
def spin():
    import hashlib
    data = bytes(1 << 22)
    while True:  # always runnable, never blocked; hashing releases the GIL, so the servers keep it
        hashlib.sha256(data).digest()

if mode == "spin":
    threading.Thread(target=spin, daemon=True).start()
ready.wait()
print("ready", port, ",".join(map(str, tids)), flush=True)
threading.Event().wait()
"""


class ThreadServer:
    def __init__(self, mode: str):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", line
        self.port = int(line[1])
        self.tids = [int(t) for t in line[2].split(",")]  # thread i is pinned to CPU i and owns socket i

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def threaded():
    made = []

    def start(mode):
        made.append(ThreadServer(mode))
        return made[-1]

    yield start
    for s in made:
        s.stop()


@pytest.mark.parametrize("mode", ["epoll", "accept", "poll", "select"])
def test_each_thread_gets_its_cpus_connections(env, threaded, mode):  # noqa: F811
    """(a) per-thread epoll (selectors.EpollSelector), (b) threads blocked in accept(), and poll/select."""
    srv = threaded(mode)
    assert len(srv.tids) == 2
    rep = json.loads(cli("attach", "--port", srv.port, "--domains", "cpu", "--json").stdout)
    owners = {o["tid"]: s["domain"] for s in rep["sockets"] for o in s["owners"]}
    assert owners == {tid: cpu for cpu, tid in enumerate(srv.tids)}, rep["sockets"]
    assert all(o["pid"] == srv.proc.pid for s in rep["sockets"] for o in s["owners"])
    for cpu in (0, 1):
        assert ask(cpu, srv.port) == [cpu] * N  # every connection accepted by thread ``cpu``
    st = json.loads(cli("stats", "--json").stdout)[0]
    assert st["counters"]["local"] == 2 * N and st["counters"]["wildcard"] == st["counters"]["fallback"] == 0
    human = cli("status").stdout
    for tid in srv.tids:
        assert f"owner={srv.proc.pid}/{tid} " in human, human
    status = json.loads(cli("status", "--json").stdout)[0]
    assert sorted(o["tid"] for s in status["sockets"] for o in s["owners"]) == sorted(srv.tids)
    cli("detach", "--port", srv.port)


@pytest.mark.parametrize("mode", ["shared", "spin"])
def test_unproven_thread_owners_keep_the_process_rule(env, threaded, mode):  # noqa: F811
    """shared: every thread polls one epoll; spin: a thread is running at every sample."""
    srv = threaded(mode)
    assert os.sched_getaffinity(srv.proc.pid) == {0, 1}  # the main thread: the process rule gives the wildcard
    rep = json.loads(cli("attach", "--port", srv.port, "--domains", "cpu", "--json").stdout)
    assert [s["domain"] for s in rep["sockets"]] == ["wildcard", "wildcard"], rep["sockets"]
    assert [o["tid"] for s in rep["sockets"] for o in s["owners"]] == [None, None]
    got = ask(0, srv.port) + ask(1, srv.port)
    assert len(got) == 2 * N  # still served (by the kernel's hash within the wildcard)
    assert json.loads(cli("stats", "--json").stdout)[0]["counters"]["wildcard"] == 2 * N
    cli("detach", "--port", srv.port)


@pytest.mark.parametrize("abi", sorted(_sys.WAIT_SYSCALLS_BY_ABI))
def test_wait_syscall_numbers_match_debians_headers(abi):
    """The numbers read from /proc/PID/task/TID/syscall, against each architecture's cross headers."""
    from test_portability import CROSS

    want = _sys.WAIT_SYSCALLS_BY_ABI[abi]
    if abi not in CROSS:  # riscv64, loongarch64: asm-generic, as aarch64
        assert want == _sys.WAIT_SYSCALLS_BY_ABI["aarch64"]
        return
    triplet, flags = CROSS[abi]
    root = "/usr/include/x86_64-linux-gnu" if triplet == "x86_64-linux-gnu" else f"/usr/{triplet}/include"
    need(os.path.isdir(root), f"Debian's cross headers for {triplet} (make setup installs them)")
    src = "#include <asm/unistd.h>\n" + "".join(f"NR_{k} = __NR_{k}\n" for k in want)
    out = subprocess.run(
        ["cpp", "-P", "-nostdinc", "-undef", *flags, "-I", root, "-I", "/usr/include"],
        input=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got = {}
    for line in out.splitlines():
        if line.startswith("NR_"):
            name, expr = line[3:].split(" = ", 1)
            assert re.fullmatch(r"[0-9+() ]+", expr), f"{abi} {name}: {expr}"
            got[name] = eval(expr)  # only digits, '+' and parentheses, checked above
    assert got == want
