"""`make soak`: Debian's nginx under wrk while numareuse and nginx change everything they can.

One run, in a network namespace of its own (so that the kernel's TCP counters
count only this run's connections): nginx with ``reuseport`` and one worker per
CPU pinned by ``worker_cpu_affinity``, driven by ``wrk -t2 -c16 -H 'Connection:
close'`` (every request a new connection, so every request is a steering
decision), through phases that each run for their own time slice under the load
with their own counter deltas:

- baseline: the load alone, no numareuse;
- attach/detach: ``numareuse attach`` and ``detach`` cycles;
- spec swaps: ``attach -d cpu`` <-> ``-d '0;1'`` with a capacity change (new maps,
  the sockets moved one at a time);
- reloads: ``nginx -s reload`` to the same and other worker counts, each followed
  by ``numareuse attach`` (registering the new workers' sockets);
- kill -9: workers killed (the master respawns them), with and without numareuse,
  interleaved, several runs each: a kill resets the killed worker's connections
  whatever steers them, so numareuse is compared with the kernel's own hash;
- watcher restarts: only where ``numareuse watch`` exists.

Every phase without kills must lose nothing: no wrk socket error, no non-2xx
answer, no ListenDrops or ListenOverflows in the namespace, and, with numareuse,
no closing listener's connection left unmigrated. Every RST the kernel sends is
counted by the kernel path that sent it (bench/rsts.py). One path is the
kernel's own race: a handshake that completes on a listener that nginx closes
at that instant is reset whatever chose the listener (seen without numareuse
too). A failed request that such a reset explains is shown as that, one for one,
and every other failure fails the phase. Prints a markdown table and writes
bench/soak-results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import free_port, git_commit, nginx, rsts, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
IP = shutil.which("ip") or "/usr/sbin/ip"
T0 = time.monotonic()

# What the table shows of the namespace's counters (nstat's names), and what a phase without
# kills must keep at 0 besides failed requests: a SYN dropped or refused by a listener, a
# closing listener's connection that found no peer. TcpOutRsts is counted, not judged: an RST
# that hits a request shows as a wrk error; one that hits none is TCP's own (a SYN that met a
# TIME_WAIT socket's PAWS check, a segment for a connection already gone), and the baseline
# without numareuse shows them too. Their companion counters are listed with the phase.
SHOWN = (
    "TcpExtListenDrops",
    "TcpExtListenOverflows",
    "TcpOutRsts",
    "TcpExtTCPMigrateReqSuccess",
    "TcpExtTCPMigrateReqFailure",
)
MUST_BE_ZERO = ("TcpExtListenDrops", "TcpExtListenOverflows", "TcpExtTCPMigrateReqFailure")
WATCHED = (*SHOWN, "TcpEstabResets", "TcpExtPAWSTimewait", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose")
RST_COMPANIONS = ("TcpExtPAWSTimewait", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpExtEmbryonicRsts")
GAUGES = ("TcpCurrEstab", "TcpMaxConn", "TcpRtoAlgorithm", "TcpRtoMin", "TcpRtoMax")

LEAD = 0.5  # s of load before a phase's first action
TAIL = 0.7  # s of load after its last one: respawns, migrations and closes show in the window
KILL_GAP = 0.3  # s at least between two kills
SETTLE = 0.4  # s between phases: wrk's own teardown (resets of its open connections) stays outside every window


def log(msg: str) -> None:
    print(f"[soak {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- plan ----------------------------------------------------------------------


@dataclass
class Plan:
    """Durations and counts; --short is the form tests/test_soak.py runs inside `make test`."""

    duration: float = 60.0  # s of load over all phases, shared by their weights
    cycles: int = 20  # attach/detach cycles
    swaps: int = 4  # domain-spec swaps
    reloads: int = 10  # nginx reloads (numareuse attached)
    kills: int = 10  # worker kill -9 per kill run
    kill_reps: int = 3  # kill runs with numareuse, and as many without
    watch_restarts: int = 5  # watcher restarts, when `numareuse watch` exists
    reference: bool = True  # the same reloads without numareuse, for comparison (not judged)
    short: bool = False
    only: tuple[str, ...] = ()  # phase kinds to run (KINDS); all when empty
    # wrk counts a request as a timeout when it is older than this at one of its 2-s checks, without
    # aborting it. Its default (2 s) is a latency threshold: a 2-CPU machine loaded by other runs starves
    # nginx that long with no numareuse at all. 10 s means stuck; `stranded` catches stuck ones wrk missed.
    wrk_timeout: float = 10.0

    @classmethod
    def short_form(cls) -> Plan:
        return cls(duration=12.0, cycles=4, swaps=2, reloads=3, kills=3, kill_reps=1, watch_restarts=2, reference=False)


# -- counters ------------------------------------------------------------------


def counters() -> dict[str, int]:
    """The namespace's TCP counters as nstat names them (Tcp* from /proc/net/snmp, TcpExt* from netstat)."""
    out: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with open(path) as f:
            lines = f.read().splitlines()
        for head, values in zip(lines[::2], lines[1::2]):
            prefix, names = head.split(":", 1)
            if prefix not in ("Tcp", "TcpExt"):
                continue
            for n, v in zip(names.split(), values.split(":", 1)[1].split()):
                out[prefix + n] = int(v)
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if k not in GAUGES}


