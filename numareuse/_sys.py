"""Every raw syscall, socket option and magic number numareuse uses, in one place.

Nothing here raises a numareuse error: callers get OSError with the kernel's
errno, and the public layer translates it once (see ``errors.wrap``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import socket
import struct
import threading

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# (bpf, pidfd_getfd, renameat2) for the ABIs of Debian's architectures, as their
# linux-libc-dev-*-cross headers define them (tests/test_portability.py checks
# each against those headers). A 32-bit userland on a 64-bit kernel uses its
# own ABI's numbers, hence the pointer size.
SYSCALLS = {
    "x86_64": (321, 438, 316),
    "i386": (357, 438, 353),
    "aarch64": (280, 438, 276),
    "arm": (386, 438, 382),  # EABI (armel, armhf)
    "ppc64le": (361, 438, 357),
    "s390x": (351, 438, 347),
    "mips64": (5315, 5438, 5311),  # n64 (mips64el)
    "mips": (4355, 4438, 4351),  # o32 (mipsel)
    "riscv64": (280, 438, 276),  # asm-generic, as aarch64
    "loongarch64": (280, 438, 276),
}


def abi(machine: str | None = None, bits64: bool | None = None) -> str | None:
    """The syscall ABI of this process: a key of SYSCALLS, or None when unknown."""
    m = machine or os.uname().machine
    wide = struct.calcsize("P") == 8 if bits64 is None else bits64
    if m in ("x86_64", "amd64") or re.fullmatch(r"i[3-6]86", m):
        return "x86_64" if wide else "i386"
    if m in ("aarch64", "arm64") or m.startswith("arm"):
        return "aarch64" if wide else "arm"
    if m.startswith("mips"):
        return "mips64" if wide else "mips"
    if m.startswith("ppc64") and wide:
        return "ppc64le"
    return m if m in SYSCALLS else None


_NR_BPF, _NR_PIDFD_GETFD, _NR_RENAMEAT2 = SYSCALLS.get(abi(), (-1, -1, -1))

# enum bpf_cmd (include/uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24  # 5.6+
BPF_MAP_UPDATE_BATCH = 26

# enum bpf_map_type / bpf_prog_type / bpf_attach_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_SK_REUSEPORT_SELECT = 39
BPF_SK_REUSEPORT_SELECT_OR_MIGRATE = 40  # 5.14+: room for tcp_migrate_req

BPF_ANY = 0
BPF_NOEXIST = 1

# socket options (include/uapi/asm-generic/socket.h)
SO_BINDTODEVICE = 25
SO_REUSEPORT = 15
SO_ACCEPTCONN = 30
SO_INCOMING_CPU = 49
SO_ATTACH_REUSEPORT_EBPF = 52
SO_COOKIE = 57
SO_DETACH_REUSEPORT_BPF = 68
SO_PROTOCOL = 38
SO_DOMAIN = 39


class _MapCreate(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _MapElem(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ProgLoad(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class _ObjPin(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _InfoByFd(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _GetId(ctypes.Structure):
    _fields_ = [
        ("start_id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    # The kernel zero-checks the tail of bpf_attr past what it knows, so pass
    # exactly the struct we filled (it is zero-initialised by ctypes).
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


BPF_F_MMAPABLE = 1 << 10  # 5.5+: an ARRAY map user space can mmap


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str, flags: int = 0) -> int:
    attr = _MapCreate(map_type, key_size, value_size, max_entries, flags)
    attr.map_name = name.encode()[:15]
    return _bpf(BPF_MAP_CREATE, attr)


def _elem(cmd: int, fd: int, key: bytes, value, flags: int = 0) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    attr = _MapElem(fd, 0, ctypes.addressof(kbuf), ctypes.addressof(value) if value is not None else 0, flags)
    _bpf(cmd, attr)


def _update(fd: int, key: bytes, value: bytes, flags: int) -> None:
    s = _lookup_scratch
    if len(key) > s.SIZE or len(value) > s.SIZE:
        vbuf = ctypes.create_string_buffer(value, len(value))
        _elem(BPF_MAP_UPDATE_ELEM, fd, key, vbuf, flags)
        return
    s.key.raw, s.value.raw = key, value  # the scratch buffers: no allocation on the controller's hot path
    s.attr.map_fd, s.attr.flags = fd, flags
    ret = _libc.syscall(_NR_BPF, BPF_MAP_UPDATE_ELEM, s.ref, _MAP_ELEM_SIZE)
    s.attr.flags = 0
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def map_update(fd: int, key: int, value: bytes, flags: int = BPF_ANY) -> None:
    _update(fd, struct.pack("=I", key), value, flags)


def map_update_u64key(fd: int, key: int, value: bytes, flags: int = BPF_ANY) -> None:
    _update(fd, struct.pack("=Q", key), value, flags)


class _LookupScratch(threading.local):
    """Per-thread key/value buffers and attrs for map lookups, updates and deletes (the hot calls).

    A register or sweep looks up one or two elements per slot of a region;
    allocating ctypes buffers and the attr for each costed more than the
    syscall itself.
    """

    SIZE = 64

    def __init__(self):
        self.key = ctypes.create_string_buffer(self.SIZE)
        self.value = ctypes.create_string_buffer(self.SIZE)
        self.attr = _MapElem(0, 0, ctypes.addressof(self.key), ctypes.addressof(self.value), 0)
        self.ref = ctypes.byref(self.attr)
        # a delete's attr ends at the key: the kernel refuses a non-zero value field
        self.del_attr = _MapElem(0, 0, ctypes.addressof(self.key), 0, 0)
        self.del_ref = ctypes.byref(self.del_attr)


_lookup_scratch = _LookupScratch()
_MAP_ELEM_SIZE = ctypes.sizeof(_MapElem)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value, or None when the key has no element (ENOENT)."""
    s = _lookup_scratch
    if len(key) <= s.SIZE and value_size <= s.SIZE:
        s.key.raw = key
        s.attr.map_fd = fd
        if _libc.syscall(_NR_BPF, BPF_MAP_LOOKUP_ELEM, s.ref, _MAP_ELEM_SIZE) < 0:
            err = ctypes.get_errno()
            if err == 2:
                return None
            raise OSError(err, os.strerror(err))
        return ctypes.string_at(s.value, value_size)
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, fd, key, vbuf)
    except OSError as e:
        if e.errno == 2:
            return None
        raise
    return vbuf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete; False when there was nothing to delete."""
    s = _lookup_scratch
    s.key.raw = key[: s.SIZE]
    s.del_attr.map_fd = fd
    if _libc.syscall(_NR_BPF, BPF_MAP_DELETE_ELEM, s.del_ref, _MAP_ELEM_SIZE) < 0:
        err = ctypes.get_errno()
        if err == 2:
            return False
        raise OSError(err, os.strerror(err))
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (BPF_MAP_GET_NEXT_KEY from no key)."""
    keys: list[bytes] = []
    prev = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        kbuf = ctypes.create_string_buffer(prev, key_size) if prev is not None else None
        attr = _MapElem(fd, 0, ctypes.addressof(kbuf) if kbuf is not None else 0, ctypes.addressof(nxt), 0)
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as e:
            if e.errno == 2:
                return keys
            raise
        prev = nxt.raw
        keys.append(prev)


