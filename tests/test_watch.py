"""``numareuse watch`` against Debian's nginx: reloads, worker kills, restarts, config and signals.

The watcher runs as its own process (as under systemd), with the private
bpffs and run directory of test_cli's ``env`` fixture; what it did is read
back with ``numareuse status`` / ``stats`` and with clients pinned to each
CPU (domains ``cpu``: one virtual domain per CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import need, pinned
from test_cli import ask, cli, env  # noqa: F401  (fixture)
from test_nginx import NGINX, WRK, free_port, worker_pid

from bench.nginx import conf as nginx_conf
from numareuse import _sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEADLINE = (
    30.0  # s to wait for a change to show (on a loaded machine); the watcher's speed is measured by bench/watch.py
)

AFFINITY = {2: "01 10", 4: "01 10 01 10"}


def wait_for(what, cond, deadline=DEADLINE, step=0.05):
    """Poll ``cond`` until it returns something true; fail naming ``what``."""
    end = time.monotonic() + deadline
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline} s waiting for {what}")
        time.sleep(step)


def listening_inodes(port: int) -> set[int]:
    out = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                out.add(int(fields[9]))
    return out


class Nginx:
    """Debian's nginx with ``workers`` workers pinned 01 10 (01 10); reload() changes the count."""

    def __init__(self, tmp_path, port=None, workers=2, affinity=None):
        self.dir, self.port = tmp_path, port or free_port()
        self.conf = tmp_path / "nginx.conf"
        self.proc = None
        self.start(workers, affinity)

    def _write(self, workers, affinity=None):
        affinity = affinity or AFFINITY[workers]
        self.conf.write_text(nginx_conf(self.dir, self.port, workers, affinity))

    def start(self, workers=2, affinity=None):
        self._write(workers, affinity)
        self.proc = subprocess.Popen([NGINX, "-c", str(self.conf), "-e", str(self.dir / "error.log")])
        self.workers = self._wait_workers(workers, old=set())

    def _wait_workers(self, n, old):
        """{pid: cpu} once exactly n workers, none of ``old``, each pinned to one CPU, serve."""

        def ready():
            try:
                kids = psutil.Process(self.proc.pid).children()
                cpus = {k.pid: k.cpu_affinity() for k in kids}
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except (OSError, psutil.Error):
                return None
            if len(cpus) == n and not (set(cpus) & old) and all(len(c) == 1 for c in cpus.values()):
                return {pid: c[0] for pid, c in cpus.items()}
            return None

        return wait_for(f"{n} nginx workers", ready)

    def reload(self, workers, affinity=None):
        self._write(workers, affinity)
        old = set(self.workers)
        self.proc.send_signal(signal.SIGHUP)
        self.workers = self._wait_workers(workers, old)
        # the old workers are gone once their exit was reaped by the master
        wait_for("the old workers to exit", lambda: not any(psutil.pid_exists(p) for p in old))
        return self.workers

    def on(self, cpu):
        return {pid for pid, c in self.workers.items() if c == cpu}

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nginx(tmp_path, two_cpus):
    need(os.path.exists(NGINX), "nginx (Debian nginx-light) is not installed")
    made = []

    def start(workers=2, port=None, sub="nginx"):
        d = tmp_path / sub
        d.mkdir(exist_ok=True)
        n = Nginx(d, port, workers)
        made.append(n)
        return n

    yield start
    for n in made:
        n.stop()


