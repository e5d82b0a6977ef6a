"""``numareuse watch``: keep each group's registrations what a fresh ``attach`` would make them.

A long-running reconciler. For every configured group it detects change
cheaply, and only then runs :func:`numareuse.control.attach`, which is
already an idempotent "make it so" (it updates in place and reports what
changed). The cheap check (a *fingerprint*) is:

* the group's sockets, listed by sock_diag (the kernel returns only
  listening TCP / unconnected UDP sockets, so a busy host's TIME_WAIT
  lines in /proc/net/tcp are never read): new and closed sockets, and a
  restarted server's all-new sockets;
* for each owner of the last pass and every child of the owners' parents
  (nginx's master forks the new workers): its CPU affinity
  (sched_getaffinity) and the group sockets its epoll watches (the fdinfo
  of its cached epoll fds);
* the online CPUs (hotplug), which can change the domains.

Kernel events make it react at once where the kernel has them: fork, exec
and exit through the proc connector (NETLINK_CONNECTOR), CPU online/offline
through uevents. A TCP listen() or a UDP bind() has no event short of a
tracing program, and affinity and epoll changes none at all, so those are
polled: every ``interval`` seconds, and every 50 ms for 2 s after a
relevant event (a fork by a server process, an exit of an owner, any fork
or exec while a group waits for its server).

Every attach runs in a forked child that exits after it: the pidfd_getfd
duplicates it takes die with it (a duplicate kept open would keep a socket
the server closed listening, and connections steered to it would never be
accepted), and bcc/LLVM, needed when a selector is built, never enters the
watcher. All state is pinned, so the watcher may crash or be restarted at
any time without touching traffic.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import ipaddress
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, field

from . import _sys, control, discovery
from ._layout import MAX_CAPACITY
from .errors import NumaReuseError

log = logging.getLogger("numareuse.watch")

DEFAULT_INTERVAL = 0.5  # s between polls of what has no kernel event
HOT_INTERVAL = 0.05  # s between polls after an event
HOT_SECONDS = 2.0  # how long polls stay fast after an event
CHILD_TIMEOUT = 120.0  # s an attach may take before it is killed (a bcc compile under load)
MAX_BACKOFF = 30.0


class ConfigError(NumaReuseError):
    """A configuration that cannot be used: the message names the file, the line and the cause."""

    errno = errno.EINVAL

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key  # the offending key of a [[group]] table, to find its line


# -- configuration --------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """One group to watch: the options of ``numareuse attach``."""

    port: int
    address: str | None = None
    udp: bool = False
    ipv6: bool = False
    domains: str = "numa"
    capacity: int | None = None
    netns: str | None = None
    pid: int | None = None

    @property
    def key(self) -> tuple:
        """What names the group; domains and capacity are how it is steered."""
        return (self.port, self.address, self.udp, self.ipv6, self.netns, self.pid)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if self.ipv6 else socket.AF_INET

    def __str__(self) -> str:
        addr = self.address or "*"
        host = f"[{addr}]" if self.ipv6 and self.address else addr
        where = f" netns={self.netns}" if self.netns else f" pid={self.pid}" if self.pid else ""
        return f"{'udp' if self.udp else 'tcp'}{6 if self.ipv6 else 4} {host}:{self.port}{where}"

    def attach_kwargs(self) -> dict:
        kw = {}
        if self.netns is not None:  # only when set: control grows these options in another branch
            kw["netns"] = self.netns
        if self.pid is not None:
            kw["pid"] = self.pid
        return kw


@dataclass
class Config:
    groups: list[GroupSpec]
    interval: float = DEFAULT_INTERVAL
    detach_on_exit: bool = False
    metrics: str | None = None
    path: str | None = None  # the file it was read from (SIGHUP re-reads it)
    overrides: dict = field(default_factory=dict)  # command-line options that win over the file, also after SIGHUP

    def apply_overrides(self) -> Config:
        for k, v in self.overrides.items():
            setattr(self, k, v)
        return self


TOP_KEYS = {"interval": (int, float), "detach_on_exit": bool, "metrics": str, "group": list}
GROUP_KEYS = {
    "port": int,
    "address": str,
    "udp": bool,
    "ipv6": bool,
    "domains": str,
    "capacity": int,
    "netns": str,
    "pid": int,
}
_GROUP_ARG = re.compile(r"^(?:(tcp|udp)(4|6)?:)?(?:(\[[^\]]+\]|[^:\[\]]+):)?(\d+)$")


def check_domains(spec: str) -> str | None:
    """Why ``spec`` can never be a domain spec, or None (offline CPUs are a runtime matter)."""
    spec = spec.strip()
    if spec in ("numa", "llc", "cpu"):
        return None
    for part in spec.split(";"):
        try:
            if not _sys.parse_cpulist(part):
                return f"domain spec {spec!r} has an empty domain"
        except ValueError:
            return f"domain spec {spec!r} does not parse: expected numa, llc, cpu or CPU lists like '0-1;2-3'"
    return None


def make_group(where: str, **kw) -> GroupSpec:
    """A checked GroupSpec; ConfigError (prefixed with ``where``) for a bad value."""

    def bad(msg, key):
        return ConfigError(f"{where}{msg}", key)

    port = kw.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise bad(f"port {port!r} is not a port number (1-65535)", "port")
    cap = kw.get("capacity")
    if cap is not None and (isinstance(cap, bool) or not 1 <= cap <= MAX_CAPACITY):
        raise bad(f"capacity {cap!r} out of range 1..{MAX_CAPACITY}", "capacity")
    domains = kw.get("domains") or "numa"
    if why := check_domains(domains):
        raise bad(why, "domains")
    addr = kw.get("address")
    ipv6 = bool(kw.get("ipv6"))
    if addr is not None:
        try:
            ip = ipaddress.ip_address(addr.strip("[]"))
        except ValueError:
            raise bad(f"address {addr!r} is not an IP address", "address") from None
        if (ip.version == 6) != ipv6:
            raise bad(
                f"address {addr!r} is IPv{ip.version}, the group IPv{6 if ipv6 else 4} (ipv6 = true for IPv6)",
                "address",
            )
        addr = str(ip)
    if kw.get("netns") is not None and kw.get("pid") is not None:
        raise bad("netns and pid both name a network namespace: give one", "pid")
    pid = kw.get("pid")
    if pid is not None and (isinstance(pid, bool) or pid < 1):
        raise bad(f"pid {pid!r} is not a process id", "pid")
    for opt in ("netns", "pid"):
        if kw.get(opt) is not None and opt not in inspect.signature(control.attach).parameters:
            raise bad(f"{opt}: this numareuse's control.attach does not take {opt} yet", opt)
    return GroupSpec(
        port=port,
        address=addr,
        udp=bool(kw.get("udp")),
        ipv6=ipv6,
        domains=domains.strip(),
        capacity=cap,
        netns=kw.get("netns"),
        pid=pid,
    )


def parse_group_arg(text: str, **common) -> GroupSpec:
    """``--group [tcp|udp][4|6]:[ADDR:]PORT``: '8080', 'tcp4:8080', 'udp6:[::1]:53', 'tcp:10.0.0.1:80'."""
    m = _GROUP_ARG.match(text.strip())
    if not m:
        raise ConfigError(f"--group {text!r}: expected [tcp|udp][4|6]:[ADDR:]PORT, e.g. tcp4:8080 or udp6:[::1]:53")
    proto, fam, addr, port = m.groups()
    if addr is not None and fam is None:
        fam = "6" if ":" in addr else "4"
    kw = dict(common)
    kw.update(port=int(port), address=addr.strip("[]") if addr else None)
    if proto:
        kw["udp"] = proto == "udp"
    if fam:
        kw["ipv6"] = fam == "6"
    return make_group(f"--group {text}: ", **kw)


def _key_line(text: str, table_index: int | None, key: str) -> int:
    """Line (1-based) of ``key`` at the top level (None) or in the n-th [[group]] table; 1 if not found."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    headers = [i for i, ln in enumerate(lines) if re.match(r"^\s*\[", ln)]
    if table_index is None:
        end = headers[0] if headers else len(lines)
    else:
        tables = [i for i in headers if re.match(r"^\s*\[\[\s*group\s*\]\]", lines[i])]
        if table_index < len(tables):
            start = tables[table_index]
            later = [i for i in headers if i > start]
            end = later[0] if later else len(lines)
            if key is None:
                return start + 1
    pat = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=") if key else None
    for i in range(start, end):
        if pat and pat.match(lines[i]):
            return i + 1
    return start + 1


def load_config(path: str) -> Config:
    """Read and check a TOML config; ConfigError names the file, the line and the cause."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = m.group(1) if m else "1"
        cause = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", msg)
        if not m and "end of document" in msg:
            line = str(len(text.splitlines()) or 1)
        raise ConfigError(f"{path}:{line}: {cause}") from None

    def where(table, key):
        return f"{path}:{_key_line(text, table, key)}: "

    for k, v in data.items():
        if k not in TOP_KEYS:
            raise ConfigError(f"{where(None, k)}unknown key {k!r} (known: {', '.join(TOP_KEYS)})")
        if not isinstance(v, TOP_KEYS[k]) or isinstance(v, bool) and TOP_KEYS[k] is not bool:
            raise ConfigError(f"{where(None, k)}{k} has the wrong type ({type(v).__name__})")
    groups_raw = data.get("group", [])
    if not groups_raw:
        raise ConfigError(f"{path}:1: no [[group]] table: nothing to watch")
    interval = float(data.get("interval", DEFAULT_INTERVAL))
    if not 0.01 <= interval <= 3600:
        raise ConfigError(f"{where(None, 'interval')}interval {interval} out of range 0.01..3600 seconds")
    metrics = data.get("metrics")
    if metrics is not None:
        try:
            parse_hostport(metrics)
        except ValueError as e:
            raise ConfigError(f"{where(None, 'metrics')}{e}") from None
    groups: list[GroupSpec] = []
    for i, g in enumerate(groups_raw):
        if not isinstance(g, dict):
            raise ConfigError(f"{where(None, 'group')}group must be [[group]] tables")
        for k, v in g.items():
            if k not in GROUP_KEYS:
                raise ConfigError(f"{where(i, k)}unknown key {k!r} in [[group]] (known: {', '.join(GROUP_KEYS)})")
            if not isinstance(v, GROUP_KEYS[k]) or isinstance(v, bool) and GROUP_KEYS[k] is not bool:
                raise ConfigError(f"{where(i, k)}{k} has the wrong type ({type(v).__name__})")
        if "port" not in g:
            raise ConfigError(f"{where(i, None)}[[group]] without a port")
        try:
            spec = make_group("", **g)
        except ConfigError as e:
            raise ConfigError(f"{where(i, e.key)}{e}") from None
        if any(s.key == spec.key for s in groups):
            raise ConfigError(f"{where(i, 'port')}group {spec} is given twice")
        groups.append(spec)
    return Config(groups, interval, bool(data.get("detach_on_exit", False)), metrics, path)


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:9465', '[::1]:9465', ':9465' (every address) -> (host, port)."""
    m = re.match(r"^(?:\[([^\]]+)\]|([^:]*)):(\d+)$", text)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"metrics address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9465")
    return (m.group(1) or m.group(2) or ""), int(m.group(3))


