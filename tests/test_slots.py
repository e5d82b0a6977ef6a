"""The slot allocator on the real kernel: cost per register, flow stability, repairs, drain, the lock.

Domains "0;1" (CPU 0 and CPU 1) and clients pinned to a CPU give exact
placement on a one-node machine, as in test_selector.py.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import threading
import time

import pytest
from conftest import connect_from, drain, pinned, reuseport_socket

from numareuse import CapacityError, NotInGroupError, NumaReuseError, Selector, StateError, _sys

pytestmark = pytest.mark.usefixtures("no_leaks")
N = 40


@pytest.fixture
def sel(kernel, two_cpus):
    with Selector("0;1") as s:
        yield s


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _count_map_ops(monkeypatch) -> dict[str, int]:
    """Count every bpf() map operation the controller makes (each is one syscall)."""
    ops = {"n": 0}
    for name in (
        "map_lookup",
        "map_update",
        "map_update_u64key",
        "map_delete",
        "map_lookup_batch",
        "map_update_batch",
    ):
        real = getattr(_sys, name)

        def counted(*a, _real=real, **kw):
            ops["n"] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(_sys, name, counted)
    return ops


def test_register_costs_the_same_map_operations_at_any_fill(kernel, group, monkeypatch, many_fds):
    """O(1): a register into a region holding 1 or 255 sockets makes the same number of map operations."""
    socks, _ = group(257)
    with Selector("0", capacity=256) as sel:
        sel.attach(socks[0])
        sel.register(socks[0], 0)
        costs = {}
        for i, s in enumerate(socks[1:256], start=1):
            if i in (1, 255):
                ops = _count_map_ops(monkeypatch)
                sel.register(s, 0)
                costs[i] = ops["n"]
                monkeypatch.undo()
            else:
                sel.register(s, 0)
        assert costs[1] == costs[255], costs
        assert len(sel.registrations()) == 256
        with pytest.raises(CapacityError):
            sel.register(socks[256], 0)


def _udp_owner(port: int, clients, socks) -> dict[int, int]:
    """client index -> index of the server socket its datagram reached (all sent from CPU 0)."""
    owner = {}
    for first in range(0, len(clients), 100):  # in batches: a socket's receive buffer holds a few hundred
        with pinned(0):
            for i in range(first, min(first + 100, len(clients))):
                clients[i].sendto(b"%d" % i, ("127.0.0.1", port))
        for j, s in enumerate(socks):
            s.setblocking(False)
            while True:
                try:
                    data, _ = s.recvfrom(16)
                except BlockingIOError:
                    break
                owner[int(data)] = j
    assert len(owner) == len(clients), f"{len(owner)} of {len(clients)} datagrams arrived"
    return owner


def _moved(a: dict[int, int], b: dict[int, int]) -> float:
    return sum(1 for k in a if a[k] != b[k]) / len(a)


def test_udp_flows_keep_their_socket_when_the_region_changes(sel, group, many_fds):
    """1000 fixed 4-tuples; a region goes 4 -> 5 -> 4 -> 3 sockets: at most 1.5/n of the flows move."""
    socks, port = group(6, type=socket.SOCK_DGRAM)
    sel.attach(socks[0])
    for s in socks[:4]:
        sel.register(s, 0)
    clients = []
    try:
        for _ in range(1000):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("127.0.0.1", 0))  # a fixed source port for the test: a fixed 4-tuple
            clients.append(c)
        base = _udp_owner(port, clients, socks)
        assert set(base.values()) == {0, 1, 2, 3}  # every socket of the region has flows
        sel.register(socks[4], 0)  # n = 4 -> 5
        joined = _udp_owner(port, clients, socks)
        sel.unregister(socks[4])  # 5 -> 4
        left = _udp_owner(port, clients, socks)
        sel.unregister(socks[1])  # 4 -> 3, a socket from the middle (its slot is filled from the tail)
        middle = _udp_owner(port, clients, socks)
        shares = {"4->5": _moved(base, joined), "5->4": _moved(joined, left), "4->3": _moved(left, middle)}
        print(f"flows moved: {shares}")
        assert shares["4->5"] <= 1.5 / 4, shares
        assert shares["5->4"] <= 1.5 / 5, shares
        assert shares["4->3"] <= 1.5 / 4, shares
        # only the flows of the socket that left moved
        assert all(middle[k] == left[k] for k in left if left[k] != 1), "a flow of a staying socket moved"
        assert all(joined[k] in (base[k], 4) for k in base), "a flow moved between two staying sockets"
    finally:
        for c in clients:
            c.close()


def test_closed_socket_flows_go_to_the_others_after_refresh(sel, group, many_fds):
    socks, port = group(4, type=socket.SOCK_DGRAM)
    sel.attach(socks[0])
    for s in socks:
        sel.register(s, 0)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(400)]
    try:
        for c in clients:
            c.bind(("127.0.0.1", 0))
        before = _udp_owner(port, clients, socks)
        socks[2].close()  # the kernel empties its slot at once
        assert sel.refresh() == 1
        live = [socks[0], socks[1], socks[3]]
        after = _udp_owner(port, clients, live)
        names = {0: 0, 1: 1, 2: 3}  # index in live -> index in socks
        moved = sum(1 for k in before if before[k] != names[after[k]])
        assert moved == sum(1 for k in before if before[k] == 2), "only the closed socket's flows may move"
    finally:
        for c in clients:
            c.close()


def test_bucket_shares_stay_balanced(sel, group):
    """Every socket of a region owns its share of buckets within one bucket, through joins and leaves."""
    socks, _ = group(12)
    sel.attach(socks[0])
    for s in socks[:8]:
        sel.register(s, 0)
    sel.unregister(socks[3])
    sel.unregister(socks[5])
    for s in socks[8:]:
        sel.register(s, 0)
    shares = sel._slots.bucket_shares(0)
    assert shares == sel._slots.recorded_shares(0)
    assert len(shares) == 10 and sum(shares.values()) == sel.layout.nbuckets
    assert max(shares.values()) - min(shares.values()) <= 1, shares


@pytest.mark.parametrize("scramble", ["zero", "garbage", "self-loops"])
def test_bucket_chains_are_only_hints(kernel, two_cpus, group, scramble):
    """The controller's bucket chains (pad halves of the u32 elements) may hold anything after
    a crash or an older release: joins and leaves still move exactly a share of buckets each
    and keep the shares level, checked against the table itself."""
    import random

    rnd = random.Random(7)
    socks, _ = group(8)
    with Selector("0;1", capacity=16) as sel:  # 64 buckets: 4+ owners take theirs a few at a time
        sl = sel._slots
        sel.attach(socks[0])
        for s in socks[:3]:  # 3 -> 4 owners: each donor gives several buckets, popped off one chain
            sel.register(s, 0)
        table = sl.v.span("buckets", 0, sl.nb)
        for key, n in (("buckets", sl.nb), ("bucket_count", sl.cap)):
            for i in range(n):
                if scramble == "self-loops":
                    # each head names one of its index's own buckets, whose link names itself:
                    # a pop that only checked the owner would take that bucket again and again
                    v = i + 1 if key == "buckets" else (table.index(i) + 1 if i in table else 0)
                else:
                    v = 0 if scramble == "zero" else rnd.randrange(1 << 32)
                sl.v.put_pad(key, i, v)

        table = sl.v.span("buckets", 0, sl.nb)
        for i in set(table):  # the table scan (the fallback when a share is off) ignores the pads
            assert sl._find(sl._table(0), i) == table.index(i)

        def flows() -> list[int]:  # bucket -> cookie of the socket it names (indexes move in a compaction)
            return [sl.slot_cookie(o) if o < sl.cap else 0 for o in sl.v.span("buckets", 0, sl.nb)]

        joins = iter(socks[3:])
        for leaver in (None, socks[2], None, socks[0], None, None, socks[5]):
            before, n = flows(), len(sel.registrations())
            if leaver is None:
                sel.register(next(joins), 0)
                bound = -(-sl.nb // (n + 1))  # a newcomer takes its share
            else:
                assert sel.unregister(leaver)
                bound = -(-sl.nb // n)  # the leaver's share goes to the others
            moved = sum(x != y for x, y in zip(before, flows()))
            shares = sl.bucket_shares(0)
            assert shares == sl.recorded_shares(0), shares
            assert sum(shares.values()) == sl.nb and max(shares.values()) - min(shares.values()) <= 1, shares
            assert len(shares) == len(sel.registrations())
            assert 0 < moved <= bound, (leaver, moved, bound)


def test_shutdown_then_listen_again_is_repaired_by_refresh(sel, group):
    """A listener paused with shutdown() leaves its slot (the kernel empties it); refresh puts it back."""
    socks, port = group(2)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sel.register(socks[1], 1)
    socks[1].shutdown(socket.SHUT_RDWR)
    socks[1].listen(512)  # same socket, same cookie, same port: listening again
    assert sel.refresh() == 0
    assert all(r["live"] for r in sel.registrations())
    assert connect_from(1, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [0, N]


def test_a_move_cut_short_is_repaired(sel, group):
    """A crash between a move's delete and its insert leaves the socket in no slot; refresh puts it back."""
    socks, port = group(2)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sel.register(socks[1], 1)
    slot = next(r["slot"] for r in sel.registrations() if r["domain"] == 1)
    _sys.map_delete(sel.map_fds["sockarray"], struct.pack("=I", slot))  # the move's first step, then the "crash"
    sel.refresh()
    assert connect_from(1, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [0, N]
    assert sel.stats()["fallback"] == 0


def test_an_orphan_above_the_count_does_not_block_register(sel, group):
    """A crash after the sockarray update and before the bookkeeping: the next register finds and reuses it."""
    socks, port = group(2)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    orphan_slot = 1 * sel.capacity + 5  # domain 1, far above its count (0)
    _sys.map_update(sel.map_fds["sockarray"], orphan_slot, struct.pack("=Q", socks[1].fileno()))
    assert sel.register(socks[1], 1) == 1
    slots = [r["slot"] for r in sel.registrations() if r["domain"] == 1]
    assert slots == [1 * sel.capacity]
    assert _sys.map_lookup(sel.map_fds["sockarray"], struct.pack("=I", orphan_slot), 8) is None
    assert connect_from(1, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [0, N]


def test_drain_stops_new_connections_and_waits_for_the_queue(sel, group):
    socks, port = group(3)
    a, a2, b = socks
    sel.attach(a)
    sel.register(a, 0)
    sel.register(a2, 0)
    sel.register(b, 1)
    assert connect_from(0, socket.AF_INET, port, N).ok == N
    queued_on_a = len(_accept_all(a, keep=True))
    assert queued_on_a > 0
    assert connect_from(0, socket.AF_INET, port, N).ok == N  # queue some on a again, then drain without accepting
    drain([a2, b])
    assert sel.drain(a, timeout=0.3, grace=0) is False  # nobody accepts: the queue stays
    assert sel.drained() == {_sys.sock_cookie(a.fileno())}
    before = drain([a])[0]
    assert before > 0
    assert connect_from(0, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [0, N, 0]  # nothing new reaches the drained socket; its domain peer takes all
    # an owner that keeps accepting: drain returns True once its queue is empty
    stop = threading.Event()
    t = threading.Thread(target=lambda: [_accept_all(a) or time.sleep(0.005) for _ in iter(stop.is_set, True)])
    t.start()
    try:
        assert sel.drain(a, timeout=5, grace=0.05) is True
    finally:
        stop.set()
        t.join()
    sel.register(a, 0)  # steer to it again
    assert sel.drained() == set()
    assert connect_from(0, socket.AF_INET, port, N).ok == N
    got = drain(socks)
    assert got[0] > 0 and got[0] + got[1] == N and got[2] == 0


def test_a_drained_socket_is_not_picked_when_its_domain_empties(sel, group):
    """Domain 0's only socket drained: its connections go to a registered socket, never to it."""
    socks, port = group(2)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sel.register(socks[1], 1)
    sel.drain(socks[0], timeout=0, grace=0)
    assert connect_from(0, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [0, N]
    assert sel.stats()["remote"] >= N and sel.stats()["fallback"] == 0


def _accept_all(sock, keep=False) -> list:
    sock.setblocking(False)
    out = []
    while True:
        try:
            c, _ = sock.accept()
        except BlockingIOError:
            return out
        out.append(c) if keep else None
        c.close()


def test_a_stopped_lock_holder_cannot_hang_register(sel, group):
    """A forked worker stopped (SIGSTOP) while it holds the selector's lock: register fails after the timeout."""
    socks, _ = group(1)
    sel.attach(socks[0])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: take the lock through the inherited selector, then freeze
        try:
            os.close(r)
            with sel._lock():
                os.write(w, b"x")
                os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        sel._lock.timeout = 0.5
        with pytest.raises(StateError, match=f"pid {pid}"):  # instead of waiting forever
            sel.register(socks[0], 0)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    sel._lock.timeout = 10
    assert sel.register(socks[0], 0) == 0  # the holder is gone: the lock is free again


def test_a_socket_bound_to_a_device_is_another_group(sel, group):
    """SO_BINDTODEVICE makes a separate reuseport group on the same address and port: refused, named."""
    (plain,), port = group(1)
    dev = reuseport_socket(port=port, device="lo")
    try:
        sel.attach(plain)
        with pytest.raises(NotInGroupError, match="on device lo"):
            sel.register(dev, 0)
        with pytest.raises(NumaReuseError, match="one Selector per group"):
            sel.attach(dev)
        assert sel.registrations() == []
    finally:
        dev.close()


def test_closed_or_bogus_fds_are_not_in_the_group(sel, group):
    (s,), _ = group(1)
    sel.attach(s)
    dead = socket.socket()
    fd = dead.fileno()
    dead.close()
    with pytest.raises(NotInGroupError, match="not open"):
        sel.register(fd, 0)
    with pytest.raises(NotInGroupError, match="not open"):
        sel.attach(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(NotInGroupError, match="not a socket"):
            sel.register(r, 0)
    finally:
        os.close(r)
        os.close(w)