class Watcher:
    """``numareuse watch ARGS`` as a process; its log lines in ``self.log``."""

    def __init__(self, tmp_path, *args, script=None, prefix=(), extra_env=None):
        self.logfile = tmp_path / f"watch-{time.monotonic_ns()}.log"
        if script and not script.endswith(".py"):  # a wrapper such as setpriv
            cmd = [script, *prefix, sys.executable, "-m", "numareuse.cli.main"]
        else:
            cmd = [sys.executable, script] if script else [sys.executable, "-m", "numareuse.cli.main"]
        penv = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}  # pytest under systemd
        penv.update(extra_env or {})
        self.proc = subprocess.Popen(
            [*cmd, "watch", *map(str, args)], stderr=open(self.logfile, "w"), stdin=subprocess.DEVNULL, env=penv
        )

    @property
    def log(self) -> list[str]:
        return self.logfile.read_text().splitlines()

    def wait_log(self, pattern, count=1, deadline=None):
        def seen():
            n = len([ln for ln in self.log if re.search(pattern, ln)])
            assert n >= count or self.proc.poll() is None, "exited:\n" + "\n".join(self.log)
            return n >= count

        try:
            wait_for(f"log line {pattern!r}", seen, deadline=deadline or DEADLINE)
        except pytest.fail.Exception as e:
            pytest.fail(f"{e}; the log:\n" + "\n".join(self.log))

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)

    def kill(self) -> None:
        """SIGKILL the watcher and the attach it may have forked (which ignores SIGTERM and would
        finish on its own, holding the test's bpffs busy past its umount)."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGSTOP)  # no new fork while its children are listed
        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(procs, timeout=10)
        self.proc.wait(10)


@pytest.fixture
def watcher(env, tmp_path):  # noqa: F811
    made = []

    def start(*args, **kw):
        w = Watcher(tmp_path, *args, **kw)
        made.append(w)
        return w

    yield start
    for w in made:
        w.kill()


def status() -> list[dict]:
    return json.loads(cli("status", "--json").stdout)


def registered(port) -> dict[int, dict]:
    """cookie -> {domain, live, owners} of the group on ``port`` as the pinned maps hold it."""
    for g in status():
        if g["group"]["port"] == port and "sockets" in g:
            return {s["cookie"]: s for s in g["sockets"]}
    return {}


def steered(srv: Nginx, domain_of=lambda cpu: cpu):
    """Every live socket registered, each in the domain of its one owner's CPU, and nothing else."""

    def ok():
        regs = registered(srv.port)
        if len(regs) != len(srv.workers) or not all(r["live"] for r in regs.values()):
            return None
        owners = {}
        for r in regs.values():
            if len(r["owners"]) != 1 or r["owners"][0]["pid"] not in srv.workers:
                return None
            pid = r["owners"][0]["pid"]
            if r["domain"] != domain_of(srv.workers[pid]):
                return None
            owners[pid] = srv.workers[pid]
        return regs if owners == srv.workers else None

    return ok


def check_clients(srv: Nginx, n=40, cpus=(0, 1), serving=None) -> None:
    """n connections from each CPU: all served by that CPU's workers (``serving(cpu)``), and by every one."""
    for cpu in cpus:
        with pinned(cpu):
            got = {worker_pid(srv.port) for _ in range(n)}
        assert got == (serving or srv.on)(cpu), (cpu, got, srv.workers)


def counters(port) -> dict[str, int]:
    for g in json.loads(cli("stats", "--json").stdout):
        if g["group"]["port"] == port:
            return g["counters"]
    raise AssertionError(f"no stats for port {port}")


def test_reload_to_more_workers_is_followed_without_attach(nginx, watcher):
    srv = nginx(workers=2)
    w = watcher("--port", srv.port, "--domains", "cpu")
    wait_for("2 workers steered", steered(srv))
    srv.reload(4)  # worker_cpu_affinity 01 10 01 10
    t0 = time.monotonic()
    regs = wait_for("4 workers steered after the reload", steered(srv))
    took = time.monotonic() - t0
    before = counters(srv.port)  # after the readiness probes of reload()
    assert sorted(r["domain"] for r in regs.values()) == [0, 0, 1, 1]
    check_clients(srv)
    c = counters(srv.port)
    assert c["local"] - before["local"] == 80 and c["wildcard"] == before["wildcard"]
    assert c["fallback"] == before["fallback"]
    assert not [ln for ln in w.log if "error" in ln], w.log
    print(f"reload 2 -> 4 steered {took:.2f} s after the new workers served")