def map_lookup_batch(fd: int, first: int, count: int, value_size: int) -> bytes:
    """Values of array keys first..first+count-1 in one call (BPF_MAP_LOOKUP_BATCH, 5.6+)."""
    keys = ctypes.create_string_buffer(4 * count)
    values = ctypes.create_string_buffer(value_size * count)
    prev = ctypes.c_uint32(first - 1)
    out = ctypes.c_uint32(0)
    attr = _Batch(
        ctypes.addressof(prev) if first > 0 else 0,
        ctypes.addressof(out),
        ctypes.addressof(keys),
        ctypes.addressof(values),
        count,
        fd,
        0,
        0,
    )
    try:
        _bpf(BPF_MAP_LOOKUP_BATCH, attr)
    except OSError as e:
        if e.errno != 2:  # ENOENT: the last batch of the map, with attr.count filled
            raise
    if attr.count != count:
        raise OSError(5, f"batch lookup returned {attr.count} of {count} elements")
    return values.raw


def map_update_batch(fd: int, keys: list[int], values: bytes) -> None:
    """Set u32 keys to the packed ``values`` (same order) in one call (BPF_MAP_UPDATE_BATCH)."""
    if not keys:
        return
    kbuf = ctypes.create_string_buffer(struct.pack(f"={len(keys)}I", *keys), 4 * len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    attr = _Batch(0, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), len(keys), fd, 0, 0)
    _bpf(BPF_MAP_UPDATE_BATCH, attr)
    if attr.count != len(keys):
        raise OSError(5, f"batch update wrote {attr.count} of {len(keys)} elements")


