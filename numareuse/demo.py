"""``make demo``: the bundled pre-fork server under pinned client load, before and after numareuse.

Starts ``python -m numareuse.examples.prefork`` on loopback with one worker per CPU,
pinned like nginx's ``worker_cpu_affinity auto``, first with the kernel's
default SO_REUSEPORT balancing (``--no-numareuse``) and then with numareuse,
and runs the same client load against each: client processes pinned to each
CPU with sched_setaffinity, one new connection per request. Over loopback a
client's SYN is processed on the client's CPU, so that CPU's domain is the
domain that "received" the connection, and each answer says which worker
and domain served it. With one NUMA node the demo uses virtual domains, one
per CPU, and says so.

Why Python clients and not wrk: wrk cannot pin per CPU inside one run, keeps
its few connections open (so only a handful of steering decisions happen),
and does not report which worker answered. Here every request is a new
connection, hence a new steering decision, and every answer is counted by
domain exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

from . import _sys, topology

HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
MAX_REQUESTS = 200_000  # per client process: a bound besides the duration


def _client_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the demo process cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool.terminate() ends a client quietly


def _client(args: tuple[int, int, float]) -> dict:
    """Pinned to ``cpu``: requests on new connections for ``duration`` s; counts answers by domain."""
    cpu, port, duration = args
    os.sched_setaffinity(0, {cpu})
    served: dict[str, int] = {}
    errors, n = 0, 0
    start = time.monotonic()
    end = start + duration
    while time.monotonic() < end and n < MAX_REQUESTS:
        n += 1
        try:
            with socket.create_connection((HOST, port), timeout=5) as c:
                c.sendall(REQUEST)
                data = b""
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            m = re.search(rb"\r\nX-Worker-Domain: (\S+)\r\n", data)
            if not data.startswith(b"HTTP/1.1 200") or not m:
                errors += 1
                continue
            d = m.group(1).decode()
            served[d] = served.get(d, 0) + 1
        except OSError:
            errors += 1
    return {"cpu": cpu, "served": served, "errors": errors, "elapsed": time.monotonic() - start}


def _set_pdeathsig() -> None:
    # the server dies with the demo even if the demo is SIGKILLed (PR_SET_PDEATHSIG)
    _sys.set_pdeathsig(signal.SIGTERM)


class _Server:
    """The pre-fork server as a child in its own session (Ctrl-C reaches only the demo, which stops it)."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "numareuse.examples.prefork", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,  # the demo has no other threads when it starts a server
        )
        self.output = ""

    def _read_until(self, pattern: str, timeout: float) -> re.Match | None:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                m = re.search(pattern, self.output, re.M)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return re.search(pattern, self.output, re.M)
                self.output += chunk.decode(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> int:
        m = self._read_until(r"^ready port=(\d+)", timeout)
        if m is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.output.strip())
        return int(m.group(1))

    def workers(self) -> list[str]:
        return sorted(re.findall(r"^worker \d+ pid=\d+ cpus=\S+ domain=\S+ registered=\S+", self.output, re.M))

    def stop(self) -> dict[str, int]:
        """SIGTERM, wait; SIGKILL the whole session if it does not stop. Returns the program's counters."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._read_until(r"^stopped", 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers included; nothing is left behind
        self.proc.wait()
        self.proc.stdout.close()
        m = re.search(r"^stats (.*)$", self.output, re.M)
        return dict((k, int(v)) for k, v in (kv.split("=") for kv in m.group(1).split())) if m else {}


def _run_load(pool, cpus: list[int], per_cpu: int, port: int, duration: float) -> list[dict]:
    jobs = [(cpu, port, duration) for cpu in cpus for _ in range(per_cpu)]
    return pool.map_async(_client, jobs).get(timeout=duration + 60)


def _summary(results: list[dict], topo: topology.Topology) -> dict:
    served: dict[str, int] = {}
    local = total = errors = 0
    for r in results:
        mine = str(topo.cpu_domain.get(r["cpu"]))
        for d, n in r["served"].items():
            served[d] = served.get(d, 0) + n
            total += n
            local += n if d == mine else 0
        errors += r["errors"]
    elapsed = max((r["elapsed"] for r in results), default=1.0)
    return {"served": served, "local": local, "total": total, "errors": errors, "rps": total / elapsed}


def _table(cols: list[tuple[str, dict, dict]], topo: topology.Topology) -> str:
    rows = []
    for d, cpus in enumerate(topo.domains):
        if cpus:
            label = f"requests served by domain {d} (CPU {','.join(map(str, cpus))})"
            rows.append((label, [f"{s['served'].get(str(d), 0)}" for _, s, _ in cols]))
    rows.append(
        ("served on the local domain", [f"{100.0 * s['local'] / max(s['total'], 1):.1f} %" for _, s, _ in cols])
    )
    rows.append(("requests/s", [f"{s['rps']:.0f}" for _, s, _ in cols]))
    rows.append(("errors", [f"{s['errors']}" for _, s, _ in cols]))
    rows.append(
        (
            "program: local / wildcard / fallback",
            [f"{st['local']} / {st['wildcard']} / {st['fallback']}" if st else "-" for _, _, st in cols],
        )
    )
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(name), *(len(r[1][i]) for r in rows)) for i, (name, _, _) in enumerate(cols)]
    out = ["  " + " " * w0 + "".join(f"  {name:>{w}}" for (name, _, _), w in zip(cols, widths))]
    for label, vals in rows:
        out.append("  " + f"{label:<{w0}}" + "".join(f"  {v:>{w}}" for v, w in zip(vals, widths)))
    return "\n".join(out)


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m numareuse.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=4.0, help="seconds of load per run (default 4)")
    p.add_argument("--clients-per-cpu", type=int, default=2, help="client processes pinned to each CPU (default 2)")
    p.add_argument("--domains", help="domain spec (default: numa with several nodes, else cpu)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("Error: demo: needs root (CAP_BPF, CAP_NET_ADMIN to load and attach the program)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.monotonic()
    cpus = sorted(os.sched_getaffinity(0))
    nodes = [n for n, c in topology.numa_nodes().items() if c]
    domains = a.domains or ("numa" if len(nodes) > 1 else "cpu")
    topo = topology.parse(domains)
    print(f"numareuse demo: {len(cpus)} CPUs, {len(nodes)} NUMA node{'s' if len(nodes) != 1 else ''}", flush=True)
    if a.domains is None and len(nodes) <= 1:
        print(
            "  this machine has one NUMA node, so the demo uses VIRTUAL domains, one per CPU (--domains cpu):\n"
            "  the same program and maps, with each CPU standing in for a node. With several nodes it uses\n"
            "  --domains numa.",
            flush=True,
        )
    doms = "; ".join(f"domain {d} = CPU {','.join(map(str, c))}" for d, c in enumerate(topo.domains) if c)
    print(f"  domains ({domains}): {doms}")
    server_args = ["--host", HOST, "--port", "0", "--workers", str(len(cpus)), "--affinity", "auto"]
    server_args += ["--domains", domains]
    print(f"  server: python -m numareuse.examples.prefork {' '.join(server_args)} [--no-numareuse]")
    print(
        f"  load:   {a.clients_per_cpu} client processes pinned to each CPU, a new connection per request, "
        f"{a.duration:g} s per run",
        flush=True,
    )
    runs = [("kernel default", ["--no-numareuse"]), ("numareuse", [])]
    cols = []
    server = pool = None
    try:
        for i, (name, extra) in enumerate(runs, 1):
            print(f"\n[{i}/{len(runs)}] {name}{' (--no-numareuse: the kernel hash picks the socket)' if extra else ''}")
            server = _Server(server_args + extra)
            port = server.wait_ready()
            for w in server.workers():
                print(f"  {w}")
            print(f"  server ready on {HOST}:{port}; load for {a.duration:g} s ...", flush=True)
            pool = multiprocessing.get_context("fork").Pool(len(cpus) * a.clients_per_cpu, _client_init)
            results = _run_load(pool, cpus, a.clients_per_cpu, port, a.duration)
            pool.close()
            pool.join()
            pool = None
            stats = server.stop()
            server = None
            s = _summary(results, topo)
            share = 100.0 * s["local"] / max(s["total"], 1)
            print(f"  {s['total']} requests, {share:.1f} % on the local domain, {s['errors']} errors; server stopped")
            cols.append((name, s, stats))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything the demo started", file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, multiprocessing.TimeoutError) as e:
        print(f"Error: demo: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if pool is not None:
            pool.terminate()
            pool.join()
        if server is not None:
            server.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print("\nresults (local = answered by a worker of the domain whose CPU received the connection):")
    print(_table(cols, topo))
    print(
        "\n  requests/s: Python clients and a Python server sharing the same CPUs; compare the columns,\n"
        "  not with nginx, and expect other load on the machine to move them (the local share does not\n"
        "  move). The program's counters: local = picked in the packet's domain, fallback = left to\n"
        "  the kernel's hash."
    )
    print(f"\ndemo took {time.monotonic() - t0:.1f} s; every process it started has stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