# -- what a metrics collector reads -----------------------------------------------


@dataclass
class Health:
    """The watcher's own figures, for a metrics collector (numareuse.metrics) to read.

    Plain attributes updated by the watcher's thread; a collector in another
    thread reads them (each is one Python object, read atomically).
    """

    started: float = field(default_factory=time.time)
    reconciles: int = 0  # attaches run (each a full re-scan of one group)
    errors: int = 0  # attaches that failed (not counting a group waiting for its server)
    changes: int = 0  # registration and owner changes made
    last_success: float | None = None  # time.time() of the last attach that completed
    groups: dict[str, str] = field(default_factory=dict)  # group -> "steering" | "waiting" | "error"
    events: bool = False  # kernel process events are in use (else everything is polled)


# -- the watcher ----------------------------------------------------------------


@dataclass
class _Group:
    spec: GroupSpec
    state: str = "new"  # new | steering | waiting | error
    note: str | None = None  # the last waiting/error line logged (each is logged once)
    baseline: tuple | None = None  # fingerprint taken before the last attach
    owners: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # cookie -> [(pid, comm)]
    domains: dict[int, object] = field(default_factory=dict)  # cookie -> domain
    pids: set[int] = field(default_factory=set)  # owners of the last pass
    warnings: set[str] = field(default_factory=set)  # attach's last warnings (each logged once)
    parents: set[int] = field(default_factory=set)  # their parents (who forks new workers)
    next_check: float = 0.0
    hot_until: float = 0.0
    retry_at: float | None = None
    failures: int = 0
    diag: socket.socket | None = None
    no_diag: bool = False  # sock_diag failed: read /proc/net instead


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _ppid(pid: int) -> int:
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError):
            out.update(int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split())
    return out


