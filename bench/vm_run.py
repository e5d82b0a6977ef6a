"""`make vm-bench`: locality on real NUMA nodes, numareuse against simpler peers.

Where every CPU has its own socket, SO_INCOMING_CPU already keeps each
connection on its CPU. numareuse's edge is a NUMA node wider than its sockets
(fewer workers than CPUs on a node): SO_INCOMING_CPU then falls back to the
group's hash for the CPUs without a socket. This measures that on real NUMA
nodes: one qemu guest per layout (vm/run.sh; 2 nodes x 2 CPUs, 4 nodes x 2
CPUs), and inside it, in one process, for one and for two workers per node
(and for two once each node's first worker has exited, as a crashed or
restarting worker leaves it), the share of connections served by a socket of
the packet's node with

* ``kernel_hash``: no program, no socket option: the kernel's hash;
* ``so_incoming_cpu``: each worker's socket set to a CPU of its node (worker j
  of a node to its j-th CPU; kernel 6.2+, backported to Debian's 6.1);
* ``selftest_minimal``: Linux's reuseport_bpf_numa.c idea as an SK_REUSEPORT
  program, sockarray index = ``bpf_get_numa_node_id()``: one slot per node, so
  with two workers per node the second one's socket is never selected;
* ``numareuse``: ``Selector(domains="numa")``, every socket registered in its
  worker's node.

A worker here is its listening socket (the one a pinned worker of a
SO_REUSEPORT pre-fork server polls); connections are queued and drained, not
served by processes. Clients are pinned to every CPU in turn: over loopback a
SYN is processed on the client's CPU, which is checked on every connection
(the accepted socket's SO_INCOMING_CPU). Counts are bounded (``--per-cpu``).
Emulated CPUs (qemu TCG) make absolute times meaningless: only locality
shares and their ratios are reported.

Run on the host, it boots the guests, reads each guest's result line from the
serial console, writes bench/vm-results.json and prints a markdown table.
``--guest`` is the part that runs inside a guest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import git_commit, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
T0 = time.monotonic()
MARK = "numareuse-vm-bench-result "  # the guest's one result line on the serial console
LAYOUTS = {"2x2": "0-1;2-3", "4x2": "0-1;2-3;4-5;6-7"}  # VM_NODES: CPU lists per node
MODES = ("kernel_hash", "so_incoming_cpu", "selftest_minimal", "numareuse")
TITLES = {
    "kernel_hash": "kernel hash",
    "so_incoming_cpu": "SO_INCOMING_CPU",
    "selftest_minimal": "selftest-style minimal",
    "numareuse": "numareuse",
}
# (key, workers per node, whether each node's first worker has exited before the clients run)
CONFIGS = (("1", 1, False), ("2", 2, False), ("2-exited", 2, True))


def log(msg: str) -> None:
    print(f"[vm-bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- inside the guest ----------------------------------------------------------


def served(cpu: int, port: int, socks, n: int, wl, so_incoming_cpu: int) -> tuple[list[int], int]:
    """n connections from a client pinned to ``cpu``: (accepted per socket, connections not processed on ``cpu``)."""
    counts, elsewhere = [0] * len(socks), 0
    clients = []
    with wl.pinned(cpu):
        try:
            for _ in range(n):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                clients.append(c)
                c.settimeout(10)
                c.connect((wl.HOST, port))
            for i, s in enumerate(socks):
                s.setblocking(False)
                for _ in range(wl.BACKLOG + 1):  # bounded: a backlog holds at most BACKLOG
                    try:
                        a, _addr = s.accept()
                    except BlockingIOError:
                        break
                    elsewhere += a.getsockopt(socket.SOL_SOCKET, so_incoming_cpu) != cpu
                    wl._rst_close(a)
                    counts[i] += 1
        finally:
            for c in clients:
                wl._rst_close(c)
    return counts, elsewhere


def guest(args) -> int:
    from numareuse import Selector, _sys, topology

    from . import workload as wl
    from .programs import NodeMinimal

    if os.geteuid() != 0:
        sys.exit("vm-bench: the guest part needs root")
    nodes = {n: cpus for n, cpus in topology.numa_nodes().items() if cpus}
    booted = os.environ.get("NUMAREUSE_VM_NODES")
    if booted and [_sys.parse_cpulist(p) for p in booted.split(";") if p] != list(nodes.values()):
        sys.exit(f"vm-bench: booted with nodes {booted!r}, the kernel reports {nodes}")
    if len(nodes) < 2:
        sys.exit(f"vm-bench: needs >= 2 NUMA nodes with CPUs, this machine has {nodes}")
    node_ids = sorted(nodes)
    node_of = {c: n for n, cpus in nodes.items() for c in cpus}
    cpus = sorted(node_of)
    log(f"guest: kernel {platform.release()}, nodes {nodes}; {args.per_cpu} connections per CPU per arm")
    t = time.monotonic()
    sel = Selector("numa")
    base = NodeMinimal(max(node_ids) + 1)
    log(f"guest: numareuse and the minimal program compiled and loaded in {time.monotonic() - t:.1f} s")
    res: dict = {
        "kernel": platform.release(),
        "nodes": {str(n): c for n, c in nodes.items()},
        "per_cpu": args.per_cpu,
        "arms": {},
    }
    try:
        for key, k, exited in CONFIGS:
            for mode in MODES:
                res["arms"][f"{key}/{mode}"] = arm(
                    k, exited, mode, nodes, node_ids, node_of, cpus, sel, base, args, wl, _sys
                )
    finally:
        base.close()
        sel.close()
    res["guest_s"] = round(time.monotonic() - T0, 1)
    print(MARK + json.dumps(res, separators=(",", ":"), sort_keys=True), flush=True)
    return 0


def arm(k, exited, mode, nodes, node_ids, node_of, cpus, sel, base, args, wl, _sys) -> dict:
    """One contender with k workers (sockets) per node: connections from every CPU, where they landed.

    ``exited``: each node's first worker closes its socket after the set-up (a
    worker that crashed or is being restarted), the one the minimal program
    holds; nothing sweeps the selector's maps afterwards.
    """
    socks, port = wl.group(k * len(node_ids))
    sock_node = [node_ids[i // k] for i in range(len(socks))]
    worker_cpu = [nodes[sock_node[i]][(i % k) % len(nodes[sock_node[i]])] for i in range(len(socks))]
    before = None
    try:
        if mode == "so_incoming_cpu":
            for s, cpu in zip(socks, worker_cpu):
                s.setsockopt(socket.SOL_SOCKET, _sys.SO_INCOMING_CPU, cpu)
        elif mode == "selftest_minimal":
            for i, s in enumerate(socks):
                if i % k == 0:  # a node's slot holds one socket: its first worker's
                    base.place(sock_node[i], s)
            _sys.attach_reuseport_prog(socks[0].fileno(), base.prog_fd)
        elif mode == "numareuse":
            sel.attach(socks[0])
            for s, n in zip(socks, sock_node):
                sel.register(s, n)
            before = sel.stats()
        live = list(range(len(socks)))
        if exited:
            live = [i for i in live if i % k]
            for i in range(0, len(socks), k):
                socks[i].close()
        per_sock = [0] * len(socks)
        per_cpu_local, elsewhere, local_total = {}, 0, 0
        for cpu in cpus:
            got, off = served(cpu, port, [socks[i] for i in live], args.per_cpu, wl, _sys.SO_INCOMING_CPU)
            elsewhere += off
            counts = [0] * len(socks)
            for i, c in zip(live, got):
                counts[i] = c
            per_sock = [a + b for a, b in zip(per_sock, counts)]
            local = sum(c for c, n in zip(counts, sock_node) if n == node_of[cpu])
            per_cpu_local[str(cpu)] = local / sum(counts)
            local_total += local
        counters = None
        if before is not None:
            counters = {key: v - before[key] for key, v in sel.stats().items()}
            sel.detach()
            sel.clear()
        elif mode == "selftest_minimal":
            base.clear()
    finally:
        wl.close_all(socks)
    total = sum(per_sock)
    with_worker = {worker_cpu[i] for i in live}
    out = {
        "workers_per_node": k,
        "first_worker_exited": exited,
        "locality": local_total / total,
        "locality_cpus_with_a_worker": _mean([per_cpu_local[str(c)] for c in cpus if c in with_worker]),
        "locality_cpus_without_a_worker": _mean([per_cpu_local[str(c)] for c in cpus if c not in with_worker]),
        "per_cpu_locality": per_cpu_local,
        "per_socket": per_sock,
        "socket_node": sock_node,
        "socket_cpu": worker_cpu,
        "sockets_idle": sum(1 for i in live if per_sock[i] == 0),
        "sockets_live": len(live),
        "connections": total,
        "not_processed_on_client_cpu": elsewhere,
    }
    if counters is not None:
        out["program_counters"] = counters
    log(
        f"guest: {k}/node{' (first exited)' if exited else ''} {mode:16s} locality {out['locality']:.3f} "
        f"(CPUs with a worker {_fmt(out['locality_cpus_with_a_worker'])}, "
        f"without {_fmt(out['locality_cpus_without_a_worker'])}); per socket {per_sock}"
        + (f"; counters {counters}" if counters else "")
    )
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


# -- on the host -----------------------------------------------------------------


def run_guest(name: str, nodes: str, args) -> dict:
    """Boot one guest with VM_NODES=nodes, run the guest part in it; its result."""
    cmd = [str(REPO / "vm" / "run.sh"), sys.executable, "-m", "bench.vm_run", "--guest", "--per-cpu", str(args.per_cpu)]
    env = {k: v for k, v in os.environ.items() if k != "VM_SMP"}
    env["VM_NODES"] = nodes
    log(f"{name}: booting a guest with NUMA nodes {nodes}")
    t = time.monotonic()
    result = None
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            line = line.rstrip("\n")
            if line.startswith(MARK):
                result = json.loads(line[len(MARK) :])
            else:
                print(line, file=sys.stderr, flush=True)
    if p.returncode != 0 or result is None:
        raise SystemExit(f"vm-bench: the {name} guest failed (vm/run.sh exit status {p.returncode})")
    result["wall_s"] = round(time.monotonic() - t, 1)
    log(f"{name}: done in {result['wall_s']} s (host wall clock, boot included)")
    return result


def markdown(layouts: dict) -> str:
    peers = ", ".join(TITLES[m] for m in MODES[:-1])
    head = "| guest | workers | " + " | ".join(TITLES[m] for m in MODES) + f" | numareuse ÷ ({peers}) |"
    out = [head, "|" + "---|" * (len(MODES) + 3)]
    for r in layouts.values():
        nn = len(r["nodes"])
        per = len(next(iter(r["nodes"].values())))
        for key, k, exited in CONFIGS:
            arms = {m: r["arms"][f"{key}/{m}"] for m in MODES}
            cells = []
            for m in MODES:
                a = arms[m]
                cell = f"{a['locality']:.2f}"
                if a["sockets_idle"]:
                    cell += f" ({a['sockets_idle']} of {a['sockets_live']} workers idle)"
                cells.append(cell)
            nr = arms["numareuse"]["locality"]
            ratios = ", ".join(f"{nr / arms[m]['locality']:.2f}" for m in MODES[:-1])
            workers = f"{k}/node" + (", then the first of each node exits" if exited else "")
            out.append(f"| {nn} nodes x {per} CPUs | {workers} | " + " | ".join(cells) + f" | {ratios} |")
    return "\n".join(out)


def host(args) -> int:
    layouts = {}
    for name in args.layouts:
        layouts[name] = run_guest(name, LAYOUTS[name], args)
    for name, r in layouts.items():
        bad = {key: n for key, a in r["arms"].items() if (n := a["not_processed_on_client_cpu"])}
        if bad:
            log(f"WARNING {name}: connections not processed on their client's CPU: {bad}")
    res = {
        "layouts": layouts,
        "meta": {
            "commit": git_commit(),
            "per_cpu": args.per_cpu,
            "duration_s": round(time.monotonic() - T0, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "qemu TCG guests: locality shares and ratios only, no times",
        },
    }
    write_json(args.out, res)
    log(f"wrote {args.out} in {res['meta']['duration_s']} s")
    print(
        "Share of connections served by a worker of the packet's NUMA node "
        f"({args.per_cpu} connections from a client pinned to each CPU in turn; qemu TCG guests):\n"
    )
    print(markdown(layouts))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", action="store_true", help="the part that runs inside a guest")
    ap.add_argument("--per-cpu", type=int, default=300, help="connections from each CPU per arm (default 300)")
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="guests to boot")
    ap.add_argument("--out", default=str(HERE / "vm-results.json"), help="where to write the JSON results")
    args = ap.parse_args(argv)
    if not 1 <= args.per_cpu <= 1000:
        ap.error("--per-cpu must be within 1..1000 (one batch fits an accept queue)")
    with contextlib.suppress(AttributeError):
        sys.stdout.reconfigure(line_buffering=True)
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
