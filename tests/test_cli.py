"""The numareuse command end to end: real servers on loopback, real attach, real steering.

Every test uses a private bpffs mount and run directory (NUMAREUSE_BPFFS,
NUMAREUSE_RUNDIR), so nothing it pins is seen outside it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import LOOPBACK, Tally, assert_runs, handshake, need, pinned, reuseport_socket
from numareuse.cli.main import main

from numareuse import _layout, _sys

HERE = os.path.dirname(os.path.abspath(__file__))
N = 20


@pytest.fixture
def env(kernel, two_cpus, tmp_path, monkeypatch):
    """A private, not yet mounted bpffs directory (attach mounts it) and run directory."""
    from conftest import Created

    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    monkeypatch.setenv("NUMAREUSE_BPFFS", str(bpffs))
    monkeypatch.setenv("NUMAREUSE_RUNDIR", str(tmp_path / "run"))
    made = Created(monkeypatch)
    yield bpffs
    # every mount: a watcher and a CLI run that raced to mount it stack two
    for _ in range(5):
        r = subprocess.run(["umount", str(bpffs)], capture_output=True, text=True)
        if r.returncode:
            break
    # a mount left behind outlives the test (pytest cannot even remove its directory): busy means a
    # process the test started still works in it
    assert not os.path.ismount(bpffs), f"bpffs still mounted: {r.stderr.strip()}"
    # nothing we loaded may outlive a test: its servers are stopped, its pins unmounted
    maps, progs = made.alive()
    assert not progs and not maps, f"leaked BPF programs {progs}, maps {maps}"


def pinned_groups(bpffs) -> list[str]:
    root = os.path.join(bpffs, "numareuse")
    return [g for ns in os.listdir(root) for g in os.listdir(os.path.join(root, ns))] if os.path.isdir(root) else []


def cli(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


class Server:
    """tests/forkserver.py in a subprocess: one SO_REUSEPORT socket per worker, each worker on a CPU."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "forkserver.py"), *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", line
        self.port = int(line[1])
        self.pids = [int(p) for p in line[2].split(",")]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def server():
    made = []

    def start(*args):
        s = Server(*args)
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


def ask(cpu, port, n=N, family=socket.AF_INET, udp=False) -> Tally:
    """Worker index that answered each of n connections (or datagrams) from a client pinned to ``cpu``.

    ``.resent``: the SYNs re-sent for them (measured; the program runs again for some).
    """
    out = Tally()
    with pinned(cpu):
        for i in range(n):
            if udp:
                c = socket.socket(family, socket.SOCK_DGRAM)
                c.settimeout(5)
                c.bind((LOOPBACK[family], 0))
                c.sendto(b"%d" % i, (LOOPBACK[family], port))
                data = c.recv(64)
            else:
                c = socket.socket(family)
                out.resent += handshake(c, (LOOPBACK[family], port))
                data = b""
                while not data.endswith(b"\n"):
                    chunk = c.recv(64)
                    assert chunk, "connection closed without an answer"
                    data += chunk
            c.close()
            out.append(int(data.split()[-1]))
    return out


@pytest.mark.parametrize(
    "flags",
    [[], ["--ipv6"], ["--udp"], ["--udp", "--ipv6"]],
    ids=["tcp4", "tcp6", "udp4", "udp6"],
)
def test_attach_steers_running_server(env, server, flags):
    srv = server("--workers", 4, "--cpus", "0,0,1,1", *flags)
    family = socket.AF_INET6 if "--ipv6" in flags else socket.AF_INET
    before = ask(0, srv.port, family=family, udp="--udp" in flags)
    r = cli("attach", "--port", srv.port, "--domains", "cpu", "--json", "--progress", *flags)
    rep = json.loads(r.stdout)
    assert rep["action"] == "attached" and len(rep["sockets"]) == 4
    assert sorted(s["domain"] for s in rep["sockets"]) == [0, 0, 1, 1]
    assert sorted(o["pid"] for s in rep["sockets"] for o in s["owners"]) == sorted(srv.pids)
    assert "attach: scanning" in r.stderr  # progress on stderr
    assert rep["group"]["address"] == ("::1" if family == socket.AF_INET6 else "127.0.0.1")
    again = 0
    for cpu, mine in ((0, {0, 1}), (1, {2, 3})):
        got = ask(cpu, srv.port, family=family, udp="--udp" in flags)
        assert set(got) == mine, f"client on cpu {cpu} reached workers {got}"
        again += got.resent
    st = json.loads(cli("stats", "--json").stdout)
    assert_runs(st[0]["counters"]["local"], 2 * N, again, "local")
    assert st[0]["locality"] == 1.0
    assert set(before) - {0, 1}  # without numareuse the kernel sent cpu 0's clients to domain 1 too
    cli("detach", "--port", srv.port, *flags)


