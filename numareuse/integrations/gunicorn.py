"""numareuse for gunicorn: each worker pinned to one domain and sent that domain's connections.

One line, the last of a ``gunicorn.conf.py`` (hooks defined above it keep
working: they are chained)::

    from numareuse.integrations.gunicorn import enable; enable(globals())

or the ready config, which also turns on ``reuse_port``::

    NUMAREUSE_DOMAINS="0-15;16-31" gunicorn -c python:numareuse.gunicorn -w 8 app:app

Settings: ``enable(globals(), domains=..., sockets=...)``, or the config
variables ``numareuse_domains`` / ``numareuse_sockets``; the environment
variables ``NUMAREUSE_DOMAINS`` / ``NUMAREUSE_SOCKETS`` override both.
``domains`` is a :class:`~numareuse.Selector` spec (default ``numa``).
Workers are spread round robin over the domains that have CPUs, each pinned
to all CPUs of its domain; a replacement takes the domain of the worker it
replaces.

It needs ``--reuse-port``: without it all workers accept from one socket the
arbiter made, there is nothing to steer, and numareuse logs one warning and
changes nothing.

``sockets``:

``held`` (default)
    The arbiter keeps one listening socket per worker place, registered in
    that place's domain, for its whole life (as nginx's master does), and a
    worker serves the socket of its place instead of the one gunicorn made
    for it (closed in ``post_fork``, never steered to). A worker that exits
    (``--max-requests``, a crash, a timeout kill) leaves its socket and its
    accept queue behind: connections wait for the replacement, which takes
    the same place, so none is reset and none leaves its domain. With
    gunicorn's own ``--reuse-port`` sockets, workers that get the same load
    recycle at the same moment, the group is briefly empty and new
    connections are refused: kernel migration cannot help, it needs a
    socket that stays.
``own``
    Each worker keeps the socket gunicorn made for it, attaches the program
    (again: the group is new when every worker was recycled) and registers
    it in its domain (``CURRENT``). Steering to it stops at its last request
    (``pre_request`` when ``max_requests`` is reached) and again when it
    stops (``worker_exit``, or its socket's ``close()``: gthread and uvicorn
    close their listeners before ``worker_exit`` runs), then handshakes in
    flight get ``DRAIN_GRACE`` seconds before the socket closes; what is
    queued then is moved by kernel migration where the program supports it
    (``Selector.migration``), else reset. Connections that arrive while a
    domain's only worker is replaced go to another domain.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from dataclasses import dataclass, field

from .. import topology
from ..errors import NumaReuseError
from ..selector import CURRENT, Selector

SOCKET_MODES = ("held", "own")
DRAIN_GRACE = 0.05  # own sockets: seconds for handshakes in flight before a stopping worker's socket closes
UVICORN_SETTLE = 0.05  # seconds a stopping uvicorn worker reads the requests of connections it just accepted

# gunicorn hook -> its arity (gunicorn checks it); the user's hook runs after numareuse's, except on_exit
HOOKS = {
    "when_ready": 1,
    "pre_fork": 2,
    "post_fork": 2,
    "pre_request": 2,
    "worker_exit": 2,
    "child_exit": 2,
    "on_exit": 1,
}


@dataclass(eq=False)
class _Place:
    """Where a worker runs: a domain and, with held sockets, the listeners the arbiter keeps for it."""

    domain: int
    sockets: list = field(default_factory=list)  # gunicorn socket objects, one per bind address
    worker: object = None  # the gunicorn worker living here, in the arbiter's table


class _Integration:
    """numareuse's state in the arbiter (and, copied by fork, in each worker)."""

    def __init__(self) -> None:
        self.domains: str | None = None  # as configured (a reload re-runs the config: read at start only)
        self.sockets: str | None = None
        self.mode = "held"  # in use while active
        self.active = False
        self.topology: topology.Topology | None = None
        self.valid: list[int] = []
        self.selectors: list[Selector] = []  # one per bind address (each is its own SO_REUSEPORT group)
        self.places: list[_Place] = []
        self.warned = False
        self.stopped = False  # own sockets, in a worker: steering to its sockets stopped
        self.waited = False  # ... and the grace for handshakes in flight is over

    def configure(self, domains: str | None, sockets: str | None) -> None:
        if sockets is not None and sockets not in SOCKET_MODES:
            raise ValueError(f"numareuse: sockets must be one of {SOCKET_MODES}, not {sockets!r}")
        self.domains, self.sockets = domains, sockets

    def _settings(self) -> tuple[str, str]:
        spec = os.environ.get("NUMAREUSE_DOMAINS") or self.domains or "numa"
        mode = os.environ.get("NUMAREUSE_SOCKETS") or self.sockets or "held"
        if mode not in SOCKET_MODES:
            raise NumaReuseError(f"NUMAREUSE_SOCKETS must be one of {SOCKET_MODES}, not {mode!r}")
        return spec, mode

    # -- arbiter ----------------------------------------------------------

    def when_ready(self, server) -> None:
        """Build the selector (and, held, the first places) before the first worker is forked."""
        if self.active:
            return
        if not server.cfg.reuse_port:
            if not self.warned:
                server.log.warning(
                    "numareuse: gunicorn runs without --reuse-port: every worker accepts from one "
                    "shared socket, so there is nothing to steer; numareuse changes nothing"
                )
                self.warned = True
            return
        try:
            spec, self.mode = self._settings()
            self.topology = topology.parse(spec)
            self.valid = [d for d in range(self.topology.ndomains) if self.topology.valid(d)]
            if self.mode == "held":
                for _ in range(server.num_workers):
                    self._new_place(server)
                for sel, sock in zip(self.selectors, self.places[0].sockets):
                    sel.attach(sock)  # regions are filled: it steers from its first packet
            else:
                self.selectors = [Selector(self.topology) for _ in server.cfg.address]
        except (NumaReuseError, OSError) as e:
            server.log.error("numareuse: off: %s", e)
            self._release()
            return
        self.active = True
        migration = all(getattr(sel, "migration", False) for sel in self.selectors)
        server.log.info(
            "numareuse: workers spread over domains %s (%s), %s sockets, kernel migration %s",
            spec,
            ", ".join(f"{d}: cpus {_cpus_text(self.topology.domains[d])}" for d in self.valid),
            self.mode,
            "on" if migration else "off",
        )

    def _new_place(self, server) -> _Place:
        """A place with new listening sockets, registered in the domain with the fewest places."""
        from gunicorn import sock as gsock

        count = collections.Counter(p.domain for p in self.places)
        place = _Place(min(self.valid, key=lambda d: (count[d], d)))
        place.sockets = gsock.create_sockets(server.cfg, server.log)
        try:
            if not self.selectors:
                self.selectors = [Selector(self.topology) for _ in place.sockets]
                for sel, sock in zip(self.selectors, place.sockets):
                    sel.use_group(sock)
            for sel, sock in zip(self.selectors, place.sockets):
                sel.register(sock, place.domain)
        except BaseException:
            for sock in place.sockets:
                sock.close()
            raise
        self.places.append(place)
        return place

    def _live(self, server) -> set[int]:
        return {id(w) for w in server.WORKERS.values()}

    def pre_fork(self, server, worker) -> None:
        """Choose the new worker's place (held) or domain (own): where a worker is missing."""
        if not self.active:
            return
        if self.mode == "own":
            count = collections.Counter(getattr(w, "_numareuse_domain", None) for w in server.WORKERS.values())
            worker._numareuse_domain = min(self.valid, key=lambda d: (count[d], d))
            return
        live = self._live(server)
        free = [p for p in self.places if p.worker is None or id(p.worker) not in live]
        if free:
            count = collections.Counter(p.domain for p in self.places if p not in free)
            place = min(free, key=lambda p: (count[p.domain], self.places.index(p)))
        else:
            # A reload (HUP) forks its new workers first, then stops the oldest ones: a new worker
            # shares the place of the oldest worker that still has one and takes it over, queue
            # included. Only more workers than that (TTIN) need a new place.
            owners = [w for w in server.WORKERS.values() if getattr(w, "_numareuse_place", None) is not None]
            owners = sorted((w for w in owners if w._numareuse_place.worker is w), key=lambda w: w.age)
            if owners and len(server.WORKERS) >= server.num_workers:
                place = owners[0]._numareuse_place
            else:
                try:
                    place = self._new_place(server)
                except (NumaReuseError, OSError) as e:
                    server.log.error("numareuse: no socket for a new worker, it runs unsteered: %s", e)
                    return
        place.worker = worker
        worker._numareuse_place = place
        worker._numareuse_domain = place.domain

    def child_exit(self, server, worker) -> None:
        """A worker was reaped: its place waits for the replacement, unless there are more places than workers."""
        if not self.active or self.mode != "held":
            return
        place = getattr(worker, "_numareuse_place", None)
        if place is not None and place.worker is worker:
            place.worker = None
        live = self._live(server)
        for p in sorted(self.places, key=self.places.index, reverse=True):
            if len(self.places) <= server.num_workers:
                break
            if p.worker is None or id(p.worker) not in live:
                self._retire(p)

    def _retire(self, place: _Place) -> None:
        """Stop steering to a place no worker will take (fewer workers now), then close its sockets."""
        for sel, sock in zip(self.selectors, place.sockets):
            with contextlib.suppress(NumaReuseError):
                _stop_steering(sel, sock)
        time.sleep(DRAIN_GRACE)
        for sock in place.sockets:
            sock.close()  # still queued: moved by kernel migration where the program supports it
        self.places.remove(place)

    def on_exit(self, server) -> None:
        self._release()

    def _release(self) -> None:
        for sel in self.selectors:
            with contextlib.suppress(NumaReuseError):
                sel.close()  # in the arbiter: empties the maps and detaches
        for place in self.places:
            for sock in place.sockets:
                sock.close()
        self.selectors, self.places, self.active = [], [], False

    # -- worker -----------------------------------------------------------

    def post_fork(self, server, worker) -> None:
        """Pin the worker to its domain; serve its place's sockets (held) or register its own (own)."""
        if not self.active:
            return
        self.stopped = self.waited = False
        if "uvicorn" in type(worker).__module__:
            _settle_uvicorn_shutdown()
        domain = getattr(worker, "_numareuse_domain", None)
        if domain is None:
            self._forget_arbiter_state(keep=None)
            return
        try:
            os.sched_setaffinity(0, self.topology.domains[domain])
        except OSError as e:
            server.log.warning("numareuse: worker %s not pinned to domain %s: %s", worker.pid, domain, e)
        if self.mode == "held":
            place = worker._numareuse_place
            made, worker.sockets = worker.sockets, list(place.sockets)
            for sock in made:
                sock.close()  # gunicorn's own socket for this worker: never registered, nothing queued
            self._forget_arbiter_state(keep=place)
            return
        try:
            for sel, sock in zip(self.selectors, worker.sockets):
                sel.attach(sock)  # the group may be new: every earlier worker may have exited
                sel.register(sock, CURRENT)
        except NumaReuseError as e:
            server.log.error("numareuse: worker %s runs unsteered: %s", worker.pid, e)
            return
        for sock in worker.sockets:
            _before_close(sock, lambda: self._stop(worker, DRAIN_GRACE))

    def _forget_arbiter_state(self, keep: _Place | None) -> None:
        """In a worker: close the inherited map fds and the other places' sockets."""
        for sel in self.selectors:
            with contextlib.suppress(NumaReuseError):
                sel.close()  # a forked copy only drops its fds
        for place in self.places:
            if place is not keep:
                for sock in place.sockets:
                    sock.close()
        self.selectors, self.places = [], [keep] if keep else []

    def pre_request(self, worker, req) -> None:
        """Own sockets: the worker's last request (it exits after it); steer nothing more to it."""
        if self.active and self.mode == "own" and worker.nr + 1 >= worker.max_requests:
            self._stop(worker, 0.0)

    def worker_exit(self, server, worker) -> None:
        """Own sockets: the worker stops (its sockets are still open); let handshakes in flight finish."""
        # gunicorn also calls it in the arbiter, for a worker that vanished before it was reaped
        if self.active and self.mode == "own" and os.getpid() == worker.pid:
            self._stop(worker, DRAIN_GRACE)

    def _stop(self, worker, grace: float) -> None:
        if not self.stopped:
            self.stopped = True
            for sel, sock in zip(self.selectors, worker.sockets):
                with contextlib.suppress(NumaReuseError):
                    _stop_steering(sel, sock)
        if grace and not self.waited:
            self.waited = True
            time.sleep(grace)


