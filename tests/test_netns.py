"""Servers in other network namespaces: `--netns NAME|PATH` and `--pid PID`.

Each test makes its own namespace (`ip netns add`, a unique name, deleted at
the end) and runs tests/forkserver.py in it under `ip netns exec`. Clients run
in the namespace too, pinned with taskset: their loopback SYNs are processed
on that CPU there as well.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest
from conftest import need
from test_cli import HERE, N, assert_untouched, cli, env, error_of, pinned_groups  # noqa: F401  (fixture)

IP = shutil.which("ip") or "/usr/sbin/ip"

CLIENT = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
out = []
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port), timeout=30)  # a loaded machine can starve the server
    data = b""
    while not data.endswith(b"\\n"):
        chunk = c.recv(64)
        assert chunk, "closed without an answer"
        data += chunk
    c.close()
    out.append(data.split()[-1].decode())
print(" ".join(out))
"""


def ip(*args, check=True):
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check)


@pytest.fixture
def netns():
    need(os.path.exists(IP), "iproute2 (ip) is not installed")
    made = []

    def make():
        name = f"nrtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        ip("netns", "add", name)
        made.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    yield make
    for name in made:
        ip("netns", "delete", name, check=False)


class NsServer:
    """tests/forkserver.py inside network namespace ``ns`` (two workers, on CPUs 0 and 1)."""

    def __init__(self, ns: str):
        cmd = [IP, "netns", "exec", ns, sys.executable, os.path.join(HERE, "forkserver.py")]
        self.proc = subprocess.Popen([*cmd, "--workers", "2", "--cpus", "0,1"], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()  # `ip netns exec` execs: proc.pid is the server's master
        assert line and line[0] == "ready", line
        self.ns, self.port, self.pids = ns, int(line[1]), [int(p) for p in line[2].split(",")]

    def ask(self, cpu: int, n: int = N) -> list[int]:
        """Worker index that answered each of n connections from a client in the namespace on ``cpu``."""
        cmd = [IP, "netns", "exec", self.ns, "taskset", "-c", str(cpu), sys.executable, "-c", CLIENT, str(self.port)]
        r = subprocess.run([*cmd, str(n)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return [int(w) for w in r.stdout.split()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def ns_server():
    made = []

    def start(ns):
        made.append(NsServer(ns))
        return made[-1]

    yield start
    for s in made:
        s.stop()


def in_root_ns(port: int) -> bool:
    s = socket.socket()
    try:
        return s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        s.close()


def state_dirs(bpffs) -> list[str]:
    root = os.path.join(bpffs, "numareuse")
    return sorted(d for d in os.listdir(root) if os.listdir(os.path.join(root, d))) if os.path.isdir(root) else []


def netns_cookie(ns_path: str) -> int:
    """The cookie of a namespace, read by a child that enters it (not by the code under test)."""
    code = "import socket; s = socket.socket(socket.AF_UNIX); print(int.from_bytes(s.getsockopt(1, 71, 8), 'little'))"
    r = subprocess.run(["nsenter", f"--net={ns_path}", sys.executable, "-c", code], capture_output=True, text=True)
    need(r.returncode == 0, f"SO_NETNS_COOKIE (Linux 5.14): {r.stderr.strip()}")
    return int(r.stdout)


def test_attach_by_netns_name_and_by_pid(env, netns, ns_server):  # noqa: F811
    name = netns()
    srv = ns_server(name)
    assert not in_root_ns(srv.port)  # the server is not in our namespace
    before = srv.ask(0, 40)
    assert set(before) == {0, 1}  # the kernel's hash sends CPU 0's clients to both workers
    rep = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "--netns", name, "--json").stdout)
    assert rep["action"] == "attached" and sorted(s["domain"] for s in rep["sockets"]) == [0, 1]
    assert sorted(o["pid"] for s in rep["sockets"] for o in s["owners"]) == sorted(srv.pids)
    assert srv.ask(0) == [0] * N and srv.ask(1) == [1] * N
    cookie = netns_cookie(f"/run/netns/{name}")
    assert rep["netns"]["cookie"] == cookie and state_dirs(env) == [f"netns-cookie-{cookie}"]
    # the same state, whichever way the namespace is named: its cookie keys it
    names = (name, f"/run/netns/{name}", f"/proc/{srv.pids[1]}/ns/net")
    for how in (*(("--netns", n) for n in names), ("--pid", srv.pids[0])):
        st = json.loads(cli("stats", "--json", *how).stdout)
        assert [g["counters"]["local"] for g in st] == [2 * N], how
        assert len(json.loads(cli("status", "--json", *how).stdout)) == 1
    assert cli("status", "--json").stdout.strip() == "[]"  # nothing attached in ours
    ratio = f'numareuse_locality_ratio{{group="tcp4 127.0.0.1:{srv.port}"}} 1.0'
    assert ratio in cli("stats", "--prometheus", "--netns", name).stdout
    assert ratio not in cli("stats", "--prometheus").stdout
    again = cli("attach", "-p", srv.port, "-d", "cpu", "--pid", srv.pids[1], "--json")
    assert json.loads(again.stdout)["action"] == "unchanged" and "already attached" in again.stderr
    cli("detach", "-p", srv.port, "--pid", srv.pids[0])
    assert pinned_groups(env) == [] and cli("status", "--json", "--netns", name).stdout.strip() == "[]"
    assert set(srv.ask(0, 40)) == {0, 1}  # the kernel's hash again
    r = cli("detach", "-p", srv.port, "--netns", name)
    assert "nothing attached" in r.stderr


def test_attach_under_ip_netns_exec_is_seen_from_the_root_namespace(env, netns, ns_server):  # noqa: F811
    """`ip netns exec` runs in a private mount namespace with a fresh /sys: pins go to the host's bpffs."""
    name = netns()
    srv = ns_server(name)
    inside = [IP, "netns", "exec", name, sys.executable, "-m", "numareuse.cli.main"]
    r = subprocess.run([*inside, "attach", "-p", str(srv.port), "-d", "cpu", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.ismount(env)  # mounted in our (the host's) mount namespace, not in the command's
    st = json.loads(cli("status", "--json", "--netns", name).stdout)
    assert len(st) == 1 and sorted(s["domain"] for s in st[0]["sockets"]) == [0, 1]
    assert srv.ask(0) == [0] * N and srv.ask(1) == [1] * N
    r = subprocess.run([*inside, "stats", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["counters"]["local"] == 2 * N, r.stderr
    cli("detach", "-p", srv.port, "--netns", name)
    assert pinned_groups(env) == []
    r = subprocess.run([*inside, "status", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_bad_netns_or_pid(env, netns, tmp_path):  # noqa: F811
    gone = subprocess.Popen(["true"])
    gone.wait()
    plain = tmp_path / "plain"
    plain.write_text("")
    cases = [
        (("--netns", "nrtest-no-such-namespace"), "--netns nrtest-no-such-namespace: no network namespace"),
        (("--netns", str(tmp_path / "missing")), "no network namespace"),
        (("--netns", str(plain)), "is not a network namespace"),
        (("--pid", gone.pid), f"--pid {gone.pid}: no such process"),
        (("--netns", netns(), "--pid", os.getpid()), "give --netns or --pid, not both"),
    ]
    for how, cause in cases:
        for cmd in (("attach", "-p", 9), ("detach", "-p", 9), ("status",), ("stats",)):
            msg = error_of(cli(*cmd, *how, ok=False))
            assert msg.startswith(f"Error: {cmd[0]}: ") and cause in msg, (cmd, how, msg)
    assert_untouched(env)


def test_older_release_state_under_the_inode(env, netns, ns_server):  # noqa: F811
    """State keyed netns-<inode> (before the cookie) is read in place and moved by the next writer;
    under an inode a dead namespace had, with no socket of its group here, it is removed, never adopted."""
    name = netns()
    srv = ns_server(name)
    cli("attach", "-p", srv.port, "-d", "cpu", "--netns", name, "-q")
    root, run = os.path.join(env, "numareuse"), os.path.join(os.environ["NUMAREUSE_RUNDIR"])
    (new,) = state_dirs(env)
    inode = os.stat(f"/run/netns/{name}").st_ino
    for base in (root, run):
        os.rename(os.path.join(base, new), os.path.join(base, f"netns-{inode}"))  # as an older release wrote it
    st = json.loads(cli("status", "--json", "--netns", name).stdout)
    assert len(st) == 1 and st[0]["spec"] == "cpu"  # read in place
    assert srv.ask(0) == [0] * N
    r = cli("attach", "-p", srv.port, "-d", "cpu", "--netns", name, "--json", "--progress")
    assert json.loads(r.stdout)["action"] == "unchanged" and f"moved netns-{inode}/" in r.stderr
    assert state_dirs(env) == [new] and not os.path.exists(os.path.join(root, f"netns-{inode}"))
    assert os.listdir(os.path.join(run, new))  # the run file moved too
    # the same state left under the inode of another namespace, whose sockets are all gone
    other = netns()
    srv.stop()
    other_inode = os.stat(f"/run/netns/{other}").st_ino
    for base in (root, run):
        os.rename(os.path.join(base, new), os.path.join(base, f"netns-{other_inode}"))
    assert cli("status", "--json", "--netns", other).stdout.strip() == "[]"  # not mistaken for it
    r = cli("detach", "-p", srv.port, "--netns", other)
    assert "nothing attached" in r.stderr
    assert pinned_groups(env) == [] and not os.path.exists(os.path.join(root, f"netns-{other_inode}"))


def test_under_ip_netns_exec_no_private_bpffs(env, netns, ns_server):  # noqa: F811
    """When the host's bpffs cannot be mounted, attach refuses: it never pins where only it can see."""
    name = netns()
    srv = ns_server(name)
    inside = [IP, "netns", "exec", name, sys.executable, "-m", "numareuse.cli.main"]
    bad = {**os.environ, "NUMAREUSE_BPFFS": "/proc/self/fdinfo"}  # procfs refuses any mount
    r = subprocess.run([*inside, "attach", "-p", str(srv.port), "-d", "cpu"], capture_output=True, text=True, env=bad)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "in the host's mount namespace" in r.stderr and "cannot be mounted there" in r.stderr, r.stderr
    assert set(srv.ask(0, 40)) == {0, 1}  # no program was attached: the kernel's hash


def test_before_5_14_the_inode_names_the_namespace(env, netns, ns_server, monkeypatch):  # noqa: F811
    """Without SO_NETNS_COOKIE (ENOPROTOOPT) the state directory is netns-<inode>, as older releases wrote."""
    from numareuse import _sys

    def old_kernel(fd):
        raise OSError(92, "Protocol not available")

    monkeypatch.setattr(_sys, "netns_cookie", old_kernel)
    name = netns()
    srv = ns_server(name)
    rep = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "--netns", name, "--json").stdout)
    assert rep["netns"]["cookie"] is None
    assert state_dirs(env) == [f"netns-{os.stat(f'/run/netns/{name}').st_ino}"]
    assert srv.ask(1) == [1] * N
    assert len(json.loads(cli("status", "--json", "--pid", srv.pids[0]).stdout)) == 1
    cli("detach", "-p", srv.port, "--netns", name)
    assert pinned_groups(env) == []