def test_status_stats_topology_formats(env, server):
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    again = ask(0, srv.port, 5).resent
    st = json.loads(cli("status", "--json").stdout)
    assert len(st) == 1
    g = st[0]
    assert g["group"] == {"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": srv.port}
    assert g["spec"] == "cpu" and isinstance(g["program_id"], int)
    assert {s["domain"] for s in g["sockets"]} == {0, 1}
    for s in g["sockets"]:
        assert s["sk"] == f"sk:{s['cookie']}" and s["live"]
        assert s["owners"][0]["pid"] in srv.pids and s["owners"][0]["comm"]
    human = cli("status").stdout
    assert f"127.0.0.1:{srv.port}" in human and "sk:" in human and "owner=" in human
    prom = cli("stats", "--prometheus").stdout
    local = f'numareuse_selections_total{{cpu="0",domain="0",group="tcp4 127.0.0.1:{srv.port}",outcome="local"}} '
    assert_runs(
        int(float(next(ln for ln in prom.splitlines() if ln.startswith(local))[len(local) :])), 5, again, "local"
    )
    assert "# TYPE numareuse_locality_ratio gauge" in prom
    watch = cli("stats", "--watch", "0.1", "--count", "2", "--json").stdout.strip().splitlines()
    assert len(watch) == 2 and "rates" in json.loads(watch[1])[0]
    assert "locality=100.0%" in cli("stats").stdout
    topo = json.loads(cli("topology", "--json").stdout)
    assert sorted(c["cpu"] for c in topo["cpus"]) == sorted(
        _sys.parse_cpulist(open("/sys/devices/system/cpu/online").read())
    )
    assert topo["nodes"] and all("memory_only" in n for n in topo["nodes"])
    assert any(i["name"] == "lo" for i in topo["interfaces"])
    assert "NUMA nodes:" in cli("topology").stdout
    for cmd in ("attach", "detach", "status", "stats", "topology"):
        assert "Examples:" in cli(cmd, "--help").stdout
    cli("detach", "-p", srv.port)
    assert "no group attached" in cli("status").stdout


def test_attach_again_is_idempotent_and_follows_changes(env, server):
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    again = cli("attach", "-p", srv.port, "-d", "cpu", "-q", "--json")
    assert json.loads(again.stdout)["action"] == "unchanged"
    assert "already attached" in again.stderr
    # worker 0 is moved to CPU 1 behind our back: a re-attach moves its socket, nothing else
    os.sched_setaffinity(srv.pids[0], {1})
    rep = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "-q", "--json").stdout)
    assert rep["action"] == "updated" and len(rep["changes"]) == 1 and "0 -> 1" in rep["changes"][0]
    assert set(ask(1, srv.port)) == {0, 1}
    assert set(ask(0, srv.port)) <= {0, 1}  # domain 0 is empty now: kernel hash, still answered
    # a changed domain spec swaps in a new program atomically
    rep = json.loads(cli("attach", "-p", srv.port, "-d", "0-1", "-q", "--json").stdout)
    assert rep["action"] == "replaced"
    st = json.loads(cli("status", "--json").stdout)
    assert st[0]["spec"] == "0-1" and {s["domain"] for s in st[0]["sockets"]} == {0}
    # one domain holding both workers: every CPU's clients reach both, all local
    near, far = ask(0, srv.port, 40), ask(1, srv.port, 40)
    assert set(near) == {0, 1} and set(far) == {0, 1}
    assert_runs(json.loads(cli("stats", "--json").stdout)[0]["counters"]["local"], 80, near.resent + far.resent)
    cli("detach", "-p", srv.port)


def test_detach_restores_kernel_balance_and_is_idempotent(env, server):
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    assert set(ask(0, srv.port)) == {0}
    r = cli("detach", "-p", srv.port, "--json")
    assert json.loads(r.stdout)["program_was_attached"] is True
    assert set(ask(0, srv.port, 40)) == {0, 1}  # the kernel's hash uses both again
    r = cli("detach", "-p", srv.port)
    assert "nothing attached" in r.stderr and r.exit_code == 0
    assert pinned_groups(env) == []  # no pinned group left behind (the netns lock directory stays)