def _cpus_text(cpus) -> str:
    return ",".join(map(str, cpus)) if len(cpus) < 4 else f"{cpus[0]}..{cpus[-1]} ({len(cpus)})"


def _stop_steering(sel: Selector, sock) -> None:
    """Selector.drain() without waiting where the selector has it (it marks the socket drained), else unregister."""
    drain = getattr(sel, "drain", None)
    if drain is not None:
        drain(sock, timeout=0.0, grace=0.0)
    else:
        sel.unregister(sock)


def _before_close(sock, action) -> None:
    """Run ``action`` once before ``sock.close()`` (gunicorn socket objects; asyncio closes them too)."""
    close = sock.close

    def closing():
        if getattr(sock, "sock", None) is not None:
            with contextlib.suppress(Exception):
                action()
        close()

    sock.close = closing


def _settle_uvicorn_shutdown() -> None:
    """Let a stopping uvicorn worker read the requests of the connections it has just accepted.

    uvicorn's ``Server.shutdown()`` (0.54 and older) closes its listeners and,
    in the same event loop iteration, every connection with no parsed request
    yet (``protocol.cycle is None``): a connection accepted a moment before,
    its request still unread, is closed and the client is reset (measured:
    every recycle of a busy worker lost one or two). This closes the
    listeners first and gives those requests ``UVICORN_SETTLE`` seconds to be
    read, so that uvicorn serves them like any request in progress (the fix
    proposed to uvicorn as Kludex/uvicorn#3124). Patched in the worker only.
    """
    try:
        from uvicorn.server import Server
    except ImportError:
        return
    shutdown = Server.shutdown
    if getattr(shutdown, "_numareuse", False):
        return

    async def settled_shutdown(self, *args, **kwargs):
        for server in getattr(self, "servers", ()):
            server.close()  # stop accepting: what is queued now waits for the next worker
        await asyncio.sleep(UVICORN_SETTLE)
        return await shutdown(self, *args, **kwargs)

    settled_shutdown._numareuse = True
    Server.shutdown = settled_shutdown