def test_reload_to_fewer_workers_drops_closed_sockets(nginx, watcher):
    srv = nginx(workers=4)
    w = watcher("--port", srv.port, "--domains", "cpu")
    first = wait_for("4 workers steered", steered(srv))
    srv.reload(2)
    regs = wait_for("2 sockets left registered", steered(srv))
    assert set(regs) < set(first)  # nginx keeps two of its sockets and closes two
    assert len(listening_inodes(srv.port)) == 2
    check_clients(srv)
    w.wait_log(r"- 2 closed socket\(s\) dropped")


def test_killed_worker_replacement_becomes_owner(nginx, watcher):
    srv = nginx(workers=2)
    w = watcher("--port", srv.port, "--domains", "cpu")
    regs = wait_for("2 workers steered", steered(srv))
    (victim,) = srv.on(0)
    (cookie,) = [c for c, r in regs.items() if r["owners"][0]["pid"] == victim]
    os.kill(victim, signal.SIGKILL)
    srv.workers = srv._wait_workers(2, old={victim})
    (replacement,) = srv.on(0)
    regs = wait_for("the replacement as owner", steered(srv))
    assert regs[cookie]["owners"][0]["pid"] == replacement  # the same socket: the master kept it
    check_clients(srv)
    w.wait_log(rf"~ sk:{cookie} owner {victim}/nginx -> {replacement}/nginx")


def test_reload_in_the_middle_of_a_scan_leaves_no_socket_alive(nginx, watcher, tmp_path):
    srv = nginx(workers=4)
    files = {k: tmp_path / k for k in ("arm", "paused", "go")}
    w = watcher(
        "--port",
        srv.port,
        "--domains",
        "cpu",
        script=os.path.join(HERE, "watch_paused.py"),
        extra_env={f"NUMAREUSE_TEST_{k.upper()}": str(p) for k, p in files.items()},
    )
    wait_for("4 workers steered", steered(srv))
    old = listening_inodes(srv.port)
    files["arm"].touch()
    w.proc.send_signal(signal.SIGHUP)  # re-checks every group: a scan that now stops holding its duplicates
    # the script opens the file, then writes its pid: wait for the pid, not only the file
    wait_for("the scan to pause", lambda: files["paused"].exists() and files["paused"].read_text().strip())
    scanner = int(files["paused"].read_text())
    srv.reload(2)
    # the two sockets nginx closed listen on, through the paused scan's duplicates alone
    assert listening_inodes(srv.port) == old
    files["arm"].unlink()
    files["go"].touch()
    wait_for("the paused scan to exit", lambda: not psutil.pid_exists(scanner))
    regs = wait_for("2 sockets left registered", steered(srv))
    now = listening_inodes(srv.port)
    assert len(now) == 2 and now < old, (now, old)
    held = {os.readlink(f"/proc/{w.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{w.proc.pid}/fd")}
    assert not {f"socket:[{i}]" for i in old} & held, held
    wait_for("the watcher to be idle (no attach process)", lambda: psutil.Process(w.proc.pid).children() == [])
    assert listening_inodes(srv.port) == now
    assert len(regs) == 2
    check_clients(srv)


def test_restarting_the_watcher_under_load_drops_nothing(nginx, watcher, tmp_path):
    need(WRK is not None, "wrk is not installed")
    srv = nginx(workers=2)
    w = watcher("--port", srv.port, "--domains", "cpu")
    wait_for("2 workers steered", steered(srv))
    before = counters(srv.port)
    wrk = subprocess.Popen(
        [WRK, "-t2", "-c16", "-d120s", "-H", "Connection: close", f"http://127.0.0.1:{srv.port}/"],
        stdout=subprocess.PIPE,
        text=True,
    )
    # a fixed number of restarts under load, however slow a loaded machine makes each one;
    # wrk stops on SIGINT and prints its totals
    time.sleep(0.5)
    for _ in range(3):
        assert wrk.poll() is None
        assert w.stop() == 0
        w = watcher("--port", srv.port, "--domains", "cpu")
        w.wait_log("steering 2 sockets")
    time.sleep(0.5)
    wrk.send_signal(signal.SIGINT)
    out, _ = wrk.communicate(timeout=60)
    assert int(re.search(r"(\d+) requests in", out).group(1)) > 100, out
    assert "Socket errors" not in out, out
    assert "Non-2xx" not in out, out
    assert counters(srv.port)["fallback"] == before["fallback"]
    assert w.stop() == 0


