"""Find the sockets of a running server's SO_REUSEPORT group and who accepts on each.

Every worker of a pre-fork server usually holds every listening fd (inherited
from the master), so holding a socket says little. What a worker polls says
more: /proc/PID/fdinfo/<epoll fd> lists each watched file with its inode
("tfd: ... ino:<hex>"). Checked with Debian's nginx (reuseport +
worker_cpu_affinity): each worker's epoll holds exactly its own socket.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field

import psutil

from . import _sys, topology
from .errors import NotInGroupError, NumaReuseError, ProcessGone, from_oserror
from .selector import WILDCARD
from .state import Group

_TFD = re.compile(r"^tfd:\s*(\d+).*\bino:([0-9a-f]+)", re.M)


@dataclass
class Holder:
    pid: int
    fd: int
    comm: str


@dataclass
class GroupSocket:
    """One socket of the group, with a duplicate fd in this process."""

    inode: int
    holders: list[Holder]
    fd: int = -1  # our duplicate (pidfd_getfd); close with close_all()
    cookie: int = 0
    owners: list[Holder] = field(default_factory=list)
    domain: int = WILDCARD

    def as_dict(self) -> dict:
        return {
            "cookie": self.cookie,
            "sk": f"sk:{self.cookie}",
            "owners": [{"pid": h.pid, "comm": h.comm} for h in self.owners],
            "domain": "wildcard" if self.domain == WILDCARD else self.domain,
        }


def polled_inodes(pid: int) -> set[int]:
    """Inodes of the files this process's epoll instances watch."""
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                out.update(int(ino, 16) for _, ino in _TFD.findall(f.read()))
        except OSError:
            continue
    return out


def _comm(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def _hex_addr(text: str) -> tuple[str, int]:
    """'0100007F:1F90' (the kernel's /proc/net format: 32-bit words in host order) -> ('127.0.0.1', 8080)."""
    addr, port = text.split(":")
    raw = b"".join(int(addr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(addr), 8))
    fam = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(fam, raw), int(port, 16)


def bound_sockets(proto: str, ipv6: bool, port: int) -> dict[int, str]:
    """inode -> bound address of this netns's listening TCP / unconnected UDP sockets on ``port``."""
    path = f"/proc/net/{proto}{'6' if ipv6 else ''}"
    want = "0A" if proto == "tcp" else "07"  # TCP_LISTEN; UDP TCP_CLOSE = not connected
    local_port = f":{port:04X} "  # cheap pre-filter: a busy host has 100k+ lines (TIME_WAIT)
    out = {}
    with open(path) as f:
        next(f)
        for line in f:
            if local_port not in line:
                continue
            fields = line.split()
            if fields[1].endswith(local_port.strip()) and fields[3] == want:
                out[int(fields[9])] = _hex_addr(fields[1])[0]
    return out


def holders_of(inodes) -> dict[int, list[Holder]]:
    """inode -> every (pid, fd) that holds it, over all processes we can see."""
    links = {f"socket:[{i}]": i for i in inodes}
    out: dict[int, list[Holder]] = {i: [] for i in inodes}
    for pid in psutil.pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        comm = None
        for fd in fds:
            try:
                ino = links.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if ino is not None:
                comm = comm or _comm(pid)
                out[ino].append(Holder(pid, int(fd), comm))
    return out


def find_sockets(port: int, address: str | None = None, udp: bool = False, ipv6: bool = False):
    """(Group, [GroupSocket]) for the sockets bound to ``port`` in this network namespace.

    Raises NotInGroupError when there is none or one lacks SO_REUSEPORT, and
    NumaReuseError when the port is bound on several addresses and ``address``
    does not pick one. The caller must close_all() the result.
    """
    proto = "udp" if udp else "tcp"
    what = f"{proto.upper()}/IPv{6 if ipv6 else 4}"
    found = bound_sockets(proto, ipv6, port)
    if address is not None:
        fam = socket.AF_INET6 if ipv6 else socket.AF_INET
        try:
            address = socket.inet_ntop(fam, socket.inet_pton(fam, address))  # '0:0::1' == '::1'
        except OSError:
            raise NumaReuseError(f"--address {address!r} is not an IPv{6 if ipv6 else 4} address") from None
        found = {i: a for i, a in found.items() if a == address}
    if not found:
        where = f"{address}:{port}" if address else f"port {port}"
        raise NotInGroupError(f"no {'bound' if udp else 'listening'} {what} socket on {where}")
    addrs = sorted(set(found.values()))
    if len(addrs) > 1:
        raise NumaReuseError(
            f"port {port} is bound on several addresses ({', '.join(addrs)}): choose one with --address"
        )
    group = Group(proto, 6 if ipv6 else 4, addrs[0], port)
    held = holders_of(found)
    socks = [GroupSocket(ino, hs) for ino, hs in sorted(held.items()) if hs]
    if not socks:
        raise ProcessGone(f"no process holds the sockets of {group} (exited, or not visible to us)")
    try:
        for s in socks:
            _duplicate(s)
            if not _sys.sock_opt_int(s.fd, _sys.SO_REUSEPORT):
                pids = ", ".join(str(h.pid) for h in s.holders)
                raise NotInGroupError(f"the socket on {group} held by pid {pids} has no SO_REUSEPORT")
            s.cookie = _sys.sock_cookie(s.fd)
        _assign_owners(socks)
    except BaseException:
        close_all(socks)
        raise
    if not socks:
        raise ProcessGone(f"every process holding {group} exited during discovery")
    return group, socks


def _duplicate(s: GroupSocket) -> None:
    last: OSError | None = None
    for h in s.holders:
        try:
            s.fd = _sys.pidfd_getfd(h.pid, h.fd)
        except OSError as e:  # gone (ESRCH) or fd closed (EBADF): try another holder
            last = e
            continue
        if os.fstat(s.fd).st_ino == s.inode:
            return
        os.close(s.fd)  # the fd number was reused for something else
        s.fd = -1
    if last is not None and last.errno in (1, 13):
        raise from_oserror(last, f"taking a duplicate of pid {s.holders[0].pid}'s socket (pidfd_getfd)")
    raise ProcessGone(f"pid {', '.join(str(h.pid) for h in s.holders)} exited or closed its socket during attach")


def _assign_owners(socks: list[GroupSocket]) -> None:
    """Owners = holders that epoll-watch the socket; else holders none of whose children hold it."""
    pids = {h.pid for s in socks for h in s.holders}
    polled = {pid: polled_inodes(pid) for pid in pids}
    parents = {}
    for pid in pids:
        try:
            parents[pid] = psutil.Process(pid).ppid()
        except psutil.Error:
            parents[pid] = 0
    for s in socks:
        owners = [h for h in s.holders if s.inode in polled[h.pid]]
        if not owners:
            holder_pids = {h.pid for h in s.holders}
            owners = [h for h in s.holders if not any(parents.get(p) == h.pid for p in holder_pids)]
        s.owners = owners or list(s.holders)


def assign_domains(socks: list[GroupSocket], topo: topology.Topology) -> None:
    """A socket's domain: the one domain holding every CPU its owners may run on, else the wildcard."""
    for s in socks:
        cpus: set[int] = set()
        for h in s.owners:
            try:
                cpus |= os.sched_getaffinity(h.pid)
            except OSError:
                continue
        d = topo.domain_of_cpus(cpus) if cpus else None
        s.domain = WILDCARD if d is None else d


def close_all(socks: list[GroupSocket]) -> None:
    for s in socks:
        if s.fd >= 0:
            os.close(s.fd)
            s.fd = -1