_STATE = _Integration()


def _chain(name: str, arity: int, ours, user):
    """One gunicorn hook of ``arity`` that runs numareuse's part, then the user's (on_exit: the user's first)."""
    user = getattr(user, "_numareuse_user", user)  # enable() run twice wraps the user's hook once
    if isinstance(user, str):  # "module.function", as gunicorn allows in a config
        from gunicorn.config import validate_callable

        user = validate_callable(arity)(user)

    def run(*args):
        def mine():
            try:
                ours(*args)
            except Exception:  # a hook that raises would stop gunicorn; numareuse only logs
                log = getattr(args[0], "log", None)
                if log is not None:
                    log.exception("numareuse: %s failed", name)

        if name == "on_exit" and user is not None:
            user(*args)
        mine()
        if name != "on_exit" and user is not None:
            user(*args)

    hook = (lambda a: run(a)) if arity == 1 else (lambda a, b: run(a, b))
    hook.__name__ = hook.__qualname__ = name
    hook._numareuse_user = user
    return hook


def enable(namespace: dict | None = None, *, domains: str | None = None, sockets: str | None = None) -> dict:
    """Put numareuse's gunicorn hooks into ``namespace`` (a config file's ``globals()``) and return it.

    Hooks the namespace already defines are chained, so call it last.
    ``domains`` / ``sockets`` default to the config variables
    ``numareuse_domains`` / ``numareuse_sockets``; the environment variables
    ``NUMAREUSE_DOMAINS`` / ``NUMAREUSE_SOCKETS`` override them.
    """
    ns = {} if namespace is None else namespace
    _STATE.configure(
        domains if domains is not None else ns.get("numareuse_domains"),
        sockets if sockets is not None else ns.get("numareuse_sockets"),
    )
    for name, arity in HOOKS.items():
        ns[name] = _chain(name, arity, getattr(_STATE, name), ns.get(name))
    return ns
