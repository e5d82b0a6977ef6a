"""Errors under pre-fork recycling: workers that each own a SO_REUSEPORT socket and exit after N requests.

A small HTTP server in gunicorn's model (``--reuse-port --max-requests``):
the master holds no listener; each worker, pinned to a CPU, creates its own
listening socket, serves ``--max-requests`` requests and exits (its socket
closes with it); the master spawns a replacement. When a listener closes,
connections in its accept queue and handshakes in flight to it are reset,
unless they migrate. Three cases, each under
``wrk -t2 -c16 -d15s -H 'Connection: close'`` (every request a new connection):

* ``kernel_hash``: no program, net.ipv4.tcp_migrate_req=0;
* ``kernel_hash_migrate``: no program, net.ipv4.tcp_migrate_req=1 (the kernel
  migrates to a socket its hash picks);
* ``numareuse``: the program attached (SELECT_OR_MIGRATE), each worker
  registered in its CPU's domain, and before it exits each worker drains its
  socket (Selector.drain) while it keeps accepting.

The server and wrk run inside a network namespace the bench creates (the
sysctl is per namespace): the root namespace is never changed.

    python -m bench.recycle serve --port P --workers 4 --max-requests 1000 --mode numareuse
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from . import log, rsts
from .release import REPO

HOST = "127.0.0.1"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok\n"
CASES = ("kernel_hash", "kernel_hash_migrate", "numareuse")
# the namespace's counters that say where a connection was lost (deltas over the wrk run)
NSTAT = (
    "TcpAttemptFails",
    "TcpEstabResets",
    "TcpOutRsts",
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpExtTCPMigrateReqSuccess",
    "TcpExtTCPMigrateReqFailure",
    "TcpExtTCPAbortOnClose",
    "TcpExtTCPReqQFullDrop",
)


# -- the server (runs inside the namespace) ---------------------------------------


def _handle(c: socket.socket) -> None:
    try:
        c.setblocking(True)
        c.settimeout(2)
        buf = b""
        while b"\r\n\r\n" not in buf and len(buf) < 65536:
            chunk = c.recv(4096)
            if not chunk:
                return
            buf += chunk
        c.sendall(RESPONSE)
    except OSError:
        pass
    finally:
        c.close()


def _worker(port: int, cpu: int, max_requests: int, backlog: int, sel, ready_fd: int | None) -> None:
    os.sched_setaffinity(0, {cpu})

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((HOST, port))
    s.listen(backlog)
    s.setblocking(False)
    if sel is not None:
        from numareuse import CURRENT

        t0 = time.monotonic()
        sel.attach(s)  # the group may be new (every earlier socket closed): the program goes with it
        sel.register(s, CURRENT)
        _debug(f"pid {os.getpid()} cpu {cpu}: registered in {time.monotonic() - t0:.3f} s")
    if ready_fd is not None:
        os.write(ready_fd, b".")
        os.close(ready_fd)
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN)
    served, drainer = 0, None
    while True:
        if served >= max_requests and drainer is None:
            if sel is None:
                break  # gunicorn: stop accepting, close the listener, exit
            # stop new connections coming here, keep accepting until the queue is empty
            drainer = threading.Thread(target=sel.drain, args=(s,), kwargs={"timeout": 5.0, "grace": 0.1})
            drainer.start()
            t_drain = time.monotonic()
        if drainer is not None and not drainer.is_alive():
            _debug(f"pid {os.getpid()} cpu {cpu}: drained in {time.monotonic() - t_drain:.3f} s, served {served}")
            break
        for _fd, _ev in ep.poll(0.02):
            for _ in range(64):
                try:
                    c, _addr = s.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    break
                _handle(c)
                served += 1
    s.close()
    os._exit(0)


def _debug(msg: str) -> None:
    if os.environ.get("BENCH_RECYCLE_DEBUG"):
        print(f"{time.monotonic():.3f} {msg}", file=sys.stderr, flush=True)


def _monitor(sel) -> None:
    """BENCH_RECYCLE_DEBUG=1: log each change of the registered sockets by domain, with the counters."""
    last = None
    while True:
        try:
            regs = sel.registrations()
            st = sel.stats()
        except Exception as e:  # noqa: BLE001
            _debug(f"monitor: {e}")
            time.sleep(0.01)
            continue
        live = {}
        for r in regs:
            live.setdefault(r["domain"], []).append(int(r["live"]))
        now = tuple(sorted((k, tuple(v)) for k, v in live.items()))
        if now != last:
            _debug(f"monitor: live by domain {now}, fallback {st['fallback']} remote {st['remote']}")
            last = now
        time.sleep(0.002)


class _Stop(Exception):
    pass


def serve(args) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    sel = None
    if args.mode == "numareuse":
        from numareuse import Selector

        sel = Selector(";".join(map(str, cpus)))
    slots: dict[int, int] = {}  # pid -> worker index
    respawned = 0

    def spawn(i: int, ready_fd: int | None) -> None:
        pid = os.fork()
        if pid == 0:
            random.seed(os.getpid())
            try:
                limit = args.max_requests + random.randint(0, args.max_requests_jitter)
                _worker(args.port, cpus[i % len(cpus)], limit, args.backlog, sel, ready_fd)
            finally:
                os._exit(1)
        slots[pid] = i

    def stop(*_):
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    r, w = os.pipe()
    for i in range(args.workers):
        spawn(i, w)
    os.close(w)
    got = b""
    while len(got) < args.workers:
        chunk = os.read(r, 64)
        if not chunk:
            break
        got += chunk
    os.close(r)
    print("ready", flush=True)
    if sel is not None and os.environ.get("BENCH_RECYCLE_DEBUG"):
        threading.Thread(target=_monitor, args=(sel,), daemon=True).start()
    try:
        while True:
            pid, _status = os.wait()
            i = slots.pop(pid, None)
            if i is not None:
                respawned += 1
                spawn(i, None)
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for pid in slots:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in slots:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    out = {"respawned": respawned}
    if sel is not None:
        out["counters"] = sel.stats()
        out["migration"] = sel.migration
        sel.close()
    print(json.dumps(out), flush=True)
    return 0


# -- the driver (runs in the bench) ---------------------------------------------------


def parse_wrk(text: str) -> dict:
    """Requests and errors from wrk's report."""
    out = {"requests": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0, "non_2xx": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    if m:
        out["requests"] = int(m.group(1))
        out["seconds"] = float(m.group(2)) * (0.001 if m.group(3) == "ms" else 1)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    out["errors"] = out["connect"] + out["read"] + out["write"] + out["timeout"] + out["non_2xx"]
    return out


class Netns:
    """A network namespace of the bench's own (loopback up), deleted at the end."""

    def __init__(self):
        self.name = f"numareuse-bench-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def cmd(self, *args) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, args)]

    def run(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), check=True, capture_output=True, text=True, timeout=timeout)

    def sysctl(self, name: str, value: int) -> None:
        self.run("sysctl", "-q", "-w", f"{name}={value}")

    def nstat(self) -> dict[str, int]:
        """The namespace's SNMP/netstat counters (absolute)."""
        r = subprocess.run(self.cmd("nstat", "-asz", "--json"), capture_output=True, text=True, timeout=30)
        try:
            return {k: int(v) for k, v in json.loads(r.stdout)["kernel"].items()}
        except (ValueError, KeyError, TypeError):
            return {}

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _one_case(ns: Netns, case: str, port: int, config: dict, seconds: float, census=None) -> dict:
    ns.sysctl("net.ipv4.tcp_migrate_req", 1 if case == "kernel_hash_migrate" else 0)
    mode = "numareuse" if case == "numareuse" else "hash"
    cmd = [sys.executable, "-m", "bench.recycle", "serve", "--port", port, "--mode", mode]
    cmd += ["--workers", config["workers"], "--max-requests", config["max_requests"]]
    cmd += ["--max-requests-jitter", config["jitter"]]
    srv = subprocess.Popen(ns.cmd(*cmd), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"bench.recycle server ({case}) did not start: {line!r}")
        before = ns.nstat()
        rst0 = census.snapshot() if census else {}
        wrk = subprocess.run(
            ns.cmd("wrk", "-t2", "-c16", f"-d{seconds}s", "-H", "Connection: close", f"http://{HOST}:{port}/"),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        after = ns.nstat()
        rst1 = census.snapshot() if census else {}
        srv.send_signal(signal.SIGTERM)
        out, _ = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    got = parse_wrk(wrk.stdout)
    tail = [ln for ln in out.splitlines() if ln.startswith("{")]
    got.update(json.loads(tail[-1]) if tail else {})
    got["nstat"] = {k: after[k] - before.get(k, 0) for k in NSTAT if k in after}
    # every RST by the kernel path that sent it (bench/rsts.py): which losses migration could not prevent
    # (wrk's own teardown at the end of its run is in the window: its open connections, "close")
    got["rst_paths"] = census.delta(rst0, rst1)["paths"] if census else None
    got["errors_per_100k"] = 1e5 * got["errors"] / got["requests"] if got["requests"] else None
    c = got.get("counters")
    if c:
        migrated = sum(c[k] for k in ("migrated_local", "migrated_wildcard", "migrated_remote", "migrated_fallback"))
        got["migrated"] = migrated
        got["migrated_locality"] = c["migrated_local"] / migrated if migrated else None
        sel_total = sum(c[k] for k in ("local", "wildcard", "remote", "fallback"))
        got["locality"] = c["local"] / sel_total if sel_total else None
    return got


def measure_recycling(cpus, plan, res) -> None:
    """Every configuration of ``plan.recycle_configs`` under the three cases, in one namespace."""
    ns = Netns()
    try:
        census = rsts.RstCensus()
    except Exception as e:  # the figures stand without it; only the paths of the resets go unnamed
        census = None
        log(f"recycling: RSTs not told apart by kernel path ({type(e).__name__}: {e})")
    out = {"wrk": f"-t2 -c16 -d{plan.recycle_seconds}s -H 'Connection: close'", "configs": []}
    port = 8080
    try:
        for config in plan.recycle_configs:
            conf = dict(config)
            for case in CASES:
                port += 1
                conf[case] = got = _one_case(ns, case, port, config, plan.recycle_seconds, census)
                extra = ""
                if "counters" in got:
                    c = got["counters"]
                    extra = (
                        f"; migrated {got['migrated']} (local {c['migrated_local']}, unowned "
                        f"{c['migrated_unowned']}), selections local {c['local']} remote {c['remote']} "
                        f"fallback {c['fallback']}"
                    )
                log(
                    f"recycling {config['name']}, {case}: {got['errors']} errors in {got['requests']} requests "
                    f"({got['errors_per_100k'] or 0:.1f} per 100k; connect {got['connect']} read {got['read']} "
                    f"write {got['write']} timeout {got['timeout']}), {got.get('respawned')} workers "
                    f"recycled{extra}; netstat {got['nstat']}; RSTs by kernel path {got['rst_paths']}"
                )
            out["configs"].append(conf)
    finally:
        ns.close()
        if census is not None:
            census.close()
    res["recycling"] = out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the recycling server (inside a namespace)")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--max-requests", type=int, default=1000)
    s.add_argument("--max-requests-jitter", type=int, default=0, help="each worker's limit: + randint(0, this)")
    s.add_argument("--backlog", type=int, default=2048, help="listen() backlog (gunicorn's default)")
    s.add_argument("--mode", choices=("hash", "numareuse"), default="hash")
    args = ap.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