def runq_wait(pids) -> dict[int, float]:
    """Seconds each task of ``pids`` has waited on a run queue (/proc/PID/task/TID/schedstat, field 2)."""
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        out[int(tid)] = int(f.read().split()[1]) / 1e9
    return out


def waited(before: dict[int, float], after: dict[int, float]) -> float:
    """Run-queue wait over a window, summed over the tasks alive at both ends (workers may come and go)."""
    return round(sum(after[t] - before[t] for t in after.keys() & before.keys()), 2)


# -- wrk -----------------------------------------------------------------------


class Wrk:
    """One wrk run for one phase; stopped with SIGINT, which makes wrk print its summary."""

    def __init__(self, url: str, seconds: float, out: Path, timeout: float):
        self.out = out
        limit = f"-d{int(seconds * 2 + 60)}s"  # an upper bound: the phase stops it
        with open(out, "w") as f:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [WRK, "-t2", "-c16", limit, f"--timeout={timeout:g}s", "-H", "Connection: close", url],
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return parse_wrk(self.out.read_text())


def parse_wrk(text: str) -> dict:
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{text}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}.get(m.group(3), 1.0)
    res = {
        "requests": int(m.group(1)),
        "seconds": round(float(m.group(2)) * scale, 2),
        "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "non2xx": 0,
    }
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if e:
        res["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, e.groups())))
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if n:
        res["non2xx"] = int(n.group(1))
    lat = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if lat:
        res["latency"] = {"avg": lat.group(1), "stdev": lat.group(2), "max": lat.group(3)}
    return res


# -- nginx ---------------------------------------------------------------------


def socket_fds(pid: int) -> int:
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


class ActionError(Exception):
    """An action of a phase did not do what it should (a CLI error, nginx not ready)."""


class Nginx:
    """Debian's nginx with a private prefix: one worker per CPU of ``cpus`` (cycling), pinned."""

    def __init__(self, root: Path, port: int, cpus: list[int]):
        self.dir, self.port, self.cpus = root, port, cpus
        self.conf = root / "nginx.conf"
        self.workers = 0
        self.proc: subprocess.Popen | None = None
        self.idle_fds = 0  # socket fds of an idle worker (listeners, channel): the rest are connections
        self.held: list[int] = []  # connections each killed worker held (its socket fds beyond idle_fds)

    def _cpu(self, i: int) -> int:
        return self.cpus[i % len(self.cpus)]

    def _write(self, workers: int) -> None:
        width = max(self.cpus) + 1
        masks = " ".join(format(1 << self._cpu(i), f"0{width}b") for i in range(workers))
        self.conf.write_text(nginx.conf(self.dir, self.port, workers, masks, shutdown_timeout="5s"))
        self.workers = workers

    def _cmd(self, *extra: str) -> list[str]:
        return [NGINX, "-p", f"{self.dir}/", "-c", str(self.conf), "-e", str(self.dir / "error.log"), *extra]

    def start(self, workers: int) -> None:
        self._write(workers)
        self.proc = subprocess.Popen(self._cmd(), stdin=subprocess.DEVNULL)
        pids = self.wait_workers(set())
        time.sleep(0.2)  # done with start-up
        self.idle_fds = min(socket_fds(p) for p in pids)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def children(self):
        import psutil

        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def wait_workers(self, old: set[int], gone: frozenset[int] = frozenset(), timeout: float = 10) -> list[int]:
        """Wait until the master has ``self.workers`` workers not in ``old``, each on its own CPU; their pids."""
        import psutil

        want = sorted(self._cpu(i) for i in range(self.workers))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ActionError(f"nginx exited ({self.proc.returncode}): {self.error_tail()}")
            kids = [w for w in self.children() if w.pid not in old and w.pid not in gone]
            try:
                got = sorted(c for w in kids for c in w.cpu_affinity()) if len(kids) == self.workers else None
            except psutil.Error:
                got = None
            with contextlib.suppress(psutil.Error):
                if got == want and all(len(w.cpu_affinity()) == 1 for w in kids):
                    return [w.pid for w in kids]
            if time.monotonic() > deadline:
                raise ActionError(f"nginx: {self.workers} pinned workers not up in {timeout} s ({len(kids)} seen)")
            time.sleep(0.02)

    def reload(self, workers: int) -> str:
        old = {w.pid for w in self.children()}
        self._write(workers)
        r = subprocess.run(self._cmd("-s", "reload"), capture_output=True, text=True)
        if r.returncode:
            raise ActionError(f"nginx -s reload: {r.stderr.strip()}")
        self.wait_workers(old)
        deadline = time.monotonic() + 6  # worker_shutdown_timeout 5s bounds the old workers' exit
        while {w.pid for w in self.children()} & old and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"{len(old)} -> {workers} workers"

    def kill_worker(self, k: int) -> str:
        """kill -9 the worker on the k-th CPU (cycling) and wait for the master to respawn it."""
        import psutil

        cpu = self._cpu(k)
        victims = []
        for w in self.children():
            with contextlib.suppress(psutil.Error):
                if w.cpu_affinity() == [cpu]:
                    victims.append(w)
        if not victims:
            raise ActionError(f"no worker on CPU {cpu}")
        pid = victims[0].pid
        # stopped first, so that what it holds is read exactly: it accepts nothing more before the kill
        os.kill(pid, signal.SIGSTOP)
        held = socket_fds(pid)
        os.kill(pid, signal.SIGKILL)
        held -= self.idle_fds
        self.held.append(held)
        self.wait_workers(set(), gone={pid})
        return f"killed {pid} (CPU {cpu}) holding {held} connection(s)"

    def error_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join((self.dir / "error.log").read_text().splitlines()[-3:])
        return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, the master closes the sockets
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- numareuse -----------------------------------------------------------------


class Numareuse:
    """The numareuse CLI, run as a child of this process: in its network and mount namespaces."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int):
        self.cmd, self.env, self.port = cmd, env, port
        self.calls: list[dict] = []
        self.attached = False  # as our own attach/detach left it (a watcher attaches too: see Watcher)

    def run(self, *args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        t = time.monotonic()
        r = subprocess.run([*self.cmd, *map(str, args)], env=self.env, capture_output=True, text=True, timeout=timeout)
        self.calls.append({"args": list(map(str, args)), "rc": r.returncode, "s": round(time.monotonic() - t, 3)})
        if check and r.returncode:
            raise ActionError(f"numareuse {' '.join(map(str, args))}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def attach(self, *extra) -> dict:
        rep = json.loads(self.run("attach", "-p", self.port, "--json", "-q", *extra).stdout)
        self.attached = True
        return rep

    def detach(self) -> dict:
        rep = json.loads(self.run("detach", "-p", self.port, "--json").stdout)
        self.attached = False
        return rep

    def status(self) -> list[dict]:
        return [g for g in json.loads(self.run("status", "--json").stdout) if g["group"]["port"] == self.port]

    def probe_watch(self) -> subprocess.Popen:
        """`numareuse watch --help`, started now and read later (it runs while nginx starts)."""
        return subprocess.Popen(
            [*self.cmd, "watch", "--help"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )


WATCHER_UP = 30  # s: a watcher's first pass, on a loaded machine


class Watcher:
    """`numareuse watch` processes, restarted by phase actions; their exit statuses are kept."""

    def __init__(self, nr: Numareuse, logdir: Path):
        self.nr, self.logdir = nr, logdir
        self.proc: subprocess.Popen | None = None
        self.n = 0
        self.exits: list[dict] = []

    def start(self) -> str:
        self.n += 1
        self.nr.attached = True  # its first pass attaches
        with open(self.logdir / f"watch-{self.n}.log", "w") as f:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [*self.nr.cmd, "watch", "-p", str(self.nr.port), "-d", "cpu", "--interval", "0.2"],
                env=self.nr.env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        # Up once its first pass has logged the group's program: its signal handlers are set by then.
        # A SIGTERM before that (Python still starting, seen once under a CPU hog) ends it by the
        # signal, as it would any program: harmless, but it is not the clean stop a restart tests.
        start, log = time.monotonic(), self.logdir / f"watch-{self.n}.log"
        while not re.search(r", program \d+", log.read_text()):
            if self.proc.poll() is not None or time.monotonic() - start > WATCHER_UP:
                tail = " | ".join(log.read_text().splitlines()[-5:])
                raise ActionError(f"watcher {self.n} not up after {time.monotonic() - start:.1f} s: {tail}")
            time.sleep(0.02)
        return f"watcher {self.n} started (pid {self.proc.pid}, up in {time.monotonic() - start:.2f} s)"

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc is None:
            return "no watcher"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        # SIGTERM must end it cleanly (the steering stays pinned); SIGKILL is a crash it must survive
        ok = rc == 0 if sig == signal.SIGTERM else rc == -signal.SIGKILL
        self.exits.append({"watcher": self.n, "signal": signal.Signals(sig).name, "rc": rc, "ok": ok})
        self.proc = None
        if not ok:
            tail = (self.logdir / f"watch-{self.n}.log").read_text().splitlines()[-5:]
            raise ActionError(f"watcher {self.n} exited {rc} on {signal.Signals(sig).name}: {' | '.join(tail)}")
        return f"watcher {self.n} stopped ({signal.Signals(sig).name})"

    def restart(self, i: int) -> str:
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
        return f"{self.stop(sig)}; {self.start()}"


# -- phases --------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    arm: str  # "numareuse" | "kernel" (no program attached)
    slice_s: float
    actions: list = field(default_factory=list)  # (label, callable)
    kills: bool = False
    judged: bool = True  # False: a reference row, shown, never a failure


def stranded(port: int, wait: float = 15.0) -> int:
    """Connections still queued on the group's listeners ``wait`` s after the load stopped.

    Live workers empty their queues once wrk is gone (within milliseconds, or seconds
    on a machine starved by other runs); what stays is queued on a socket that no
    worker accepts from: connections lost that a wrk timeout might not live to see.
    """
    deadline = time.monotonic() + wait
    while True:
        queued = 0
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(path) as f:
                for line in f.read().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                        queued += int(fields[4].split(":")[1], 16)  # rx_queue: the accept queue's length
        if not queued or time.monotonic() >= deadline:
            return queued
        time.sleep(0.05)


def run_phase(ph: Phase, url: str, workdir: Path, index: int, nginx: Nginx, plan: Plan, census=None) -> dict:
    """The load for ph.slice_s seconds (longer if its actions need it), the actions spread over it."""
    log(f"phase {ph.name} ({ph.arm}): {len(ph.actions)} actions over {ph.slice_s:.1f} s")
    before = counters()
    rst0 = census.snapshot() if census else {}
    wrk = Wrk(url, ph.slice_s, workdir / f"wrk-{index}.out", plan.wrk_timeout)
    t0 = time.monotonic()
    time.sleep(0.05)  # wrk's threads exist
    workers = [w.pid for w in nginx.children()]
    rq0_nginx, rq0_wrk = runq_wait(workers), runq_wait([wrk.proc.pid])
    done, errors = [], []
    nginx.held.clear()
    span = max(ph.slice_s - LEAD - TAIL, 0.0)
    n = len(ph.actions)
    for i, (label, fn) in enumerate(ph.actions):
        at = LEAD + (span * i / (n - 1) if n > 1 else span / 2)
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        ts = round(time.monotonic() - t0, 2)
        c0 = counters()
        try:
            entry = {"t": ts, "action": label, "result": fn() or ""}
        except (ActionError, subprocess.TimeoutExpired) as e:
            errors.append(f"{label} at {ts} s: {e}")
            entry = {"t": ts, "action": label, "error": str(e)}
        # which action a counter moved during (the load's own background is in it too)
        entry["counters"] = {k: v for k, v in delta(c0, counters()).items() if v and k in WATCHED}
        entry["s"] = round(time.monotonic() - t0 - ts, 2)
        done.append(entry)
        if not wrk.alive():
            errors.append("wrk exited before the phase ended")
            break
    time.sleep(max(0.0, t0 + ph.slice_s - time.monotonic(), TAIL if n else 0.0))
    after = counters()  # before wrk stops: its teardown resets its open connections, not a server's doing
    rst1 = census.snapshot() if census else {}
    elapsed = time.monotonic() - t0
    rq_nginx = waited(rq0_nginx, runq_wait(workers))
    rq_wrk = waited(rq0_wrk, runq_wait([wrk.proc.pid]))
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    w = wrk.stop()
    left = stranded(nginx.port)
    time.sleep(SETTLE)
    d = delta(before, after)
    res = {
        "phase": ph.name,
        "arm": ph.arm,
        "kills": ph.kills,
        "judged": ph.judged,
        "slice_s": round(ph.slice_s, 2),
        "seconds": round(elapsed, 2),
        "actions": len(done),
        "action_errors": errors,
        "log": done,
        "requests": w["requests"],
        "wrk_errors": sum(w["errors"].values()),
        "wrk_error_kinds": w["errors"],
        "non2xx": w["non2xx"],
        "latency": w.get("latency"),
        # CPU starvation, for slow requests: seconds the workers present at the start (and wrk's
        # threads) spent runnable but waiting for a CPU, and the machine's 1-min load average
        "runq_wait_s": {"nginx_workers": rq_nginx, "wrk": rq_wrk},
        "loadavg": load,
        "nstat": {k: v for k, v in sorted(d.items()) if v},
        "stranded": left,
    }
    if ph.kills:
        res["held_at_kill"] = list(nginx.held)
    for k in SHOWN:
        res[k] = d.get(k, 0)
    res["failed"] = res["wrk_errors"] + res["non2xx"]
    # Resets by the kernel path that sent them (bench/rsts.py). One path is the kernel's own race,
    # whatever steers: a handshake completing on a listener that nginx closes at that instant.
    # Each such reset is one failed request; a failure beyond them is judged, not excused.
    census_d = census.delta(rst0, rst1) if census else {"paths": {}, "other_stacks": []}
    res["rst_paths"] = census_d["paths"]
    if census_d["other_stacks"]:
        res["rst_other_stacks"] = census_d["other_stacks"]
    res["kernel_race"] = race_resets(res)
    res["verdict"] = verdict(res, ph, errors)
    if res["TcpOutRsts"]:
        res["rst_companions"] = {k: d.get(k, 0) for k in RST_COMPANIONS if d.get(k)}
    log(
        f"  {res['requests']} requests, {res['failed']} failed {w['errors']}, OutRsts {res['TcpOutRsts']}, "
        f"ListenDrops {res['TcpExtListenDrops']}, max latency {(w.get('latency') or {}).get('max')}, "
        f"run-queue wait nginx {rq_nginx} s wrk {rq_wrk} s, load {load}: {res['verdict']}"
    )
    for e in errors:
        log(f"  action error: {e}")
    return res


def race_resets(res: dict) -> int:
    """The phase's failed requests that a handshake_vs_close reset explains, one for one."""
    return min(res["failed"], res["rst_paths"].get(rsts.RACE, 0))


def verdict(res: dict, ph: Phase, errors: list[str]) -> str:
    """A phase's verdict from its counts: kill runs are compared in kill_summary, reference rows never fail."""
    if ph.kills:
        return (
            "compared below"
            if not (errors or res["stranded"])
            else (f"FAIL: stranded={res['stranded']}, {len(errors)} errors")
        )
    if not ph.judged:
        return "reference"
    # a failed request is judged unless a reset by the kernel's own race explains it, one for one
    bad = [f"failed={res['failed']}"] if res["failed"] > race_resets(res) else []
    bad += [f"{k}={res[k]}" for k in (*MUST_BE_ZERO, "stranded") if res[k]]
    # a closing listener's queued connection reset: what numareuse's migrating program is there to prevent
    unmigrated = res["rst_paths"].get(rsts.UNMIGRATED, 0) if ph.arm == "numareuse" else 0
    bad += [f"unmigrated={unmigrated}"] if unmigrated else []
    bad += [f"{len(errors)} action error(s)"] if errors else []
    return "ok" if not bad else "FAIL: " + ", ".join(bad)


def kill_summary(rows: list[dict]) -> dict:
    """numareuse's kill runs against the kernel's, with the run-to-run spread of the kernel's.

    A kill resets the connections the killed worker had accepted (read from its fds
    between a SIGSTOP and the SIGKILL: ``held``); how many of wrk's 16 that is depends on how the
    load runs, not on who chose the socket: a local worker (numareuse) takes a
    connection in as soon as it runs, while under the kernel's hash more of them wait
    in accept queues, which survive the kill (the master holds the sockets). So the
    judged figure is the failures beyond what the kills reset (``failed - held`` per
    run): numareuse's mean must stay within the kernel runs' mean plus their spread.
    Raw failures per run and per 10k requests are shown beside it.
    """
    out: dict = {}
    for arm in ("numareuse", "kernel"):
        runs = [r for r in rows if r["kills"] and r["arm"] == arm]
        out[arm] = {
            "failed": [r["failed"] for r in runs],
            "held_at_kill": [sum(r.get("held_at_kill", [])) for r in runs],
            "reset": [r["nstat"].get("TcpEstabResets", 0) for r in runs],  # both ends of each reset connection
            "OutRsts": [r["TcpOutRsts"] for r in runs],
            "ListenDrops": [r["TcpExtListenDrops"] for r in runs],
            "requests": [r["requests"] for r in runs],
            "kills": [r["actions"] for r in runs],
        }
        o = out[arm]
        o["excess"] = [f - h for f, h in zip(o["failed"], o["held_at_kill"])]
        reqs = sum(o["requests"])
        o["failed_per_10k_requests"] = round(1e4 * sum(o["failed"]) / reqs, 2) if reqs else None
    if not out["numareuse"]["failed"] or not out["kernel"]["failed"]:
        out["verdict"] = "not run"
        return out
    for key in ("failed", "excess"):
        n, k = out["numareuse"][key], out["kernel"][key]
        out[key] = {
            "mean_numareuse": round(statistics.mean(n), 1),
            "mean_kernel": round(statistics.mean(k), 1),
            "spread_kernel": max(k) - min(k) if len(k) > 1 else None,
        }
    ex = out["excess"]
    if any(r["action_errors"] for r in rows if r["kills"]):
        out["verdict"] = "FAIL: action errors"
    elif ex["spread_kernel"] is None:
        out["verdict"] = "1 run each: no spread to compare with"
    elif ex["mean_numareuse"] <= ex["mean_kernel"] + ex["spread_kernel"]:
        out["verdict"] = "ok"
    else:
        more = ex["mean_numareuse"] - ex["mean_kernel"]
        out["verdict"] = (
            f"FAIL: numareuse adds {more:.1f} failures per run beyond the kills' own, spread {ex['spread_kernel']}"
        )
    return out


def reload_counts(n: int, base: int) -> list[int]:
    """Worker counts for n reloads: the same count again and other counts, ending on ``base`` when n allows."""
    pattern = [2 * base, 2 * base, base + 1, base, base, 2 * base, base + 1, base + 1, 2 * base, base]
    return [pattern[i % len(pattern)] for i in range(n)]


# -- the run -------------------------------------------------------------------


KINDS = ("baseline", "attach", "swaps", "reloads", "reference", "kills", "watch")


def plan_phases(plan: Plan, nginx: Nginx, nr: Numareuse, watcher, check: StateCheck, spec: str, base: int):
    """The phases in order, each with the setup to run before it (without load) and its actions.

    Each phase's slice is its weight's share of plan.duration; a kill run gets at
    least the time for the master to respawn each killed worker before the next kill.
    """
    planned: list[tuple[str, float, object, Phase]] = []  # kind, weight, setup, phase

    def detached():
        if nr.attached:
            nr.detach()

    def restore_workers():
        detached()
        if nginx.workers != base:
            nginx.reload(base)

    def fresh_attach(*extra):
        def f():
            restore_workers()
            nr.attach("-d", "cpu", *extra)

        return f

    planned.append(("baseline", 1.0, restore_workers, Phase("baseline", "kernel", 0)))

    if plan.cycles:
        cyc = [("attach 1 + status", lambda: check.attach(base)), ("detach 1 + status", check.detach)]
        for i in range(1, plan.cycles):
            cyc.append((f"attach {i + 1}", lambda: _expect(nr.attach("-d", "cpu"), "attached")))
            cyc.append((f"detach {i + 1}", lambda: _expect(nr.detach(), "detached")))
        planned.append(("attach", 2.0, restore_workers, Phase("attach/detach", "numareuse", 0, cyc)))

    if plan.swaps:
        swaps = []
        for i in range(plan.swaps):
            args = ("-d", spec, "--capacity", "128") if i % 2 == 0 else ("-d", "cpu", "--capacity", "256")
            swaps.append((f"attach {' '.join(args)}", lambda a=args: _expect(nr.attach(*a), "replaced")))
        planned.append(("swaps", 1.0, fresh_attach("--capacity", "256"), Phase("spec swaps", "numareuse", 0, swaps)))

    counts = reload_counts(plan.reloads, base)

    def reload_then_attach(k):
        def f():
            c0 = counters()
            r = nginx.reload(k)
            c1 = counters()
            rep = nr.attach("-d", "cpu")
            c2 = counters()
            if len(rep["sockets"]) != k:
                raise ActionError(f"attach after a reload to {k} workers found {len(rep['sockets'])} sockets")
            rsts = f"OutRsts +{c1['TcpOutRsts'] - c0['TcpOutRsts']} / +{c2['TcpOutRsts'] - c1['TcpOutRsts']}"
            return f"{r}; attach: {rep['action']} ({rsts})"

        return f

    if plan.reloads:
        rel = [(f"reload to {k} + attach", reload_then_attach(k)) for k in counts]
        planned.append(("reloads", 2.0, fresh_attach(), Phase("reloads", "numareuse", 0, rel)))
        if plan.reference:
            ref = [(f"reload to {k}", lambda k=k: nginx.reload(k)) for k in counts]
            ph = Phase("reloads, no numareuse", "kernel", 0, ref, judged=False)
            planned.append(("reference", 1.0, restore_workers, ph))

    if plan.kills:
        for rep in range(plan.kill_reps):
            for arm in ("numareuse", "kernel"):
                kills = [(f"kill -9 #{k + 1}", lambda k=k: nginx.kill_worker(k)) for k in range(plan.kills)]
                setup = fresh_attach() if arm == "numareuse" else restore_workers
                planned.append(("kills", 0.5, setup, Phase(f"kill -9 #{rep + 1}", arm, 0, kills, kills=True)))

    if watcher is not None:
        acts = [("start watcher", watcher.start)]
        for i, k in enumerate(reload_counts(plan.watch_restarts, base)):
            acts.append((f"reload to {k}", lambda k=k: nginx.reload(k)))
            acts.append((f"restart watcher {i + 1}", lambda i=i: watcher.restart(i)))
        planned.append(("watch", 1.5, fresh_attach(), Phase("watcher restarts", "numareuse", 0, acts)))

    planned = [p for p in planned if p[0] in plan.only]
    unit = plan.duration / (sum(w for _, w, _, _ in planned) or 1.0)
    for kind, weight, _, ph in planned:
        ph.slice_s = unit * weight
        if kind == "kills":
            ph.slice_s = max(ph.slice_s, LEAD + TAIL + KILL_GAP * len(ph.actions))
    return [(setup, ph) for _, _, setup, ph in planned]


def _expect(report: dict, action: str) -> str:
    if report.get("action") != action:
        raise ActionError(f"expected {action!r}, got {report.get('action')!r}: {report.get('changes')}")
    return action


class StateCheck:
    """The first attach/detach cycle also checks that status and detach, each a new CLI process in this
    namespace, find the state attach pinned in the namespace's bpffs (and that detach removes it)."""

    def __init__(self, nr: Numareuse, bpffs: Path):
        self.nr, self.bpffs = nr, bpffs
        self.result: dict = {"ok": False}

    def _pinned(self) -> list[str]:
        return [p.name for p in (self.bpffs / "numareuse").glob("netns-*/tcp4_*")]

    def attach(self, workers: int) -> str:
        action = _expect(self.nr.attach("-d", "cpu"), "attached")
        st = self.nr.status()
        live = sum(1 for s in st[0]["sockets"] if s["live"]) if len(st) == 1 else 0
        self.result.update(status_after_attach=f"{live}/{workers} sockets", pinned_after_attach=self._pinned())
        if live != workers or len(self._pinned()) != 1:
            raise ActionError(f"status after attach: {self.result}")
        return action

    def detach(self) -> str:
        action = _expect(self.nr.detach(), "detached")
        self.result.update(status_after_detach=self.nr.status(), pinned_after_detach=self._pinned())
        if self.result["status_after_detach"] or self.result["pinned_after_detach"]:
            raise ActionError(f"state left after detach: {self.result}")
        self.result["ok"] = True
        return action


def private_state(prefix: str) -> tuple[Path, Path, dict[str, str]]:
    """A work directory with a bpffs mounted in it, and the environment that points numareuse at it.

    ip netns exec gave this process a private mount namespace (and a fresh /sys without bpffs):
    a bpffs mounted here is seen by every CLI run below, its children, and by nothing outside.
    No crash hook reaches the CLI runs.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix))
    bpffs = work / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMAREUSE_CRASH")}
    env.update(NUMAREUSE_BPFFS=str(bpffs), NUMAREUSE_RUNDIR=str(work / "run"))
    return work, bpffs, env


def inner(args, plan: Plan) -> int:
    """The soak itself, run inside the namespace by ``ip netns exec`` (own network and mount namespaces)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("soak: needs at least 2 CPUs (one pinned nginx worker per CPU, domains by CPU)")
    spec = ";".join(map(str, cpus))
    base = len(cpus)
    work, bpffs, env = private_state("numareuse-soak-")
    if args.cli:  # another numareuse (another checkout's venv): not this checkout's package
        env.pop("PYTHONPATH", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = args.cli.split() if args.cli else [sys.executable, "-m", "numareuse.cli.main"]
    nr = Numareuse(cmd, env, port)
    nginx = Nginx(work, port, cpus)
    watcher = None
    census = None
    rows: list[dict] = []
    res: dict = {"plan": plan.__dict__, "cpus": cpus, "port": port, "state_check": {"ok": False}}
    res["final_status_empty"] = False
    try:
        subprocess.run([IP, "link", "set", "lo", "up"], check=True)
        probe = nr.probe_watch()
        nginx.start(base)
        log(f"nginx on 127.0.0.1:{port}, {base} workers on CPUs {cpus}; netns {args.netns}, bpffs {bpffs}")
        check = StateCheck(nr, bpffs)
        try:
            census = rsts.RstCensus()
            res["rst_census"] = {"available": True}
        except Exception as e:  # judged without it: every failed request counts, none is told apart
            res["rst_census"] = {"available": False, "reason": f"{type(e).__name__}: {e}"}
            log(f"RSTs not told apart by kernel path: {res['rst_census']['reason']}")
        has_watch = probe.wait(60) == 0
        res["watch"] = {"available": has_watch, "ran": False}
        if has_watch and plan.watch_restarts and "watch" in plan.only:
            watcher = Watcher(nr, work)
        elif not has_watch:
            res["watch"]["reason"] = "`numareuse watch --help` failed: no watch command in this numareuse"
            log("watcher phase skipped: " + res["watch"]["reason"])
        for i, (setup, ph) in enumerate(plan_phases(plan, nginx, nr, watcher, check, spec, base)):
            try:
                setup()
            except (ActionError, subprocess.TimeoutExpired) as e:
                res["setup_error"] = f"before {ph.name} ({ph.arm}): {e}"
                log(f"setup failed, stopping: {res['setup_error']}")
                break
            rows.append(run_phase(ph, url, work, i, nginx, plan, census))
            if ph.name == "watcher restarts":
                with contextlib.suppress(ActionError):
                    watcher.stop()
                res["watch"].update(ran=True, exits=watcher.exits, final=_registered(nr, nginx))
                if not res["watch"]["final"]["ok"]:
                    rows[-1]["verdict"] = "FAIL: the last watcher left sockets unregistered"
        nr.detach()
        res["final_status_empty"] = nr.status() == []
        res["state_check"] = check.result
    finally:
        if watcher is not None:
            with contextlib.suppress(Exception):
                watcher.stop(signal.SIGKILL)
        nginx.stop()
        if census is not None:
            census.close()
        subprocess.run(["umount", str(bpffs)], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["phases"] = rows
    res["kill_summary"] = kill_summary(rows)
    res["cli_calls"] = {"count": len(nr.calls), "max_s": max((c["s"] for c in nr.calls), default=0)}
    res["ok"] = (
        "setup_error" not in res
        and (res["state_check"]["ok"] or not plan.cycles or "attach" not in plan.only)
        and res["final_status_empty"]
        and all(r["verdict"] in ("ok", "reference", "compared below") for r in rows)
        and not res["kill_summary"]["verdict"].startswith("FAIL")
    )
    res["meta"] = {
        "kernel": platform.release(),
        "commit": git_commit(),
        "netns": args.netns,
        "duration_s": round(time.monotonic() - T0, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load": f"wrk -t2 -c16 --timeout {plan.wrk_timeout:g}s -H 'Connection: close' (one run per phase, SIGINT)",
    }
    write_json(args.out, res)
    log(f"wrote {args.out}")
    print(markdown(res))
    return 0 if res["ok"] else 1


def _registered(nr: Numareuse, nginx: Nginx) -> dict:
    st = nr.status()
    live = sum(1 for s in st[0]["sockets"] if s["live"]) if st else 0
    return {"workers": nginx.workers, "registered_live": live, "ok": live == nginx.workers}


def markdown(res: dict) -> str:
    head = "| phase | arm | s | actions | requests | max latency | wrk errors | non-2xx | ListenDrops |"
    head += " ListenOverflows | OutRsts | RSTs by kernel path | MigrateReq ok/fail | verdict |"
    out = [head, "|" + "---|" * 14]
    notes, races = [], []
    for r in res["phases"]:
        kinds = ", ".join(f"{k} {v}" for k, v in r["wrk_error_kinds"].items() if v)
        errs = f"{r['wrk_errors']} ({kinds})" if kinds else "0"
        mig = f"{r['TcpExtTCPMigrateReqSuccess']}/{r['TcpExtTCPMigrateReqFailure']}"
        paths = ", ".join(f"{k} {v}" for k, v in r.get("rst_paths", {}).items()) or "-"
        if r.get("kernel_race"):
            races.append(r)
            paths += f" [r{len(races)}]"
        verdict = r["verdict"] if r["verdict"] in ("ok", "reference", "compared below") else f"**{r['verdict']}**"
        rst = str(r["TcpOutRsts"])
        if r.get("rst_companions") is not None and not r["kills"] and not r["failed"]:
            notes.append(r)
            rst += f" [{len(notes)}]"
        out.append(
            f"| {r['phase']} | {r['arm']} | {r['seconds']} | {r['actions']} | {r['requests']} | "
            f"{(r.get('latency') or {}).get('max', '-')} | {errs} | "
            f"{r['non2xx']} | {r['TcpExtListenDrops']} | {r['TcpExtListenOverflows']} | {rst} | "
            f"{paths} | {mig} | {verdict} |"
        )
    for i, r in enumerate(notes, 1):
        companions = ", ".join(f"{k} {v}" for k, v in r["rst_companions"].items()) or "no other counter"
        during = [
            f"{a['action']} (t={a['t']} s) {a['counters']['TcpOutRsts']}"
            for a in r["log"]
            if a.get("counters", {}).get("TcpOutRsts")
        ]
        where = "; during " + ", ".join(during) if during else "; none during an action"
        out.append(f"\n[{i}] {r['TcpOutRsts']} RST(s) and no failed request in {r['phase']}: {companions}{where}")
    for i, r in enumerate(races, 1):
        out.append(
            f"\n[r{i}] {r['kernel_race']} of the {r['failed']} failed request(s) in {r['phase']} were reset by the "
            f"kernel's handshake_vs_close path: a handshake completed on a listener nginx closed at that instant "
            f"(inet_csk_complete_hashdance -> inet_child_forget), which resets whatever chose the listener"
        )
    if not res.get("rst_census", {}).get("available", True):
        out.append(f"\nRSTs not told apart by kernel path ({res['rst_census']['reason']}): every failure is judged")
    ks = res["kill_summary"]
    if "failed" in ks and isinstance(ks["failed"], dict):
        n, k = ks["numareuse"], ks["kernel"]
        out.append("")
        out.append(
            f"kill -9 runs, numareuse vs kernel: failed requests {n['failed']} vs {k['failed']}; connections the "
            f"killed workers held {n['held_at_kill']} vs {k['held_at_kill']}; failures beyond those "
            f"{n['excess']} (mean {ks['excess']['mean_numareuse']}) vs {k['excess']} (mean "
            f"{ks['excess']['mean_kernel']}, spread {ks['excess']['spread_kernel']}): {ks['verdict']}; "
            f"failed per 10k requests {n['failed_per_10k_requests']} vs {k['failed_per_10k_requests']}"
        )
    w = res.get("watch", {})
    out.append("")
    if w.get("ran"):
        exits = ", ".join(f"{e['signal']}->{e['rc']}" for e in w["exits"])
        out.append(f"watcher: ran ({exits}); registered after the last: {w['final']}")
    else:
        out.append(f"watcher: not run ({w.get('reason', 'no restarts planned')})")
    if "setup_error" in res:
        out.append(f"**setup failed, the run stopped**: {res['setup_error']}")
    sc = res.get("state_check", {})
    ran = res["plan"]["cycles"] and "attach" in res["plan"]["only"]
    sc_text = ("ok" if sc.get("ok") else f"**{sc}**") if ran else "not run (no attach/detach phase)"
    out.append(f"state in the namespace's bpffs (attach -> status -> detach, separate CLI runs): {sc_text}")
    return "\n".join(out)


# -- outside the namespace -------------------------------------------------------


def outer(argv: list[str], args) -> int:
    """Make the network namespace, run the soak inside it, and remove it (and anything left in it)."""
    if os.geteuid() != 0:
        sys.exit("soak: needs root (network namespace, bpffs, BPF programs, ptrace of nginx)")
    for tool in (NGINX, WRK, IP):
        if not os.path.exists(tool):
            sys.exit(f"soak: {tool} is missing (make setup installs nginx-light, wrk, iproute2)")
    ns = f"numareuse-soak-{os.getpid()}"
    subprocess.run([IP, "netns", "add", ns], check=True)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the soak; this one cleans up after
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        cmd = [IP, "netns", "exec", ns, sys.executable, "-m", "bench.soak", "--inner", "--netns", ns, *argv]
        child = subprocess.Popen(cmd, cwd=REPO, env=env, preexec_fn=_restore_signals)
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        _remove_netns(ns)


def _restore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove_netns(ns: str) -> None:
    """Kill what is still running in our namespace (only this soak started processes there), then delete it."""
    for _ in range(20):
        r = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True)
        pids = [int(p) for p in r.stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    subprocess.run([IP, "netns", "del", ns], capture_output=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="the short form (12 s, fewer cycles) that `make test` runs")
    ap.add_argument("--duration", type=float, help="seconds of load over all phases (default 60, --short 12)")
    ap.add_argument("--cycles", type=int, help="attach/detach cycles (20)")
    ap.add_argument("--swaps", type=int, help="domain-spec swaps (4)")
    ap.add_argument("--reloads", type=int, help="nginx reloads (10)")
    ap.add_argument("--kills", type=int, help="worker kill -9 per kill run (10)")
    ap.add_argument("--kill-reps", type=int, help="kill runs with numareuse, and as many without (3)")
    ap.add_argument("--watch-restarts", type=int, help="watcher restarts where `numareuse watch` exists (5)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reloads without numareuse")
    ap.add_argument("--only", metavar="KIND,...", help=f"run only these phases, of: {','.join(KINDS)}")
    ap.add_argument("--wrk-timeout", type=float, help="wrk --timeout in seconds (10; wrk's own default is 2)")
    ap.add_argument("--cli", help="the numareuse command to run (default: this checkout's, with this Python)")
    ap.add_argument("--out", default=str(HERE / "soak-results.json"), help="where to write the JSON results")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (nginx, wrk and watcher logs)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--netns", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = os.path.abspath(args.out)
    plan = Plan.short_form() if args.short else Plan()
    for k in ("duration", "cycles", "swaps", "reloads", "kills", "kill_reps", "watch_restarts", "wrk_timeout"):
        v = getattr(args, k)
        if v is not None:
            if v < 0 or (k in ("duration", "wrk_timeout") and v <= 0):
                ap.error(f"--{k.replace('_', '-')} must be positive")
            setattr(plan, k, v)
    if args.no_reference:
        plan.reference = False
    plan.only = tuple(k for k in (args.only or ",".join(KINDS)).split(",") if k)
    bad = set(plan.only) - set(KINDS)
    if bad:
        ap.error(f"--only: unknown phase kind(s) {', '.join(sorted(bad))} (kinds: {', '.join(KINDS)})")
    plan.short = args.short
    return args, plan


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, plan = parse_args(argv)
    if args.inner:
        return inner(args, plan)
    return outer([*argv, "--out", args.out], args)


if __name__ == "__main__":
    sys.exit(main())