def _netns_path(spec: GroupSpec) -> str | None:
    if spec.pid is not None:
        return f"/proc/{spec.pid}/ns/net"
    if spec.netns is not None:
        return spec.netns if "/" in spec.netns else f"/run/netns/{spec.netns}"
    return None


@contextlib.contextmanager
def _in_netns(path: str | None):
    """This thread in the network namespace at ``path`` for the block (None: stay)."""
    if path is None:
        yield
        return
    target = os.open(path, os.O_RDONLY)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _sys.setns(target, _sys.CLONE_NEWNET)
        try:
            yield
        finally:
            _sys.setns(own, _sys.CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(own)


def _diag_in(path: str | None) -> socket.socket:
    """A sock_diag socket of the network namespace at ``path`` (a socket keeps its namespace)."""
    with _in_netns(path):
        return _sys.diag_socket()


def _proc_net_sockets(spec: GroupSpec) -> dict[int, int]:
    """inode -> 0 of the group's sockets from the /proc/net tables of its namespace."""
    name = f"{'udp' if spec.udp else 'tcp'}{'6' if spec.ipv6 else ''}"
    want = "07" if spec.udp else "0A"  # unconnected UDP / TCP_LISTEN
    suffix = f":{spec.port:04X}"
    out = {}
    with _in_netns(_netns_path(spec)), open(f"/proc/thread-self/net/{name}") as f:
        next(f)
        for line in f:
            if suffix not in line:
                continue
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == want:
                if spec.address is None or discovery._hex_addr(fields[1])[0] == spec.address:
                    out[int(fields[9])] = 0
    return out


def _in_child(fn, *args, timeout: float = CHILD_TIMEOUT) -> dict:
    """Run ``fn(*args)`` in a forked child; {"report": ...} or {"error": class, "message": ...}.

    The child ignores SIGTERM/SIGHUP/SIGINT so that an attach always
    completes (the watcher waits for it before it exits), and every fd it
    took (pidfd_getfd duplicates, a selector's maps) closes when it exits.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 0
        try:
            os.close(r)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            try:
                out = {"report": fn(*args)}
            except NumaReuseError as e:
                out = {"error": type(e).__name__, "message": str(e), "errno": e.errno}
            except BaseException as e:  # a bug: its traceback is the report
                out = {"error": "bug", "message": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data) :]
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait_readable(r, left):
                os.kill(pid, signal.SIGKILL)
                return {"error": "timeout", "message": f"the attach took over {timeout:.0f} s and was stopped"}
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        why = (
            f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {os.waitstatus_to_exitcode(status)}"
        )
        return {"error": "crash", "message": f"the attach process died ({why}) without a report"}
    return json.loads(b"".join(chunks))


def _wait_readable(fd: int, timeout: float) -> bool:
    while True:
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            continue


def _attach(spec: GroupSpec) -> dict:
    return control.attach(
        spec.port, spec.address, spec.udp, spec.ipv6, spec.domains, spec.capacity, **spec.attach_kwargs()
    )


def _detach(spec: GroupSpec) -> dict:
    return control.detach(spec.port, spec.address, spec.udp, spec.ipv6, **spec.attach_kwargs())


_WAITING = ("NotInGroupError", "ProcessGone", "DomainSpecError")


class Watcher:
    """The reconcile loop over a Config. ``run()`` returns the exit status."""

    def __init__(self, config: Config):
        self.config = config
        self.health = Health()
        self.groups: dict[tuple, _Group] = {}
        self._stop = False
        self._reload = False
        self.status = 0  # run()'s exit status
        self._why = ""
        self._events: socket.socket | None = None
        self._uevents: socket.socket | None = None
        self._epolls: dict[int, list[int]] = {}  # pid -> fd numbers of its epoll instances
        self._me = os.getpid()
        self._set_groups(config.groups)

    # -- configuration --

    def _set_groups(self, specs: list[GroupSpec]) -> None:
        old = self.groups
        self.groups = {}
        for spec in specs:
            g = old.pop(spec.key, None)
            if g is None:
                g = _Group(spec)
                log.info(f"{spec}: watching (domains {spec.domains})")
            elif g.spec != spec:
                log.info(
                    f"{spec}: domains {g.spec.domains} -> {spec.domains}, capacity {g.spec.capacity} -> {spec.capacity}"
                )
                g.spec = spec
            g.baseline, g.next_check = None, 0.0  # check every group now
            self.groups[spec.key] = g
        for g in old.values():
            log.info(f"{g.spec}: no longer watched; its steering stays (numareuse detach removes it)")
            self.health.groups.pop(str(g.spec), None)
            if g.diag is not None:
                g.diag.close()

    def reload(self) -> None:
        if self.config.path is None:
            log.info("SIGHUP: no --config file to re-read; checking every group again")
            self._set_groups(self.config.groups)
            return
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            log.error(f"SIGHUP: {e}; keeping the previous configuration")
            return
        new.overrides = self.config.overrides
        new.apply_overrides()
        new.metrics = self.config.metrics  # the metrics server keeps its address until restarted
        log.info(f"SIGHUP: re-read {self.config.path} ({len(new.groups)} groups)")
        self.config = new
        self._set_groups(new.groups)

    # -- the loop --

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop, self._why = True, signal.Signals(signum).name

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self._open_events()
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self.reload()
                now = time.monotonic()
                for g in list(self.groups.values()):
                    if self._stop:
                        break
                    if g.next_check <= now:
                        self._check(g)
                        now = time.monotonic()
                        hot = now < g.hot_until
                        g.next_check = now + (HOT_INTERVAL if hot else self.config.interval)
                        if g.retry_at is not None:
                            g.next_check = min(g.next_check, g.retry_at)
                if self._stop or self._reload:
                    continue
                timeout = max(0.0, min((g.next_check for g in self.groups.values()), default=60.0) - now)
                fds = [wake_r] + [s for s in (self._events, self._uevents) if s is not None]
                try:
                    ready = select.select(fds, [], [], timeout)[0]
                except InterruptedError:  # pragma: no cover
                    continue
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(256)
                if self._events in ready:
                    self._read_events()
                if self._uevents in ready:
                    self._read_uevents()
            how = "detaching every group" if self.config.detach_on_exit else "the steering stays"
            log.info(f"stopping: {self._why}; {how}")
            if self.config.detach_on_exit:
                return self._detach_all() or self.status
            return self.status
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old.items():
                signal.signal(s, h)
            for s in (self._events, self._uevents, wake_r, wake_w):
                if s is not None:
                    s.close()
            for g in self.groups.values():
                if g.diag is not None:
                    g.diag.close()
                    g.diag = None

    def _detach_all(self) -> int:
        status = 0
        for g in self.groups.values():
            res = _in_child(_detach, g.spec)
            if "error" in res:
                log.error(f"{g.spec}: detach failed: {res['message']}")
                status = 1
            elif res["report"]["action"] == "detached":
                log.info(f"{g.spec}: detached")
        return status

    # -- kernel events --

    def _open_events(self) -> None:
        try:
            self._events = _sys.proc_connector()
            self.health.events = True
        except OSError as e:
            log.info(f"no process events (proc connector: {e.strerror}): polling every {self.config.interval} s")
        try:
            self._uevents = _sys.uevent_socket()
        except OSError:
            self._uevents = None

    def _hot(self, g: _Group, now: float) -> None:
        g.hot_until = now + HOT_SECONDS
        g.next_check = min(g.next_check, now + HOT_INTERVAL / 2)

    def _read_events(self) -> None:
        now = time.monotonic()
        while True:
            try:
                data = self._events.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # events were lost: look at everything
                    for g in self.groups.values():
                        self._hot(g, now)
                    continue
                raise
            for what, pid, tgid, parent in _sys.proc_events(data):
                if pid != tgid or parent == self._me:
                    continue  # a thread, or our own attach process
                for g in self.groups.values():
                    if g.state != "steering":
                        if what != _sys.PROC_EVENT_EXIT:  # a server may be starting
                            self._hot(g, now)
                    elif what == _sys.PROC_EVENT_FORK and (parent in g.parents or parent in g.pids):
                        self._hot(g, now)  # a new worker: it will poll a socket soon
                    elif tgid in g.pids or tgid in g.parents:
                        self._hot(g, now)  # an owner exited or exec'd

    def _read_uevents(self) -> None:
        now = time.monotonic()
        cpu = False
        while True:
            try:
                data = self._uevents.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                cpu = True  # lost some: maybe a CPU's
                break
            head = data.split(b"\0", 1)[0]
            if head.startswith((b"online@", b"offline@", b"add@", b"remove@")) and b"/devices/system/cpu/" in head:
                cpu = True
        if cpu:
            for g in self.groups.values():
                self._hot(g, now)

    # -- the cheap check --

    def _sockets(self, g: _Group) -> dict[int, int]:
        """inode -> cookie (0 when read from /proc) of the group's sockets now.

        sock_diag when the kernel has it (its inet_diag/tcp_diag/udp_diag modules
        may be missing or not loadable), else the /proc/net tables.
        """
        spec = g.spec
        proto, state = (socket.IPPROTO_UDP, _sys.TCP_CLOSE) if spec.udp else (socket.IPPROTO_TCP, _sys.TCP_LISTEN)
        if not g.no_diag:
            try:
                if g.diag is None:
                    g.diag = _diag_in(_netns_path(spec))
                found = _sys.diag_list(g.diag, spec.family, proto, state)
                return {ino: ck for addr, port, ino, ck in found if port == spec.port and spec.address in (None, addr)}
            except OSError as e:
                if g.diag is not None:
                    g.diag.close()
                    g.diag = None
                if e.errno not in (errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EINVAL):
                    raise  # the namespace is gone, or not ours to enter
                log.debug(f"{spec}: sock_diag unavailable ({e.strerror}): reading /proc/net")
                g.no_diag = True
        return _proc_net_sockets(spec)

    def _polled(self, pid: int) -> set[int] | None:
        """Inodes this process's epoll instances watch (None: it is gone)."""
        fds = self._epolls.get(pid)
        out: set[int] = set()
        if fds:
            try:
                for fd in fds:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                        raise FileNotFoundError
                    out.update(
                        int(i, 16)
                        for i in re.findall(r"^tfd:.*\bino:([0-9a-f]+)", _read(f"/proc/{pid}/fdinfo/{fd}"), re.M)
                    )
                return out
            except OSError:
                pass  # closed or reused: list the fds again
        fds = []
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            self._epolls.pop(pid, None)
            return None
        for fd in names:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                    continue
                text = _read(f"/proc/{pid}/fdinfo/{fd}")
            except OSError:
                continue
            fds.append(int(fd))
            out.update(int(i, 16) for i in re.findall(r"^tfd:.*\bino:([0-9a-f]+)", text, re.M))
        self._epolls[pid] = fds
        return out

    def _fingerprint(self, g: _Group) -> tuple:
        socks = self._sockets(g)
        pids = set(g.pids)
        for parent in g.parents:
            pids |= _children(parent)
        procs = []
        for pid in sorted(pids):
            try:
                aff = frozenset(os.sched_getaffinity(pid))
            except OSError:
                aff = None
            polled = self._polled(pid) if aff is not None else None
            procs.append((pid, aff, frozenset(polled & socks.keys()) if polled is not None else None))
        try:
            online = _read("/sys/devices/system/cpu/online").strip()
        except OSError:
            online = ""
        return (frozenset(socks.items()), tuple(procs), online)

    def _check(self, g: _Group) -> None:
        now = time.monotonic()
        if g.spec.pid is not None and not os.path.exists(f"/proc/{g.spec.pid}"):
            # the namespace went with it: a restart (systemd, Kubernetes) names the new process
            log.error(f"{g.spec}: process {g.spec.pid} exited; exiting so that a restart finds its successor")
            self._stop, self.status, self._why = True, 1, f"process {g.spec.pid} exited"
            return
        try:
            fp = self._fingerprint(g)
        except OSError as e:
            # the namespace is gone or unreadable: attach says why (once), and it is tried again
            fp = ("unreadable", e.errno)
            g.retry_at = g.retry_at or now + min(MAX_BACKOFF, 0.2 * 2 ** min(g.failures, 8))
        due = g.retry_at is not None and now >= g.retry_at
        if fp == g.baseline and not due:
            return
        g.retry_at = None
        if log.isEnabledFor(logging.DEBUG):
            parts = ("sockets", "processes", "online CPUs")
            why = (
                "first check"
                if g.baseline is None
                else "retry"
                if fp == g.baseline
                else ", ".join(p for p, a, b in zip(parts, fp, g.baseline) if a != b)
            )
            log.debug(f"{g.spec}: attach ({why})")
        self._reconcile(g, fp)

    # -- the reconcile --

    def _reconcile(self, g: _Group, fp: tuple) -> None:
        spec, name = g.spec, str(g.spec)
        self.health.reconciles += 1
        res = _in_child(_attach, spec)
        g.baseline = fp
        if "report" in res:
            rep = res["report"]
            self._took(g, rep)
            self.health.last_success = time.time()
            return
        kind, msg = res["error"], res["message"]
        if kind in _WAITING:
            # no socket yet, the server gone, or a spec naming an offline CPU: wait, it is no failure
            state = "waiting"
            g.failures += 1
            if kind != "NotInGroupError" or "SO_REUSEPORT" in msg:  # not an event we could see: poll
                g.retry_at = time.monotonic() + min(MAX_BACKOFF, 0.2 * 2 ** min(g.failures, 8))
        else:
            state = "error"
            self.health.errors += 1
            g.failures += 1
            g.retry_at = time.monotonic() + min(MAX_BACKOFF, 2 ** min(g.failures, 5))
        note = f"{name}: {'waiting: ' if state == 'waiting' else 'error: '}{msg}"
        if note != g.note:
            (log.info if state == "waiting" else log.error)(note)
            if "trace" in res:
                log.error(res["trace"].rstrip())
            g.note = note
        g.state = state
        self.health.groups[name] = state

    def _took(self, g: _Group, rep: dict) -> None:
        """Log what an attach changed (one line each) and learn the group's processes."""
        name = str(g.spec)
        changes = list(rep["changes"])
        owners: dict[int, list[tuple[int, str]]] = {}
        domains: dict[int, object] = {}
        for s in rep["sockets"]:
            owners[s["cookie"]] = [(o["pid"], o["comm"]) for o in s["owners"]]
            domains[s["cookie"]] = s["domain"]
        for cookie, now in owners.items():
            was = g.owners.get(cookie)
            if was is not None and was != now and g.state == "steering":
                fmt = lambda os_: ",".join(f"{p}/{c}" for p, c in os_) or "-"  # noqa: E731
                changes.append(f"~ sk:{cookie} owner {fmt(was)} -> {fmt(now)}")
        if rep["action"] in ("attached", "replaced"):
            log.info(f"{name}: {rep['action']}, program {rep['program_id']}, {len(rep['sockets'])} sockets")
        elif g.state != "steering":
            log.info(f"{name}: steering {len(rep['sockets'])} sockets, program {rep['program_id']}")
        for c in changes:
            log.info(f"{name}: {c}")
        warnings = rep.get("warnings", [])
        for w in warnings:
            if w not in g.warnings:  # once, not at every check
                log.warning(f"{name}: {w}")
        g.warnings = set(warnings)
        self.health.changes += len(changes)
        g.owners, g.domains = owners, domains
        g.pids = {p for os_ in owners.values() for p, _ in os_}
        g.parents = {pp for p in g.pids if (pp := _ppid(p)) > 1 and pp != self._me}
        for pid in list(self._epolls):
            if not any(pid in gr.pids for gr in self.groups.values()):
                self._epolls.pop(pid, None)
        g.state, g.note, g.failures = "steering", None, 0
        self.health.groups[name] = "steering"


# -- logging and the entry point --------------------------------------------------


class _Formatter(logging.Formatter):
    """One line per record: a timestamp on a terminal; under systemd (JOURNAL_STREAM) a <N> priority."""

    _PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, journal: bool, stamps: bool):
        super().__init__()
        self.journal, self.stamps = journal, stamps

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING and not self.journal:
            msg = f"{record.levelname.lower()}: {msg}"
        if self.journal:
            return "\n".join(f"<{self._PRIO.get(record.levelno, 6)}>{ln}" for ln in msg.splitlines())
        if self.stamps:
            return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        return msg