def prog_load(prog_type: int, insns: bytes, name: str, expected_attach_type: int, log_size: int = 0):
    """Load raw instructions; returns (fd, None), or (-1, (errno, verifier log)) when refused."""
    lic = ctypes.create_string_buffer(b"GPL")
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(log_size) if log_size else None
    attr = _ProgLoad(
        prog_type,
        len(insns) // 8,
        ctypes.addressof(ibuf),
        ctypes.addressof(lic),
        1 if log_size else 0,
        log_size,
        ctypes.addressof(log) if log is not None else 0,
    )
    attr.prog_name = name.encode()[:15]
    attr.expected_attach_type = expected_attach_type
    ret = _libc.syscall(_NR_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        return -1, (err, log.value.decode(errors="replace") if log is not None else "")
    return ret, None


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _ObjPin(ctypes.addressof(p), fd, 0))


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _ObjPin(ctypes.addressof(p), 0, 0))


def obj_info(fd: int, size: int = 256) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(fd, size, ctypes.addressof(buf)))
    return buf.raw


def prog_info(fd: int) -> dict:
    """id, name, run_time_ns and run_cnt of a program (struct bpf_prog_info)."""
    raw = obj_info(fd, 232)
    (ptype, pid) = struct.unpack_from("=II", raw, 0)
    name = raw[64:80].split(b"\0", 1)[0].decode()
    run_time_ns, run_cnt = struct.unpack_from("=QQ", raw, 192)
    return {"type": ptype, "id": pid, "name": name, "run_time_ns": run_time_ns, "run_cnt": run_cnt}


def map_info(fd: int) -> dict:
    """type, id, sizes and name of a map (struct bpf_map_info)."""
    raw = obj_info(fd, 88)
    mtype, mid, ks, vs, me, mf = struct.unpack_from("=IIIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return {"type": mtype, "id": mid, "key_size": ks, "value_size": vs, "max_entries": me, "name": name}


def _next_ids(cmd: int) -> list[int]:
    ids, start = [], 0
    while True:
        attr = _GetId(start, 0, 0)
        try:
            _bpf(cmd, attr)
        except OSError as e:
            if e.errno == 2:
                return ids
            raise
        ids.append(attr.next_id)
        start = attr.next_id


def map_ids() -> list[int]:
    """Ids of every BPF map in the kernel (to check for leaks)."""
    return _next_ids(BPF_MAP_GET_NEXT_ID)


def prog_ids() -> list[int]:
    return _next_ids(BPF_PROG_GET_NEXT_ID)


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetId(prog_id, 0, 0))


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A duplicate, in this process, of another process's fd (needs ptrace rights)."""
    pidfd = os.pidfd_open(pid)
    try:
        ret = _libc.syscall(_NR_PIDFD_GETFD, pidfd, target_fd, 0)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return ret
    finally:
        os.close(pidfd)


def sched_getcpu() -> int:
    """The CPU this thread runs on now (Python 3.11 has no os.sched_getcpu)."""
    cpu = _libc.sched_getcpu()
    if cpu < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return cpu


_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]


def _getsockopt(fd: int, opt: int, size: int) -> bytes:
    # straight to libc: no dup and no socket object (which leaked its dup when
    # ``fd`` was not a socket, and cost more than the syscall on register's path)
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, opt, buf, ctypes.byref(n)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[: n.value]