def test_waits_for_a_server_then_adopts_a_restarted_one(nginx, watcher, tmp_path):
    port = free_port()
    w = watcher("--port", port, "--domains", "cpu")
    w.wait_log(rf"waiting: no listening TCP/IPv4 socket on port {port}")
    srv = nginx(workers=2, port=port)
    first = wait_for("2 workers steered", steered(srv))
    srv.stop()
    w.wait_log(rf"waiting: no listening TCP/IPv4 socket on port {port}", count=2)
    srv.start(2)
    regs = wait_for("the restarted server's sockets steered", steered(srv))
    assert not set(regs) & set(first)  # all-new sockets, adopted into the pinned selector
    check_clients(srv)
    assert len([ln for ln in w.log if "waiting" in ln]) == 2  # once per wait, not once per poll


# -- configuration and signals -------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, cause",
    [
        ("[[group]]\nport = 8080\nprot = 'tcp'\n", 3, "unknown key 'prot' in [[group]]"),
        ("interval = 0.5\n[[group]]\nport = 70000\n", 3, "port 70000 is not a port number"),
        ("[[group]]\nport = 8080\n\n[[group]]\nport = 8081\ndomains = '0-'\n", 6, "domain spec '0-' does not parse"),
        ("[[group]\nport = 8080\n", 1, "Expected ']]' at the end of an array declaration"),
        ("intervl = 1\n", 1, "unknown key 'intervl'"),
        ("[[group]]\nport = 53\naddress = '::1'\n", 3, "address '::1' is IPv6, the group IPv4"),
        ("interval = 0.5\n", 1, "no [[group]] table"),
    ],
    ids=["unknown-key", "bad-port", "bad-spec", "toml-syntax", "unknown-top-key", "family", "no-group"],
)
def test_config_errors_are_one_line_and_change_nothing(env, tmp_path, text, line, cause):  # noqa: F811
    path = tmp_path / "watch.toml"
    path.write_text(text)
    r = cli("watch", "--config", path, ok=False)
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: watch: {path}:{line}: "), lines
    assert cause in lines[0], lines
    assert os.listdir(env) == []  # bpffs not even mounted: nothing was changed


def test_example_config_parses():
    from numareuse import watch

    cfg = watch.load_config(os.path.join(HERE, "..", "examples", "watch.toml"))
    assert [g.port for g in cfg.groups] == [8080, 8443, 53]
    assert cfg.groups[2].udp and cfg.groups[2].ipv6


def test_sighup_rereads_the_config_and_keeps_it_when_bad(nginx, watcher, tmp_path):
    a = nginx(workers=2, sub="a")
    b = nginx(workers=2, sub="b")
    conf = tmp_path / "watch.toml"
    conf.write_text(f"[[group]]\nport = {a.port}\ndomains = 'cpu'\n")
    w = watcher("--config", conf)
    wait_for("a steered", steered(a))
    conf.write_text(f"[[group]]\nport = {a.port}\ndomains = 'cpu'\nbogus = 1\n")
    w.proc.send_signal(signal.SIGHUP)
    w.wait_log(rf"SIGHUP: {conf}:4: unknown key 'bogus'.*; keeping the previous configuration")
    conf.write_text(
        f"[[group]]\nport = {a.port}\ndomains = 'cpu'\ncapacity = 64\n\n[[group]]\nport = {b.port}\ndomains = 'cpu'\n"
    )
    w.proc.send_signal(signal.SIGHUP)
    wait_for("b steered", steered(b))
    wait_for("a rebuilt with capacity 64", lambda: [g for g in status() if g["capacity"] == 64])
    wait_for("a steered again", steered(a))
    check_clients(a)
    check_clients(b)
    w.wait_log(rf"tcp4 \*:{a.port}: replaced")
    assert w.proc.poll() is None


