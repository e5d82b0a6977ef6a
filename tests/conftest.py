"""Real-kernel fixtures: sockets in SO_REUSEPORT groups, pinned clients, leak checks.

A test that needs a kernel feature this machine lacks calls ``need(...)``:
it skips with the reason, or fails when NUMAREUSE_REQUIRE_KERNEL=1 (CI), so
that CI cannot pass by skipping the core.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import time
from typing import NamedTuple

import pytest

# the checkout's root: tests share helpers with bench/ (bench.nginx)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numareuse import _sys
from numareuse.topology import pinned  # noqa: F401  (tests import it from here)

REQUIRE_KERNEL = os.environ.get("NUMAREUSE_REQUIRE_KERNEL") == "1"


def need(ok: bool, reason: str) -> None:
    if ok:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"NUMAREUSE_REQUIRE_KERNEL=1 and the kernel lacks: {reason}")
    pytest.skip(reason)


def _bpf_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN)"
    try:
        fd = _sys.map_create(_sys.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 1, "nr_probe")
    except OSError as e:
        return f"BPF_MAP_TYPE_REUSEPORT_SOCKARRAY unavailable: {e.strerror}"
    os.close(fd)
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc Python bindings (python3-bpfcc) missing"
    return None


_BPF_PROBLEM = _bpf_usable()


@pytest.fixture
def kernel():
    """Skip (or fail under CI) unless BPF reuseport selection is usable here."""
    need(_BPF_PROBLEM is None, _BPF_PROBLEM or "")


@pytest.fixture
def two_cpus():
    need(len(os.sched_getaffinity(0)) >= 2, "needs at least 2 CPUs to make 2 virtual domains")


LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def reuseport_socket(family=socket.AF_INET, type=socket.SOCK_STREAM, port=0, reuseport=True, listen=True, device=""):
    s = socket.socket(family, type)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if device:  # SO_BINDTODEVICE: another reuseport group than the same address without it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    s.bind((LOOPBACK[family], port))
    if type == socket.SOCK_STREAM and listen:
        s.listen(512)
    return s


@pytest.fixture
def group():
    """Factory: n sockets of one new SO_REUSEPORT group; all closed at the end."""
    made = []

    def make(n, family=socket.AF_INET, type=socket.SOCK_STREAM):
        first = reuseport_socket(family, type)
        port = first.getsockname()[1]
        socks = [first] + [reuseport_socket(family, type, port) for _ in range(n - 1)]
        made.extend(socks)
        return socks, port

    yield make
    for s in made:
        s.close()


# struct tcp_info: tcpi_total_retrans is the u32 at byte 100 (since 2.6; the layout only grows)
_TCPI_TOTAL_RETRANS = 100
# struct linger {1, 0}: close() sends a reset and frees the socket at once (no FIN exchange, no TIME_WAIT)
LINGER_RST = struct.pack("ii", 1, 0)


def resent(c: socket.socket) -> int:
    """Segments this TCP socket sent again (tcpi_total_retrans).

    Read right after connect() it is the SYNs re-sent before the handshake
    completed; on an accepted socket that sent nothing yet, the SYN-ACKs
    (the kernel copies the request's count). Verified by
    test_selector.py::test_a_resent_syn_is_measured_and_counted.
    """
    info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_TOTAL_RETRANS + 4)
    return struct.unpack_from("=I", info, _TCPI_TOTAL_RETRANS)[0]


def handshake(c: socket.socket, address, timeout: float = 5.0) -> int:
    """connect() without sleeping; returns the SYNs re-sent (measured, see ``resent``).

    The thread spins until the handshake completes instead of sleeping, so a
    pinned client's CPU never goes idle: an idle CPU's timers run on another
    CPU (kernel.timer_migration), and a SYN re-sent from there is processed
    there, in another domain. Over loopback the handshake completes within
    connect() itself, so the spin costs nothing unless a SYN is re-sent.
    """
    c.setblocking(False)
    try:
        c.connect(address)
    except BlockingIOError:  # EINPROGRESS; EALREADY when a connect() was already under way
        pass
    except OSError as e:
        if e.errno != errno.EISCONN:  # an earlier connect() has completed meanwhile
            raise
    poll = select.poll()
    poll.register(c, select.POLLOUT)
    deadline = time.monotonic() + timeout
    while not poll.poll(0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"connect to {address}: no handshake within {timeout} s")
    err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err), address)
    c.settimeout(timeout)
    return resent(c)


class Sent(NamedTuple):
    ok: int  # connections made (datagrams sent)
    resent: int  # SYNs re-sent for them, measured per connection


def connect_from(cpu: int, family, port: int, n: int, type=socket.SOCK_STREAM) -> Sent:
    """Open n connections (or send n datagrams) from a client pinned to ``cpu``.

    Each TCP connection is reset by the client right after its handshake:
    nothing of it reaches the listener afterwards. (A graceful close leaves
    the client in TIME_WAIT; on a loaded machine a late segment can make it
    answer after the server's socket is gone, and that answer is looked up
    as a new flow: the program runs again.)
    """
    ok = syns = 0
    with pinned(cpu):
        for i in range(n):
            c = socket.socket(family, type)
            try:
                if type == socket.SOCK_STREAM:
                    syns += handshake(c, (LOOPBACK[family], port))
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                else:
                    c.bind((LOOPBACK[family], 0))  # a new source port: a new flow each time
                    c.sendto(b"x%d" % i, (LOOPBACK[family], port))
                ok += 1
            finally:
                c.close()
    return Sent(ok, syns)


class Tally(list):
    """Results, one per socket or connection; ``resent``: handshake packets sent again for them (measured)."""

    resent = 0


def drain(socks) -> Tally:
    """How many connections / datagrams each socket has queued (accepting them)."""
    counts = Tally()
    for s in socks:
        s.setblocking(False)
        n = 0
        while True:
            try:
                if s.type == socket.SOCK_STREAM:
                    c = s.accept()[0]
                    counts.resent += resent(c)
                    c.close()
                else:
                    s.recvfrom(64)
            except BlockingIOError:
                break
            n += 1
        counts.append(n)
    return counts


def assert_runs(counter: int, connections: int, resent: int, what: str = "") -> None:
    """A program counter against the connections that should bump it and the handshakes measured re-sent.

    Every connection runs the program once. A re-sent SYN runs it once more
    only if the first was dropped after the program ran (a full accept
    queue); one lost before it, or that meets the request socket, does not
    (both checked on 6.18). So the count is exact when nothing was re-sent,
    and otherwise within what was measured, never a guessed margin.
    """
    assert connections <= counter <= connections + resent, (
        f"{what}: counter {counter} for {connections} connections and {resent} re-sent handshake packets"
    )


def open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


class Created:
    """Ids of the BPF maps and programs this process creates while active."""

    def __init__(self, monkeypatch):
        from numareuse import selector

        self.maps: set[int] = set()
        self.progs: set[int] = set()
        real_map, real_prog = _sys.map_create, selector.load_program

        def map_create(*a, **kw):
            fd = real_map(*a, **kw)
            self.maps.add(_sys.map_info(fd)["id"])
            return fd

        def load_program(*a, **kw):
            loaded = real_prog(*a, **kw)
            self.progs.add(_sys.prog_info(loaded[0])["id"])
            return loaded

        monkeypatch.setattr(_sys, "map_create", map_create)
        monkeypatch.setattr(selector, "load_program", load_program)

    def alive(self) -> tuple[set[int], set[int]]:
        """Those still in the kernel, after waiting for the RCU-deferred free."""
        deadline = time.monotonic() + 3
        while True:
            maps, progs = self.maps & set(_sys.map_ids()), self.progs & set(_sys.prog_ids())
            if not (maps or progs) or time.monotonic() > deadline:
                return maps, progs
            time.sleep(0.05)


@pytest.fixture
def created(kernel, monkeypatch):
    return Created(monkeypatch)


@pytest.fixture
def no_leaks(kernel, monkeypatch):
    """Fail the test if it leaves fds, or BPF maps / programs it created, behind."""
    fds = open_fds()
    made = Created(monkeypatch)
    yield made
    import gc

    gc.collect()
    leaked_fds = {f for f in open_fds() - fds if os.path.exists(f"/proc/self/fd/{f}")}
    assert not leaked_fds, {f: os.readlink(f"/proc/self/fd/{f}") for f in leaked_fds}
    maps, progs = made.alive()
    assert not maps, f"BPF maps leaked: {sorted(maps)}"
    assert not progs, f"BPF programs leaked: {sorted(progs)}"
