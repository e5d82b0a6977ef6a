"""The domain-change window: `numareuse attach` with another --domains / --capacity under steady load.

A different domain spec or capacity needs a new selector, and a socket can
sit in one sockarray only, so the old one is emptied before the new one is
filled and swapped in: for that window the old program finds no socket and
leaves the choice to the kernel's hash (``fallback``). No connection may
fail. The window is measured as the number of ``fallback`` selections of
the old program (read through an fd of its counters map kept open across
the change) plus those of the new one, with pinned clients connecting in a
loop; both releases are measured when the previous one is available.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import threading
import time
from pathlib import Path

from numareuse import _sys
from numareuse.topology import pinned

from . import log
from .controller import ForkServer, _header_env, private_state
from .release import Release

FALLBACK = 2  # counter index of `fallback` in layouts 1 and 2
CHANGES = (("0;1", 128), ("cpu", 256))  # (domains, capacity): there and back, each a new selector


class Load:
    """One client thread per CPU, pinned, connecting in a loop and reading the answer; counts failures."""

    def __init__(self, port: int, cpus):
        self.port, self.ok, self.failed, self.errors = port, 0, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(cpu,), daemon=True) for cpu in cpus]

    def _run(self, cpu: int) -> None:
        with pinned(cpu):
            while not self._stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                        data = b""
                        while not data.endswith(b"\n"):
                            chunk = c.recv(64)
                            if not chunk:
                                raise ConnectionError("closed without an answer")
                            data += chunk
                    self.ok += 1
                except OSError as e:
                    self.failed += 1
                    if len(self.errors) < 10:
                        self.errors.append(repr(e))

    def snapshot(self) -> tuple[int, int]:
        return self.ok, self.failed

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(10)


def _group_dir(bpffs: str, port: int) -> str | None:
    found = glob.glob(os.path.join(bpffs, "numareuse", "netns-*", f"tcp4_*_{port}"))
    return found[0] if found else None


def _fallback(counters_fd: int) -> int:
    ncpus = _sys.possible_cpus()
    raw = _sys.map_lookup(counters_fd, struct.pack("=I", FALLBACK), 8 * ncpus)
    return sum(struct.unpack(f"={ncpus}Q", raw)) if raw else 0


def _counters_fd(bpffs: str, port: int) -> int:
    d = _group_dir(bpffs, port)
    if d is None:
        raise RuntimeError(f"no pinned group for port {port} under {bpffs}")
    return _sys.obj_get(os.path.join(d, "counters"))


def _one_release(rel: Release, cpus, plan, workdir: Path) -> dict:
    env = _header_env()
    out: dict = {"changes": []}
    with private_state(workdir) as state:
        env.update(state)
        bpffs = state["NUMAREUSE_BPFFS"]
        server = ForkServer(4, cpus)
        try:
            rel.cli("attach", "--port", server.port, "--domains", "cpu", "--quiet", **env)
            # warm-up: the programs of both layouts in the cache (layout 2), not counted
            for domains, capacity in CHANGES:
                rel.cli("attach", "--port", server.port, "--domains", domains, "--capacity", capacity, "-q", **env)
            with Load(server.port, cpus) as load:
                time.sleep(plan.window_settle)
                for _rep in range(plan.window_reps):
                    for domains, capacity in CHANGES:
                        fd = _counters_fd(bpffs, server.port)
                        try:
                            f0 = _fallback(fd)
                            ok0, failed0 = load.snapshot()
                            t = time.perf_counter()
                            rel.cli(
                                "attach",
                                "--port",
                                server.port,
                                "--domains",
                                domains,
                                "--capacity",
                                capacity,
                                "--quiet",
                                **env,
                            )
                            took = time.perf_counter() - t
                            ok1, failed1 = load.snapshot()
                            time.sleep(plan.window_settle)
                            old_fallback = _fallback(fd) - f0
                        finally:
                            os.close(fd)
                        fd = _counters_fd(bpffs, server.port)
                        try:
                            new_fallback = _fallback(fd)
                        finally:
                            os.close(fd)
                        out["changes"].append(
                            {
                                "domains": domains,
                                "capacity": capacity,
                                "seconds": took,
                                "fallback_old_program": old_fallback,
                                "fallback_new_program": new_fallback,
                                "window": old_fallback + new_fallback,
                                "connections_during": ok1 - ok0,
                                "failed_during": failed1 - failed0,
                            }
                        )
            out["connections"], out["failed"], out["errors"] = load.ok, load.failed, load.errors
        finally:
            rel.cli("detach", "--port", server.port, check=False, **env)
            server.stop()
    ch = out["changes"]
    out["window_max"] = max(c["window"] for c in ch)
    out["window_median"] = sorted(c["window"] for c in ch)[len(ch) // 2]
    out["change_seconds_median"] = sorted(c["seconds"] for c in ch)[len(ch) // 2]
    return out


def measure_domain_change(cpus, plan, res, rels: dict[str, Release], workdir: Path) -> None:
    out = {"changes": [f"--domains {d} --capacity {c}" for d, c in CHANGES]}
    for key, rel in rels.items():
        out[key] = o = _one_release(rel, cpus, plan, workdir)
        log(
            f"domain change ({rel.name}): window (fallback selections) "
            + ", ".join(str(c["window"]) for c in o["changes"])
            + f"; {o['failed']} failed of {o['connections'] + o['failed']} connections; each change "
            f"{o['change_seconds_median']:.2f} s (median)"
        )
    res["domain_change"] = out