def _setsockopt(fd: int, opt: int, value: int) -> None:
    v = ctypes.c_int(value)
    if _libc.setsockopt(fd, socket.SOL_SOCKET, opt, ctypes.byref(v), 4) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sock_opt_int(fd: int, opt: int) -> int:
    return struct.unpack("=i", _getsockopt(fd, opt, 4))[0]


IFNAMSIZ = 16


def ifname(raw: bytes) -> str:
    """A getsockopt(SO_BINDTODEVICE) answer as a name ('' for none)."""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def sock_device(fd: int) -> str:
    """The interface a socket is bound to (SO_BINDTODEVICE), or ''."""
    return ifname(_getsockopt(fd, SO_BINDTODEVICE, IFNAMSIZ))


def sock_cookie(fd: int) -> int:
    return struct.unpack("=Q", _getsockopt(fd, SO_COOKIE, 8))[0]


def attach_reuseport_prog(sock_fd: int, prog_fd: int) -> None:
    _setsockopt(sock_fd, SO_ATTACH_REUSEPORT_EBPF, prog_fd)


# r0 = SK_PASS; exit: a program that selects nothing, so the kernel's hash picks
_PASS_THROUGH = struct.pack("=BBhi", 0xB7, 0, 0, 1) + struct.pack("=BBhi", 0x95, 0, 0, 0)


