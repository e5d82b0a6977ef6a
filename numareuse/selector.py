"""The selector: maps, program and slot layout, owned by one object.

The kernel maps are the single source of truth, so that every process that
holds their fds (a pre-fork master, its forked workers, the CLI through
pinned state) sees and changes the same registrations:

* ``sockarray``   REUSEPORT_SOCKARRAY, region r holds slots r*capacity ..
                  r*capacity+count[r]-1; regions 0..ndomains-1 are domains,
                  region ndomains is the wildcard
* ``region_count`` ARRAY, live slot count per region (read by the program)
* ``cpu_domain``  ARRAY, cpu -> domain (ndomains = none: go to the wildcard)
* ``counters``    PERCPU_ARRAY, outcomes counted by the program
* ``slot_cookie`` ARRAY, slot -> socket cookie (0 = hole); controller only
* ``slot_of``     HASH, socket cookie -> slot; controller only
* ``meta``        ARRAY, layout version and sizes, for pinned state checks

Changes happen under a lock (a POSIX lock on an inherited memfd for forked
workers, or flock on the pinned directory) and in an order that keeps every
slot below count either live or a hole the program probes past.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import tempfile
import threading
import weakref
from importlib import resources

from . import _layout, _sys, topology
from ._headers import ensure_kernel_source
from .errors import (
    CapacityError,
    DomainError,
    NotInGroupError,
    NotSupported,
    NumaReuseError,
    StateError,
    VerifierError,
    from_oserror,
    wrap,
)

CURRENT = -1  # FreeBSD TCP_REUSPORT_LB_NUMA_CURDOM
WILDCARD = -2  # FreeBSD TCP_REUSPORT_LB_NUMA_NODOM

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

# (map key, bpf map type, key size, value size, entries as a function of the layout)
_MAP_SPECS = (
    ("sockarray", _sys.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, lambda nd, cap, ncpu: (nd + 1) * cap),
    ("cpu_domain", _sys.BPF_MAP_TYPE_ARRAY, 4, 4, lambda nd, cap, ncpu: ncpu),
    ("region_count", _sys.BPF_MAP_TYPE_ARRAY, 4, 4, lambda nd, cap, ncpu: nd + 1),
    ("counters", _sys.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, lambda nd, cap, ncpu: _layout.NR_COUNTERS),
    ("slot_cookie", _sys.BPF_MAP_TYPE_ARRAY, 4, 8, lambda nd, cap, ncpu: (nd + 1) * cap),
    ("slot_of", _sys.BPF_MAP_TYPE_HASH, 8, 4, lambda nd, cap, ncpu: (nd + 1) * cap),
    ("meta", _sys.BPF_MAP_TYPE_ARRAY, 4, 8, lambda nd, cap, ncpu: len(_layout.META_KEYS)),
)

_MIN_KERNEL = {
    "sockarray": "BPF_MAP_TYPE_REUSEPORT_SOCKARRAY (Linux 4.19)",
    "program": "BPF_PROG_TYPE_SK_REUSEPORT (Linux 4.19)",
}


def _fileno(sock) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


class _Lock:
    """Mutual exclusion between threads and processes sharing one selector.

    ``posix`` locks (fcntl/lockf) belong to a process, so a forked worker that
    inherited the fd excludes its master without reopening anything (it may
    have dropped the privileges needed to reopen). flock on a directory fd is
    used for pinned state, opened anew by each process.
    """

    def __init__(self, fd: int, posix: bool):
        self.fd, self._posix = fd, posix
        self._threads = threading.Lock()
        _LOCKS.add(self)

    def _after_fork(self) -> None:
        # a thread of the parent may have held it at fork(): the child has no such thread
        self._threads = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, shared: bool = False):
        with self._threads:
            if self._posix:
                fcntl.lockf(self.fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            else:
                fcntl.flock(self.fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                (fcntl.lockf if self._posix else fcntl.flock)(self.fd, fcntl.LOCK_UN)


_LOCKS: weakref.WeakSet[_Lock] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [lock._after_fork() for lock in list(_LOCKS)])


@contextlib.contextmanager
def _stderr_captured():
    """Collect what C code (clang, libbpf, the verifier log) writes to fd 2."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        out = {"text": ""}
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out["text"] = tmp.read().decode(errors="replace")


