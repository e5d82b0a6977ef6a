"""The selector: NUMA-local socket selection for one SO_REUSEPORT group.

A thin public object over three private parts: ``_maps`` (the kernel maps,
their layout, pinning and upgrades), ``_loader`` (the program, compiled
once outside this process and loaded with the map fds patched in) and
``_slots`` (the slot allocator). The kernel maps are the single source of
truth, so that every process holding their fds sees the same registrations.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time

from . import _layout, _loader, _maps, _slots, _sys, topology
from .errors import DomainError, NotInGroupError, NumaReuseError, from_oserror, wrap

CURRENT = -1  # FreeBSD TCP_REUSPORT_LB_NUMA_CURDOM
WILDCARD = -2  # FreeBSD TCP_REUSPORT_LB_NUMA_NODOM

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_TCP_INFO = 11
_SIOCINQ = 0x541B


def load_program(layout: _layout.Layout, fds: dict[str, int], migrate: bool | None = None) -> tuple[int, int, int]:
    """(program fd, program hash, attach type) of the selector over ``fds`` (see ``_loader.load``)."""
    return _loader.load(layout, fds, migrate)


def _fileno(sock) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _group_key(fd: int) -> tuple[tuple, int]:
    """((family, type, protocol, bound address, device), cookie) of a socket usable in a
    group, else ENOENT. One dup, and every query through it (each a C call, no ctypes)."""
    try:
        dup = os.dup(fd)
    except OSError as e:
        raise NotInGroupError(f"fd {fd} is not open ({e.strerror})") from None
    try:
        s = socket.socket(fileno=dup)
    except OSError as e:
        os.close(dup)
        raise NotInGroupError(f"fd {fd} is not a socket ({e.strerror})") from None
    try:
        fam, typ = s.family, s.type  # each read converts to an IntEnum: read once
        if fam not in (socket.AF_INET, socket.AF_INET6) or typ not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise NotInGroupError("not a TCP or UDP socket over IPv4/IPv6")
        if not s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            raise NotInGroupError("socket has no SO_REUSEPORT, so it is in no reuseport group")
        addr = s.getsockname()
        if addr[1] == 0:
            raise NotInGroupError("socket is not bound")
        if typ == socket.SOCK_STREAM and not s.getsockopt(socket.SOL_SOCKET, _sys.SO_ACCEPTCONN):
            raise NotInGroupError("TCP socket is not listening")
        # sockets bound to different devices (SO_BINDTODEVICE) form different groups on one address
        device = _sys.ifname(s.getsockopt(socket.SOL_SOCKET, _sys.SO_BINDTODEVICE, _sys.IFNAMSIZ))
        cookie = _U64.unpack(s.getsockopt(socket.SOL_SOCKET, _sys.SO_COOKIE, 8))[0]
        return (fam, typ, s.proto, addr[:2], device), cookie
    finally:
        s.close()


def _describe(key: tuple) -> str:
    host, port = key[3][0], key[3][1]
    where = f"[{host}]:{port}" if key[0] == socket.AF_INET6 else f"{host}:{port}"
    return where + (f" on device {key[4]}" if key[4] else "")


def queued(fd: int) -> int:
    """Connections waiting in a listener's accept queue (datagram bytes for UDP)."""
    if _sys.sock_opt_int(fd, _sys.SO_PROTOCOL) == socket.IPPROTO_TCP:
        # struct tcp_info of a listener: tcpi_unacked (offset 24) is sk_ack_backlog
        info = socket.socket(fileno=os.dup(fd))
        try:
            raw = info.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
        finally:
            info.close()
        return struct.unpack_from("=I", raw, 24)[0]
    import fcntl

    buf = fcntl.ioctl(fd, _SIOCINQ, b"\0\0\0\0")
    return struct.unpack("=i", buf)[0]