def test_detach_after_server_exit_removes_state(env, server):
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    srv.stop()
    cli("detach", "-p", srv.port)
    assert cli("status", "--json").stdout.strip() == "[]"


def test_unpinned_worker_goes_to_wildcard(env, server):
    srv = server("--workers", 3, "--cpus", "0,1,-")
    rep = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "-q", "--json").stdout)
    assert sorted(map(str, (s["domain"] for s in rep["sockets"]))) == ["0", "1", "wildcard"]
    cli("detach", "-p", srv.port)


# -- bad input: one line, exit 1, nothing changed -----------------------------


def error_of(r) -> str:
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def assert_untouched(env, port=None):
    assert cli("status", "--json").stdout.strip() == "[]"
    assert not os.path.isdir(os.path.join(env, "numareuse")) or not any(
        n for _, _, files in os.walk(os.path.join(env, "numareuse")) for n in files
    )


def test_no_socket_on_port(env):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    msg = error_of(cli("attach", "-p", port, ok=False))
    assert msg.startswith("Error: attach: no listening TCP/IPv4 socket on port")
    assert_untouched(env)


def test_socket_without_reuseport(env, server):
    srv = server("--workers", 1, "--no-reuseport")
    msg = error_of(cli("attach", "-p", srv.port, ok=False))
    assert "has no SO_REUSEPORT" in msg
    assert_untouched(env)


def test_bad_domain_specs(env, server):
    srv = server("--workers", 2, "--cpus", "0,1")
    offline = max(_sys.parse_cpulist(open("/sys/devices/system/cpu/possible").read())) + 1
    for spec, cause in (("0-1;x", "does not parse"), (f"0;{offline}", "CPU ids are 0.."), ("0-1;1", "in domains")):
        msg = error_of(cli("attach", "-p", srv.port, "-d", spec, ok=False))
        assert cause in msg, msg
    assert_untouched(env)
    assert set(ask(0, srv.port, 40)) == {0, 1}  # still the kernel's balance


def test_process_exits_during_attach(env, server, monkeypatch):
    from numareuse import discovery

    srv = server("--workers", 2, "--cpus", "0,1")
    real = discovery.holders_of

    def then_exit(*args):
        found = real(*args)
        srv.stop()  # the server exits between the scan and taking its sockets
        return found

    monkeypatch.setattr(discovery, "holders_of", then_exit)
    msg = error_of(cli("attach", "-p", srv.port, ok=False))
    assert "exited" in msg
    assert_untouched(env)


