"""Loopback workloads for the benchmarks: reuseport groups, pinned clients, a forked server.

Over loopback a client pinned to CPU n has its SYN processed on CPU n, so the
"packet's domain" of a connection is the domain of its client's CPU (see
tests/conftest.py). Every connection ends with an RST (SO_LINGER 0) so that
tens of thousands of connections leave no TIME_WAIT behind and never run out
of ephemeral ports. All traffic goes to 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import socket
import struct
import time

from numareuse.topology import pinned  # noqa: F401  (the benchmarks call wl.pinned)

from . import join_or_kill

HOST = "127.0.0.1"
BACKLOG = 1024
LINGER_RST = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT on either side
_MP = multiprocessing.get_context("fork")  # children inherit the listeners and map fds


def listener(port: int = 0, backlog: int = BACKLOG) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((HOST, port))
    s.listen(backlog)
    return s


def group(n: int, backlog: int = BACKLOG) -> tuple[list[socket.socket], int]:
    """n listening sockets in one new SO_REUSEPORT group on 127.0.0.1; (sockets, port)."""
    first = listener(0, backlog)
    port = first.getsockname()[1]
    return [first] + [listener(port, backlog) for _ in range(n - 1)], port


def close_all(socks) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def _rst_close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    s.close()


def drain(socks) -> list[int]:
    """Accept (and reset) every queued connection; how many each socket had."""
    counts = []
    for s in socks:
        s.setblocking(False)
        n = 0
        for _ in range(BACKLOG + 1):  # bounded: a backlog holds at most BACKLOG
            try:
                c, _addr = s.accept()
            except BlockingIOError:
                break
            _rst_close(c)
            n += 1
        counts.append(n)
    return counts


def served_by(cpu: int, port: int, socks, n: int, batch: int = 200) -> list[int]:
    """Open n connections from a client pinned to ``cpu``; how many each socket of ``socks`` accepted.

    Client sockets stay open until their batch is drained, so every connection
    is in an accept queue when we count, and then both ends are reset.
    """
    total = [0] * len(socks)
    done = 0
    with pinned(cpu):
        while done < n:
            clients = []
            try:
                for _ in range(min(batch, n - done)):
                    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    clients.append(c)
                    c.settimeout(5)
                    c.connect((HOST, port))
                total = [a + b for a, b in zip(total, drain(socks))]
            finally:
                for c in clients:
                    _rst_close(c)
            done += len(clients)
    return total


# -- a forked server and closed-loop clients (connection rate) ---------------


def _serve(cpu: int, fds: list[int], stop_fd: int, max_s: float, out) -> None:
    """Worker pinned to ``cpu``: accept on its listeners and reset, until told to stop."""
    os.sched_setaffinity(0, {cpu})
    socks = [socket.socket(fileno=os.dup(fd)) for fd in fds]
    for s in socks:
        s.setblocking(False)
    by_fd = {s.fileno(): s for s in socks}
    # epoll, as nginx: `numareuse attach` finds a socket's worker by the epoll that watches it
    poller = select.epoll()
    for fd in [*by_fd, stop_fd]:
        poller.register(fd, select.EPOLLIN)
    accepted, deadline = 0, time.monotonic() + max_s
    while time.monotonic() < deadline:
        ready = [fd for fd, _ev in poller.poll(1.0)]
        if stop_fd in ready:
            break
        for fd in ready:
            s = by_fd[fd]
            for _ in range(64):
                try:
                    c, _addr = s.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    break
                _rst_close(c)
                accepted += 1
    poller.close()
    close_all(socks)
    out.send(accepted)


class Server:
    """One accepting worker process per CPU, each serving the listeners given for its CPU.

    Like a pre-fork server whose worker pinned to CPU c registered its own
    sockets in c's domain. The workers live until :meth:`stop` (or ``max_s``).
    """

    def __init__(self, workers: dict[int, list[socket.socket]], max_s: float = 300.0):
        self._stop_r, self._stop_w = os.pipe()
        self._procs = []
        for cpu, socks in workers.items():
            parent, child = _MP.Pipe(duplex=False)
            p = _MP.Process(
                target=_serve, args=(cpu, [s.fileno() for s in socks], self._stop_r, max_s, child), daemon=True
            )
            p.start()
            child.close()
            self._procs.append((p, parent))

    def stop(self) -> int:
        """Stop every worker; the number of connections they accepted."""
        os.write(self._stop_w, b"x")
        total = 0
        for p, conn in self._procs:
            if conn.poll(10):
                total += conn.recv()
            join_or_kill(p)
        os.close(self._stop_r)
        os.close(self._stop_w)
        return total


def one_connection(port: int) -> bool:
    """Connect, wait until a server accepted and closed (its RST), close. False on a failure."""
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(5)
    try:
        c.connect((HOST, port))
        c.recv(1)  # b"" or ECONNRESET: the server accepted and closed
    except ConnectionResetError:  # also from connect() when the server was that quick
        pass
    except OSError:
        return False
    finally:
        c.close()
    return True


SLOW_S = 0.2  # a connection this slow waited for a SYN retransmission (1 s) or a descheduled worker


def _client(cpu: int, port: int, start, seconds: float, max_conns: int, out) -> None:
    """Closed loop pinned to ``cpu``: connect, wait for the server's accept (its RST), close."""
    os.sched_setaffinity(0, {cpu})
    start.wait(30)
    n, errors, slow = 0, 0, 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    now = t0
    while n < max_conns and now < deadline:
        errors += not one_connection(port)
        n += 1
        t, now = now, time.perf_counter()
        slow += now - t > SLOW_S
    out.send((n - errors, time.perf_counter() - t0, errors, slow))


def connection_rate(cpus, port: int, seconds: float, max_conns: int = 1_000_000) -> tuple[float, int, int]:
    """Connections per second of one closed-loop client per CPU, all started together; (rate, errors, slow).

    ``slow``: connections that took more than SLOW_S seconds (they explain an outlier round).
    """
    start = _MP.Event()
    procs = []
    for cpu in cpus:
        parent, child = _MP.Pipe(duplex=False)
        p = _MP.Process(target=_client, args=(cpu, port, start, seconds, max_conns, child), daemon=True)
        p.start()
        child.close()
        procs.append((p, parent))
    start.set()
    rate, errors, slow = 0.0, 0, 0
    for p, conn in procs:
        if conn.poll(seconds + 30):
            ok, elapsed, err, n_slow = conn.recv()
            rate += ok / elapsed
            errors += err
            slow += n_slow
        else:
            errors += 1
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    return rate, errors, slow