class Selector:
    """NUMA-local socket selection for one SO_REUSEPORT group.

    ``domains`` is ``"numa"``, ``"llc"``, ``"cpu"``, an explicit spec such as
    ``"0-1;2-3"`` or a :class:`topology.Topology`. ``capacity`` is the number
    of sockets per domain (and in the wildcard), 256 by default as FreeBSD's
    group. ``migrate`` None loads the program so that a closing listener's
    connections migrate where the kernel can (5.14+). Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, domains="numa", *, capacity: int = _layout.DEFAULT_CAPACITY, migrate: bool | None = None):
        topo = domains if isinstance(domains, topology.Topology) else topology.parse(domains)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= _layout.MAX_CAPACITY:
            raise NumaReuseError(f"capacity {capacity!r} out of range 1..{_layout.MAX_CAPACITY}")
        layout = _layout.Layout(topo.ndomains, capacity, _sys.possible_cpus())
        fds = _maps.create(layout)
        prog_fd = -1
        try:
            _maps.write_cpu_domains(fds["cpu_domain"], layout, topo.cpu_domain)
            prog_fd, prog_hash, attach_type = load_program(layout, fds, migrate)
            _maps.write_meta(fds["meta"], layout, attach_type, prog_hash)
        except OSError as e:
            _maps.close_fds(fds)
            if prog_fd >= 0:
                os.close(prog_fd)
            raise from_oserror(e, "writing the selector's maps") from e
        except BaseException:
            _maps.close_fds(fds)
            if prog_fd >= 0:
                os.close(prog_fd)
            raise
        self._init(topo, layout, fds, prog_fd, _layout.LAYOUT_VERSION, attach_type, prog_hash)
        self._detach_on_close = True

    def _init(self, topo, layout, fds, prog_fd, version, attach_type, prog_hash) -> None:
        self.topology = topo
        self.layout = layout
        self.capacity = layout.capacity
        self.ncpus = layout.ncpus
        self.layout_version = version
        self.attach_type = attach_type
        self.prog_hash = prog_hash
        self._fds = fds
        self._prog_fd = prog_fd
        self._sock_fds: dict[int, int] = {}
        # layout-1 state (not mappable) is only read, cleared or upgraded
        self._slots = _slots.Slots(fds, layout, self._sock_fds) if version == _layout.LAYOUT_VERSION else None
        self._lock_fd = os.memfd_create("numareuse-lock")  # close-on-exec: a lock is never inherited by exec
        self._lock = _slots.Lock(self._lock_fd)
        self._group: tuple | None = None
        self._attached = False
        self._owner = os.getpid()

    @classmethod
    def adopt(cls, topo: topology.Topology, fds: dict[str, int], prog_fd: int, meta: dict) -> Selector:
        """A selector over existing maps and program (pinned state); takes ownership of the fds.

        It does not know whether the program is attached: the caller does.
        Layout-1 state can be read; :meth:`upgrade` turns it into layout 2.
        """
        layout = _maps.check_meta(meta)
        self = cls.__new__(cls)
        self._init(topo, layout, dict(fds), prog_fd, meta["version"], meta["attach_type"], meta.get("prog_hash") or 0)
        self._detach_on_close = False
        return self

    @wrap("pinning the selector in bpffs")
    def pin(self, directory: str) -> None:
        """Pin every map and the program as files in ``directory`` (an existing bpffs dir).

        Pinned steering outlives this object: close() no longer detaches.
        """
        self._detach_on_close = False
        _maps.pin(self._fds, self._prog_fd, directory)

    # -- properties -------------------------------------------------------

    @property
    def ndomains(self) -> int:
        return self.topology.ndomains

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def migration(self) -> bool:
        """The program is loaded as SELECT_OR_MIGRATE: a closing listener's connections migrate."""
        return self.attach_type == _sys.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE

    @property
    def prog_fd(self) -> int:
        return self._prog_fd

    @property
    def map_fds(self) -> dict[str, int]:
        return dict(self._fds)

    def program_info(self) -> dict:
        """id, name and the kernel's run_time_ns / run_cnt of the loaded program."""
        return _sys.prog_info(self._prog_fd)

    # -- programs and layouts ---------------------------------------------

    def current_program(self) -> bool:
        """The loaded program is the one this numareuse would load now (same hash and attach type)."""
        if self.layout_version != _layout.LAYOUT_VERSION:
            return False
        insns = _loader.compiled(self.layout, _loader.migration_supported())
        want = _sys.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if _loader.migration_supported() else 0
        return _loader.program_hash(insns) == self.prog_hash and (want == 0 or self.attach_type == want)

    @wrap("loading the new program")
    def reload_program(self) -> None:
        """Load this numareuse's program over the same maps (attach it with :meth:`attach`).

        Registrations and counters stay; when attached, the kernel swaps the
        program atomically, so steering has no gap.
        """
        if self.layout_version != _layout.LAYOUT_VERSION:
            raise NumaReuseError("reload_program needs layout 2: upgrade() first")
        fd, prog_hash, attach = load_program(self.layout, self._fds)
        with self._lock():
            _maps.write_meta(self._fds["meta"], self.layout, attach, prog_hash)
        os.close(self._prog_fd)
        self._prog_fd, self.prog_hash, self.attach_type = fd, prog_hash, attach

    @wrap("upgrading the pinned layout")
    def upgrade(self) -> None:
        """Turn layout-1 maps into layout 2 in place and load the new program over them.

        The sockarray and the slot bookkeeping are kept, so every socket stays
        in its slot; attach the new program (:meth:`attach`) to swap it in
        atomically, then pin again.
        """
        if self.layout_version == _layout.LAYOUT_VERSION:
            return
        new = _maps.upgrade_v1(self._fds, self.layout)
        fds = {k: v for k, v in self._fds.items() if k not in new}
        old = {k: self._fds[k] for k in new if k in self._fds}
        fds.update(new)
        try:
            slots = _slots.Slots(fds, self.layout, self._sock_fds)
        except BaseException:
            _maps.close_fds(new)
            raise
        try:
            for r in _slots.legacy_registrations(self._fds, self.layout):
                slots.set_region_entry(r["cookie"], r["region"])
            for region, n in enumerate(slots.counts()):
                if n:  # bucket b -> b mod n: every slot its share, every flow on a socket
                    slots._write_buckets(region, list(range(slots.nb)), [b % n for b in range(slots.nb)])
                    shares = [len(range(i, slots.nb, n)) for i in range(n)]
                    slots._write_shares(region, shares, set(range(n)))
            slots.write_spill()
            fd, prog_hash, attach = load_program(self.layout, fds)
        except BaseException:
            slots.close()
            _maps.close_fds(new)
            raise
        _maps.write_meta(fds["meta"], self.layout, attach, prog_hash)
        _maps.close_fds(old)
        os.close(self._prog_fd)
        self._fds, self._slots = fds, slots
        self._prog_fd, self.prog_hash, self.attach_type = fd, prog_hash, attach
        self.layout_version = _layout.LAYOUT_VERSION

    # -- sockets ----------------------------------------------------------

    def _member(self, sock) -> tuple[int, int]:
        """(fd, cookie) of a socket of the attached group, else NotInGroupError."""
        fd = _fileno(sock)
        if self._group is None:
            raise NotInGroupError("the selector is not attached to a reuseport group")
        key, cookie = _group_key(fd)
        if key != self._group:
            raise NotInGroupError(f"socket {_describe(key)} is not in the attached group {_describe(self._group)}")
        return fd, cookie

    # -- attach / detach --------------------------------------------------

    @wrap("naming the group")
    def use_group(self, sock) -> None:
        """Name the SO_REUSEPORT group of ``sock`` without attaching the program.

        Lets a controller fill the regions first, so that the program steers
        from its first packet (``attach`` afterwards).
        """
        fd = _fileno(sock)
        key, cookie = _group_key(fd)
        if self._group is not None and key != self._group:
            raise NumaReuseError(
                f"already attached to group {_describe(self._group)}, not {_describe(key)}; use one Selector per group"
            )
        self._group = key
        self._sock_fds[cookie] = fd

    def attach(self, sock) -> None:
        """Attach the program to the SO_REUSEPORT group of ``sock`` (any socket of it).

        Attaching again is harmless: the kernel swaps in the same program.
        """
        self.use_group(sock)
        try:
            _sys.attach_reuseport_prog(_fileno(sock), self._prog_fd)
        except OSError as e:
            if not self._attached:
                self._group = None
            raise from_oserror(e, "attaching the program (SO_ATTACH_REUSEPORT_EBPF)") from e
        self._attached = True

    def forget_attached(self) -> None:
        """Another program is attached now: do not detach it on close."""
        self._attached = False

    def _any_group_fd(self, sock=None) -> int | None:
        if sock is not None:
            return self._member(sock)[0]
        for cookie in list(self._sock_fds):
            fd = _slots.live_fd(self._sock_fds, cookie)
            if fd is not None:
                return fd
        return None

    @staticmethod
    def detach_group(sock) -> bool:
        """Detach whatever program is attached to the reuseport group of ``sock`` (for a
        controller that holds no Selector for it, as ``numareuse detach`` after a crash).
        Returns False when none was."""
        try:
            return _sys.detach_reuseport_prog(_fileno(sock))
        except OSError as e:
            raise from_oserror(e, "detaching the program (SO_DETACH_REUSEPORT_BPF)") from e

    def detach(self, sock=None) -> bool:
        """Detach the program from the group; the kernel's own hash balances again.

        Needs an open socket of the group: ``sock``, or one this selector
        attached or registered. Returns False when nothing was attached.
        """
        if not self._attached:
            return False
        fd = self._any_group_fd(sock)
        if fd is None:
            # every socket we knew is closed: the group (and the program with it) is gone
            self._group, self._attached = None, False
            return False
        done = self.detach_group(fd)
        self._group, self._attached = None, False
        return done

    # -- registration -----------------------------------------------------

    def _region(self, domain: int) -> tuple[int, int]:
        """(region, resolved domain) for a register() domain argument."""
        if domain == WILDCARD:
            return self.ndomains, WILDCARD
        if domain == CURRENT:
            d = topology.current_domain(self.topology)
            return (self.ndomains, WILDCARD) if d is None else (d, d)
        if isinstance(domain, bool) or not isinstance(domain, int) or not self.topology.valid(domain):
            raise DomainError(
                f"domain {domain!r} is not CURRENT (-1), WILDCARD (-2) or a domain with CPUs in 0..{self.ndomains - 1}"
            )
        return domain, domain

    def _need_v2(self) -> None:
        if self.layout_version != _layout.LAYOUT_VERSION:
            raise NumaReuseError("this selector's pinned state has layout 1: attach again to upgrade it")

    @wrap("registering the socket")
    def register(self, sock, domain: int = CURRENT) -> int:
        """Steer connections of ``domain`` to ``sock``; returns the domain used.

        As FreeBSD's TCP_REUSPORT_LB_NUMA: CURRENT is the caller's domain (the
        domain holding all CPUs of the calling thread's affinity, else the
        domain of the CPU it runs on now; WILDCARD if that CPU is in no
        domain), WILDCARD puts the socket in the group every domain falls back
        to. Registering a registered socket moves it; registering a drained
        socket steers to it again. Raises DomainError (EINVAL),
        NotInGroupError (ENOENT), CapacityError (ENOSPC).
        """
        region, resolved = self._region(domain)
        fd, cookie = self._member(sock)
        self._need_v2()
        s = self._slots
        with self._lock():
            s.sock_fds[cookie] = fd
            cur = s.slot_of(cookie)
            if cur is not None and cur // self.capacity == region and s.live(cur, cookie):
                entry = s.region_entry(cookie)
                if entry != (region, 0):
                    s.set_region_entry(cookie, region)
                return resolved
            if cur is not None:
                if cur // self.capacity != region:
                    s.free_index(region)  # CapacityError here leaves the socket where it was
                s.vacate(cur, cookie)
            s.insert(region, fd, cookie)
        return resolved

    @wrap("unregistering the socket")
    def unregister(self, sock, compact: bool = True) -> bool:
        """Take ``sock`` out of its region. Returns False when it was not registered.

        ``compact=False`` leaves its slot a hole instead of moving the region's
        last socket into it: for a selector that hands its sockets to a
        replacement, whose program keeps steering to those left (a move
        empties a slot for a moment).
        """
        _fd, cookie = self._member(sock)
        self._need_v2()
        with self._lock():
            cur = self._slots.slot_of(cookie)
            if cur is None:
                return False
            self._slots.vacate(cur, cookie, compact=compact)
        return True

    @wrap("draining the socket")
    def drain(self, sock, timeout: float = 5.0, grace: float = 0.1) -> bool:
        """Stop steering new connections to ``sock`` and wait until its queue is empty.

        The protocol for a server that closes a listener (a worker exiting):
        drain, keep accepting until this returns, then close. ``grace``
        covers handshakes already in flight to the socket; then this waits up
        to ``timeout`` seconds for the accept queue (UDP: the receive queue)
        to empty. Returns True when it did. The socket stays in the group
        and is marked drained, so that reconcilers leave it alone;
        :meth:`register` steers to it again. What is still queued when it
        closes migrates (:attr:`migration`); a drained socket has no region,
        so that goes by the domain of the CPU that closes it.
        """
        fd, cookie = self._member(sock)
        self._need_v2()
        with self._lock():
            self._slots.drain(cookie)
        deadline = time.monotonic() + max(timeout, grace)
        time.sleep(max(grace, 0))
        while True:
            if queued(fd) == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def drained(self) -> set[int]:
        """Cookies of the sockets drained and not registered again."""
        if self.layout_version != _layout.LAYOUT_VERSION:
            return set()
        return self._slots.drained()

    @wrap("sweeping the selector's slots")
    def refresh(self) -> int:
        """Drop slots of closed sockets, repair live ones, compact every region; returns slots freed."""
        self._need_v2()
        with self._lock():
            freed = sum(self._slots.sweep(r) for r in range(self.layout.nregions))
            self._slots._collect_region_entries()
            return freed

    @wrap("clearing the selector's slots")
    def clear(self) -> None:
        """Unregister every socket (counts first, so the program stops picking at once).

        A socket can sit in only one REUSEPORT_SOCKARRAY (the kernel marks it
        busy), so a replacement selector needs the old one cleared first.
        """
        with self._lock():
            if self._slots is not None:
                self._slots.clear()
            else:
                _slots.legacy_clear(self._fds, self.layout)

    # -- reading ----------------------------------------------------------

    @wrap("reading the selector's maps")
    def registrations(self) -> list[dict]:
        """Every registered socket: slot, domain (WILDCARD for the wildcard), cookie, live."""
        with self._lock(shared=True):
            out = (
                self._slots.registrations()
                if self._slots is not None
                else _slots.legacy_registrations(self._fds, self.layout)
            )
        for r in out:
            r["domain"] = WILDCARD if r.pop("region") == self.ndomains else r["slot"] // self.capacity
        return out

    @wrap("reading the selector's counters")
    def cpu_stats(self) -> dict[int, dict[str, int]]:
        """The program's counters per CPU: cpu -> {name: value}."""
        out: dict[int, dict[str, int]] = {cpu: {} for cpu in range(self.ncpus)}
        for i, name in enumerate(_layout.COUNTERS):
            try:
                raw = _sys.map_lookup(self._fds["counters"], _U32.pack(i), 8 * self.ncpus)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                raw = None
            values = struct.unpack(f"={self.ncpus}Q", raw) if raw else (0,) * self.ncpus
            for cpu, v in enumerate(values):
                out[cpu][name] = v
        return out

    def stats(self) -> dict[str, int]:
        """The program's counters summed over CPUs (names in ``numareuse._layout.COUNTERS``)."""
        per = self.cpu_stats()
        return {name: sum(c[name] for c in per.values()) for name in _layout.COUNTERS}

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Detach (in the process that created the selector) and release every fd.

        A forked worker closing its inherited copy only drops its fds, and a
        pinned selector stays attached (detach explicitly).
        """
        try:
            if self._detach_on_close and os.getpid() == self._owner and self._fds:
                with contextlib.suppress(NumaReuseError):
                    # empty the sockarray now: the kernel frees the map some ms later,
                    # and until then its sockets cannot join another selector (EBUSY)
                    self.clear()
                    if self._attached:
                        self.detach()
        finally:
            self._group, self._attached = None, False
            if self._slots is not None:
                self._slots.close()
            _maps.close_fds(self._fds)
            for fd in (self._prog_fd, self._lock_fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._prog_fd = self._lock_fd = -1
            self._sock_fds.clear()

    def __enter__(self) -> Selector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"<Selector domains={self.topology.spec!r} ndomains={self.ndomains} {state}>"