def detach_reuseport_prog(sock_fd: int) -> bool:
    """Detach the group's program; False when none was attached (ENOENT).

    SO_DETACH_REUSEPORT_BPF is 5.3+. Before it (ENOPROTOOPT), a pass-through
    program replaces ours: it selects nothing, so the kernel's own hash
    balances the group again, as after a detach.
    """
    try:
        _setsockopt(sock_fd, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as e:
        if e.errno == 2:
            return False
        if e.errno != 92:  # ENOPROTOOPT: the kernel predates the option
            raise
        fd, err = prog_load(BPF_PROG_TYPE_SK_REUSEPORT, _PASS_THROUGH, "numareuse_pass", BPF_SK_REUSEPORT_SELECT)
        if fd < 0:
            raise OSError(err[0], os.strerror(err[0])) from None
        try:
            _setsockopt(sock_fd, SO_ATTACH_REUSEPORT_EBPF, fd)
        finally:
            os.close(fd)  # the group holds its own reference
    return True


def possible_cpus() -> int:
    """Number of possible CPU ids (per-CPU map values have one slot each)."""
    with open("/sys/devices/system/cpu/possible") as f:
        return parse_cpulist(f.read())[-1] + 1


def parse_cpulist(text: str, limit: int | None = None) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format).

    ``limit``: CPU ids must be below it; checked before a range is expanded,
    so that '0-99999999' is an error, not an exhausted memory.
    """
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi) if dash else int(lo)
        if lo_i < 0 or lo_i > hi_i:
            raise ValueError(f"bad CPU range {part!r}")
        if limit is not None and hi_i >= limit:
            raise OverflowError(hi_i)
        cpus.update(range(lo_i, hi_i + 1))
    return sorted(cpus)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def rename_exchange(a: str, b: str) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE, 3.15+; bpffs supports it)."""
    ret = _libc.syscall(_NR_RENAMEAT2, _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


_PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (setuid clears it)."""
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- network namespaces --------------------------------------------------------

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # 5.14+: u64 id of the socket's network namespace, given to no other while the system runs
# ioctl on an nsfs fd (4.11+): the CLONE_NEW* type of the namespace. _IO(0xb7, 3): _IOC_NONE is 1
# (bit 29) where the ioctl encoding puts direction bits that way (powerpc, mips), else 0.
_NS_GET_NSTYPE = 0x2000B703 if abi() in ("ppc64le", "mips", "mips64") else 0xB703


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ns_type(fd: int) -> int:
    """CLONE_NEW* type of a namespace fd; OSError(ENOTTY) when ``fd`` is not a namespace."""
    import fcntl

    return fcntl.ioctl(fd, _NS_GET_NSTYPE)


def netns_cookie(sock_fd: int) -> int:
    """The network namespace cookie of a socket (ENOPROTOOPT before 5.14)."""
    return struct.unpack("=Q", _getsockopt(sock_fd, SO_NETNS_COOKIE, 8))[0]


# -- what a blocked thread waits on (/proc/PID/task/TID/syscall) ----------------
#
# ABI -> syscall name -> number, as the cross headers define them (tests/test_threads.py
# checks each against those headers), for the syscalls whose first argument says what
# a blocked thread waits on: an epoll fd (epoll_*), a listening fd (accept*), a struct
# pollfd array with nfds second (poll, ppoll*), or nfds with the read fd_set second
# (select, _newselect, pselect6*). i386's and powerpc's old select (82) takes a struct
# pointer and is left out. asm-generic ABIs (aarch64, riscv64, loongarch64) have only
# the p-variants.

_GENERIC_WAITS = {"epoll_pwait": 22, "epoll_pwait2": 441, "accept": 202, "accept4": 242, "ppoll": 73, "pselect6": 72}
WAIT_SYSCALLS_BY_ABI = {
    "x86_64": {
        "epoll_wait": 232,
        "epoll_pwait": 281,
        "epoll_pwait2": 441,
        "accept": 43,
        "accept4": 288,
        "poll": 7,
        "ppoll": 271,
        "select": 23,
        "pselect6": 270,
    },
    "i386": {
        "epoll_wait": 256,
        "epoll_pwait": 319,
        "epoll_pwait2": 441,
        "accept4": 364,
        "poll": 168,
        "ppoll": 309,
        "ppoll_time64": 414,
        "_newselect": 142,
        "pselect6": 308,
        "pselect6_time64": 413,
    },
    "aarch64": _GENERIC_WAITS,
    "riscv64": _GENERIC_WAITS,
    "loongarch64": _GENERIC_WAITS,
    "arm": {
        "epoll_wait": 252,
        "epoll_pwait": 346,
        "epoll_pwait2": 441,
        "accept": 285,
        "accept4": 366,
        "poll": 168,
        "ppoll": 336,
        "ppoll_time64": 414,
        "_newselect": 142,
        "pselect6": 335,
        "pselect6_time64": 413,
    },
    "ppc64le": {
        "epoll_wait": 238,
        "epoll_pwait": 303,
        "epoll_pwait2": 441,
        "accept": 330,
        "accept4": 344,
        "poll": 167,
        "ppoll": 281,
        "_newselect": 142,
        "pselect6": 280,
    },
    "s390x": {
        "epoll_wait": 251,
        "epoll_pwait": 312,
        "epoll_pwait2": 441,
        "accept4": 364,
        "poll": 168,
        "ppoll": 302,
        "select": 142,
        "pselect6": 301,
    },
    "mips64": {
        "epoll_wait": 5209,
        "epoll_pwait": 5272,
        "epoll_pwait2": 5441,
        "accept": 5042,
        "accept4": 5293,
        "poll": 5007,
        "ppoll": 5261,
        "_newselect": 5022,
        "pselect6": 5260,
    },
    "mips": {
        "epoll_wait": 4250,
        "epoll_pwait": 4313,
        "epoll_pwait2": 4441,
        "accept": 4168,
        "accept4": 4334,
        "poll": 4188,
        "ppoll": 4302,
        "ppoll_time64": 4414,
        "_newselect": 4142,
        "pselect6": 4301,
        "pselect6_time64": 4413,
    },
}
WAIT_SYSCALLS = WAIT_SYSCALLS_BY_ABI.get(abi() or "", {})
POLLIN = 0x1


_SIOCOUTQ = 0x5411  # TIOCOUTQ: for an AF_UNIX socket, bytes it sent that its peer has not read yet


def unread_bytes(fd: int) -> int:
    """Bytes this AF_UNIX socket sent that its peer has not read yet (ioctl SIOCOUTQ)."""
    n = ctypes.c_int(0)
    if _libc.ioctl(fd, _SIOCOUTQ, ctypes.byref(n)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return n.value


# -- numareuse watch: kernel event sources and a cheap socket listing ---------------
#
# The proc connector (NETLINK_CONNECTOR, CN_IDX_PROC; include/uapi/linux/cn_proc.h)
# multicasts fork, exec and exit of every task; listening needs CAP_NET_ADMIN in the
# initial user namespace, from the initial pid namespace.

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_PROC_EVENT_HDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns


def proc_connector() -> socket.socket:
    """A non-blocking netlink socket subscribed to the proc connector's events."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((os.getpid(), CN_IDX_PROC))
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
        s.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(cn), _NLMSG_DONE, 0, 0, os.getpid()) + cn)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def proc_events(data: bytes):
    """(what, pid, tgid, parent_tgid) per process event in one datagram of the proc connector.

    parent_tgid is the forking process for FORK and the parent for EXIT, else 0;
    for FORK, pid/tgid are the child's.
    """
    off = 0
    while off + _NLMSG_HDR.size <= len(data):
        length, mtype = _NLMSG_HDR.unpack_from(data, off)[:2]
        if length < _NLMSG_HDR.size:
            return
        body = off + _NLMSG_HDR.size
        if mtype == _NLMSG_DONE and body + _CN_MSG.size + _PROC_EVENT_HDR.size <= off + length:
            idx, val = _CN_MSG.unpack_from(data, body)[:2]
            ev = body + _CN_MSG.size
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC):
                what = _PROC_EVENT_HDR.unpack_from(data, ev)[0]
                p = ev + _PROC_EVENT_HDR.size
                if what == PROC_EVENT_FORK:
                    _ppid, ptgid, cpid, ctgid = struct.unpack_from("=iiii", data, p)
                    yield what, cpid, ctgid, ptgid
                elif what == PROC_EVENT_EXEC:
                    pid, tgid = struct.unpack_from("=ii", data, p)
                    yield what, pid, tgid, 0
                elif what == PROC_EVENT_EXIT:
                    pid, tgid, _code, _sig, _ppid, ptgid = struct.unpack_from("=iiIIii", data, p)
                    yield what, pid, tgid, ptgid
        off += (length + 3) & ~3


