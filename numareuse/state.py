"""Pinned state: steering that outlives the process that attached it.

Layout, per network namespace and reuseport group (as Cloudflare's tubular)::

    <bpffs>/numareuse/netns-cookie-<cookie>/    lock: flock, shared for readers
        tcp4_127_0_0_1_8080/                    one group; names have no dots (bpffs refuses them)
            prog sockarray cpu_domain region_count counters slot_cookie slot_of meta
    <rundir>/netns-cookie-<cookie>/tcp4_127_0_0_1_8080.json   spec and socket owners, for status

A namespace is named by its cookie (SO_NETNS_COOKIE, 5.14+), which the
kernel never gives to another namespace while it runs; its nsfs inode can be
reused once the namespace is gone. Older releases wrote ``netns-<inode>``:
such state is read in place and moved under the cookie by the next writer
(``Store.adopt_legacy``). Before 5.14 the inode is the only name there is.

A group directory is built under a temporary name and renamed into place,
so readers see all of it or none. ``meta`` holds the layout version: state
of another version is refused, never misread.

Pins and run files always go to the host's mount namespace: a command run
under ``ip netns exec`` has a private one with a fresh /sys, where a bpffs it
mounted (and pinned into) would vanish with it; it reaches the host's through
/proc/<host pid>/root instead (``host_root``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import _maps, _sys
from .errors import NotSupported, NumaReuseError, PermissionDenied, ProcessGone, StateError, from_oserror
from .selector import Selector
from .topology import Topology

BPF_FS_MAGIC = 0xCAFE4A11


def bpffs_root() -> str:
    return os.environ.get("NUMAREUSE_BPFFS", "/sys/fs/bpf")


def run_root() -> str:
    return os.environ.get("NUMAREUSE_RUNDIR", "/run/numareuse")


def netns_id(ns: Netns | None = None) -> str:
    """The state directory name of ``ns`` (default: this thread's network namespace)."""
    if ns is not None:
        return ns.id
    with Netns.current() as cur:
        return cur.id


class Netns:
    """A network namespace: this thread's, a named one (/run/netns/NAME or a path), or a process's.

    Holds an fd of the namespace, so it cannot go away while in use. The
    namespace-bound work (reading /proc/net, making a socket) happens in the
    calling thread after setns(CLONE_NEWNET), which then returns to its own
    namespace; sockets made meanwhile stay in the target one.
    """

    def __init__(self, fd: int, what: str, pid: int | None = None):
        self.fd, self.what, self.pid = fd, what, pid
        st = os.fstat(fd)
        own = os.stat("/proc/thread-self/ns/net")
        self.inode = st.st_ino
        self.foreign = (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino)
        try:
            with self.entered():
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                    self.cookie: int | None = _sys.netns_cookie(probe.fileno())
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:  # before 5.14: the inode is all there is
                os.close(fd)
                raise from_oserror(e, f"entering {what}") from e
            self.cookie = None

    @classmethod
    def current(cls) -> Netns:
        return cls(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC), "this network namespace")

    @classmethod
    def resolve(cls, netns: str | None = None, pid: int | None = None) -> Netns:
        """The namespace named by --netns NAME|PATH or --pid PID (neither: this one)."""
        if netns is not None and pid is not None:
            raise NumaReuseError("give --netns or --pid, not both")
        if pid is not None:
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise ProcessGone(f"--pid {pid}: no such process") from None
            except OSError as e:
                raise from_oserror(e, f"--pid {pid}: opening its network namespace") from e
            return cls(fd, f"the network namespace of pid {pid}", pid)
        if netns is None:
            return cls.current()
        path = netns if "/" in netns else os.path.join("/run/netns", netns)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            hint = "" if "/" in netns else " (see `ip netns list`)"
            raise NumaReuseError(f"--netns {netns}: no network namespace {path}{hint}") from None
        except OSError as e:
            raise from_oserror(e, f"--netns {netns}: opening {path}") from e
        try:
            kind = _sys.ns_type(fd)
        except OSError:
            kind = None  # ENOTTY: a plain file (a /run/netns entry whose mount is gone), or a kernel before 4.11
        if kind != _sys.CLONE_NEWNET:
            os.close(fd)
            raise NumaReuseError(f"--netns {netns}: {path} is not a network namespace")
        return cls(fd, f"network namespace {netns}")

    @property
    def id(self) -> str:
        return f"netns-cookie-{self.cookie}" if self.cookie is not None else self.legacy_id

    @property
    def legacy_id(self) -> str:
        return f"netns-{self.inode}"

    def as_dict(self) -> dict:
        return {"cookie": self.cookie, "inode": self.inode}

    @contextlib.contextmanager
    def entered(self):
        """Run the block in this namespace (the calling thread only), then return."""
        if not self.foreign:
            yield self
            return
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _sys.setns(self.fd, _sys.CLONE_NEWNET)
            try:
                yield self
            finally:
                _sys.setns(back, _sys.CLONE_NEWNET)
        finally:
            os.close(back)

    def open_proc_net(self, name: str):
        """/proc/net/<name> of this namespace, open for reading (a proc net file keeps the
        namespace it was opened in, so it is read after returning)."""
        if self.pid is not None:
            try:
                return open(f"/proc/{self.pid}/net/{name}")  # no setns needed
            except (FileNotFoundError, ProcessLookupError):
                pass  # the process exited; self.fd still holds its namespace
        with self.entered():
            return open(f"/proc/thread-self/net/{name}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Group:
    """One SO_REUSEPORT group: protocol, family, bound address and port."""

    proto: str  # "tcp" | "udp"
    family: int  # 4 | 6
    address: str
    port: int

    @property
    def name(self) -> str:
        addr = self.address.replace(".", "_").replace(":", "_")
        return f"{self.proto}{self.family}_{addr}_{self.port}"

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.family == 6 else self.address
        return f"{self.proto}{self.family} {host}:{self.port}"

    def as_dict(self) -> dict:
        return {"proto": self.proto, "family": self.family, "address": self.address, "port": self.port}


def _is_bpffs(path: str, pid: str = "self") -> bool:
    # statfs f_type would be exact; /proc/mounts is enough and portable in Python
    path = os.path.realpath(path)
    with open(f"/proc/{pid}/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "bpf" for line in f)


def _host_pid() -> int | None:
    """A process of the host's mount namespace when ours is another one (else None).

    kthreadd (pid 2, parent 0) lives in the initial mount namespace whenever
    we see it at all (our pid namespace is the initial one); otherwise pid 1,
    the init of our pid namespace (a container's). None also when neither can
    be read: then we cannot tell, and keep to our own namespace.
    """
    try:
        own = os.stat("/proc/self/ns/mnt")
    except OSError:
        return None
    for pid in (2, 1):
        try:
            if pid == 2:
                with open("/proc/2/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] != "0":
                        continue  # not a kernel thread: our pid namespace is not the initial one
            host = os.stat(f"/proc/{pid}/ns/mnt")
        except (OSError, IndexError):
            continue
        return None if (host.st_dev, host.st_ino) == (own.st_dev, own.st_ino) else pid
    return None


def host_root(create: bool = False) -> str:
    """'' when pins and run files live at their own paths; '/proc/N/root' when they must be
    reached in the host's mount namespace (ours is private: ``ip netns exec``)."""
    pid = _host_pid()
    if pid is None:
        return ""
    root = os.path.abspath(bpffs_root())
    if os.environ.get("NUMAREUSE_BPFFS") and _is_bpffs(root):
        return ""  # a bpffs the caller mounted in its own namespace and named: its explicit choice
    prefix = f"/proc/{pid}/root"
    with contextlib.suppress(OSError):
        if _is_bpffs(root) and os.stat(root).st_dev == os.stat(prefix + root).st_dev:
            return ""  # our view has the host's very bpffs (a private namespace that kept it)
    return prefix


@contextlib.contextmanager
def _mounting(path: str, what: str):
    """Serialise check-then-mount of the bpffs at ``path`` between numareuse processes.

    Two commands (a watcher and a CLI run) that both found it unmounted would
    otherwise stack two bpffs mounts, and the upper one hides every pin made in
    the lower. The flock is on the directory under the mount point: a process
    that opens it after the mount gets the bpffs root instead, and its check
    sees the mount. The wait is bounded: only a mount(8) runs under it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise NotSupported(f"bpffs: {what}: {e.strerror}") from None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateError(f"bpffs: another process has been mounting {what} for 10 s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def ensure_bpffs() -> str:
    """The bpffs mount (in the host's mount namespace), mounted now if absent.

    Raises NotSupported when it cannot be: never a bpffs private to this
    command's mount namespace, whose pins would vanish with it.
    """
    root = bpffs_root()
    prefix = host_root()
    if not prefix:
        if _is_bpffs(root):
            return root
        if not os.path.isdir(root):
            raise NotSupported(f"bpffs: {root} does not exist (kernel without CONFIG_BPF_SYSCALL?)")
        with _mounting(root, root):
            if _is_bpffs(root):
                return root  # mounted by another numareuse process meanwhile
            r = subprocess.run(["mount", "-t", "bpf", "bpf", root], capture_output=True, text=True)
            if r.returncode != 0 or not _is_bpffs(root):
                cause = (r.stderr.strip().splitlines() or ["mount failed"])[-1]
                raise NotSupported(f"bpffs is not mounted at {root} and cannot be mounted: {cause}")
        return root
    pid = prefix.split("/")[2]
    root = os.path.abspath(root)
    where = f"{root} in the host's mount namespace (pid {pid}'s; this command runs in a private one)"
    if _is_bpffs(root, pid):
        return prefix + root
    if not os.path.isdir(prefix + root):
        raise NotSupported(f"bpffs: {where} does not exist")
    with _mounting(prefix + root, where):
        if _is_bpffs(root, pid):
            return prefix + root
        # mount it there, as attach does in its own namespace: a bpffs mounted here would die with this command
        r = subprocess.run(
            ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "mount", "-t", "bpf", "bpf", root],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0 or not _is_bpffs(root, pid):
            cause = (r.stderr.strip().splitlines() or ["mount failed"])[-1]
            raise NotSupported(f"bpffs is not mounted at {where} and cannot be mounted there: {cause}")
    return prefix + root


class Store:
    """The pinned groups of one network namespace (default: this thread's), under one lock.

    ``has_sockets(group)`` tells whether the namespace has a socket bound to
    ``group`` now: it decides whether state an older release left under the
    namespace's inode is this namespace's (see ``adopt_legacy``).
    """

    def __init__(
        self,
        create: bool = False,
        ns: Netns | None = None,
        has_sockets: Callable[[Group], bool] | None = None,
    ):
        if ns is None:
            with Netns.current() as cur:
                ids = (cur.id, cur.legacy_id)
        else:
            ids = (ns.id, ns.legacy_id)
        self.id, self.legacy_id = ids
        prefix = host_root()
        root = ensure_bpffs() if create else prefix + (os.path.abspath(bpffs_root()) if prefix else bpffs_root())
        runroot = prefix + os.path.abspath(run_root()) if prefix else run_root()
        self.dir = os.path.join(root, "numareuse", self.id)
        self.rundir = os.path.join(runroot, self.id)
        self.legacy_dir = os.path.join(root, "numareuse", self.legacy_id)
        self.legacy_rundir = os.path.join(runroot, self.legacy_id)
        self.has_sockets = has_sockets
        self._home: dict[str, tuple[str, str]] = {}  # group name -> (dir, rundir) of legacy state read in place
        if create:
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise from_oserror(e, f"creating {self.dir}") from e

    def _has_legacy(self) -> bool:
        return self.legacy_dir != self.dir and os.path.isdir(self.legacy_dir)

    @contextlib.contextmanager
    def locked(self, shared: bool = False):
        fds = []
        try:
            for d in (self.dir, self.legacy_dir if self._has_legacy() else None):
                if d is None or not os.path.isdir(d):
                    continue
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
                fcntl.flock(fds[-1], fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield self
        finally:
            for fd in fds:
                os.close(fd)

    def groups(self) -> list[str]:
        """Names of the published groups (not staging directories), with this
        namespace's state an older release left under its inode."""
        names = set(self._published(self.dir))
        self._home = {}
        if self._has_legacy():
            for n in self._published(self.legacy_dir):
                if n not in names and self._legacy_ours(n, [n]):
                    self._home[n] = (self.legacy_dir, self.legacy_rundir)
                    names.add(n)
        return sorted(names)

    @staticmethod
    def _published(d: str) -> list[str]:
        if not os.path.isdir(d):
            return []
        return [n for n in os.listdir(d) if not n.startswith("tmp_") and parse_name(n)]

    def exists(self, group: Group) -> bool:
        return os.path.isdir(os.path.join(self.dir, group.name))

    # -- state of an older release, under netns-<inode> ---------------------
    #
    # An nsfs inode is unique among living namespaces only: netns-<inode> may
    # be the state of a namespace that died and whose inode we now have. It is
    # ours when one of its sockets is still alive (a socket keeps its namespace
    # alive, and no two living namespaces share an inode), or when this
    # namespace has a socket bound to its group (its program may be attached
    # there: never drop that). Otherwise no socket of its group exists here,
    # so no program of it is attached to anything here either: it is garbage,
    # whoever wrote it.

    def _legacy_ours(self, name: str, entries: list[str]) -> bool:
        group = parse_name(name)
        for e in entries:
            with contextlib.suppress(StateError):
                sel = self.open(name, os.path.join(self.legacy_dir, e))
                try:
                    if any(r["live"] for r in sel.registrations()):
                        return True
                finally:
                    sel.close()
        return bool(self.has_sockets and group and self.has_sockets(self._legacy_group(name) or group))

    def _legacy_group(self, name: str) -> Group | None:
        try:
            with open(os.path.join(self.legacy_rundir, name + ".json")) as f:
                return Group(**json.load(f)["group"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def adopt_legacy(self) -> list[str]:
        """Move this namespace's state from netns-<inode> under its cookie; remove garbage there.

        For writers, under ``locked()``. Returns what was done.
        """
        if not self._has_legacy():
            return []
        by_name: dict[str, list[str]] = {}
        for e in sorted(os.listdir(self.legacy_dir)):
            name = e[4:].rsplit("-", 1)[0] if e.startswith("tmp_") else e
            if parse_name(name):
                by_name.setdefault(name, []).append(e)
        done = []
        for name, entries in by_name.items():
            group = parse_name(name)
            if not self._legacy_ours(name, entries):
                for e in entries:
                    shutil.rmtree(os.path.join(self.legacy_dir, e), ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.legacy_rundir, name + ".json"))
                done.append(f"removed {self.legacy_id}/{name}: no socket of {group} exists in this network namespace")
                continue
            if os.path.isdir(os.path.join(self.dir, name)):
                done.append(f"kept {self.legacy_id}/{name}: {self.id}/{name} exists too")
                continue
            os.makedirs(self.dir, exist_ok=True)
            for e in entries:
                os.rename(os.path.join(self.legacy_dir, e), os.path.join(self.dir, e))
            with contextlib.suppress(FileNotFoundError):
                os.makedirs(self.rundir, exist_ok=True)
                os.rename(os.path.join(self.legacy_rundir, name + ".json"), os.path.join(self.rundir, name + ".json"))
            done.append(f"moved {self.legacy_id}/{name} (an older release's) to {self.id}/{name}")
        for d in (self.legacy_dir, self.legacy_rundir):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only when empty; kept when an older release's lock holder still uses it
        self._home = {}
        return done

    # -- reading ----------------------------------------------------------

    def info(self, name: str) -> dict:
        path = os.path.join(self._home.get(name, (self.dir, self.rundir))[1], name + ".json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def open(self, name: str, directory: str | None = None) -> Selector:
        """The pinned selector of group ``name`` (or of a staging ``directory``)."""
        gdir = directory or os.path.join(self._home.get(name, (self.dir, self.rundir))[0], name)
        fds, prog, meta = _maps.open_pinned(gdir)
        try:
            topo = topology_from_map(fds["cpu_domain"], meta, self.info(name).get("spec", "pinned"))
            return Selector.adopt(topo, fds, prog, meta)
        except BaseException:
            _maps.close_fds(fds)
            os.close(prog)
            raise

    # -- writing ----------------------------------------------------------
    #
    # A new selector is pinned under tmp_<group>-* BEFORE its program is
    # attached, then renamed (or atomically exchanged) into place: a crash at
    # any point leaves pins that name their group, which recover() finishes.

    def stage(self, group: Group, sel: Selector) -> str:
        # "-" separates the random suffix: group names never contain one (bpffs refuses ".")
        tmp = tempfile.mkdtemp(prefix=f"tmp_{group.name}-", dir=self.dir)
        try:
            sel.pin(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def commit(self, staged: str, group: Group, info: dict) -> None:
        final = os.path.join(self.dir, group.name)
        if os.path.isdir(final):
            _sys.rename_exchange(staged, final)  # readers see the old or the new, never neither
            shutil.rmtree(staged)  # now the old pins
        else:
            os.rename(staged, final)
        self.write_info(group, info)

    def recover(self, group: Group) -> list[str]:
        """Finish what a crashed attach left for ``group``; returns what was done.

        A complete staging directory is the newest state (its program may be
        attached already): it replaces the published one, whose sockarray is
        emptied first so that its sockets can be registered again.
        """
        done = []
        for tmp in sorted(glob.glob(os.path.join(self.dir, f"tmp_{group.name}-*"))):
            try:
                self.open(group.name, tmp).close()
            except StateError:
                shutil.rmtree(tmp, ignore_errors=True)  # crashed while pinning: nothing attached it
                done.append(f"removed incomplete {os.path.basename(tmp)}")
                continue
            final = os.path.join(self.dir, group.name)
            if os.path.isdir(final):
                with contextlib.suppress(StateError):
                    old = self.open(group.name)
                    try:
                        # a program swap stages the same maps again: those must stay filled
                        if not _same_maps(old, tmp):
                            old.clear()
                    finally:
                        old.close()
                _sys.rename_exchange(tmp, final)
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
            done.append(f"recovered {os.path.basename(tmp)} left by an interrupted attach")
        return done

    def recover_all(self) -> list[str]:
        """recover() every group that has a staging directory."""
        names = (
            {n[4:].rsplit("-", 1)[0] for n in os.listdir(self.dir) if n.startswith("tmp_")}
            if os.path.isdir(self.dir)
            else set()
        )
        return [note for n in sorted(names) if (g := parse_name(n)) for note in self.recover(g)]

    def write_info(self, group: Group, info: dict) -> None:
        os.makedirs(self.rundir, exist_ok=True)
        path = os.path.join(self.rundir, group.name + ".json")
        fd, tmp = tempfile.mkstemp(dir=self.rundir, prefix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        os.rename(tmp, path)

    def remove(self, name: str) -> None:
        # the netns directory stays: it is the lock others may be waiting on
        shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        for tmp in glob.glob(os.path.join(self.dir, f"tmp_{name}-*")):
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.rundir, name + ".json"))


def _same_maps(sel: Selector, directory: str) -> bool:
    """The pinned sockarray in ``directory`` is ``sel``'s own (a program swap, not a new selector)."""
    try:
        fd = _sys.obj_get(os.path.join(directory, "sockarray"))
    except OSError:
        return False
    try:
        return _sys.map_info(fd)["id"] == _sys.map_info(sel.map_fds["sockarray"])["id"]
    finally:
        os.close(fd)


def parse_name(name: str) -> Group | None:
    """tcp4_127_0_0_1_8080 -> Group; None for anything else."""
    try:
        head, *addr, port = name.split("_")
        proto, fam = head[:-1], int(head[-1])
        if proto not in ("tcp", "udp") or fam not in (4, 6) or not addr:
            return None
        if fam == 4:
            address = ".".join(addr)
        else:  # the name replaced ':' by '_': rebuild and normalise
            address = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ":".join(addr)))
        return Group(proto, fam, address, int(port))
    except (ValueError, OSError):
        return None


def topology_from_map(cpu_domain_fd: int, meta: dict, spec: str) -> Topology:
    nd = meta["ndomains"]
    groups: list[list[int]] = [[] for _ in range(nd)]
    for cpu in range(meta["ncpus"]):
        raw = _sys.map_lookup(cpu_domain_fd, struct.pack("=I", cpu), 4)
        d = struct.unpack("=I", raw)[0] if raw else nd
        if d < nd:
            groups[d].append(cpu)
    cpu_domain = {c: d for d, g in enumerate(groups) for c in g}
    return Topology(spec, tuple(tuple(g) for g in groups), cpu_domain)


def require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionDenied("needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_PTRACE)")
