"""Older kernels and other CPUs, simulated at the boundary where this machine cannot run them.

The tested floor is Debian bookworm's kernel 6.1 (the VM suite boots it) and
this machine's 6.18. Older behaviour is simulated at the refusing syscall:
a detach before 5.3 (no SO_DETACH_REUSEPORT_BPF), map creation before 5.11
(charged to RLIMIT_MEMLOCK), no migration before 5.14. Syscall numbers of
every architecture Debian ships are checked against Debian's own cross
headers (linux-libc-dev-*-cross, installed by `make setup`).
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import socket
import subprocess

import pytest
from conftest import connect_from, drain, need

from numareuse import Selector, _loader, _maps, _sys

# ABI -> (cross header triplet, preprocessor flags that select that ABI in asm/unistd.h)
CROSS = {
    "aarch64": ("aarch64-linux-gnu", ["-D__aarch64__"]),
    "arm": ("arm-linux-gnueabihf", ["-D__arm__", "-D__ARM_EABI__"]),
    "i386": ("i686-linux-gnu", ["-D__i386__"]),
    "mips64": ("mips64el-linux-gnuabi64", ["-D__mips__", "-D_MIPS_SIM=3"]),
    "mips": ("mipsel-linux-gnu", ["-D__mips__", "-D_MIPS_SIM=1"]),
    "ppc64le": ("powerpc64le-linux-gnu", ["-D__powerpc64__"]),
    "s390x": ("s390x-linux-gnu", ["-D__s390x__"]),
    "x86_64": ("x86_64-linux-gnu", ["-D__x86_64__"]),
}


def _numbers_from_headers(triplet: str, flags: list[str]) -> tuple[int, int, int]:
    root = f"/usr/{triplet}/include"
    if triplet == "x86_64-linux-gnu":
        root = "/usr/include/x86_64-linux-gnu"
    need(os.path.isdir(root), f"Debian's cross headers for {triplet} (make setup installs them)")
    names = ("bpf", "pidfd_getfd", "renameat2")
    src = "#include <asm/unistd.h>\n" + "".join(f"NR_{k} = __NR_{k}\n" for k in names)
    out = subprocess.run(
        ["cpp", "-P", "-nostdinc", "-undef", *flags, "-I", root, "-I", "/usr/include"],
        input=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    vals = dict(ln[3:].split(" = ", 1) for ln in out.splitlines() if ln.startswith("NR_"))
    nums = []
    for k in names:
        expr = vals[k]
        assert re.fullmatch(r"[0-9+() ]+", expr), f"{triplet} {k}: {expr}"
        nums.append(eval(expr))  # only digits, '+' and parentheses, checked above
    return tuple(nums)


@pytest.mark.skipif(shutil.which("cpp") is None, reason="needs the C preprocessor (gcc)")
@pytest.mark.parametrize("abi", sorted(CROSS))
def test_syscall_numbers_match_debians_headers(abi):
    triplet, flags = CROSS[abi]
    assert _numbers_from_headers(triplet, flags) == _sys.SYSCALLS[abi]


@pytest.mark.parametrize(
    "machine,bits64,want",
    [
        ("x86_64", True, "x86_64"),
        ("x86_64", False, "i386"),  # i386 userland on an amd64 kernel
        ("i686", False, "i386"),
        ("aarch64", True, "aarch64"),
        ("aarch64", False, "arm"),  # armhf userland on an arm64 kernel
        ("armv7l", False, "arm"),
        ("mips64", True, "mips64"),
        ("mips", False, "mips"),
        ("ppc64le", True, "ppc64le"),
        ("s390x", True, "s390x"),
        ("riscv64", True, "riscv64"),
        ("sparc64", True, None),
    ],
)
def test_abi_of_a_machine(machine, bits64, want):
    assert _sys.abi(machine, bits64) == want


def test_detach_before_5_3_attaches_a_pass_through_program(kernel, two_cpus, group, monkeypatch):
    """No SO_DETACH_REUSEPORT_BPF (ENOPROTOOPT): detach leaves the group to the kernel's hash all the same."""
    real = _sys._setsockopt

    def old_kernel(fd, opt, value):
        if opt == _sys.SO_DETACH_REUSEPORT_BPF:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return real(fd, opt, value)

    socks, port = group(4)
    with Selector("0;1") as sel:
        sel.attach(socks[0])
        for i, s in enumerate(socks):
            sel.register(s, i // 2)
        monkeypatch.setattr(_sys, "_setsockopt", old_kernel)
        assert sel.detach() is True
        before = sel.stats()["local"]
        assert connect_from(0, socket.AF_INET, 0 or port, 40).ok == 40
        got = drain(socks)
        assert sum(got[2:]) > 0, got  # the kernel's hash again: domain 1's sockets get CPU 0's clients
        assert sel.stats()["local"] == before  # our program no longer runs


def test_map_memory_charged_to_memlock_before_5_11(kernel, monkeypatch):
    """Before 5.11 a map's memory counts against RLIMIT_MEMLOCK (64 KiB by default): the limit is raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, hard))
    real = _sys.map_create

    def charged(*a, **kw):  # what an old kernel does: EPERM while the soft limit is 64 KiB
        if resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] < 1 << 20:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real(*a, **kw)

    monkeypatch.setattr(_sys, "map_create", charged)
    try:
        fds = _maps.create(_maps._layout.Layout(2, 16, _sys.possible_cpus()))
        _maps.close_fds(fds)
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))


def test_no_migration_before_5_14(kernel, two_cpus, monkeypatch):
    """Kernels before 5.14 have no SELECT_OR_MIGRATE: the program loads as SELECT and says so."""
    monkeypatch.setattr(_loader, "kernel_version", lambda: (5, 10))
    with Selector("0;1") as sel:
        assert sel.migration is False
        assert sel.attach_type == _sys.BPF_SK_REUSEPORT_SELECT