def load_program(defines: dict[str, int], attach_type: int = _sys.BPF_SK_REUSEPORT_SELECT) -> int:
    """Compile bpf/selector.bpf.c with bcc and load it; return a program fd owned by the caller."""
    ensure_kernel_source()
    try:
        from bcc import BPF
    except ImportError as e:
        raise NotSupported("bcc Python bindings: install Debian's python3-bpfcc (make setup does)") from e
    src = resources.files("numareuse.bpf").joinpath("selector.bpf.c").read_text()
    cflags = [f"-D{k}={v}" for k, v in defines.items()]
    b, fd, err = None, -1, None
    with _stderr_captured() as log:
        try:
            b = BPF(text=src.encode(), cflags=cflags)
            fn = b.load_func(_layout.PROG_NAME.encode(), _sys.BPF_PROG_TYPE_SK_REUSEPORT, attach_type=attach_type)
            fd = os.dup(fn.fd)
        except Exception as e:  # bcc raises bare Exception for compile and load errors
            err = e
        finally:
            if b is not None:
                b.cleanup()  # closes bcc's own fds; ours is the dup
    if err is not None:
        lines = [ln for ln in log["text"].splitlines() if ln.strip()]
        tail = "\n".join(lines[-8:])
        if "Permission denied" in tail or "Operation not permitted" in tail:
            raise from_oserror(PermissionError(1, "Operation not permitted"), "loading the BPF program")
        if "Invalid argument" in str(err) and not tail:
            raise NotSupported(f"the kernel refused the program: needs {_MIN_KERNEL['program']}")
        raise VerifierError(f"loading the BPF program failed: {err}\n{tail}")
    return fd


