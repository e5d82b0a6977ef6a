"""A small pre-fork HTTP server in nginx's model, with numareuse steering.

The master creates one SO_REUSEPORT listening socket per worker, attaches a
:class:`~numareuse.Selector` to the group and forks the workers. Each worker
pins itself to its CPUs, optionally drops privileges, registers ITS OWN
socket in the domain it now runs in (``CURRENT``) and serves HTTP/1.1,
answering every request with who answered it (``X-Worker-Pid``,
``X-Worker-Index``, ``X-Worker-Cpu``, ``X-Worker-Domain``).

Integrating numareuse into another pre-fork server takes three lines::

    sel = Selector(domains="numa")       # master, before fork (needs root/CAP_BPF)
    sel.attach(listeners[0])             # master: any socket of the SO_REUSEPORT group
    sel.register(my_listener, CURRENT)   # worker, after it set its CPU affinity

``CURRENT`` is the domain holding the worker's whole CPU affinity, as
FreeBSD's ``TCP_REUSPORT_LB_NUMA_CURDOM``. The worker uses the map fds it
inherited; the selector's lock is a POSIX lock on an inherited memfd, so
workers and master exclude each other without reopening anything.

Design choices, and why:

* The master keeps every listening socket open for the server's lifetime
  and each worker index owns one socket. A dead worker's socket therefore
  stays in the SO_REUSEPORT group *and* in its sockarray slot: connections
  steered to it are queued in its accept backlog (not refused, not reset) and
  the replacement worker, forked with the same index, accepts them. This is
  nginx's model. A worker closes the other workers' sockets (its epoll holds
  only its own, as nginx's does), which changes nothing for their lifetime.
* Unprivileged workers (``--user``): with kernel.unprivileged_bpf_disabled
  set, kernels >= ~6.5 still let a process update maps through fds it
  inherited from a privileged parent; older kernels refuse every bpf() call.
  The worker first registers directly; on a permission error it sends
  ``register <domain>`` to the master over its own control socketpair (the
  worker computes the domain from its affinity), and the master registers
  *that worker's* socket, the only one the channel can name.
  ``--registration master`` forces the second path.
* After registering, a worker closes its copy of the selector's fds: an
  unprivileged worker cannot touch the maps afterwards.
* SIGTERM to one worker is a graceful restart (it stops accepting, finishes
  its connections, the master forks a replacement); SIGTERM/SIGINT to the
  master stops the workers, detaches the program and exits 0. A SIGKILLed
  worker loses only the requests it had already accepted, as with nginx.

Usage::

    python -m numareuse.examples.prefork --port 8080 --workers 2 --affinity auto --domains cpu [--user nobody]

``--affinity`` is ``auto`` (worker i on CPU i mod ncpu), nginx-style masks
(``"01 10"``: rightmost bit is CPU 0; the last mask repeats for further
workers), ``;``-separated CPU lists (``"0-1;2-3"``), or ``none``.
``--no-numareuse`` runs the same server without the program (baseline).
The master prints ``ready port=P workers=N ...`` once every worker serves.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pwd
import select
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass

from .. import _sys, topology
from ..errors import NumaReuseError, PermissionDenied
from ..selector import CURRENT, WILDCARD, Selector

DRAIN_SECONDS = 5.0  # a stopping worker finishes its connections within this
KEEPALIVE_SECONDS = 30.0
MAX_HEAD = 16384
RESTART_BACKOFF = 1.0  # a worker that died younger than this is restarted after this delay
READY_TIMEOUT = 30.0


def _domain_name(d: int | None) -> str:
    if d is None:
        return "none"
    return "wildcard" if d == WILDCARD else str(d)


# -- configuration ---------------------------------------------------------


def parse_affinity(spec: str, workers: int, cpus: list[int] | None = None) -> list[set[int] | None]:
    """CPU sets per worker from an nginx-style ``worker_cpu_affinity`` value.

    ``auto``: worker i on the i-th allowed CPU, wrapping around. Masks
    (``"0001 0010"``, rightmost bit CPU 0) as nginx; fewer masks than workers
    reuse the last one, as nginx does. ``"0-1;2-3"``: one CPU list per worker,
    likewise. ``none``/``off``: no pinning.
    """
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    spec = spec.strip()
    if spec in ("none", "off"):
        return [None] * workers
    if spec == "auto":
        return [{cpus[i % len(cpus)]} for i in range(workers)]
    tokens = spec.split()
    if ";" not in spec and tokens and all(set(t) <= {"0", "1"} for t in tokens):
        sets = [{len(t) - 1 - b for b, ch in enumerate(t) if ch == "1"} for t in tokens]
    else:
        try:
            sets = [set(_sys.parse_cpulist(part)) for part in spec.split(";") if part.strip()]
        except ValueError:
            sets = []
        if not sets:
            raise ValueError(f"affinity {spec!r}: expected auto, none, masks like '01 10' or CPU lists like '0-1;2-3'")
    for s in sets:
        if not s:
            raise ValueError(f"affinity {spec!r} gives a worker no CPU")
        if not s <= set(cpus):
            raise ValueError(f"affinity {spec!r} names CPUs not available to this process: {sorted(s - set(cpus))}")
    return [sets[min(i, len(sets) - 1)] for i in range(workers)]


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0  # 0: one per allowed CPU
    affinity: str = "auto"
    domains: str = "numa"
    user: str | None = None
    registration: str = "auto"  # auto: direct, else ask the master; master: always ask the master
    numareuse: bool = True
    backlog: int = 4096


# -- small helpers ---------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, flush=True)


def _drop_privileges(user: str) -> None:
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)  # clears CapEff/CapPrm, and the parent-death signal


def _listener(family: int, host: str, port: int, backlog: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


# -- worker ----------------------------------------------------------------


MAX_BODY = 1 << 20  # a body is read and ignored; past this the request is refused


class _BadRequest(Exception):
    def __init__(self, status: str):
        self.status = status


def _parse_request(buf: bytes):
    """(bytes consumed, method, keep-alive) of the first complete request in buf, or None."""
    skip = 0
    while buf.startswith(b"\r\n", skip):  # RFC 9112: ignore empty lines before a request
        skip += 2
    end = buf.find(b"\r\n\r\n", skip)
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise _BadRequest("431 Request Header Fields Too Large")
        return None
    lines = buf[skip:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest("400 Bad Request")
    method, _, version = parts
    headers = {}
    for ln in lines[1:]:
        k, sep, v = ln.partition(b":")
        if not sep:
            raise _BadRequest("400 Bad Request")
        headers[k.strip().lower()] = v.strip().lower()
    if b"transfer-encoding" in headers:
        raise _BadRequest("501 Not Implemented")
    cl = headers.get(b"content-length", b"0")
    if not cl.isdigit():  # int() would take "-48" (a request that never ends), "+5", "1_0"
        raise _BadRequest("400 Bad Request")
    length = int(cl)
    if length > MAX_BODY:
        raise _BadRequest("413 Content Too Large")
    total = end + 4 + length
    if len(buf) < total:
        return None
    conn = headers.get(b"connection", b"")
    keep = b"keep-alive" in conn if version == b"HTTP/1.0" else b"close" not in conn
    return total, method, keep


class _Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "closing", "last", "served")

    def __init__(self, sock: socket.socket):
        self.sock, self.inbuf, self.outbuf, self.closing = sock, b"", b"", False
        self.last, self.served = time.monotonic(), 0


class _Worker:
    """One worker process: affinity, privileges, registration, then an epoll HTTP loop."""

    def __init__(self, cfg: Config, index: int, sock, ctl, sel, topo, cpus, sigr: int):
        self.cfg, self.index, self.sock, self.ctl, self.sel = cfg, index, sock, ctl, sel
        self.topo, self.cpus, self.sigr = topo, cpus, sigr
        self.domain: int | None = None
        self.path = "off"

    def _ask(self, msg: dict) -> dict:
        self.ctl.settimeout(10)
        self.ctl.send(json.dumps(msg).encode())
        reply = self.ctl.recv(4096)
        if not reply:
            raise NumaReuseError("the master closed the control channel")
        return json.loads(reply)

    def _register(self) -> None:
        if self.sel is None:  # --no-numareuse: report the domain we would have used
            self.domain = topology.current_domain(self.topo)
            return
        if self.cfg.registration != "master":
            try:
                self.domain, self.path = self.sel.register(self.sock, CURRENT), "direct"
                return
            except PermissionDenied:
                pass  # kernels before ~6.5 refuse bpf() to unprivileged callers: ask the master
        d = topology.current_domain(self.topo)
        reply = self._ask({"op": "register", "domain": WILDCARD if d is None else d})
        if not reply.get("ok"):
            raise NumaReuseError(f"the master could not register our socket: {reply.get('error')}")
        self.domain, self.path = reply["domain"], "master"

    def run(self, master: int) -> None:
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)
        if self.cfg.user:
            _drop_privileges(self.cfg.user)
        _sys.set_pdeathsig(signal.SIGTERM)  # after setuid, which clears it
        if os.getppid() != master:
            raise NumaReuseError("the master exited while this worker started")
        self._register()
        if self.sel is not None:
            self.sel.close()  # a worker's close only drops its fds; it never detaches
            self.sel = None
        self.ctl.send(
            json.dumps(
                {
                    "op": "ready",
                    "domain": self.domain,
                    "path": self.path,
                    "cpus": sorted(os.sched_getaffinity(0)),
                    "uid": os.getuid(),
                }
            ).encode()
        )
        self._serve()

    # HTTP

    def _response(self, status: str, method: bytes, keep: bool) -> bytes:
        cpu = _sys.sched_getcpu()
        dom = _domain_name(self.domain)
        body = (
            json.dumps(
                {
                    "pid": os.getpid(),
                    "worker": self.index,
                    "cpu": cpu,
                    "domain": "wildcard" if self.domain == WILDCARD else self.domain,
                    "registered": self.path,
                }
            )
            + "\n"
        ).encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Worker-Pid: {os.getpid()}\r\nX-Worker-Index: {self.index}\r\nX-Worker-Cpu: {cpu}\r\n"
            f"X-Worker-Domain: {dom}\r\nX-Worker-Registered: {self.path}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode()
        return head if method == b"HEAD" else head + body

    def _serve(self) -> None:
        sigr = self.sigr
        self.sock.setblocking(False)
        poll = selectors.DefaultSelector()
        poll.register(self.sock, selectors.EVENT_READ, "listen")
        poll.register(sigr, selectors.EVENT_READ, "signal")
        conns: dict[int, _Conn] = {}
        deadline = None  # set when draining
        last_sweep = time.monotonic()

        def close(c: _Conn) -> None:
            poll.unregister(c.sock)
            conns.pop(c.sock.fileno(), None)
            c.sock.close()

        def flush(c: _Conn) -> None:
            if c.sock.fileno() == -1:  # closed earlier in this batch of events
                return
            try:
                if c.outbuf:
                    c.outbuf = c.outbuf[c.sock.send(c.outbuf) :]
            except BlockingIOError:
                pass
            except OSError:
                close(c)
                return
            if c.outbuf:
                poll.modify(c.sock, selectors.EVENT_WRITE, c)
            elif c.closing:
                close(c)
            else:
                poll.modify(c.sock, selectors.EVENT_READ, c)

        def on_read(c: _Conn) -> None:
            if c.sock.fileno() == -1:  # closed earlier in this batch of events
                return
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                close(c)
                return
            c.inbuf += data
            c.last = time.monotonic()
            while not c.closing:
                try:
                    req = _parse_request(c.inbuf)
                except _BadRequest as e:
                    c.outbuf += self._response(e.status, b"GET", False)
                    c.closing = True
                    break
                if req is None:
                    break
                used, method, keep = req
                c.inbuf = c.inbuf[used:]
                keep = keep and deadline is None
                c.outbuf += self._response("200 OK", method, keep)
                c.closing, c.served = not keep, c.served + 1
            flush(c)

        while True:
            if deadline is not None and (not conns or time.monotonic() > deadline):
                break
            for key, ev in poll.select(1.0):
                if key.data == "signal":
                    sigs = os.read(sigr, 512)
                    if deadline is None and {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT} & set(sigs):
                        # stop accepting: what queues on our socket now waits for our replacement
                        with contextlib.suppress(KeyError, ValueError):  # gone if the master shut it
                            poll.unregister(self.sock)
                        deadline = time.monotonic() + DRAIN_SECONDS
                        for c in list(conns.values()):
                            if c.served and not c.inbuf and not c.outbuf:
                                close(c)  # idle keep-alive; a new connection still gets its answer
                elif key.data == "listen":
                    for _ in range(128):
                        try:
                            s, _addr = self.sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as e:
                            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                                continue
                            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                                break  # leave it queued; retry on the next wakeup
                            if e.errno == errno.EINVAL:  # the master shut the listener: stopping
                                with contextlib.suppress(KeyError, ValueError):
                                    poll.unregister(self.sock)
                                break
                            raise
                        s.setblocking(False)
                        c = _Conn(s)
                        conns[s.fileno()] = c
                        poll.register(s, selectors.EVENT_READ, c)
                elif ev & selectors.EVENT_WRITE:
                    flush(key.data)
                else:
                    on_read(key.data)
            now = time.monotonic()
            if now - last_sweep > 1.0:
                last_sweep = now
                for c in list(conns.values()):
                    if now - c.last > KEEPALIVE_SECONDS:
                        close(c)
        for c in list(conns.values()):
            close(c)


# -- master ----------------------------------------------------------------


class _Refused(Exception):
    """A control message that breaks the protocol: its worker is killed."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer of this control socket closed its end (not just sent an empty message)."""
    poll = select.poll()
    poll.register(sock, select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP) for _fd, ev in poll.poll(0))