def test_sigterm_leaves_the_steering(nginx, watcher):
    srv = nginx(workers=2)
    w = watcher("--port", srv.port, "--domains", "cpu")
    wait_for("2 workers steered", steered(srv))
    assert w.stop() == 0
    assert steered(srv)()  # pinned: still attached and registered with no watcher
    check_clients(srv)
    assert w.log[-1] == "stopping: SIGTERM; the steering stays", w.log


def test_detach_on_exit_removes_the_steering(nginx, watcher):
    srv = nginx(workers=2)
    w = watcher("--port", srv.port, "--domains", "cpu", "--detach-on-exit")
    wait_for("2 workers steered", steered(srv))
    assert w.stop() == 0
    assert status() == []
    w.wait_log(rf"tcp4 \*:{srv.port}: detached", count=1)
    with pinned(0):
        assert {worker_pid(srv.port) for _ in range(40)} == set(srv.workers)  # the kernel's hash again


def test_usage_errors(env):  # noqa: F811
    r = cli("watch", ok=False)
    assert r.exit_code == 1 and r.stderr == "Error: watch: nothing to watch: give --port, --group or --config\n"
    r = cli("watch", "--group", "tcp4:http", ok=False)
    assert r.exit_code == 1 and r.stderr.startswith("Error: watch: --group 'tcp4:http': expected"), r.stderr
    r = cli("watch", "-p", "80", "-p", "80", ok=False)
    assert r.exit_code == 1 and "given twice" in r.stderr


def test_group_syntax():
    from numareuse.watch import parse_group_arg

    g = parse_group_arg("udp6:[::1]:53", domains="cpu")
    assert (g.port, g.address, g.udp, g.ipv6, g.domains) == (53, "::1", True, True, "cpu")
    g = parse_group_arg("tcp:10.0.0.1:80")
    assert (g.port, g.address, g.udp, g.ipv6) == (80, "10.0.0.1", False, False)
    assert parse_group_arg("8080").key == (8080, None, False, False, None, None)


# -- packaging ---------------------------------------------------------------------

REPO = os.path.dirname(HERE)
UNIT = os.path.join(REPO, "packaging", "numareuse-watch.service")
CAP_BITS = {"CAP_DAC_READ_SEARCH": 2, "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_BPF": 39}


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in open(UNIT):
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def unit_caps() -> list[str]:
    return unit_settings()["CapabilityBoundingSet"][0].split()


def venv_numareuse() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "numareuse")
    need(os.access(exe, os.X_OK), f"no numareuse command beside {sys.executable} (make setup installs it)")
    return exe


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    need(tool is not None, "systemd-analyze is not installed")
    text = open(UNIT).read()
    assert "ExecStart=/usr/local/bin/numareuse watch " in text
    rendered = tmp_path / "numareuse-watch.service"
    rendered.write_text(text.replace("/usr/local/bin/numareuse", venv_numareuse()))
    r = subprocess.run([tool, "verify", str(rendered)], capture_output=True, text=True)
    assert r.returncode == 0 and "numareuse-watch" not in r.stdout + r.stderr, r.stdout + r.stderr
    s = unit_settings()
    assert s["Restart"] == ["on-failure"] and "sys-fs-bpf.mount" in s["After"][0]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_unit_capabilities_are_enough_to_attach_and_steer(env, nginx, watcher):  # noqa: F811
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    # mounted before, as systemd's sys-fs-bpf.mount is: mounting needs CAP_SYS_ADMIN, not in the set
    subprocess.run(["mount", "-t", "bpf", "bpf", str(env)], check=True)
    caps = unit_caps()
    assert set(caps) <= set(CAP_BITS), caps
    spec = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])
    srv = nginx(workers=2)
    w = watcher(
        "--port",
        srv.port,
        "--domains",
        "cpu",
        script=shutil.which("setpriv"),
        prefix=["--no-new-privs", "--bounding-set", spec, "--inh-caps", spec, "--ambient-caps", spec, "--"],
    )
    wait_for("2 workers steered", steered(srv))
    with open(f"/proc/{w.proc.pid}/status") as f:
        eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", f.read(), re.M).group(1), 16)
    assert eff == sum(1 << CAP_BITS[c] for c in caps), hex(eff)  # exactly the unit's set
    check_clients(srv)
    srv.reload(4)  # followed with that set too: events, epoll and affinity of nobody's workers
    wait_for("4 workers steered", steered(srv))
    check_clients(srv)
    assert not [ln for ln in w.log if "error" in ln or "no process events" in ln], w.log