def test_not_root(env, server, tmp_path):
    srv = server("--workers", 1)
    code = (
        # import first: the checkout may not be readable by nobody (a 0700 temp dir)
        "import os,sys; from numareuse.cli.main import main;"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534);"
        "sys.argv=['numareuse','attach','-p',sys.argv[1]]; main()"
    )
    r = subprocess.run([sys.executable, "-c", code, str(srv.port)], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == ["Error: attach: needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_PTRACE)"], r.stderr
    assert_untouched(env)


def test_bpffs_missing_and_not_mountable(env, server, tmp_path, monkeypatch):
    srv = server("--workers", 1)
    notadir = tmp_path / "file"
    notadir.write_text("")
    monkeypatch.setenv("NUMAREUSE_BPFFS", str(notadir))
    msg = error_of(cli("attach", "-p", srv.port, ok=False))
    assert msg == f"Error: attach: bpffs: {notadir} does not exist (kernel without CONFIG_BPF_SYSCALL?)"
    # procfs refuses any mount on its directories
    monkeypatch.setenv("NUMAREUSE_BPFFS", "/proc/self/fdinfo")
    msg = error_of(cli("attach", "-p", srv.port, ok=False))
    assert "bpffs is not mounted at /proc/self/fdinfo and cannot be mounted" in msg
    assert set(ask(0, srv.port, 5)) == {0}  # the server is untouched and answers


def test_old_kernel_without_sockarray(env, server, monkeypatch):
    """A kernel that refuses REUSEPORT_SOCKARRAY (before 4.19) gets a NotSupported naming it."""
    srv = server("--workers", 1)
    real = _sys.map_create

    def old_kernel(map_type, *a):
        if map_type == _sys.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY:
            raise OSError(22, "Invalid argument")
        return real(map_type, *a)

    monkeypatch.setattr(_sys, "map_create", old_kernel)
    msg = error_of(cli("attach", "-p", srv.port, ok=False))
    assert "REUSEPORT_SOCKARRAY (Linux 4.19)" in msg
    assert_untouched(env)


def test_state_of_other_layout_version_refused(env, server):
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    (name,) = os.listdir(os.path.join(env, "numareuse", os.listdir(os.path.join(env, "numareuse"))[0]))
    netns = os.listdir(os.path.join(env, "numareuse"))[0]
    meta = _sys.obj_get(os.path.join(env, "numareuse", netns, name, "meta"))
    try:
        _sys.map_update(meta, 0, struct.pack("=Q", _layout.LAYOUT_VERSION + 1))
    finally:
        os.close(meta)
    msg = error_of(cli("attach", "-p", srv.port, "-d", "cpu", ok=False))
    assert f"layout version {_layout.LAYOUT_VERSION + 1}" in msg
    st = json.loads(cli("status", "--json").stdout)
    assert "layout version" in st[0]["error"]
    assert set(ask(0, srv.port)) == {0}  # the attached program still steers, untouched
    cli("detach", "-p", srv.port)  # detach works without reading the maps


def test_port_on_several_addresses(env, server):
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    a.bind(("127.0.0.1", 0))
    a.listen()
    b = socket.socket()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    b.bind(("127.0.0.2", a.getsockname()[1]))
    b.listen()
    try:
        msg = error_of(cli("attach", "-p", a.getsockname()[1], ok=False))
        assert "several addresses" in msg and "--address" in msg
    finally:
        a.close()
        b.close()


def test_require_kernel_flag_is_seen():
    # CI sets it; this proves the suite reads it (skips become failures there)
    import conftest

    assert conftest.REQUIRE_KERNEL == (os.environ.get("NUMAREUSE_REQUIRE_KERNEL") == "1")
    need(True, "never skipped")


# -- failures half-way: rolled back, or finished by the next command ----------


def test_failed_replace_restores_old_selector(env, server, monkeypatch):
    from numareuse import state

    srv = server("--workers", 3, "--cpus", "0,0,1")
    cli("attach", "-p", srv.port, "-d", "0", "-q")  # CPU 1 is in no domain: its worker is wildcard
    before = json.loads(cli("status", "--json").stdout)[0]

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(state.Store, "commit", broken)
        msg = error_of(cli("attach", "-p", srv.port, "-d", "cpu", ok=False))
    assert "No space left on device" in msg
    after = json.loads(cli("status", "--json").stdout)[0]
    key = lambda g: sorted((s["cookie"], str(s["domain"])) for s in g["sockets"])  # noqa: E731
    assert key(after) == key(before) and after["program_id"] == before["program_id"]
    assert set(ask(0, srv.port)) == {0, 1} and set(ask(1, srv.port)) == {2}  # old steering back
    assert [g for g in pinned_groups(env) if g.startswith("tmp_")] == []
    cli("detach", "-p", srv.port)


def test_detach_without_ptrace_rights_keeps_state(env, server, monkeypatch):
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")

    def denied(pid, fd):
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(_sys, "pidfd_getfd", denied)
        msg = error_of(cli("detach", "-p", srv.port, ok=False))
    assert "Operation not permitted" in msg
    assert set(ask(0, srv.port)) == {0}  # still attached, and still known:
    assert len(json.loads(cli("status", "--json").stdout)) == 1
    cli("detach", "-p", srv.port)


def attach_then_die(port: int) -> int:
    """`attach` in a process killed after the program is attached, before its pins are renamed."""
    code = (
        "import os, sys; from numareuse import control, state;"
        "state.Store.commit = lambda *a: os._exit(9);"
        "control.attach(int(sys.argv[1]), domains='cpu')"
    )
    return subprocess.run([sys.executable, "-c", code, str(port)]).returncode


def test_crash_between_attach_and_commit_is_finished_later(env, server):
    """SIGKILL after the program is attached, before its pins are renamed into place."""
    srv = server("--workers", 2, "--cpus", "0,1")
    assert attach_then_die(srv.port) == 9
    assert set(ask(0, srv.port)) == {0}  # the orphaned program steers (and never refuses)
    assert [g for g in pinned_groups(env) if g.startswith("tmp_")]  # but it is findable
    r = cli("attach", "-p", srv.port, "-d", "cpu", "--progress", "--json")
    assert "recovered" in r.stderr
    assert json.loads(r.stdout)["action"] == "unchanged"
    assert set(ask(1, srv.port)) == {1}
    assert [g for g in pinned_groups(env) if g.startswith("tmp_")] == []
    cli("detach", "-p", srv.port)
    assert set(ask(0, srv.port, 40)) == {0, 1}


def test_detach_finds_an_orphan_from_a_crash(env, server):
    srv = server("--workers", 2, "--cpus", "0,1")
    assert attach_then_die(srv.port) == 9
    r = cli("detach", "-p", srv.port, "--json")
    assert json.loads(r.stdout)["program_was_attached"] is True
    assert pinned_groups(env) == []
    assert set(ask(0, srv.port, 40)) == {0, 1}


def test_commands_racing_to_mount_bpffs_mount_it_once(env):
    """Commands that all find the bpffs unmounted (a watcher starting as a CLI attach runs) mount it once:
    a second mount stacked on the first would hide every pin made in the first."""
    code = (
        "import os, sys, time\n"
        "from numareuse import state\n"
        "while time.time() < float(sys.argv[1]): pass\n"
        "state.ensure_bpffs()\n"
    )
    go = time.time() + 1.5  # all start at once, after their imports
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(go)], stderr=subprocess.PIPE, text=True) for _ in range(6)
    ]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errs
    with open("/proc/self/mountinfo") as f:
        mounts = [ln for ln in f if ln.split()[4] == str(env)]
    assert len(mounts) == 1, mounts