def _decode(raw: bytes) -> dict:
    """A worker's control message: a JSON object with a string ``op``; _Refused otherwise."""
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested past the limit
        raise _Refused(f"not JSON: {type(e).__name__}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise _Refused("not an object with an op")
    return msg


@dataclass
class _Slot:
    """A worker index: its socket for the server's lifetime, and its current process."""

    index: int
    sock: socket.socket
    cpus: set[int] | None
    pid: int = 0
    ctl: socket.socket | None = None
    started: float = 0.0
    ready: bool = False
    respawn_at: float | None = None


class Master:
    """Owns the listening sockets and the selector; forks, watches and replaces workers."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.topo = topology.parse(cfg.domains)
        if cfg.workers < 0:
            raise ValueError(f"--workers {cfg.workers}: give at least 1 (0 = one per CPU)")
        nworkers = cfg.workers or len(os.sched_getaffinity(0))
        affinity = parse_affinity(cfg.affinity, nworkers)
        if cfg.user:
            pwd.getpwnam(cfg.user)  # KeyError now, not in every worker
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.slots: list[_Slot] = []
        self.sel: Selector | None = None
        self.poll = selectors.DefaultSelector()
        self.stopping = False
        self.exit_code = 0
        self.announced = False
        # signals first: a SIGTERM during the (slow) program load must stop us cleanly, not kill us
        self._sigr, self._sigw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poll.register(self._sigr, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(self._sigw, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number
        try:
            port = cfg.port
            for i in range(nworkers):
                s = _listener(family, cfg.host, port, cfg.backlog)
                port = s.getsockname()[1]  # --port 0: every worker joins the first one's port
                self.slots.append(_Slot(i, s, affinity[i]))
            self.port = port
            if cfg.numareuse:
                self.sel = Selector(self.topo)
                self.sel.attach(self.slots[0].sock)
                for slot in self.slots:  # the master holds every socket: its sweeps may move any
                    self.sel.use_group(slot.sock)
        except BaseException:
            self._close()
            raise

    # lifecycle

    def run(self) -> int:
        try:
            mode = "on" if self.sel else "off"
            _log(f"master pid={os.getpid()} numareuse={mode} domains={self.topo.spec} ndomains={self.topo.ndomains}")
            with contextlib.suppress(BlockingIOError):
                self._on_signals(os.read(self._sigr, 512))  # a stop requested while we loaded
            for slot in self.slots:
                if not self.stopping:
                    self._spawn(slot)
            started = time.monotonic()
            while not self.stopping:
                now = time.monotonic()
                timeouts = [s.respawn_at - now for s in self.slots if s.respawn_at is not None]
                if not self.announced:
                    timeouts.append(started + READY_TIMEOUT - now)
                    if now > started + READY_TIMEOUT:
                        self._fatal("workers did not become ready in time")
                        break
                for key, _ in self.poll.select(max(0.0, min(timeouts)) if timeouts else None):
                    if key.data is None:
                        self._on_signals(os.read(self._sigr, 512))
                    else:
                        self._on_message(key.data)
                self._reap()
                now = time.monotonic()
                for slot in self.slots:
                    if not self.stopping and slot.respawn_at is not None and now >= slot.respawn_at:
                        self._spawn(slot)
        finally:
            self._shutdown()
        return self.exit_code

    def _fatal(self, msg: str) -> None:
        if self.exit_code:
            return  # the first cause is the one to show
        print(f"Error: prefork: {msg}", file=sys.stderr, flush=True)
        self.exit_code, self.stopping = 1, True

    def _on_signals(self, sigs: bytes) -> None:
        if {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} & set(sigs):
            self.stopping = True

    def _spawn(self, slot: _Slot) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(slot, theirs, mine)  # never returns
        theirs.close()
        mine.setblocking(False)  # a worker that never reads its replies must not block the master
        slot.pid, slot.ctl, slot.started, slot.ready, slot.respawn_at = pid, mine, time.monotonic(), False, None
        self.poll.register(mine, selectors.EVENT_READ, slot)

    def _child(self, slot: _Slot, ctl: socket.socket, master_end: socket.socket) -> None:
        code, master = 1, os.getppid()
        try:
            # our own wakeup pipe before the handlers: a SIGTERM during start-up is not lost
            sigr, sigw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(sigw, warn_on_full_buffer=False)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, lambda *_: None)  # graceful: the worker loop sees it on its wakeup fd
            master_end.close()
            for fd in (self._sigr, self._sigw):
                os.close(fd)
            for other in self.slots:
                if other is not slot:
                    other.sock.close()  # the master keeps them; our epoll holds only our own
                    if other.ctl is not None:
                        other.ctl.close()
            self.poll.close()
            _Worker(self.cfg, slot.index, slot.sock, ctl, self.sel, self.topo, slot.cpus, sigr).run(master)
            code = 0
        except BaseException as e:  # a worker must never return into the master's code
            msg = f"{type(e).__name__}: {e}"
            with contextlib.suppress(OSError):
                ctl.send(json.dumps({"op": "error", "error": msg}).encode())
            with contextlib.suppress(OSError):
                print(f"Error: prefork: worker {slot.index}: {msg}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)

    def _on_message(self, slot: _Slot) -> None:
        if slot.ctl is None:
            return
        try:
            raw = slot.ctl.recv(4096)
        except OSError:
            raw = b""
        if not raw:
            if _hung_up(slot.ctl):  # the worker exited; _reap() handles it
                self._close_channel(slot)
            else:  # a zero-length message: the same recv() result as the end of the channel
                self._kill(slot, "an empty message")
            return
        try:
            self._handle(slot, _decode(raw))
        except _Refused as e:
            # the master serves every worker: one that breaks the protocol is killed and
            # replaced, never allowed to stop or block the master
            self._kill(slot, str(e))
        except OSError as e:  # its reply could not be sent: it is gone or never reads
            self._kill(slot, type(e).__name__)

    def _kill(self, slot: _Slot, why: str) -> None:
        _log(f"worker {slot.index} pid={slot.pid}: bad control message ({why}); killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.pid, signal.SIGKILL)
        self._close_channel(slot)  # nothing else it queued is read (or obeyed)

    def _close_channel(self, slot: _Slot) -> None:
        if slot.ctl is not None:
            self.poll.unregister(slot.ctl)
            slot.ctl.close()
            slot.ctl = None

    def _handle(self, slot: _Slot, msg: dict) -> None:
        op = msg["op"]
        if op == "register":
            # one request at a time: a worker that never reads its replies would
            # otherwise have the master register for it as often as it can queue
            if _sys.unread_bytes(slot.ctl.fileno()):
                raise _Refused("a request before it read the previous reply")
            slot.ctl.send(json.dumps(self._register_for(slot, msg.get("domain"))).encode())
        elif op == "ready":
            cpus, domain, path, uid = msg.get("cpus"), msg.get("domain"), msg.get("path"), msg.get("uid")
            if not (
                isinstance(cpus, list)
                and all(_is_int(c) for c in cpus)
                and (domain is None or _is_int(domain))
                and path in ("direct", "master", "off")
                and _is_int(uid)
            ):
                raise _Refused("a ready message without cpus, domain, path and uid")
            slot.ready = True
            _log(
                f"worker {slot.index} pid={slot.pid} cpus={','.join(map(str, cpus))} "
                f"domain={_domain_name(domain)} registered={path} uid={uid}"
            )
            if not self.announced and all(s.ready for s in self.slots):
                self.announced = True
                prog = self.sel.program_info()["id"] if self.sel else 0
                _log(
                    f"ready port={self.port} workers={len(self.slots)} host={self.cfg.host} "
                    f"domains={self.topo.spec} numareuse={'on' if self.sel else 'off'} prog_id={prog}"
                )
        elif op == "error":
            if not self.announced:
                self._fatal(f"worker {slot.index}: {' '.join(str(msg.get('error')).split())}")
        else:
            raise _Refused(f"unknown op {op[:40]!r}")

    def _register_for(self, slot: _Slot, domain) -> dict:
        """A worker's request: register ITS socket (the only one its channel names) at ``domain``."""
        if self.sel is None:
            return {"ok": False, "error": "numareuse is off"}
        if domain == CURRENT or (domain != WILDCARD and not isinstance(domain, int)):
            return {"ok": False, "error": f"domain {domain!r}: send a domain number or WILDCARD"}
        try:
            return {"ok": True, "domain": self.sel.register(slot.sock, domain)}
        except NumaReuseError as e:
            return {"ok": False, "error": str(e)}

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            if os.WIFSIGNALED(status):
                how = f"signal {os.WTERMSIG(status)}"
            else:
                how = f"status {os.waitstatus_to_exitcode(status)}"
            slot.pid = 0
            self._close_channel(slot)
            if self.stopping:
                continue
            if not self.announced:
                self._fatal(f"worker {slot.index} exited ({how}) before it was ready")
                continue
            young = time.monotonic() - slot.started < RESTART_BACKOFF
            slot.respawn_at = time.monotonic() + (RESTART_BACKOFF if young else 0.0)
            _log(f"worker {slot.index} pid={pid} exited ({how}); restarting on the same socket")

    def _shutdown(self) -> None:
        live = [s for s in self.slots if s.pid]
        for s in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.pid, signal.SIGTERM)
                os.kill(s.pid, signal.SIGCONT)  # a stopped worker acts on SIGTERM only once continued
        # detach while the group exists (shutting its last listener below frees it)
        detached = False
        if self.sel is not None:
            try:
                st = self.sel.stats()
                _log("stats " + " ".join(f"{k}={v}" for k, v in st.items()))
                detached = self.sel.detach()
            except NumaReuseError as e:  # stop anyway: closing every socket below frees the group
                print(f"Error: prefork: {e}", file=sys.stderr, flush=True)
        for s in self.slots:
            # stop listening now: a new client is refused at once (and can retry elsewhere)
            # instead of being queued for a worker that drains and then reset seconds later
            with contextlib.suppress(OSError):
                s.sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + DRAIN_SECONDS + 1
        while any(s.pid for s in self.slots):
            self._reap()
            if time.monotonic() > deadline:
                for s in self.slots:
                    if s.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(s.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.01)
        self._close()
        _log(f"stopped detached={'yes' if detached else 'no'}")

    def _close(self) -> None:
        if self.sel is not None:
            self.sel.close()
            self.sel = None
        for s in self.slots:
            if s.ctl is not None:
                s.ctl.close()
            s.sock.close()
        self.poll.close()
        signal.set_wakeup_fd(-1)
        for fd in (self._sigr, self._sigw):
            if fd >= 0:
                os.close(fd)
        self._sigr = self._sigw = -1