class Selector:
    """NUMA-local socket selection for one SO_REUSEPORT group.

    ``domains`` is ``"numa"``, ``"llc"``, ``"cpu"``, an explicit spec such as
    ``"0-1;2-3"`` or a :class:`topology.Topology`. ``capacity`` is the number
    of sockets per domain (and in the wildcard), 256 by default as FreeBSD's
    group. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, domains="numa", *, capacity: int = _layout.DEFAULT_CAPACITY):
        topo = domains if isinstance(domains, topology.Topology) else topology.parse(domains)
        if not 1 <= capacity <= _layout.MAX_CAPACITY:
            raise NumaReuseError(f"capacity {capacity} out of range 1..{_layout.MAX_CAPACITY}")
        self._init(topo, capacity)
        try:
            self._create_maps()
            self._write_layout()
            self._prog_fd = load_program(
                _layout.defines(topo.ndomains, capacity, self._fds), _sys.BPF_SK_REUSEPORT_SELECT
            )
            self._lock_fd = os.memfd_create("numareuse-lock", 0)
        except BaseException:
            self._release()
            raise
        self._lock = _Lock(self._lock_fd, posix=True)

    def _init(self, topo: topology.Topology, capacity: int) -> None:
        self.topology = topo
        self.capacity = capacity
        self.ncpus = _sys.possible_cpus()
        self._fds: dict[str, int] = {}
        self._prog_fd = -1
        self._lock_fd = -1
        self._sock_fds: dict[int, int] = {}  # cookie -> the caller's fd of that socket (not a dup)
        self._group: tuple | None = None
        self._attached = False
        self._owner = os.getpid()
        self._detach_on_close = True

    @classmethod
    def adopt(cls, topo: topology.Topology, capacity: int, fds: dict[str, int], prog_fd: int) -> Selector:
        """A selector over existing maps and program (pinned state); takes ownership of the fds.

        It does not know whether the program is attached: the caller does.
        """
        self = cls.__new__(cls)
        self._init(topo, capacity)
        self._fds, self._prog_fd = dict(fds), prog_fd
        self._lock_fd = os.memfd_create("numareuse-lock", 0)
        self._lock = _Lock(self._lock_fd, posix=True)
        self._detach_on_close = False
        return self

    @wrap("pinning the selector in bpffs")
    def pin(self, directory: str) -> None:
        """Pin every map and the program as files in ``directory`` (an existing bpffs dir).

        Pinned steering outlives this object: close() no longer detaches.
        """
        self._detach_on_close = False
        for key, fd in self._fds.items():
            _sys.obj_pin(fd, os.path.join(directory, key))
        _sys.obj_pin(self._prog_fd, os.path.join(directory, "prog"))

    # -- construction -----------------------------------------------------

    def _create_maps(self) -> None:
        nd, cap = self.topology.ndomains, self.capacity
        for key, mtype, ks, vs, entries in _MAP_SPECS:
            try:
                self._fds[key] = _sys.map_create(mtype, ks, vs, entries(nd, cap, self.ncpus), _layout.MAPS[key])
            except OSError as e:
                if e.errno == 22 and key == "sockarray":
                    raise NotSupported(f"the kernel refused a map: needs {_MIN_KERNEL['sockarray']}") from e
                raise from_oserror(e, f"creating BPF map {_layout.MAPS[key]}") from e

    @wrap("writing the selector's maps")
    def _write_layout(self) -> None:
        nd = self.topology.ndomains
        for cpu in range(self.ncpus):
            dom = self.topology.cpu_domain.get(cpu, nd)
            _sys.map_update(self._fds["cpu_domain"], cpu, _U32.pack(dom))
        meta = dict(
            version=_layout.LAYOUT_VERSION,
            ndomains=nd,
            capacity=self.capacity,
            probe_max=min(_layout.PROBE_MAX, self.capacity),
            attach_type=_sys.BPF_SK_REUSEPORT_SELECT,
            ncpus=self.ncpus,
        )
        for i, k in enumerate(_layout.META_KEYS):
            _sys.map_update(self._fds["meta"], i, _U64.pack(meta[k]))

    def _release(self) -> None:
        for fd in [*self._fds.values(), self._prog_fd, self._lock_fd]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds.clear()
        self._prog_fd = self._lock_fd = -1

    # -- properties -------------------------------------------------------

    @property
    def ndomains(self) -> int:
        return self.topology.ndomains

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def prog_fd(self) -> int:
        return self._prog_fd

    @property
    def map_fds(self) -> dict[str, int]:
        return dict(self._fds)

    def program_info(self) -> dict:
        """id, name and the kernel's run_time_ns / run_cnt of the loaded program."""
        return _sys.prog_info(self._prog_fd)

    # -- sockets ----------------------------------------------------------

    @staticmethod
    def _group_key(fd: int) -> tuple:
        """(family, type, protocol, bound address) of a socket usable in a group, else ENOENT."""
        dup = os.dup(fd)
        try:
            s = socket.socket(fileno=dup)
        except OSError as e:
            os.close(dup)
            raise NotInGroupError(f"fd {fd} is not a socket ({e.strerror})") from None
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type not in (
                socket.SOCK_STREAM,
                socket.SOCK_DGRAM,
            ):
                raise NotInGroupError("not a TCP or UDP socket over IPv4/IPv6")
            if not s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                raise NotInGroupError("socket has no SO_REUSEPORT, so it is in no reuseport group")
            addr = s.getsockname()
            if addr[1] == 0:
                raise NotInGroupError("socket is not bound")
            if s.type == socket.SOCK_STREAM and not s.getsockopt(socket.SOL_SOCKET, _sys.SO_ACCEPTCONN):
                raise NotInGroupError("TCP socket is not listening")
            return (s.family, s.type, s.proto, addr[:2])
        finally:
            s.close()

    def _member(self, sock) -> tuple[int, int]:
        """(fd, cookie) of a socket of the attached group, else NotInGroupError."""
        fd = _fileno(sock)
        if self._group is None:
            raise NotInGroupError("the selector is not attached to a reuseport group")
        key = self._group_key(fd)
        if key != self._group:
            raise NotInGroupError(f"socket {key[3]} is not in the attached group {self._group[3]}")
        return fd, _sys.sock_cookie(fd)

    def _live_fd(self, cookie: int) -> int | None:
        """An fd of the socket with ``cookie`` if this process still holds one."""
        fd = self._sock_fds.get(cookie)
        if fd is None:
            return None
        try:
            if _sys.sock_cookie(fd) == cookie:
                return fd
        except OSError:
            pass
        del self._sock_fds[cookie]  # closed, or the number now names another file
        return None

    # -- attach / detach --------------------------------------------------

    def use_group(self, sock) -> None:
        """Name the SO_REUSEPORT group of ``sock`` without attaching the program.

        Lets a controller fill the regions first, so that the program steers
        from its first packet (``attach`` afterwards).
        """
        fd = _fileno(sock)
        key = self._group_key(fd)
        if self._group is not None and key != self._group:
            raise NumaReuseError(f"already attached to group {self._group[3]}; use one Selector per group")
        self._group = key
        self._sock_fds[_sys.sock_cookie(fd)] = fd

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

    def _any_group_fd(self, sock=None) -> int | None:
        if sock is not None:
            return self._member(sock)[0]
        for cookie in list(self._sock_fds):
            fd = self._live_fd(cookie)
            if fd is not None:
                return fd
        return None

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
        try:
            done = _sys.detach_reuseport_prog(fd)
        except OSError as e:
            raise from_oserror(e, "detaching the program (SO_DETACH_REUSEPORT_BPF)") from e
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

    @wrap("registering the socket")
    def register(self, sock, domain: int = CURRENT) -> int:
        """Steer connections of ``domain`` to ``sock``; returns the domain used.

        As FreeBSD's TCP_REUSPORT_LB_NUMA: CURRENT is the caller's domain (the
        domain holding all CPUs of the calling thread's affinity, else the
        domain of the CPU it runs on now; WILDCARD if that CPU is in no
        domain), WILDCARD puts the socket in the group every domain falls back
        to. Registering a registered socket moves it. Raises DomainError
        (EINVAL), NotInGroupError (ENOENT), CapacityError (ENOSPC).
        """
        region, resolved = self._region(domain)
        fd, cookie = self._member(sock)
        with self._lock():
            cur = self._slot_of(cookie)
            if cur is not None and cur // self.capacity == region and self._slot_live(cur, cookie):
                self._sock_fds[cookie] = fd
                return resolved
            if cur is not None:
                self._need_room(region)  # a failed move must leave the socket where it was
                self._vacate(cur, cookie)
                self._compact(cur // self.capacity)
            self._sock_fds[cookie] = fd
            self._insert(region, fd, cookie)
        return resolved

    @wrap("unregistering the socket")
    def unregister(self, sock) -> bool:
        """Take ``sock`` out of its region. Returns False when it was not registered."""
        _fd, cookie = self._member(sock)
        with self._lock():
            cur = self._slot_of(cookie)
            if cur is None:
                return False
            self._vacate(cur, cookie)
            self._compact(cur // self.capacity)
        return True

    @wrap("sweeping the selector's slots")
    def refresh(self) -> int:
        """Drop slots of closed sockets and compact every region; returns slots freed."""
        with self._lock():
            return sum(self._compact(r) for r in range(self.ndomains + 1))

    @wrap("clearing the selector's slots")
    def clear(self) -> None:
        """Unregister every socket (counts first, so the program stops picking at once).

        A socket can sit in only one REUSEPORT_SOCKARRAY (the kernel marks it
        busy), so a replacement selector needs the old one cleared first.
        """
        with self._lock():
            for region in range(self.ndomains + 1):
                self._set_count(region, 0)
            for slot in range((self.ndomains + 1) * self.capacity):
                # every slot, not only those below the counts: an interrupted
                # operation may have left a socket above a count
                cookie = self._slot_cookie(slot)
                if cookie or self._slot_live(slot):
                    self._vacate(slot, cookie)

    # Slot primitives; the lock is held by the caller.

    def _count(self, region: int) -> int:
        return _U32.unpack(_sys.map_lookup(self._fds["region_count"], _U32.pack(region), 4))[0]

    def _set_count(self, region: int, n: int) -> None:
        _sys.map_update(self._fds["region_count"], region, _U32.pack(n))

    def _slot_of(self, cookie: int) -> int | None:
        v = _sys.map_lookup(self._fds["slot_of"], _U64.pack(cookie), 4)
        return None if v is None else _U32.unpack(v)[0]

    def _slot_cookie(self, slot: int) -> int:
        return _U64.unpack(_sys.map_lookup(self._fds["slot_cookie"], _U32.pack(slot), 8))[0]

    def _slot_live(self, slot: int, cookie: int | None = None) -> bool:
        """The slot holds a socket (``cookie``'s, when given: a sockarray lookup returns the cookie)."""
        v = _sys.map_lookup(self._fds["sockarray"], _U32.pack(slot), 8)
        return v is not None and (cookie is None or _U64.unpack(v)[0] == cookie)

    def _put(self, slot: int, fd: int, cookie: int) -> None:
        # socket first, bookkeeping after: the program only reads the sockarray
        _sys.map_update(self._fds["sockarray"], slot, _U64.pack(fd))
        _sys.map_update(self._fds["slot_cookie"], slot, _U64.pack(cookie))
        _sys.map_update_u64key(self._fds["slot_of"], cookie, _U32.pack(slot))

    def _vacate(self, slot: int, cookie: int) -> None:
        _sys.map_delete(self._fds["sockarray"], _U32.pack(slot))
        _sys.map_delete(self._fds["slot_of"], _U64.pack(cookie))
        _sys.map_update(self._fds["slot_cookie"], slot, _U64.pack(0))

    def _need_room(self, region: int) -> list[int]:
        """Sweep ``region``; CapacityError unless it can take one more socket. Returns its holes."""
        _freed, holes = self._sweep(region)
        if not holes and self._count(region) >= self.capacity:
            name = "the wildcard" if region == self.ndomains else f"domain {region}"
            raise CapacityError(f"{name} already holds {self.capacity} sockets (capacity)")
        return holes

    def _insert(self, region: int, fd: int, cookie: int) -> None:
        holes = self._need_room(region)
        base, n = region * self.capacity, self._count(region)
        slot = base + (holes[0] if holes else n)  # a hole left by a socket we could not move, else append
        try:
            self._put(slot, fd, cookie)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise NumaReuseError(
                    "the socket is already in another selector's sockarray (the kernel allows one): "
                    "detach that one first (numareuse detach, or close the other Selector)",
                    errno=errno.EBUSY,
                ) from None
            raise
        if not holes:
            self._set_count(region, n + 1)  # publish last: the program never sees a slot before its socket

    def _compact(self, region: int) -> int:
        """Free slots of closed sockets and fill holes from the region's tail; returns slots freed.

        A socket can be moved only by a process that holds an fd of it, so a
        hole may stay; the program probes past it and a later insert fills it.
        """
        return self._sweep(region)[0]

    def _sweep(self, region: int) -> tuple[int, list[int]]:
        """:meth:`_compact`, also returning the indexes of the holes that stay (ascending).

        One pass over the region: a register costs a map lookup or two per
        slot, so an insert must not scan the region a second time.
        """
        base, n = region * self.capacity, self._count(region)
        holes, freed = [], 0
        for i in range(n):
            slot = base + i
            cookie = self._slot_cookie(slot)
            if cookie and not self._slot_live(slot, cookie):  # closed: the kernel emptied the slot
                _sys.map_delete(self._fds["slot_of"], _U64.pack(cookie))
                _sys.map_update(self._fds["slot_cookie"], slot, _U64.pack(0))
                self._sock_fds.pop(cookie, None)
                cookie, freed = 0, freed + 1
            if not cookie:
                holes.append(i)
        new_n = n
        while holes:
            last = new_n - 1
            if holes[-1] == last:  # trailing hole: just shrink
                holes.pop()
                new_n -= 1
                continue
            cookie = self._slot_cookie(base + last)
            fd = self._live_fd(cookie)
            if fd is None:
                break
            hole = holes.pop(0)
            _sys.map_delete(self._fds["sockarray"], _U32.pack(base + last))
            self._put(base + hole, fd, cookie)
            _sys.map_update(self._fds["slot_cookie"], base + last, _U64.pack(0))
            new_n -= 1
        if new_n != n:
            self._set_count(region, new_n)
        return freed, holes

    # -- reading ----------------------------------------------------------

    @wrap("reading the selector's maps")
    def registrations(self) -> list[dict]:
        """Every registered socket: slot, domain (WILDCARD for the wildcard), cookie, live."""
        out = []
        with self._lock(shared=True):
            for region in range(self.ndomains + 1):
                base = region * self.capacity
                for i in range(self._count(region)):
                    cookie = self._slot_cookie(base + i)
                    if cookie:
                        out.append(
                            {
                                "slot": base + i,
                                "domain": WILDCARD if region == self.ndomains else region,
                                "cookie": cookie,
                                "live": self._slot_live(base + i),
                            }
                        )
        return out

    @wrap("reading the selector's counters")
    def stats(self) -> dict[str, int]:
        """Outcome counters summed over CPUs: local, wildcard, fallback, empty_skipped."""
        out = {}
        for i, name in enumerate(_layout.COUNTERS):
            raw = _sys.map_lookup(self._fds["counters"], _U32.pack(i), 8 * self.ncpus)
            out[name] = sum(struct.unpack(f"={self.ncpus}Q", raw))
        return out

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
            self._release()
            self._sock_fds.clear()

    def __enter__(self) -> Selector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"<Selector domains={self.topology.spec!r} ndomains={self.ndomains} {state}>"


def check_state_version(meta: dict[str, int]) -> None:
    """Refuse pinned state written with another layout version."""
    if meta.get("version") != _layout.LAYOUT_VERSION:
        raise StateError(
            f"pinned state has layout version {meta.get('version')}, this numareuse uses "
            f"{_layout.LAYOUT_VERSION}: detach it with the numareuse that attached it"
        )