def test_sockets_of_two_reuseport_groups_on_one_port_are_refused(env):
    """Sockets bound to a device and sockets bound to none share 127.0.0.1:port but not the
    kernel's reuseport group: a program attached through one would never see the other's connections."""
    plain = reuseport_socket()
    port = plain.getsockname()[1]
    socks = [plain, reuseport_socket(port=port), reuseport_socket(port=port, device="lo")]
    try:
        msg = error_of(cli("attach", "-p", port, ok=False))
        assert f"tcp4 127.0.0.1:{port} has sockets of 2 reuseport groups" in msg, msg
        assert "device lo" in msg and "no device" in msg, msg
        assert_untouched(env)
        socks.pop().close()  # what is left is one group: attached as usual
        rep = json.loads(cli("attach", "-p", port, "--json").stdout)
        assert len(rep["sockets"]) == 2 and rep["warnings"] == []
        cli("detach", "-p", port)
    finally:
        for s in socks:
            s.close()


def test_one_group_bound_to_a_device_is_attached(env):
    first = reuseport_socket(device="lo")
    port = first.getsockname()[1]
    socks = [first, reuseport_socket(port=port, device="lo")]
    try:
        rep = json.loads(cli("attach", "-p", port, "--json").stdout)
        assert len(rep["sockets"]) == 2
        c = socket.create_connection(("127.0.0.1", port), timeout=5)  # still accepted
        c.close()
        cli("detach", "-p", port)
    finally:
        for s in socks:
            s.close()


def test_sockets_held_by_unreadable_processes_are_reported(env, monkeypatch):
    """A socket held only by a process whose /proc/PID/fd we may not read (another user
    namespace, no CAP_SYS_PTRACE over it) is left to the fallback, and attach says so."""
    from numareuse import discovery

    mine = reuseport_socket()
    port = mine.getsockname()[1]
    code = (
        "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1);"
        "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('ok', flush=True); sys.stdin.read()"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline() == "ok\n"
        real = os.listdir

        def listdir(path):
            if path == f"/proc/{other.pid}/fd":  # the refusing syscall
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(discovery.os, "listdir", listdir)
        r = cli("attach", "-p", port, "--json")
        rep = json.loads(r.stdout)
        assert len(rep["sockets"]) == 1
        want = f"1 of the 2 sockets of tcp4 127.0.0.1:{port} are left to the fallback: "
        want += f"pids {other.pid} are not ours to read"
        assert rep["warnings"] == [want]
        assert f"warning: {want}" in r.stderr.splitlines()
        cli("detach", "-p", port)
    finally:
        other.stdin.close()
        other.wait(10)
        mine.close()
