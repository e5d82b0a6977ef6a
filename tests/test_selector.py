"""The core selector on the real kernel: real sockets, real program, real connections.

Two virtual domains ("0;1": CPU 0 and CPU 1) and clients pinned to a CPU give
exact, deterministic steering on a one-node machine.
"""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest
from conftest import LOOPBACK, assert_runs, connect_from, drain, handshake, pinned, resent, reuseport_socket

from numareuse import (
    CURRENT,
    WILDCARD,
    CapacityError,
    DomainError,
    NotInGroupError,
    NumaReuseError,
    Selector,
)

# every test: no fd, map or program of its own left behind
pytestmark = pytest.mark.usefixtures("no_leaks")

FAMILIES = [socket.AF_INET, socket.AF_INET6]
TYPES = [socket.SOCK_STREAM, socket.SOCK_DGRAM]
N = 40  # connections per CPU


# two maps: AF_INET and SOCK_DGRAM are both 2
FAMILY_IDS = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
TYPE_IDS = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}


@pytest.fixture
def sel(kernel, two_cpus):
    with Selector("0;1") as s:
        yield s


@pytest.mark.parametrize("type_", TYPES, ids=TYPE_IDS.get)
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS.get)
def test_steers_each_cpu_to_its_domain(sel, group, family, type_):
    socks, port = group(4, family, type_)
    sel.attach(socks[0])
    for i, s in enumerate(socks):
        assert sel.register(s, i // 2) == i // 2
    again = 0
    for cpu in (0, 1):
        sent = connect_from(cpu, family, port, N, type_)
        assert sent.ok == N
        got = drain(socks)
        mine = got[2 * cpu : 2 * cpu + 2]
        assert sum(mine) == N, f"cpu {cpu}: {got}"
        assert all(c > 0 for c in mine), f"cpu {cpu}: both domain sockets should get some: {got}"
        again += sent.resent + got.resent
    st = sel.stats()
    assert_runs(st["local"], 2 * N, again, "local")
    assert st["wildcard"] == st["fallback"] == 0


def test_flow_hash_keeps_a_flow_on_its_socket(sel, group):
    """UDP from one source port is one flow: every datagram reaches the same socket."""
    socks, port = group(4, socket.AF_INET, socket.SOCK_DGRAM)
    sel.attach(socks[0])
    for i, s in enumerate(socks):
        sel.register(s, i // 2)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    os.sched_setaffinity(0, {0})
    try:
        for i in range(20):
            c.sendto(b"%d" % i, ("127.0.0.1", port))
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        c.close()
    got = drain(socks)
    assert sorted(got) == [0, 0, 0, 20]
    assert sum(got[:2]) == 20


def test_empty_domain_falls_back_to_wildcard(sel, group):
    socks, port = group(3)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sel.register(socks[1], WILDCARD)
    sel.register(socks[2], WILDCARD)
    far = connect_from(1, socket.AF_INET, port, N)  # domain 1 has no socket
    assert far.ok == N
    got = drain(socks)
    assert got[0] == 0 and got[1] + got[2] == N and got[1] and got[2]
    near = connect_from(0, socket.AF_INET, port, N)
    assert near.ok == N
    got_near = drain(socks)
    assert got_near == [N, 0, 0]
    st = sel.stats()
    assert_runs(st["wildcard"], N, far.resent + got.resent, "wildcard")
    assert_runs(st["local"], N, near.resent + got_near.resent, "local")
    assert st["fallback"] == 0


def test_no_domain_no_wildcard_goes_to_another_domain(sel, group):
    """Domain 1 and the wildcard are empty: a registered socket of domain 0, never an unregistered one."""
    socks, port = group(3)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sent = connect_from(1, socket.AF_INET, port, N)
    assert sent.ok == N
    got = drain(socks)
    assert got == [N, 0, 0]  # socks[1:] are in the group but not registered (e.g. draining)
    st = sel.stats()
    assert_runs(st["remote"], N, sent.resent + got.resent, "remote")
    assert st["local"] == 0 and st["fallback"] == 0


def test_nothing_registered_uses_kernel_hash(sel, group):
    socks, port = group(3)
    sel.attach(socks[0])
    sent = connect_from(1, socket.AF_INET, port, N)  # nothing registered: every connection accepted
    assert sent.ok == N
    got = drain(socks)
    assert sum(got) == N and sum(1 for g in got if g) >= 2, got  # spread by the kernel over the whole group
    assert_runs(sel.stats()["fallback"], N, sent.resent + got.resent, "fallback")


def test_a_resent_syn_is_measured_and_counted(sel, group):
    """The measurement every counter check relies on, on this kernel.

    A SYN that finds the accept queue full runs the program, then is dropped
    (ListenOverflows); the client sends it again a second later and that SYN
    runs the program again. tcpi_total_retrans on the client counts it.
    """
    socks, port = group(1)
    listener = socks[0]
    listener.listen(1)  # full at 2 queued connections (the kernel allows backlog + 1)
    sel.attach(listener)
    sel.register(listener, WILDCARD)  # whichever CPU sends the SYN again: the same outcome

    def runs() -> int:
        st = sel.stats()
        return st["local"] + st["wildcard"] + st["remote"] + st["fallback"]

    queued = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    late = socket.socket()
    try:
        late.setblocking(False)
        with pytest.raises(BlockingIOError):
            late.connect(("127.0.0.1", port))
        deadline = time.monotonic() + 5
        while runs() < 3:  # its first SYN ran the program (and was dropped: the queue is full)
            assert time.monotonic() < deadline, sel.stats()
            time.sleep(0.01)
        assert drain(socks) == [2]  # room again: the SYN sent again is accepted
        again = handshake(late, ("127.0.0.1", port), timeout=10)
        assert again >= 1
        assert drain(socks) == [1]
        assert runs() == 3 + again  # each SYN sent again was dropped after the program ran, or accepted
        assert resent(queued[0]) == 0
    finally:
        late.close()
        for c in queued:
            c.close()


def test_closed_socket_without_unregister(sel, group):
    socks, port = group(4)
    sel.attach(socks[0])
    for i, s in enumerate(socks):
        sel.register(s, i // 2)
    socks[2].close()  # domain 1 loses one of its two sockets; the kernel empties its slot
    sent = connect_from(1, socket.AF_INET, port, N)
    assert sent.ok == N
    got = drain([socks[0], socks[1], socks[3]])
    assert got == [0, 0, N]
    st = sel.stats()
    assert_runs(st["local"], N, sent.resent + got.resent, "local")
    assert st["fallback"] == 0
    # the probe stepped past the empty slot for the flows that hashed to it
    assert st["empty_skipped"] > 0
    # a sweep drops the dead slot and compacts: no probing any more
    assert sel.refresh() == 1
    regs = [r for r in sel.registrations() if r["domain"] == 1]
    assert len(regs) == 1 and regs[0]["live"] and regs[0]["slot"] == sel.capacity
    before = sel.stats()["empty_skipped"]
    assert connect_from(1, socket.AF_INET, port, N).ok == N
    assert drain([socks[3]]) == [N]
    assert sel.stats()["empty_skipped"] == before


def test_whole_domain_closed_falls_back(sel, group):
    socks, port = group(3)
    sel.attach(socks[0])
    sel.register(socks[0], WILDCARD)
    sel.register(socks[1], 1)
    sel.register(socks[2], 1)
    socks[1].close()
    socks[2].close()
    sent = connect_from(1, socket.AF_INET, port, N)
    assert sent.ok == N
    got = drain([socks[0]])
    assert got == [N]
    st = sel.stats()
    # every run of the program probed both empty slots of domain 1, then took the wildcard
    assert_runs(st["wildcard"], N, sent.resent + got.resent, "wildcard")
    assert st["local"] == 0 and st["empty_skipped"] == 2 * st["wildcard"], st


def test_register_current_uses_affinity(sel, group):
    socks, port = group(2)
    sel.attach(socks[0])
    for cpu, s in zip((0, 1), socks):
        os.sched_setaffinity(0, {cpu})
        try:
            assert sel.register(s, CURRENT) == cpu
        finally:
            os.sched_setaffinity(0, set(range(os.cpu_count())))
    assert [(r["domain"], r["live"]) for r in sel.registrations()] == [(0, True), (1, True)]


def test_current_with_affinity_spanning_domains_uses_running_cpu(sel, group, monkeypatch):
    """Affinity over both domains: CURRENT is the domain of the CPU the thread runs on."""
    from numareuse import _sys

    socks, _ = group(2)
    sel.attach(socks[0])
    os.sched_setaffinity(0, {0, 1})
    monkeypatch.setattr(_sys, "sched_getcpu", lambda: 1)
    assert sel.register(socks[0], CURRENT) == 1
    monkeypatch.setattr(_sys, "sched_getcpu", lambda: 0)
    assert sel.register(socks[0], CURRENT) == 0  # and registering again moved it
    assert [r["domain"] for r in sel.registrations()] == [0]


def test_current_on_cpu_in_no_domain_is_wildcard(kernel, two_cpus, group):
    socks, _ = group(1)
    with Selector("0") as sel, pinned(1):
        sel.attach(socks[0])
        assert sel.register(socks[0], CURRENT) == WILDCARD


def test_register_again_moves_and_is_idempotent(sel, group):
    socks, port = group(2)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sel.register(socks[1], 0)
    sel.register(socks[0], 0)  # same domain: no change
    assert [r["domain"] for r in sel.registrations()] == [0, 0]
    sel.register(socks[0], 1)  # move
    regs = sel.registrations()
    assert sorted(r["domain"] for r in regs) == [0, 1]
    assert connect_from(1, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [N, 0]
    assert connect_from(0, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [0, N]


def test_unregister_compacts(sel, group):
    socks, port = group(4)
    sel.attach(socks[0])
    for s in socks:
        sel.register(s, 0)
    assert sel.unregister(socks[0]) is True
    assert sel.unregister(socks[0]) is False
    regs = sel.registrations()
    assert [r["slot"] for r in regs] == [0, 1, 2]  # the last slot moved into the hole
    assert all(r["live"] for r in regs)
    assert connect_from(0, socket.AF_INET, port, N).ok == N
    got = drain(socks)
    assert got[0] == 0 and sum(got) == N
    assert sel.stats()["empty_skipped"] == 0


@pytest.mark.parametrize("bad", [-3, 2, 99, 1.0, "0", True, None])
def test_bad_domain_is_einval(sel, group, bad):
    socks, _ = group(1)
    sel.attach(socks[0])
    with pytest.raises(DomainError) as ei:
        sel.register(socks[0], bad)
    assert ei.value.errno == errno.EINVAL
    assert sel.registrations() == []


def test_not_in_group_is_enoent(sel, group):
    socks, port = group(1)
    with pytest.raises(NotInGroupError) as ei:
        sel.register(socks[0], 0)  # not attached yet
    assert ei.value.errno == errno.ENOENT
    sel.attach(socks[0])
    cases = []
    plain = reuseport_socket(reuseport=False)  # no SO_REUSEPORT
    cases.append(plain)
    other = reuseport_socket()  # another group (another port)
    cases.append(other)
    unlistened = reuseport_socket(port=port, listen=False)  # bound, not listening
    cases.append(unlistened)
    udp = reuseport_socket(type=socket.SOCK_DGRAM)
    cases.append(udp)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cases.append(unix)
    r, w = os.pipe()
    try:
        for s in cases:
            with pytest.raises(NotInGroupError) as ei:
                sel.register(s, 0)
            assert ei.value.errno == errno.ENOENT
        with pytest.raises(NotInGroupError):
            sel.register(r, 0)  # not a socket at all
    finally:
        for s in cases:
            s.close()
        os.close(r)
        os.close(w)
    assert sel.registrations() == []


def test_capacity_overflow(kernel, group):
    socks, _ = group(3)
    with Selector("0", capacity=2) as sel:
        sel.attach(socks[0])
        sel.register(socks[0], 0)
        sel.register(socks[1], 0)
        with pytest.raises(CapacityError) as ei:
            sel.register(socks[2], 0)
        assert ei.value.errno == errno.ENOSPC
        assert "capacity" in str(ei.value)
        sel.register(socks[2], WILDCARD)  # other regions are unaffected
        assert len(sel.registrations()) == 3


def test_detach_restores_kernel_balance(sel, group):
    socks, port = group(2)
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sel.register(socks[1], 1)
    assert sel.detach() is True
    assert sel.detach() is False  # idempotent
    assert not sel.attached
    for cpu in (0, 1):
        assert connect_from(cpu, socket.AF_INET, port, N).ok == N
        got = drain(socks)
        assert all(got), f"kernel hash should use both sockets: {got}"
    assert sel.stats()["local"] == 0  # the program no longer runs
    with pytest.raises(NotInGroupError):
        sel.register(socks[0], 0)
    sel.attach(socks[1])  # and can attach again
    assert connect_from(0, socket.AF_INET, port, N).ok == N
    assert drain(socks) == [N, 0]


def test_attach_other_group_refused(sel, group):
    a, _ = group(1)
    b, _ = group(1)
    sel.attach(a[0])
    sel.attach(a[0])  # again: no-op
    with pytest.raises(NumaReuseError):
        sel.attach(b[0])


def test_attach_requires_reuseport(sel):
    s = reuseport_socket(reuseport=False)
    try:
        with pytest.raises(NotInGroupError):
            sel.attach(s)
    finally:
        s.close()


def test_64_domains_1024_sockets(kernel, group):
    cpus = sorted(os.sched_getaffinity(0))
    # 64 domains: domain d holds CPU d for the CPUs that exist, the rest are empty-CPU-free groups
    spec = "cpu"
    from numareuse.topology import Topology

    groups = [(cpus[d],) if d < len(cpus) else () for d in range(64)]
    topo = Topology(spec, tuple(groups), {c: d for d, g in enumerate(groups) for c in g})
    socks, port = group(1024)
    with Selector(topo, capacity=512) as sel:
        sel.attach(socks[0])
        for i, s in enumerate(socks):
            sel.register(s, i % len(cpus) if i < 1000 else WILDCARD)
        assert len(sel.registrations()) == 1024
        assert connect_from(cpus[0], socket.AF_INET, port, N).ok == N
        got = drain(socks)
        assert sum(got) == N
        assert all(got[i] == 0 for i in range(len(socks)) if i >= 1000 or i % len(cpus) != 0)


def test_close_releases_everything(no_leaks, group, two_cpus):
    socks, port = group(2)
    sel = Selector("0;1")
    sel.attach(socks[0])
    sel.register(socks[0], 0)
    sel.register(socks[1], 1)
    sel.close()
    sel.close()  # twice is fine
    assert connect_from(0, socket.AF_INET, port, 10).ok == 10  # detached: kernel hash
    assert sum(drain(socks)) == 10


def test_failed_construction_leaks_nothing(no_leaks):
    with pytest.raises(NumaReuseError):
        Selector("0-1;1")  # CPU 1 in two domains
    with pytest.raises(NumaReuseError):
        Selector("0", capacity=0)


def test_loopback_constants():
    assert LOOPBACK[socket.AF_INET6] == "::1"


def test_failed_move_leaves_socket_where_it_was(kernel, two_cpus, group):
    socks, port = group(2)
    with Selector("0;1", capacity=1) as sel:
        sel.attach(socks[0])
        sel.register(socks[0], 0)
        sel.register(socks[1], 1)
        with pytest.raises(CapacityError):
            sel.register(socks[0], 1)  # domain 1 is full
        assert sorted(r["domain"] for r in sel.registrations()) == [0, 1]
        assert connect_from(0, socket.AF_INET, port, N).ok == N
        assert drain(socks) == [N, 0]


def test_clear_releases_sockets_left_above_a_count(kernel, group):
    """An interrupted operation can leave a socket in a slot past the count: clear() finds it."""
    socks, _ = group(2)
    a = Selector("0")
    b = Selector("0")
    try:
        a.attach(socks[0])
        a.register(socks[0], 0)
        a.register(socks[1], 0)
        a._slots.set_count(0, 1, 2)  # as if interrupted: socks[1] sits above the count
        a.clear()
        b.use_group(socks[0])
        b.register(socks[1], 0)  # no EBUSY: a released it
        b.register(socks[0], 0)
    finally:
        a.close()
        b.close()


def test_close_releases_sockets_at_once(kernel, group):
    """The kernel frees a closed selector's maps some ms later; close() must not make others wait."""
    socks, _ = group(2)
    a, b = Selector("0"), Selector("0")
    try:
        a.attach(socks[0])
        for s in socks:
            a.register(s, 0)
        a.close()
        b.attach(socks[0])
        for s in socks:
            b.register(s, 0)  # immediately: no EBUSY
        assert len(b.registrations()) == 2
    finally:
        b.close()


def test_socket_in_another_selector_is_a_clear_error(kernel, group):
    socks, _ = group(1)
    with Selector("0") as a, Selector("0") as b:
        a.attach(socks[0])
        a.register(socks[0], 0)
        b.use_group(socks[0])
        with pytest.raises(NumaReuseError, match="already in another selector"):
            b.register(socks[0], 0)
        assert b.registrations() == []
