"""How fast ``numareuse watch`` follows a server, and what it costs idle.

    python -m bench.watch [--rounds 5] [--idle 20] [--workers 16] [--out FILE]

Reaction time, from listen() to the socket registered in the pinned maps:

* *new worker*: a master that holds the group's sockets listens on a new
  socket and forks a worker that pins itself to a CPU and polls it (as
  nginx's master does on a reload); the fork is a proc-connector event.
* *new process*: a process unrelated to the group listens on the port and
  polls it; nothing but the poll interval finds it (a TCP listen has no
  event short of a tracing program).

Idle cost: the watcher's CPU time (utime + stime, its attach children
included) over ``--idle`` seconds with a 16-worker nginx it watches and
nothing changing, as a share of one CPU.

Everything is pinned in a private bpffs directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from numareuse import _sys
from numareuse.state import Group, Store

from . import free_port, nginx

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def log(msg: str) -> None:
    print(f"bench.watch: {msg}", file=sys.stderr, flush=True)


def listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def worker(sock: socket.socket, cpu: int) -> int:
    """Fork a worker that pins itself to ``cpu`` and polls ``sock`` until killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.sched_setaffinity(0, {cpu})
            ep = select.epoll()
            ep.register(sock.fileno(), select.EPOLLIN)
            while True:
                for _ in ep.poll():
                    with contextlib.suppress(OSError):
                        sock.accept()[0].close()
        finally:
            os._exit(0)
    return pid


def registered_at(group: Group, cookie: int, timeout: float = 10.0) -> float | None:
    """monotonic time at which ``cookie`` shows in the group's pinned maps (polled every 2 ms)."""
    end = time.monotonic() + timeout
    store = Store()
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            sel = store.open(group.name)
            try:
                if any(r["cookie"] == cookie and r["live"] for r in sel.registrations()):
                    return time.monotonic()
            finally:
                sel.close()
        time.sleep(0.002)
    return None


class Watch:
    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "numareuse.cli.main", "watch", *map(str, args)],
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_line(self, text: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the watcher exited")
            if text in line:
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise RuntimeError(f"no {text!r} from the watcher")

    def _drain(self) -> None:
        """Keep reading the log (a full pipe would stop the watcher); show what went wrong."""
        for line in self.proc.stderr:
            if "error" in line or "waiting" in line:
                log(f"watcher: {line.rstrip()}")

    def cpu_seconds(self) -> float:
        """utime + stime + cutime + cstime of the watcher (its reaped attach children count)."""
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def reaction(rounds: int, interval: float) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    port = free_port()
    first = listener(port)
    kids = [worker(first, cpus[0])]
    group = Group("tcp", 4, "127.0.0.1", port)
    socks = [first]
    w = Watch("--port", port, "--domains", "cpu", "--interval", interval)
    out: dict[str, list[float]] = {"new_worker": [], "new_process": []}
    try:
        w.wait_line("attached")
        for i in range(rounds):
            # a new worker of the watched master
            time.sleep(interval + 0.1)  # away from the poll phase: the event must do it
            t0 = time.monotonic()
            s = listener(port)
            socks.append(s)
            kids.append(worker(s, cpus[(i + 1) % len(cpus)]))
            t = registered_at(group, _sys.sock_cookie(s.fileno()))
            out["new_worker"].append(round(t - t0, 4) if t else float("nan"))
            # an unrelated process: started earlier (its fork event long past), it listens now
            go_r, go_w = os.pipe()
            r, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                os.read(go_r, 1)
                s2 = listener(port)
                os.write(wfd, _sys.sock_cookie(s2.fileno()).to_bytes(8, "little"))
                os.sched_setaffinity(0, {cpus[0]})
                ep = select.epoll()
                ep.register(s2.fileno(), select.EPOLLIN)
                time.sleep(3600)
                os._exit(0)
            kids.append(pid)
            time.sleep(2.5)  # past the fast polls its fork started
            t0 = time.monotonic()
            os.write(go_w, b"x")
            cookie = int.from_bytes(os.read(r, 8), "little")
            for fd in (go_r, go_w, r, wfd):
                os.close(fd)
            t = registered_at(group, cookie)
            out["new_process"].append(round(t - t0, 4) if t else float("nan"))
    finally:
        w.stop()
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        subprocess.run([sys.executable, "-m", "numareuse.cli.main", "detach", "-p", str(port)], capture_output=True)
        for s in socks:
            s.close()
    return out


def idle_cpu(workers: int, seconds: float, interval: float) -> dict:
    d = tempfile.mkdtemp(prefix="bench-watch-nginx-")
    port = free_port()
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(nginx.conf(d, port, workers, connections=256))
    ng = subprocess.Popen([NGINX, "-c", f"{d}/nginx.conf", "-e", f"{d}/error.log"])
    w = None
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.05)
        time.sleep(0.5)
        w = Watch("--port", port, "--domains", "cpu", "--interval", interval)
        w.wait_line("attached")
        time.sleep(2)  # the workers' epoll caches filled, the second pass done
        c0, t0 = w.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        c1, t1 = w.cpu_seconds(), time.monotonic()
        return {"workers": workers, "seconds": round(t1 - t0, 2), "cpu_share": round((c1 - c0) / (t1 - t0), 5)}
    finally:
        if w:
            w.stop()
        subprocess.run([sys.executable, "-m", "numareuse.cli.main", "detach", "-p", str(port)], capture_output=True)
        ng.terminate()
        ng.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="reaction measurements of each kind")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    ap.add_argument("--workers", type=int, default=16, help="nginx workers for the idle measurement")
    ap.add_argument("--interval", type=float, default=0.5, help="the watcher's --interval")
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("needs root")
        return 1
    bpffs = tempfile.mkdtemp(prefix="bench-watch-bpffs-")
    rundir = tempfile.mkdtemp(prefix="bench-watch-run-")
    os.environ["NUMAREUSE_BPFFS"], os.environ["NUMAREUSE_RUNDIR"] = bpffs, rundir
    try:
        log(f"reaction: {args.rounds} rounds")
        react = reaction(args.rounds, args.interval)
        log(f"idle: {args.workers}-worker nginx for {args.idle} s")
        idle = idle_cpu(args.workers, args.idle, args.interval) if os.path.exists(NGINX) else None
    finally:
        subprocess.run(["umount", bpffs], capture_output=True)
        shutil.rmtree(bpffs, ignore_errors=True)
        shutil.rmtree(rundir, ignore_errors=True)
    res = {"interval": args.interval, "reaction_s": react, "idle": idle}
    print("| watch | median | max | target |")
    print("|---|---|---|---|")
    for k, what in (("new_worker", "listen() -> registered, new worker of a watched master (fork event)"),
                    ("new_process", "listen() -> registered, unrelated new process (poll)")):  # fmt: skip
        v = react[k]
        print(f"| {what} | {statistics.median(v):.3f} s | {max(v):.3f} s | < 1 s |")
    if idle:
        print(
            f"| idle CPU, {idle['workers']}-worker nginx, {idle['seconds']} s | {100 * idle['cpu_share']:.2f} % "
            f"of one CPU | | < 1 % |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
