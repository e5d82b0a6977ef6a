"""Find the sockets of a running server's SO_REUSEPORT group and who accepts on each.

Every worker of a pre-fork server usually holds every listening fd (inherited
from the master), so holding a socket says little. What a worker polls says
more: /proc/PID/fdinfo/<epoll fd> lists each watched file with its inode
("tfd: ... ino:<hex>"). Checked with Debian's nginx (reuseport +
worker_cpu_affinity): each worker's epoll holds exactly its own socket.

In a threaded server (HAProxy's ``shards by-thread``, a thread per core) one
process holds and polls every socket, and the owner is a thread. Epoll fds
belong to the process, not to a thread, so what a thread waits on is read
from /proc/PID/task/TID/syscall: a thread blocked in epoll_wait shows the
epoll fd, in accept() the listening fd, in poll()/select() the fd array in
its memory (``thread_waits``).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psutil

from . import _sys, topology
from .errors import NotInGroupError, NumaReuseError, ProcessGone, from_oserror
from .selector import WILDCARD
from .state import Group, Netns

_TFD = re.compile(r"^tfd:\s*(\d+).*\bino:([0-9a-f]+)", re.M)


@dataclass
class Holder:
    pid: int
    fd: int
    comm: str
    tid: int | None = None  # the thread of ``pid`` that owns the socket; None: the whole process

    def as_dict(self) -> dict:
        return {"pid": self.pid, "tid": self.tid, "comm": self.comm}


@dataclass
class GroupSocket:
    """One socket of the group, with a duplicate fd in this process."""

    inode: int
    holders: list[Holder]
    fd: int = -1  # our duplicate (pidfd_getfd); close with close_all()
    cookie: int = 0
    owners: list[Holder] = field(default_factory=list)
    domain: int = WILDCARD
    device: str = ""  # SO_BINDTODEVICE
    uid: int = 0

    def as_dict(self) -> dict:
        return {
            "cookie": self.cookie,
            "sk": f"sk:{self.cookie}",
            "owners": [h.as_dict() for h in self.owners],
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


def bound_sockets(proto: str, ipv6: bool, port: int, ns: Netns | None = None) -> dict[int, str]:
    """inode -> bound address of the listening TCP / unconnected UDP sockets on ``port`` of
    network namespace ``ns`` (default: this thread's)."""
    return {ino: addr for ino, (addr, _) in _bound(proto, ipv6, port, ns).items()}


def _bound(proto: str, ipv6: bool, port: int, ns: Netns | None) -> dict[int, tuple[str, int]]:
    """inode -> (bound address, owner uid): the kernel groups reuseport sockets by uid too."""
    name = f"{proto}{'6' if ipv6 else ''}"
    want = "0A" if proto == "tcp" else "07"  # TCP_LISTEN; UDP TCP_CLOSE = not connected
    local_port = f":{port:04X} "  # cheap pre-filter: a busy host has 100k+ lines (TIME_WAIT)
    out = {}
    with ns.open_proc_net(name) if ns is not None else open(f"/proc/thread-self/net/{name}") as f:
        next(f)
        for line in f:
            if local_port not in line:
                continue
            fields = line.split()
            if fields[1].endswith(local_port.strip()) and fields[3] == want:
                out[int(fields[9])] = (_hex_addr(fields[1])[0], int(fields[7]))
    return out


def holders_of(inodes, unreadable: list[int] | None = None) -> dict[int, list[Holder]]:
    """inode -> every (pid, fd) that holds it, over all processes we can see.

    ``unreadable`` collects the pids whose fds we may not read (EACCES: another
    user namespace, or no CAP_SYS_PTRACE over them): a socket they hold looks unheld.
    """
    links = {f"socket:[{i}]": i for i in inodes}
    out: dict[int, list[Holder]] = {i: [] for i in inodes}
    for pid in psutil.pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            if unreadable is not None:
                unreadable.append(pid)
            continue
        except OSError:
            continue  # gone
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


def has_group(group: Group, ns: Netns | None = None) -> bool:
    """Whether a socket is bound to ``group`` in ``ns`` now."""
    return group.address in bound_sockets(group.proto, group.family == 6, group.port, ns).values()


def find_sockets(
    port: int,
    address: str | None = None,
    udp: bool = False,
    ipv6: bool = False,
    ns: Netns | None = None,
    progress=lambda msg: None,
    warn=lambda msg: None,
):
    """(Group, [GroupSocket]) for the sockets bound to ``port`` in network namespace ``ns``
    (default: this thread's).

    Raises NotInGroupError when there is none, one lacks SO_REUSEPORT, or they
    form several reuseport groups (other devices or users), and NumaReuseError
    when the port is bound on several addresses and ``address`` does not pick
    one. ``warn`` hears of sockets left out because no process we can read
    holds them. The caller must close_all() the result.
    """
    proto = "udp" if udp else "tcp"
    what = f"{proto.upper()}/IPv{6 if ipv6 else 4}"
    listing = _bound(proto, ipv6, port, ns)
    found = {i: a for i, (a, _) in listing.items()}
    if address is not None:
        fam = socket.AF_INET6 if ipv6 else socket.AF_INET
        try:
            address = socket.inet_ntop(fam, socket.inet_pton(fam, address))  # '0:0::1' == '::1'
        except OSError:
            raise NumaReuseError(f"--address {address!r} is not an IPv{6 if ipv6 else 4} address") from None
        found = {i: a for i, a in found.items() if a == address}
    if not found:
        where = f"{address}:{port}" if address else f"port {port}"
        if ns is not None and ns.foreign:
            where += f" in {ns.what}"
        raise NotInGroupError(f"no {'bound' if udp else 'listening'} {what} socket on {where}")
    addrs = sorted(set(found.values()))
    if len(addrs) > 1:
        raise NumaReuseError(
            f"port {port} is bound on several addresses ({', '.join(addrs)}): choose one with --address"
        )
    group = Group(proto, 6 if ipv6 else 4, addrs[0], port)
    unreadable: list[int] = []
    held = holders_of(found, unreadable)
    socks = [GroupSocket(ino, hs) for ino, hs in sorted(held.items()) if hs]
    unheld = len(held) - len(socks)
    if not socks:
        why = f"; pids {_few(unreadable)} are not ours to read" if unreadable else " (exited, or not visible to us)"
        raise ProcessGone(f"no process holds the sockets of {group}{why}")
    if unheld:
        why = f"pids {_few(unreadable)} are not ours to read" if unreadable else "held by no process we can see"
        warn(f"{unheld} of the {len(held)} sockets of {group} are left to the fallback: {why}")
    try:
        for s in socks:
            _duplicate(s)
            if not _sys.sock_opt_int(s.fd, _sys.SO_REUSEPORT):
                pids = ", ".join(str(h.pid) for h in s.holders)
                raise NotInGroupError(f"the socket on {group} held by pid {pids} has no SO_REUSEPORT")
            s.cookie = _sys.sock_cookie(s.fd)
            s.device = _sys.sock_device(s.fd)
            s.uid = listing[s.inode][1]
        _one_group(group, socks)
        _assign_owners(socks, progress)
    except BaseException:
        close_all(socks)
        raise
    if not socks:
        raise ProcessGone(f"every process holding {group} exited during discovery")
    return group, socks


def _few(pids: list[int], n: int = 5) -> str:
    return ", ".join(map(str, pids[:n])) + (f" and {len(pids) - n} more" if len(pids) > n else "")


def _one_group(group: Group, socks: list[GroupSocket]) -> None:
    """Refuse sockets of several reuseport groups on one address and port.

    The kernel groups reuseport sockets by address, port, bound device
    (SO_BINDTODEVICE) and owner uid: sockets bound to different devices (or,
    for UDP with SO_REUSEADDR, owned by different users) share the port but
    not the group, and a program attached through one group never sees the
    other's connections.
    """
    kinds: dict[tuple[str, int], list[int]] = defaultdict(list)
    for s in socks:
        kinds[(s.device, s.uid)].extend(h.pid for h in s.holders)
    if len(kinds) < 2:
        return
    devices = {d for d, _ in kinds}
    parts = []
    for (dev, uid), pids in sorted(kinds.items()):
        on = f"device {dev}" if dev else "no device"
        parts.append(f"{on}{f' uid {uid}' if len(devices) < len(kinds) else ''} (pid {_few(sorted(set(pids)), 3)})")
    raise NotInGroupError(
        f"{group} has sockets of {len(kinds)} reuseport groups, bound to {'; '.join(parts)}: "
        "numareuse steers one group; bind every socket alike"
    )


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


def _assign_owners(socks: list[GroupSocket], progress=lambda msg: None) -> None:
    """Owners = holders that epoll-watch the socket; else holders none of whose children hold it;
    then, within one threaded process, the one thread that waits on it (``_thread_owners``)."""
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
    _thread_owners(socks, progress)


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _thread_owners(socks: list[GroupSocket], progress) -> None:
    """Give a socket to a thread when its owner process is threaded and one thread alone waits on it.

    The rule holds for a process only when (a) every one of its threads was
    seen blocked at least once while sampling (a thread always running may
    be waiting on anything: nothing is proven), and (b) at least two of its
    threads each wait on sockets of the group: a server with a thread per
    socket. One waiting thread is also what an acceptor thread, or a
    leader/follower pool whose leader takes turns on one shared epoll, looks
    like; those keep the process rule. A socket two threads wait on (a
    shared epoll) keeps it too. Single-threaded processes are not sampled.
    """
    procs = {}
    for s in socks:
        owner_pids = {h.pid for h in s.owners}
        if len(owner_pids) == 1 and s.owners[0].tid is None:
            (pid,) = owner_pids
            if pid not in procs and len(_tasks(pid)) > 1:
                procs[pid] = True
    if not procs:
        return
    group = {s.inode for s in socks}
    for pid, waits in thread_waits(list(procs)).items():
        if waits is None:
            progress(f"pid {pid}: a thread was running at every sample; its sockets keep the process's affinity")
            continue
        mine = {tid: inos & group for tid, inos in waits.items() if inos & group}
        if len(mine) < 2:
            continue
        waiters: dict[int, set[int]] = defaultdict(set)
        for tid, inos in mine.items():
            for ino in inos:
                waiters[ino].add(tid)
        for s in socks:
            tids = waiters.get(s.inode, set())
            if len(tids) == 1 and {h.pid for h in s.owners} == {pid}:
                (tid,) = tids
                s.owners = [Holder(pid, s.owners[0].fd, _thread_comm(pid, tid), tid)]


def _thread_comm(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


_WAIT_NR = {nr: name for name, nr in _sys.WAIT_SYSCALLS.items()}


def thread_waits(
    pids: list[int],
    rounds: int = 5,
    interval: float = 0.002,
    patience: tuple[int, float, float] = (50, 0.25, 2.0),
) -> dict[int, dict[int, set[int]] | None]:
    """pid -> thread id -> inodes the thread was seen blocked waiting on; None for a process one
    of whose threads was never seen blocked.

    /proc/PID/task/TID/syscall shows a blocked thread's syscall number and
    arguments, and "running" for a runnable one (on a CPU or preempted: the
    kernel cannot read the registers of a task that may run). A thread
    serving a connection is briefly runnable, so each thread is sampled
    ``rounds`` times ``interval`` apart, and longer while some thread has not
    been seen blocked yet: ``patience`` = (samples, seconds, cap) gives up
    after that many samples and seconds both (on a loaded machine this
    sampler waits for a CPU too: seconds alone would be a few samples), or
    at the cap in seconds.
    """
    tasks = {pid: _tasks(pid) for pid in pids}
    waits: dict[int, dict[int, set[int]]] = {pid: defaultdict(set) for pid in pids}
    blocked: dict[int, set[int]] = {pid: set() for pid in pids}
    gone: dict[int, set[int]] = {pid: set() for pid in pids}
    cache: dict[tuple[int, int], set[int]] = {}
    least, soon, cap = patience
    t0 = time.monotonic()
    n = 0
    while True:
        for pid, tids in tasks.items():
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                        fields = f.read().split()
                except (FileNotFoundError, ProcessLookupError):
                    gone[pid].add(tid)  # exited: it waits on nothing
                    continue
                except OSError:
                    continue  # not ours to read (no ptrace rights): never proven blocked
                if not fields or fields[0] == "running":
                    continue
                blocked[pid].add(tid)
                name = _WAIT_NR.get(int(fields[0]))
                if name is not None:
                    args = [int(a, 16) for a in fields[1:7]]
                    waits[pid][tid] |= _waited_inodes(pid, name, args, cache)
        n += 1
        pending = any(set(tids) - blocked[pid] - gone[pid] for pid, tids in tasks.items())
        spent = time.monotonic() - t0
        if n >= rounds and (not pending or (n >= least and spent >= soon) or spent >= cap):
            break
        time.sleep(interval)
    return {pid: None if set(tids) - blocked[pid] - gone[pid] else dict(waits[pid]) for pid, tids in tasks.items()}


def _fd_inodes(pid: int, fd: int, cache: dict, depth: int = 0) -> set[int]:
    """The socket inode of ``fd``, or for an epoll fd the inodes it watches (one level of nesting)."""
    key = (pid, fd)
    if key in cache:
        return cache[key]
    out: set[int] = set()
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith("socket:["):
            out = {int(link[8:-1])}
        elif link == "anon_inode:[eventpoll]":
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                watched = _TFD.findall(f.read())
            out = {int(ino, 16) for _, ino in watched}
            if depth == 0:  # an epoll inside an epoll (or inside a poll set)
                for tfd, _ in watched:
                    if os.readlink(f"/proc/{pid}/fd/{tfd}") == "anon_inode:[eventpoll]":
                        out |= _fd_inodes(pid, int(tfd), cache, 1)
    except (OSError, ValueError):
        pass
    cache[key] = out
    return out


def _waited_inodes(pid: int, name: str, args: list[int], cache: dict) -> set[int]:
    if name.startswith(("epoll", "accept")):
        return _fd_inodes(pid, args[0], cache)
    fds: list[int] = []
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            if name == "poll" or name.startswith("ppoll"):  # struct pollfd { int fd; short events, revents; } [nfds]
                nfds = min(args[1], 4096)
                raw = os.pread(mem.fileno(), 8 * nfds, args[0]) if nfds else b""
                for i in range(len(raw) // 8):
                    fd, events, _ = struct.unpack_from("=ihh", raw, 8 * i)
                    if fd >= 0 and events & _sys.POLLIN:
                        fds.append(fd)
            elif args[1]:  # select, _newselect, pselect6: nfds, then the read fd_set (a bitmap)
                word = struct.calcsize("L")  # fd_set: an array of longs, bit n of word n // bits
                nwords = (min(args[0], 65536) + 8 * word - 1) // (8 * word)
                raw = os.pread(mem.fileno(), nwords * word, args[1])
                for w in range(len(raw) // word):
                    bits = int.from_bytes(raw[w * word : (w + 1) * word], sys.byteorder)
                    fds += [8 * word * w + b for b in range(8 * word) if bits >> b & 1]
    except OSError:
        return set()
    out: set[int] = set()
    for fd in fds:
        out |= _fd_inodes(pid, fd, cache)
    return out


def assign_domains(socks: list[GroupSocket], topo: topology.Topology) -> None:
    """A socket's domain: the one domain holding every CPU its owners may run on, else the wildcard."""
    for s in socks:
        cpus: set[int] = set()
        for h in s.owners:
            try:
                cpus |= os.sched_getaffinity(h.tid or h.pid)
            except OSError:
                continue
        d = topo.domain_of_cpus(cpus) if cpus else None
        s.domain = WILDCARD if d is None else d


def close_all(socks: list[GroupSocket]) -> None:
    for s in socks:
        if s.fd >= 0:
            os.close(s.fd)
            s.fd = -1
