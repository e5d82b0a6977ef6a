"""The controller: register/unregister, attach, memory and Selector() time, before (layout 1) and after.

"Before" is the previous release, layout 1, taken from git history
(bench/release.py); "after" is this checkout. Every figure comes from a fresh
process of each running the same code (bench/probe.py, or the CLI), so the
two differ only in the numareuse package. bcc always finds the kernel-header
tree through BCC_KERNEL_SOURCE, so a cold program cache measures the compile,
not the building of that tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from numareuse._headers import ensure_kernel_source

from . import log
from . import workload as wl
from .release import REPO, Release
from .steering import spec_of

FORKSERVER = REPO / "tests" / "forkserver.py"


def _header_env() -> dict[str, str]:
    tree = ensure_kernel_source()
    return {"BCC_KERNEL_SOURCE": tree} if tree else {}


def measure_register(cpus, plan, res, rels: dict[str, Release]) -> None:
    """register / unregister µs into one region of capacity 1024 holding 0, 256 and 1023 sockets.

    Register: into a region holding ``fill`` (1023 is the last free slot of
    1024); unregister: a random socket of the fill + 1 (the region's tail
    moves into its hole), back to ``fill``.
    """
    args = {"spec": ",".join(map(str, cpus)), "capacity": 1024, "fills": [0, 256, 1023], "reps": plan.register_reps}
    out = {}
    for key, rel in rels.items():
        out[key] = rel.probe("register", args, **_header_env())["fills"]
        f = out[key]
        log(
            f"register ({rel.name}): median "
            + " / ".join(f"{f[k]['register']['median_us']:.0f}" for k in f)
            + " us, unregister "
            + " / ".join(f"{f[k]['unregister']['median_us']:.0f}" for k in f)
            + f" us at fills {' / '.join(f)}"
        )
    res["register"] = {"args": args, **out}
    try:
        res["register_diagnostic"] = d = {
            "bpf_calls": {str(fill): register_syscalls(cpus, fill) for fill in (0, 256)},
            "lookup_batch_us": batch_lookup_us(),
        }
        for fill, ops in d["bpf_calls"].items():
            for op, v in ops.items():
                parts = ", ".join(
                    f"{k} {c['calls']:.0f}x/{c['elements']:.0f} el {c['us']:.0f} us" for k, c in v["bpf_calls"].items()
                )
                log(f"{op} (this release, region holding {fill}): {v['median_us']:.0f} us: {parts}")
        log(
            "BPF_MAP_LOOKUP_BATCH of n u32: " + ", ".join(f"{n}: {us:.0f} us" for n, us in d["lookup_batch_us"].items())
        )
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        log(f"register diagnostic failed: {e!r}")


def measure_attach_library(cpus, plan, res, rels: dict[str, Release]) -> None:
    """Selector() + attach + register every socket of a new group of 16, 256, 1024 sockets (warm program cache)."""
    nd = len(cpus)
    sizes = [16, 256, 1024]
    args = {
        "spec": spec_of(cpus),
        "ndomains": nd,
        "sizes": sizes,
        "capacity": {str(n): max(256, -(-n // nd)) for n in sizes},
        "reps": plan.attach_reps,
    }
    out = {}
    for key, rel in rels.items():
        out[key] = rel.probe("attach", args, **_header_env())["sizes"]
        s = out[key]
        log(
            f"attach library ({rel.name}): "
            + ", ".join(f"{n} sockets {s[n]['seconds']:.3f} s (Selector() {s[n]['selector_s']:.3f})" for n in s)
        )
    res["attach_library"] = {"args": args, **out}


def measure_selector(cpus, plan, res, rels: dict[str, Release], workdir: Path) -> None:
    """Selector() time and the controller's RSS in fresh processes; LLVM mapped or not.

    After: cold (an empty program cache: the compile runs in a child) and
    cached (the cache the cold run filled). Before: layout 1 compiles with bcc
    in the process, every time; its first Selector() also imports bcc.
    """
    args = {"spec": spec_of(cpus), "capacity": 256}
    env = _header_env()
    runs: dict[str, list[dict]] = {}
    for _rep in range(plan.selector_reps):
        cache = tempfile.mkdtemp(prefix="cache-", dir=workdir)
        if "after" in rels:
            runs.setdefault("after_cold", []).append(
                rels["after"].probe("selector", args, NUMAREUSE_CACHE=cache, **env)
            )
            runs.setdefault("after_cached", []).append(
                rels["after"].probe("selector", args, NUMAREUSE_CACHE=cache, **env)
            )
        if "before" in rels:
            runs.setdefault("before", []).append(rels["before"].probe("selector", args, NUMAREUSE_CACHE=cache, **env))
    out = {}
    for key, rs in runs.items():
        out[key] = {
            "first_s": statistics.median(r["first_s"] for r in rs),
            "again_s": statistics.median(r["again_s"] for r in rs),
            "rss_import_kib": statistics.median(r["rss_import_kib"] for r in rs),
            "rss_delta_kib": statistics.median(r["rss_first_kib"] - r["rss_import_kib"] for r in rs),
            "rss_delta_again_kib": statistics.median(r["rss_again_kib"] - r["rss_import_kib"] for r in rs),
            "llvm_mapped": any(r["llvm_mapped"] or r["llvm_mapped_again"] for r in rs),
            "verified_insns": rs[0].get("verified_insns"),
            "xlated_insns": rs[0].get("xlated_insns"),
            "runs": rs,
        }
        o = out[key]
        log(
            f"Selector() {key}: first {o['first_s']:.3f} s, again {o['again_s']:.3f} s; RSS +{o['rss_delta_kib']} KiB "
            f"(+{o['rss_delta_again_kib']} after the second); LLVM mapped: {o['llvm_mapped']}; "
            f"program {o['xlated_insns']} insns, {o['verified_insns']} verified"
        )
    res["selector"] = out
    try:
        res["selector_breakdown"] = b = selector_breakdown(cpus)
        log(
            f"cached Selector() of this release: maps {b['maps_s']:.3f} s, cache read {b['cached_program_s']:.3f} s, "
            f"BPF_PROG_LOAD (the verifier) {b['prog_load_s']:.3f} s"
        )
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        log(f"Selector() breakdown failed: {e!r}")


# -- the CLI against a 16-worker pre-fork server ---------------------------------


class ForkServer:
    """tests/forkserver.py: one SO_REUSEPORT socket per worker, workers pinned round-robin to ``cpus``."""

    def __init__(self, workers: int, cpus):
        cpu_list = ",".join(str(cpus[i % len(cpus)]) for i in range(workers))
        self.proc = subprocess.Popen(
            [sys.executable, str(FORKSERVER), "--workers", str(workers), "--cpus", cpu_list],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.stop()
            raise RuntimeError(f"tests/forkserver.py did not start: {line}")
        self.port = int(line[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def private_state(workdir: Path):
    """NUMAREUSE_BPFFS / NUMAREUSE_RUNDIR in ``workdir`` (attach mounts the bpffs), unmounted at the end."""
    bpffs = Path(tempfile.mkdtemp(prefix="bpffs-", dir=workdir))
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    env = {"NUMAREUSE_BPFFS": str(bpffs), "NUMAREUSE_RUNDIR": str(rundir)}
    try:
        yield env
    finally:
        subprocess.run(["umount", str(bpffs)], capture_output=True)


def _group_entry(out: str, port: int) -> dict | None:
    with contextlib.suppress(ValueError, TypeError):
        for g in json.loads(out):
            if g.get("group", {}).get("port") == port or str(g.get("name", "")).endswith(f"_{port}"):
                return g
    return None


def measure_attach_cli(cpus, plan, res, rels: dict[str, Release], workdir: Path) -> None:
    """Wall time of `numareuse attach --port P` (a fresh CLI process) on a 16-worker server, then detach.

    A warm-up attach per release first (not counted: it fills the program
    cache of layout 2). The first counted attach of each release is checked:
    10 connections per CPU, then the CLI's own stats.
    """
    env = _header_env()
    out: dict[str, dict] = {k: {"runs": []} for k in rels}
    with private_state(workdir) as state:
        env.update(state)
        server = ForkServer(plan.attach_workers, cpus)
        try:
            cmd = ["attach", "--port", server.port, "--domains", spec_of(cpus), "--json", "--quiet"]
            for rel in rels.values():
                rel.cli(*cmd, **env)
                rel.cli("detach", "--port", server.port, **env)
            for rep in range(plan.attach_reps):
                for key, rel in rels.items():
                    try:
                        t = time.perf_counter()
                        rel.cli(*cmd, **env)
                        out[key]["runs"].append(time.perf_counter() - t)
                        if rep == 0:
                            for cpu in cpus:
                                with wl.pinned(cpu):
                                    for _ in range(10):
                                        wl.one_connection(server.port)
                            st = rel.cli("stats", "--json", **env)
                            g = _group_entry(st.stdout, server.port) or {}
                            out[key]["check"] = {"counters": g.get("counters"), "locality": g.get("locality")}
                    finally:
                        rel.cli("detach", "--port", server.port, check=False, **env)
        finally:
            server.stop()
    for key, o in out.items():
        o["seconds"] = statistics.median(o["runs"])
        log(f"attach CLI ({rels[key].name}, {plan.attach_workers} workers): {o['seconds']:.3f} s; {o.get('check')}")
    res["attach_cli"] = {"workers": plan.attach_workers, **out}


def measure_controller(cpus, plan, res, rels: dict[str, Release], workdir: Path) -> None:
    measure_register(cpus, plan, res, rels)
    measure_attach_library(cpus, plan, res, rels)
    measure_selector(cpus, plan, res, rels, workdir)
    measure_attach_cli(cpus, plan, res, rels, workdir)
    res["releases"] = {k: r.name for k, r in rels.items()}


BPF_CMDS = {1: "lookup", 2: "update", 3: "delete", 4: "get_next_key", 24: "lookup_batch", 26: "update_batch"}


def register_syscalls(cpus, fill: int = 256, reps: int = 20) -> dict:
    """Where this release's register / unregister time goes: bpf() calls per operation, by command.

    In this process (layout 2 only), one region of capacity 1024 holding
    ``fill`` sockets: each bpf() syscall is counted and timed, with the
    elements of each batch call.
    """
    import random

    from numareuse import Selector, _sys

    calls: list[tuple[int, int, int]] = []  # (cmd, elements, ns)

    class Counting:
        """_sys's libc with syscall() counted: every bpf() call of the library goes through it."""

        def __init__(self, lib):
            self._lib = lib

        def __getattr__(self, name):
            return getattr(self._lib, name)

        def syscall(self, nr, *args):
            t = time.perf_counter_ns()
            try:
                return self._lib.syscall(nr, *args)
            finally:
                if nr == _sys._NR_BPF and args:
                    cmd = int(args[0])
                    attr = getattr(args[1], "_obj", None) if len(args) > 1 else None
                    n = getattr(attr, "count", 1) if cmd in (24, 26) else 1
                    calls.append((cmd, n, time.perf_counter_ns() - t))

    rng = random.Random(1)
    socks, _port = wl.group(fill + 1, backlog=8)
    out = {}
    try:
        with Selector(",".join(map(str, cpus)), capacity=1024) as sel:
            sel.attach(socks[0])
            members = socks[:fill]
            for s in members:
                sel.register(s, 0)
            spare = socks[fill]
            per = {"register": [], "unregister": []}
            real = _sys._libc
            _sys._libc = Counting(real)
            try:
                for _ in range(reps):
                    for op in ("register", "unregister"):
                        calls.clear()
                        t = time.perf_counter_ns()
                        if op == "register":
                            sel.register(spare, 0)
                            members.append(spare)
                        else:
                            spare = members.pop(rng.randrange(len(members)))
                            sel.unregister(spare)
                        per[op].append((time.perf_counter_ns() - t, list(calls)))
            finally:
                _sys._libc = real
        for op, runs in per.items():
            total = statistics.median(t for t, _c in runs)
            by: dict[str, dict] = {}
            for _t, cs in runs:
                for cmd, n, ns in cs:
                    d = by.setdefault(BPF_CMDS.get(cmd, str(cmd)), {"calls": 0, "elements": 0, "ns": 0})
                    d["calls"] += 1
                    d["elements"] += n
                    d["ns"] += ns
            for d in by.values():
                d["calls"] /= len(runs)
                d["elements"] /= len(runs)
                d["us"] = d.pop("ns") / len(runs) / 1000
            out[op] = {"median_us": total / 1000, "bpf_calls": by, "fill": fill}
    finally:
        wl.close_all(socks)
    return out


