"""Controller-side measurements in a fresh process, under whichever numareuse is first on sys.path.

    python -P bench/probe.py MODE '{json args}'    (bench/release.py runs it)

Only the public API that the layout-1 release has too (Selector, attach,
register, unregister, close) and the standard library are used, so the same
script measures the previous release and this one. Prints one JSON line.

Modes:
  selector  RSS of this process after ``import numareuse``, after a first
            Selector() and after a second; the time of each; whether LLVM
            (bcc's compiler) is mapped in the process.
  register  register / unregister times into one region (capacity 1024)
            holding a given number of sockets.
  attach    Selector() + attach + register every socket of a new group.
  select    ns per selection from the kernel's accounting (the caller turns
            kernel.bpf_stats_enabled on) at a few group sizes.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import statistics
import struct
import sys
import time

HOST = "127.0.0.1"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def llvm_mapped() -> bool:
    with open("/proc/self/maps") as f:
        return any("libLLVM" in line or "libclang" in line for line in f)


def program_size(prog_fd: int) -> dict:
    """Instructions of the loaded program and how many the verifier processed (struct bpf_prog_info)."""
    try:
        from numareuse import _sys  # private, but the same in both releases

        raw = _sys.obj_info(prog_fd, 232)
    except (ImportError, AttributeError, OSError):
        return {}
    xlated = int.from_bytes(raw[20:24], "little") // 8
    return {"xlated_insns": xlated, "verified_insns": int.from_bytes(raw[216:220], "little")}


def group(n: int, backlog: int = 8) -> list[socket.socket]:
    """n listening sockets of one new SO_REUSEPORT group on 127.0.0.1."""
    out: list[socket.socket] = []
    port = 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((HOST, port))
        s.listen(backlog)
        port = s.getsockname()[1]
        out.append(s)
    return out


def close_all(socks) -> None:
    for s in socks:
        s.close()


def summary_us(ns: list[int]) -> dict:
    us = sorted(v / 1000 for v in ns)
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "p99_us": us[min(len(us) - 1, int(0.99 * len(us)))],
        "mean_us": statistics.fmean(us),
        "max_us": us[-1],
    }


def mode_selector(a: dict) -> dict:
    rss_start = rss_kib()
    import numareuse

    rss_import = rss_kib()
    t = time.perf_counter()
    sel = numareuse.Selector(a["spec"], capacity=a["capacity"])
    first_s = time.perf_counter() - t
    rss_first = rss_kib()
    llvm = llvm_mapped()
    size = program_size(sel.prog_fd)
    sel.close()
    t = time.perf_counter()
    sel = numareuse.Selector(a["spec"], capacity=a["capacity"])
    again_s = time.perf_counter() - t
    rss_again = rss_kib()
    llvm_again = llvm_mapped()
    sel.close()
    return {
        "rss_start_kib": rss_start,
        "rss_import_kib": rss_import,
        "rss_first_kib": rss_first,
        "rss_again_kib": rss_again,
        "first_s": first_s,
        "again_s": again_s,
        "llvm_mapped": llvm,
        "llvm_mapped_again": llvm_again,
        **size,
    }


def mode_register(a: dict) -> dict:
    import numareuse

    fills = sorted(a["fills"])
    rng = random.Random(a.get("seed", 1))
    socks = group(fills[-1] + 2)
    sel = numareuse.Selector(a["spec"], capacity=a["capacity"])
    out = {}
    try:
        sel.attach(socks[0])
        members: list[socket.socket] = []
        spare = list(reversed(socks))
        for fill in fills:
            while len(members) < fill:
                s = spare.pop()
                sel.register(s, 0)
                members.append(s)
            reg, unreg = [], []
            for _ in range(a["reps"]):
                # register one socket into a region holding `fill`, then unregister a random one of
                # the fill + 1 (the region's tail moves into its hole): the region holds `fill` again
                x = spare.pop()
                t = time.perf_counter_ns()
                sel.register(x, 0)
                reg.append(time.perf_counter_ns() - t)
                members.append(x)
                y = members.pop(rng.randrange(len(members)))
                t = time.perf_counter_ns()
                sel.unregister(y)
                unreg.append(time.perf_counter_ns() - t)
                spare.append(y)
            out[str(fill)] = {"register": summary_us(reg), "unregister": summary_us(unreg)}
    finally:
        sel.close()
        close_all(socks)
    return {"fills": out}


def mode_attach(a: dict) -> dict:
    import numareuse

    nd = a["ndomains"]
    caps = {str(n): a["capacity"][str(n)] for n in a["sizes"]}
    for cap in sorted(set(caps.values())):  # warm-up: bcc imported (layout 1), programs cached (layout 2)
        numareuse.Selector(a["spec"], capacity=cap).close()
    out = {}
    for n in a["sizes"]:
        total, build = [], []
        for _ in range(a["reps"]):
            socks = group(n)
            try:
                t0 = time.perf_counter()
                sel = numareuse.Selector(a["spec"], capacity=caps[str(n)])
                t1 = time.perf_counter()
                sel.attach(socks[0])
                for i, s in enumerate(socks):
                    sel.register(s, i % nd)
                t2 = time.perf_counter()
                sel.close()
            finally:
                close_all(socks)
            total.append(t2 - t0)
            build.append(t1 - t0)
        out[str(n)] = {
            "capacity": caps[str(n)],
            "seconds": statistics.median(total),
            "selector_s": statistics.median(build),
            "register_all_s": statistics.median(t - b for t, b in zip(total, build)),
            "runs": total,
        }
    return {"sizes": out}


LINGER_RST = struct.pack("ii", 1, 0)


def _connections(cpu: int, port: int, socks, n: int, batch: int = 100) -> None:
    """n connections from this thread pinned to ``cpu``; every one accepted (and both ends reset)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        done = 0
        while done < n:
            clients = []
            try:
                for _ in range(min(batch, n - done)):
                    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    clients.append(c)
                    c.settimeout(5)
                    c.connect((HOST, port))
                for s in socks:
                    while True:
                        try:
                            a, _ = s.accept()
                        except BlockingIOError:
                            break
                        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                        a.close()
            finally:
                for c in clients:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                    c.close()
            done += len(clients)
    finally:
        os.sched_setaffinity(0, old)