# NETLINK_KOBJECT_UEVENT, group 1: the kernel's device events ("online@/devices/system/cpu/cpu3").
NETLINK_KOBJECT_UEVENT = 15


def uevent_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    try:
        s.bind((0, 1))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


# sock_diag (NETLINK_SOCK_DIAG, inet_diag_req_v2; include/uapi/linux/inet_diag.h): the
# kernel lists only the sockets in the requested states, so finding a port's listeners
# does not read the TIME_WAIT lines /proc/net/tcp has on a busy host.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
TCP_LISTEN = 10
TCP_CLOSE = 7
_DIAG_REQ = struct.Struct("=BBBBI48s")
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIII4xIIII")  # family..retrans, sockid, expires, rq, wq, uid, inode


def diag_socket() -> socket.socket:
    """A sock_diag socket of the calling thread's network namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)


def diag_list(s: socket.socket, family: int, protocol: int, state: int) -> list[tuple[str, int, int, int]]:
    """(bound address, port, inode, cookie) of every socket of ``family``/``protocol`` in ``state``."""
    req = _DIAG_REQ.pack(family, protocol, 0, 0, 1 << state, b"")
    s.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + req)
    out = []
    alen = 4 if family == socket.AF_INET else 16
    while True:
        data = s.recv(1 << 16)
        off = 0
        while off + _NLMSG_HDR.size <= len(data):
            length, mtype = _NLMSG_HDR.unpack_from(data, off)[:2]
            if length < _NLMSG_HDR.size:
                return out
            if mtype == _NLMSG_DONE:
                return out
            if mtype == _NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, off + _NLMSG_HDR.size)[0]
                raise OSError(err, os.strerror(err))
            if mtype == SOCK_DIAG_BY_FAMILY:
                m = _DIAG_MSG.unpack_from(data, off + _NLMSG_HDR.size)
                sport, src = m[4], m[6]
                cookie = m[9] | m[10] << 32  # idiag_cookie[2], low word first
                inode = m[-1]
                out.append((socket.inet_ntop(family, src[:alen]), int.from_bytes(sport, "big"), inode, cookie))
            off += (length + 3) & ~3