def selector_breakdown(cpus, reps: int = 5) -> dict[str, float]:
    """Where a cached Selector() of this release spends its time (seconds, medians): maps, cache, verifier."""
    from numareuse import _layout, _loader, _maps, _sys, topology

    topo = topology.parse(spec_of(cpus))
    layout = _layout.Layout(topo.ndomains, _layout.DEFAULT_CAPACITY, _sys.possible_cpus())
    migrate = _loader.migration_supported()
    _loader.compiled(layout, migrate)  # fill the cache first
    attach = _sys.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate else _sys.BPF_SK_REUSEPORT_SELECT
    parts: dict[str, list[float]] = {"maps_s": [], "cached_program_s": [], "prog_load_s": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        fds = _maps.create(layout)
        try:
            t1 = time.perf_counter()
            insns = _loader.compiled(layout, migrate)
            t2 = time.perf_counter()
            fd, _err = _sys.prog_load(
                _sys.BPF_PROG_TYPE_SK_REUSEPORT, _loader.patch(insns, fds), _layout.PROG_NAME, attach
            )
            t3 = time.perf_counter()
            if fd >= 0:
                os.close(fd)
        finally:
            _maps.close_fds(fds)
        parts["maps_s"].append(t1 - t0)
        parts["cached_program_s"].append(t2 - t1)
        parts["prog_load_s"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in parts.items()}


def batch_lookup_us(sizes=(256, 1024, 4096), reps: int = 20) -> dict[str, float]:
    """µs per BPF_MAP_LOOKUP_BATCH of n u32 entries of an ARRAY map (what register reads per call)."""
    from numareuse import _sys

    fd = _sys.map_create(_sys.BPF_MAP_TYPE_ARRAY, 4, 4, max(sizes), "bench_batch")
    try:
        out = {}
        for n in sizes:
            times = []
            for _ in range(reps):
                t = time.perf_counter_ns()
                _sys.map_lookup_batch(fd, 0, n, 4)
                times.append((time.perf_counter_ns() - t) / 1000)
            out[str(n)] = statistics.median(times)
        return out
    finally:
        os.close(fd)