def mode_select(a: dict) -> dict:
    """ns per selection (run_time_ns / run_cnt; the caller enables kernel.bpf_stats_enabled)."""
    import numareuse

    cpus, nd = a["cpus"], len(a["cpus"])
    out = {}
    for n in a["sizes"]:
        socks = group(n, backlog=256)
        for s in socks:
            s.setblocking(False)
        sel = numareuse.Selector(a["spec"], capacity=max(256, -(-n // nd)))
        try:
            sel.attach(socks[0])
            for i, s in enumerate(socks):
                sel.register(s, i % nd)
            port = socks[0].getsockname()[1]
            for cpu in cpus:  # warm-up
                _connections(cpu, port, socks, 20)
            samples = []
            for _ in range(a["reps"]):
                i0 = sel.program_info()
                for cpu in cpus:
                    _connections(cpu, port, socks, a["per_cpu"])
                i1 = sel.program_info()
                if i1["run_cnt"] > i0["run_cnt"]:
                    samples.append((i1["run_time_ns"] - i0["run_time_ns"]) / (i1["run_cnt"] - i0["run_cnt"]))
            st = sel.stats()
        finally:
            sel.close()
            close_all(socks)
        out[str(n)] = {"ns": statistics.median(samples) if samples else None, "samples": samples, "counters": st}
    return {"sizes": out}


MODES = {"selector": mode_selector, "register": mode_register, "attach": mode_attach, "select": mode_select}


def main() -> int:
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    res = MODES[mode](args)
    res["numareuse_file"] = os.path.dirname(sys.modules["numareuse"].__file__)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