def test_daemonset_manifest():
    yaml = pytest.importorskip("yaml", reason="PyYAML (Debian python3-yaml) is not installed")
    with open(os.path.join(REPO, "packaging", "daemonset.yaml")) as f:
        docs = list(yaml.safe_load_all(f))
    assert len(docs) == 1
    ds = docs[0]
    assert (ds["apiVersion"], ds["kind"]) == ("apps/v1", "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert pod["hostPID"] is True
    (c,) = pod["containers"]
    script = " ".join(c["command"] + c["args"])
    assert "numareuse watch --pid" in script
    added = {f"CAP_{n}" for n in c["securityContext"]["capabilities"]["add"]}
    assert set(unit_caps()) | {"CAP_SYS_ADMIN"} == added  # the unit's set and setns()
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts["bpffs"] == "/sys/fs/bpf" and vols["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert mounts["run"] == "/run/numareuse" and vols["run"]["hostPath"]["path"] == "/run/numareuse"
    for e in c["env"]:
        assert f"${e['name']}" in script


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in open(os.path.join(REPO, "packaging", "Containerfile")):
        s = line.rstrip("\n")
        if not cur and (not s.strip() or s.lstrip().startswith("#")):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        word, _, rest = cur.strip().partition(" ")
        out.append((word, rest.strip()))
        cur = ""
    assert not cur, "a continuation runs past the end"
    return out


def test_containerfile():
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "ENTRYPOINT", "CMD", "VOLUME", "WORKDIR", "LABEL", "USER"}
    ins = containerfile()
    assert all(w in known for w, _ in ins), [w for w, _ in ins if w not in known]
    assert [w for w, _ in ins if w != "ARG"][0] == "FROM"
    assert re.match(r"^\S*debian:bookworm(-slim)?$", dict(ins)["FROM"]), dict(ins)["FROM"]
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "python3-bpfcc" in runs and "linux-headers-amd64" in runs
    assert "venv --system-site-packages" in runs  # bcc's binding is in Debian's Python
    for w, a in ins:
        if w in ("ENTRYPOINT", "CMD", "VOLUME"):
            assert isinstance(json.loads(a), list)
        if w == "COPY":
            src = a.split()[0]
            assert os.path.exists(os.path.join(REPO, src)), src
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["numareuse"]
    assert json.loads(dict(ins)["CMD"])[0] == "watch"
    # every Debian package it installs exists in bookworm's archive (as apt knows it here)
    pkgs = re.search(r"install -y --no-install-recommends (.*?)(&&|$)", runs).group(1).split()
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", *pkgs], capture_output=True, text=True)
    need(r.returncode == 0 or "No packages found" in r.stderr, "apt-cache has no package lists here")
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def in_netns(pid: int):
    """This thread in the network namespace of ``pid`` for the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        _sys.setns(target, _sys.CLONE_NEWNET)
        try:
            yield
        finally:
            _sys.setns(own, _sys.CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


def test_pid_group_in_an_unshared_network_namespace(env, watcher):  # noqa: F811
    from numareuse import control

    need(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
    srv = subprocess.Popen(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            f"ip link set lo up && exec {sys.executable} {HERE}/forkserver.py --workers 2 --cpus 0,1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = srv.stdout.readline().split()
        assert line and line[0] == "ready", line
        port = int(line[1])
        assert port not in {p for _, p, _, _ in _sys.diag_list(_sys.diag_socket(), socket.AF_INET, 6, 10)}
        w = watcher("--pid", srv.pid, "--port", port, "--domains", "cpu")
        w.wait_log(rf"tcp4 \*:{port} pid={srv.pid}: \+ sk:\d+ -> 1")

        def both():
            gs = [g for g in control.status(pid=srv.pid) if g["group"]["port"] == port]
            return gs and sorted(s["domain"] for s in gs[0]["sockets"] if s["live"]) == [0, 1]

        wait_for("both sockets registered in the namespace", both)
        with in_netns(srv.pid):
            assert set(ask(0, port)) == {0} and set(ask(1, port)) == {1}
        assert w.stop() == 0
        control.detach(port, pid=srv.pid)
    finally:
        srv.terminate()
        srv.wait(10)


def test_journald_lines_carry_a_priority_and_no_timestamp(env, watcher, tmp_path):  # noqa: F811
    port = free_port()
    w = watcher("--port", port, extra_env={"JOURNAL_STREAM": "8:12345"})
    w.wait_log(rf"^<6>tcp4 \*:{port}: waiting: no listening TCP/IPv4 socket on port {port}$")
    assert w.log[0] == f"<6>tcp4 *:{port}: watching (domains numa)", w.log
    assert w.stop() == 0
    assert w.log[-1] == "<6>stopping: SIGTERM; the steering stays"


def test_metrics_hook_gets_the_watchers_health(monkeypatch):
    import types

    import numareuse
    from numareuse import watch

    got = []
    fake = types.ModuleType("numareuse.metrics")
    fake.serve_watch = lambda host, port, health: got.append((host, port, health))
    monkeypatch.setitem(sys.modules, "numareuse.metrics", fake)
    monkeypatch.setattr(numareuse, "metrics", fake, raising=False)  # `from . import` reads the package first
    h = watch.Health()
    watch.start_metrics("[::1]:9465", h)
    assert got == [("::1", 9465, h)]
    assert (h.reconciles, h.errors, h.changes, h.last_success, h.groups) == (0, 0, 0, None, {})
    bare = types.ModuleType("numareuse.metrics")
    monkeypatch.setitem(sys.modules, "numareuse.metrics", bare)
    monkeypatch.setattr(numareuse, "metrics", bare)
    with pytest.raises(watch.ConfigError, match="has no serve_watch"):
        watch.start_metrics("127.0.0.1:9465", h)


def test_fingerprint_of_a_pid_group_reads_that_namespace(kernel, two_cpus):
    """The cheap check of a ``pid`` group lists the sockets of that process's network namespace."""
    from numareuse import watch

    need(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
    srv = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", f"exec {sys.executable} {HERE}/forkserver.py --workers 2 --cpus 0,1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = srv.stdout.readline().split()
        assert line and line[0] == "ready", line
        port, workers = int(line[1]), [int(p) for p in line[2].split(",")]
        with open(f"/proc/{srv.pid}/net/tcp") as f:
            inodes = {int(ln.split()[9]) for ln in f.readlines()[1:] if ln.split()[1].endswith(f":{port:04X}")}
        assert len(inodes) == 2
        w = watch.Watcher(watch.Config([watch.GroupSpec(port=port, pid=srv.pid)]))
        (g,) = w.groups.values()
        g.pids, g.parents = set(workers), {srv.pid}
        socks, procs, _online = w._fingerprint(g)
        assert {ino for ino, _ in socks} == inodes  # sock_diag inside the namespace
        assert [(pid, aff) for pid, aff, _ in procs] == [(workers[0], {0}), (workers[1], {1})]
        assert all(len(polled) == 1 for _, _, polled in procs) and {i for *_, p in procs for i in p} == inodes
        g.no_diag = True
        assert {ino for ino, _ in w._fingerprint(g)[0]} == inodes  # /proc/PID/net, the fallback
        assert port not in {p for _, p, _, _ in _sys.diag_list(_sys.diag_socket(), socket.AF_INET, 6, 10)}
        g.diag.close() if g.diag else None
    finally:
        srv.terminate()
        srv.wait(10)
