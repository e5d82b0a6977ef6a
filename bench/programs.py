"""Baseline programs, and the kernel's own accounting of what a program and its maps cost."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from numareuse import _sys
from numareuse._headers import ensure_kernel_source

STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


class Baselines:
    """minimal_select and noop_select from minimal.bpf.c, compiled and loaded with bcc.

    minimal_select gets its own REUSEPORT_SOCKARRAY (created here, as numareuse
    creates its maps) with one slot per CPU id: slot c holds the one socket of
    the domain of CPU c. Close with :meth:`close`.
    """

    def __init__(self, ncpus: int):
        self.map_fd = _sys.map_create(_sys.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, ncpus, "bench_minimal")
        self.minimal_fd = self.noop_fd = -1
        try:
            ensure_kernel_source()
            from bcc import BPF

            src = Path(__file__).with_name("minimal.bpf.c").read_text()
            b = BPF(text=src.encode(), cflags=[f"-DSOCKARRAY_FD={self.map_fd}"])
            try:
                self.minimal_fd = os.dup(b.load_func(b"minimal_select", _sys.BPF_PROG_TYPE_SK_REUSEPORT).fd)
                self.noop_fd = os.dup(b.load_func(b"noop_select", _sys.BPF_PROG_TYPE_SK_REUSEPORT).fd)
            finally:
                b.cleanup()
        except BaseException:
            self.close()
            raise

    def place(self, cpu: int, sock) -> None:
        """Make ``sock`` the one socket selected for packets processed on ``cpu``."""
        _sys.map_update(self.map_fd, cpu, struct.pack("=Q", sock.fileno()))

    def close(self) -> None:
        for fd in (self.minimal_fd, self.noop_fd, self.map_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.minimal_fd = self.noop_fd = self.map_fd = -1


class NodeMinimal:
    """minimal_numa_select from minimal_numa.bpf.c: sockarray index = bpf_get_numa_node_id().

    The upstream selftest's idea on real NUMA nodes: slot n holds the one
    socket of node n (a socket fits in one slot only, so a node gets one
    socket however many workers it has). Close with :meth:`close`.
    """

    def __init__(self, nnodes: int):
        self.nnodes = nnodes
        self.map_fd = _sys.map_create(_sys.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, nnodes, "bench_node_min")
        self.prog_fd = -1
        try:
            ensure_kernel_source()
            from bcc import BPF

            src = Path(__file__).with_name("minimal_numa.bpf.c").read_text()
            b = BPF(text=src.encode(), cflags=[f"-DSOCKARRAY_FD={self.map_fd}"])
            try:
                self.prog_fd = os.dup(b.load_func(b"minimal_numa_select", _sys.BPF_PROG_TYPE_SK_REUSEPORT).fd)
            finally:
                b.cleanup()
        except BaseException:
            self.close()
            raise

    def place(self, node: int, sock) -> None:
        """Make ``sock`` the one socket selected for packets processed on a CPU of ``node``."""
        _sys.map_update(self.map_fd, node, struct.pack("=Q", sock.fileno()))

    def clear(self) -> None:
        """Empty every slot (a socket may sit in one sockarray slot only: free them for the next group)."""
        for node in range(self.nnodes):
            _sys.map_delete(self.map_fd, struct.pack("=I", node))

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.prog_fd = self.map_fd = -1


class Spread:
    """spread_select from spread.bpf.c over ``n`` sockets ``stride`` slots apart. Close with :meth:`close`."""

    def __init__(self, n: int, stride: int = 1):
        self.n, self.stride = n, stride
        self.map_fd = _sys.map_create(_sys.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, n * stride, "bench_spread")
        self.prog_fd = -1
        try:
            ensure_kernel_source()
            from bcc import BPF

            src = Path(__file__).with_name("spread.bpf.c").read_text()
            b = BPF(
                text=src.encode(), cflags=[f"-DSOCKARRAY_FD={self.map_fd}", f"-DSPREAD_N={n}", f"-DSTRIDE={stride}"]
            )
            try:
                self.prog_fd = os.dup(b.load_func(b"spread_select", _sys.BPF_PROG_TYPE_SK_REUSEPORT).fd)
            finally:
                b.cleanup()
        except BaseException:
            self.close()
            raise

    def fill(self, socks) -> None:
        for i, s in enumerate(socks):
            _sys.map_update(self.map_fd, i * self.stride, struct.pack("=Q", s.fileno()))

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.prog_fd = self.map_fd = -1


@contextlib.contextmanager
def bpf_stats():
    """kernel.bpf_stats_enabled=1 for the block, then the old value again (even on error or SIGTERM)."""
    with open(STATS_SYSCTL) as f:
        old = f.read().strip()
    owner = os.getpid()
    with open(STATS_SYSCTL, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        if os.getpid() == owner:  # never from a forked child
            with open(STATS_SYSCTL, "w") as f:
                f.write(old)


def run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) the kernel accounted to the program so far."""
    info = _sys.prog_info(prog_fd)
    return info["run_time_ns"], info["run_cnt"]


def memlock(fd: int) -> int:
    """Bytes of kernel memory charged to a BPF map or program (fdinfo "memlock:")."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