def setup_logging(verbose: bool = False) -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journal, stamps=not journal and sys.stderr.isatty()))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def start_metrics(address: str, health: Health) -> None:
    """Serve ``health`` (and the groups' counters) on HOST:PORT through numareuse.metrics.

    The hook: numareuse.metrics provides ``serve_watch(host, port, health)``,
    which starts its HTTP server in a daemon thread and returns.
    """
    host, port = parse_hostport(address)
    try:
        from . import metrics  # noqa: PLC0415 (optional: another branch adds it)
    except ImportError:
        raise ConfigError("--metrics needs numareuse.metrics, which this build does not have") from None
    serve = getattr(metrics, "serve_watch", None)
    if serve is None:
        raise ConfigError("--metrics: numareuse.metrics has no serve_watch(host, port, health)")
    serve(host, port, health)


def run(config: Config) -> int:
    """Watch until SIGTERM; the exit status (0, or 1 when --detach-on-exit failed)."""
    control_state_check()
    w = Watcher(config)
    if config.metrics:
        start_metrics(config.metrics, w.health)
    return w.run()


def control_state_check() -> None:
    """Fail at once, before watching, for what no wait can cure: not root."""
    from .state import require_root

    require_root()


__all__ = ["Config", "ConfigError", "GroupSpec", "Health", "Watcher", "load_config", "parse_group_arg", "run"]