# -- CLI -------------------------------------------------------------------


def _args(argv):
    p = argparse.ArgumentParser(
        prog="python -m numareuse.examples.prefork",
        description="A pre-fork HTTP server (nginx's model) whose workers register with numareuse.",
        epilog="examples:\n"
        "  python -m numareuse.examples.prefork --port 8080 --workers 2 --affinity auto --domains cpu\n"
        "  python -m numareuse.examples.prefork --port 0 --affinity '01 10' --user nobody --registration master\n"
        "  python -m numareuse.examples.prefork --port 8080 --no-numareuse   # baseline: the kernel's hash",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (IPv4 or IPv6)")
    p.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (printed on the ready line)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: one per CPU)")
    p.add_argument("--affinity", default="auto", help="auto, none, masks '01 10', or CPU lists '0-1;2-3'")
    p.add_argument("--domains", default="numa", help="numa, llc, cpu or '0-1;2-3'")
    p.add_argument("--user", help="workers drop privileges to this user after fork")
    p.add_argument(
        "--registration",
        choices=("auto", "master"),
        default="auto",
        help="auto: the worker registers itself, asking the master on EPERM; master: always ask the master",
    )
    p.add_argument("--no-numareuse", dest="numareuse", action="store_false", help="no program: kernel hash")
    p.add_argument("--backlog", type=int, default=4096)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _args(argv)
    cfg = Config(a.host, a.port, a.workers, a.affinity, a.domains, a.user, a.registration, a.numareuse, a.backlog)
    try:
        master = Master(cfg)
    except (NumaReuseError, ValueError, OSError) as e:
        print(f"Error: prefork: {e}", file=sys.stderr)
        return 1
    except KeyError:
        print(f"Error: prefork: no such user {cfg.user!r}", file=sys.stderr)
        return 1
    return master.run()


if __name__ == "__main__":
    sys.exit(main())
