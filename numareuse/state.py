"""Pinned state: steering that outlives the process that attached it.

Layout, per network namespace and reuseport group (as Cloudflare's tubular)::

    <bpffs>/numareuse/netns-<inode>/            lock: flock, shared for readers
        tcp4_127_0_0_1_8080/                    one group; names have no dots (bpffs refuses them)
            prog sockarray cpu_domain region_count counters slot_cookie slot_of meta
    <rundir>/netns-<inode>/tcp4_127_0_0_1_8080.json   spec and socket owners, for status

A group directory is built under a temporary name and renamed into place,
so readers see all of it or none. ``meta`` holds the layout version: state
of another version is refused, never misread.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from dataclasses import dataclass

from . import _maps, _sys
from .errors import NotSupported, PermissionDenied, StateError, from_oserror
from .selector import Selector
from .topology import Topology

BPF_FS_MAGIC = 0xCAFE4A11


def bpffs_root() -> str:
    return os.environ.get("NUMAREUSE_BPFFS", "/sys/fs/bpf")


def run_root() -> str:
    return os.environ.get("NUMAREUSE_RUNDIR", "/run/numareuse")


def netns_id() -> str:
    return f"netns-{os.stat('/proc/self/ns/net').st_ino}"


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


def _is_bpffs(path: str) -> bool:
    # statfs f_type would be exact; /proc/mounts is enough and portable in Python
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "bpf" for line in f)


def ensure_bpffs() -> str:
    """The bpffs mount, mounted now if absent. Raises NotSupported when it cannot be."""
    root = bpffs_root()
    if _is_bpffs(root):
        return root
    if not os.path.isdir(root):
        raise NotSupported(f"bpffs: {root} does not exist (kernel without CONFIG_BPF_SYSCALL?)")
    r = subprocess.run(["mount", "-t", "bpf", "bpf", root], capture_output=True, text=True)
    if r.returncode != 0 or not _is_bpffs(root):
        cause = (r.stderr.strip().splitlines() or ["mount failed"])[-1]
        raise NotSupported(f"bpffs is not mounted at {root} and cannot be mounted: {cause}")
    return root


class Store:
    """The pinned groups of this network namespace, under one lock."""

    def __init__(self, create: bool = False):
        root = ensure_bpffs() if create else bpffs_root()
        self.dir = os.path.join(root, "numareuse", netns_id())
        self.rundir = os.path.join(run_root(), netns_id())
        if create:
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise from_oserror(e, f"creating {self.dir}") from e

    @contextlib.contextmanager
    def locked(self, shared: bool = False):
        if not os.path.isdir(self.dir):
            yield self
            return
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)

    def groups(self) -> list[str]:
        """Names of the published groups (not staging directories)."""
        if not os.path.isdir(self.dir):
            return []
        return sorted(n for n in os.listdir(self.dir) if not n.startswith("tmp_") and parse_name(n))

    def exists(self, group: Group) -> bool:
        return os.path.isdir(os.path.join(self.dir, group.name))

    # -- reading ----------------------------------------------------------

    def info(self, name: str) -> dict:
        path = os.path.join(self.rundir, name + ".json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def open(self, name: str, directory: str | None = None) -> Selector:
        """The pinned selector of group ``name`` (or of a staging ``directory``)."""
        gdir = directory or os.path.join(self.dir, name)
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
