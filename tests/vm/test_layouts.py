"""numareuse on NUMA layouts other than the default 2 x 2 (``make vm-topology-test`` boots them).

* interleaved CPU numbering across nodes (node 0 = CPUs 0,2; node 1 = CPUs 1,3),
  as on many real servers;
* a node with memory and no CPUs (as CXL memory);
* several last-level caches per node (``VM_SMP="sockets=3,cores=2"``: the
  guest's L3 follows the socket, so node 0 = CPUs 0-3 has two of them);
* a CPU taken offline and back online under an attached selector (any layout,
  so ``make vm-test`` runs it too).

The expected layout comes from what vm/run.sh booted (NUMAREUSE_VM_NODES, in
qemu's node numbering), not from the sysfs files numareuse itself reads.
Linux numbers the nodes that have CPUs first, in the order of their first CPU
(ACPI's SRAT lists processors before memory), so a memory-only node gets an
id above every node with CPUs whatever qemu called it. A test written for one
layout skips on the others with ``pytest.skip`` (not ``need``: a layout is no
missing kernel feature, so NUMAREUSE_REQUIRE_KERNEL=1 does not fail it).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import LOOPBACK, handshake, pinned

from numareuse import CURRENT, DomainError, Selector, _sys, topology

from .conftest import stats_since

N = 24  # connections per CPU
PER_DOMAIN = 2  # sockets per domain
LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}: close() resets, no TIME_WAIT


def booted() -> list[list[int]]:
    """The guest's layout as vm/run.sh booted it: CPU lists in qemu's node order ([] = memory only)."""
    spec = os.environ.get("NUMAREUSE_VM_NODES")
    if spec is None:
        pytest.skip("needs a guest booted by vm/run.sh (NUMAREUSE_VM_NODES tells its layout)")
    return [_sys.parse_cpulist(part) for part in spec.split(";")]


def linux_nodes(layout: list[list[int]]) -> dict[int, list[int]]:
    """Linux's node id -> CPUs for the nodes with CPUs: numbered in the order of their first CPU."""
    return dict(enumerate(sorted((c for c in layout if c), key=min)))


def node_of(nodes: dict[int, list[int]]) -> dict[int, int]:
    return {c: n for n, cpus in nodes.items() for c in cpus}


def accept_all(socks) -> list[list[int]]:
    """Accept every queued connection; per socket, the CPU that processed each one's packets."""
    out = []
    for s in socks:
        s.setblocking(False)
        cpus = []
        while True:
            try:
                c, _addr = s.accept()
            except BlockingIOError:
                break
            cpus.append(c.getsockopt(socket.SOL_SOCKET, _sys.SO_INCOMING_CPU))
            c.close()
        out.append(cpus)
    return out


def connect_pinned(cpu: int, port: int, n: int = N) -> None:
    """n connections from a client pinned to ``cpu``; any that fails fails the test."""
    with pinned(cpu):
        for _ in range(n):
            c = socket.socket()
            try:
                handshake(c, (LOOPBACK[socket.AF_INET], port), timeout=10)  # a SYN sent again stays on this CPU
            except ConnectionResetError:
                pass  # accepted and reset by an Acceptor before connect() returned; a refusal is ECONNREFUSED
            finally:
                c.close()


def check_steering(sel: Selector, group, domains: dict[int, list[int]], cpus=None) -> None:
    """Register PER_DOMAIN sockets per domain; a client pinned to each CPU must land on its domain's sockets.

    The accepted sockets' SO_INCOMING_CPU proves the packets were processed
    on the client's CPU, so a miss is the selector's, not the set-up's.
    """
    dom_of = node_of(domains)
    socks, port = group(PER_DOMAIN * len(domains))
    sel.attach(socks[0])
    sock_dom = []
    for i, s in enumerate(socks):
        d = sorted(domains)[i // PER_DOMAIN]
        assert sel.register(s, d) == d
        sock_dom.append(d)
    before = sel.stats()
    for cpu in cpus if cpus is not None else sorted(dom_of):
        connect_pinned(cpu, port)
        got = accept_all(socks)
        assert {c for per in got for c in per} == {cpu}, f"client on CPU {cpu}: processed on {got}"
        mine = [len(got[i]) for i, d in enumerate(sock_dom) if d == dom_of[cpu]]
        assert sum(mine) == N, f"client on CPU {cpu} (domain {dom_of[cpu]}): per socket {[len(g) for g in got]}"
        assert all(mine), f"client on CPU {cpu}: every socket of domain {dom_of[cpu]} should get some: {mine}"
    st = stats_since(sel, before)
    assert (st["wildcard"], st["fallback"]) == (0, 0), st


def topology_json() -> dict:
    """``numareuse topology --json`` from this venv (it needs no root state)."""
    cli = Path(sys.executable).with_name("numareuse")
    r = subprocess.run([str(cli), "topology", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- interleaved numbering -----------------------------------------------------


@pytest.fixture
def interleaved():
    layout = booted()
    if all(cpus == list(range(cpus[0], cpus[-1] + 1)) for cpus in layout if cpus):
        pytest.skip(f"needs a guest whose nodes interleave CPU numbers (VM_NODES='0,2;1,3'), not {layout}")
    return linux_nodes(layout)


def test_interleaved_numbering_is_read_right(interleaved):
    topo = topology.parse("numa")
    assert [list(c) for c in topo.domains] == list(interleaved.values())
    assert topo.cpu_domain == node_of(interleaved)
    for node, cpus in interleaved.items():
        for cpu in cpus:
            with pinned(cpu):
                assert topology.current_domain(topo) == node
    assert {c["cpu"]: c["node"] for c in topology_json()["cpus"]} == node_of(interleaved)


def test_interleaved_steering(interleaved, sel, group):
    check_steering(sel, group, interleaved)


def test_interleaved_register_current(interleaved, sel, group):
    """A worker pinned to CPU n registering CURRENT lands in node(n), not in domain n // CPUs-per-node."""
    cpus = sorted(node_of(interleaved))
    socks, port = group(len(cpus))
    sel.attach(socks[0])
    for cpu, s in zip(cpus, socks):
        with pinned(cpu):
            assert sel.register(s, CURRENT) == node_of(interleaved)[cpu]
    for cpu in cpus:
        connect_pinned(cpu, port)
        got = accept_all(socks)
        assert all(node_of(interleaved)[c] == node_of(interleaved)[cpu] for c, g in zip(cpus, got) if g), (
            f"client on CPU {cpu}: {[len(g) for g in got]}"
        )


# -- a node with memory and no CPUs ------------------------------------------------


@pytest.fixture
def memory_only():
    layout = booted()
    if all(layout):
        pytest.skip(f"needs a guest with a memory-only node (VM_NODES='0-1;;2-3'), not {layout}")
    return layout


def test_memory_only_node_is_no_domain(memory_only, sel, group):
    expected = linux_nodes(memory_only)
    nodes = topology.numa_nodes()
    mem_ids = sorted(n for n, cpus in nodes.items() if not cpus)
    assert len(mem_ids) == sum(1 for c in memory_only if not c)
    assert {n: c for n, c in nodes.items() if c} == expected
    assert min(mem_ids) > max(expected), f"memory-only nodes {mem_ids} numbered among {sorted(expected)}"
    topo = topology.parse("numa")
    assert topo.ndomains == len(expected)  # no domain for a memory-only node, none shifted
    assert [list(c) for c in topo.domains] == list(expected.values())
    assert all(not topo.valid(n) for n in mem_ids)
    socks, _port = group(1)
    sel.attach(socks[0])
    for n in mem_ids:
        with pytest.raises(DomainError):
            sel.register(socks[0], n)
    report = {n["node"]: n for n in topology_json()["nodes"]}
    assert sorted(report) == sorted(nodes)
    assert {n: r["memory_only"] for n, r in report.items()} == {n: not c for n, c in nodes.items()}
    assert {n: r["cpus"] for n, r in report.items() if r["cpus"]} == expected


def test_memory_only_node_steering(memory_only, sel, group):
    check_steering(sel, group, linux_nodes(memory_only))


def test_memory_only_node_numbered_below_cpu_nodes_shifts_nothing(memory_only, group, tmp_path, monkeypatch):
    """The same memory-only node given a lower id than a node with CPUs (as other firmware may).

    x86 ACPI cannot number it so (see the module docstring), so this reads a
    copy of the guest's node directory renumbered: node 1 is the memory-only
    node, the second node with CPUs becomes node 2. Domain 2 must then be that
    node's CPUs, domain 1 no domain, and steering follow.
    """
    real = topology.numa_nodes()
    cpu_nodes = [n for n, c in real.items() if c]
    mem = next(n for n, c in real.items() if not c)
    order = [cpu_nodes[0], mem, *cpu_nodes[1:]]  # new id = position
    real_sys = Path(topology.SYS) / "devices/system"
    (tmp_path / "devices/system/cpu").mkdir(parents=True)
    (tmp_path / "devices/system/cpu/online").write_text((real_sys / "cpu/online").read_text())
    for new, old in enumerate(order):
        d = tmp_path / f"devices/system/node/node{new}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text((real_sys / f"node/node{old}/cpulist").read_text())
    monkeypatch.setattr(topology, "SYS", str(tmp_path))
    topo = topology.parse("numa")
    want = {new: real[old] for new, old in enumerate(order) if real[old]}
    assert [list(c) for c in topo.domains] == [real[old] for old in order]
    assert not topo.valid(1) and topo.cpu_domain == node_of(want)
    with Selector(topo) as sel:
        socks, _port = group(1)
        sel.attach(socks[0])
        with pytest.raises(DomainError):
            sel.register(socks[0], 1)
        sel.detach()
        check_steering(sel, group, want)


# -- several last-level caches per node ------------------------------------------------


def sysfs_llc_groups() -> list[list[int]]:
    """CPUs sharing each L3 as the guest's sysfs shows them (index3: the unified level-3 cache)."""
    groups = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index3/shared_cpu_list"):
        groups.add(tuple(_sys.parse_cpulist(Path(path).read_text())))
    return sorted(list(g) for g in groups)


def test_llc_domains(nodes, group):
    llc = sysfs_llc_groups()
    if len(llc) <= len(nodes):
        pytest.skip(
            f"needs a guest with more last-level caches than nodes "
            f"(VM_NODES='0-3;4-5' VM_SMP='sockets=3,cores=2'); L3 groups here: {llc}"
        )
    expected = os.environ.get("NUMAREUSE_VM_LLC")
    if expected:  # what the booted -smp topology should give
        assert llc == [_sys.parse_cpulist(p) for p in expected.split(";")]
    topo = topology.parse("llc")
    assert [list(c) for c in topo.domains] == llc
    assert topology_json()["llc_groups"] == llc
    with Selector("llc") as sel:
        check_steering(sel, group, dict(enumerate(llc)))


# -- a CPU offline and back online --------------------------------------------------


def victim_cpu(nodes: dict[int, list[int]]) -> int:
    """The last CPU that can go offline and whose node keeps another online CPU."""
    for cpus in reversed(list(nodes.values())):
        if len(cpus) >= 2 and os.path.exists(f"/sys/devices/system/cpu/cpu{cpus[-1]}/online"):
            return cpus[-1]
    pytest.skip(f"no CPU here can go offline with its node keeping another: {nodes}")


def set_online(cpu: int, on: bool) -> None:
    with open(f"/sys/devices/system/cpu/cpu{cpu}/online", "w") as f:
        f.write("1" if on else "0")
    assert (cpu in topology.online_cpus()) == on


@contextlib.contextmanager
def offline(cpu: int):
    """``cpu`` offline for the block.

    sched_getaffinity leaves offline CPUs out, so an affinity saved and set
    again meanwhile (as ``pinned`` does) loses ``cpu`` for good: the one from
    before is restored afterwards, or later tests (a pre-fork server pinning
    worker i to the i-th CPU of its master's affinity) would run without it.
    """
    saved = os.sched_getaffinity(0)
    set_online(cpu, False)
    try:
        yield
    finally:
        if cpu not in topology.online_cpus():
            set_online(cpu, True)
        os.sched_setaffinity(0, saved)


class Acceptor:
    """A thread accepting on every socket of a group; per socket, the packet CPU of each connection."""

    def __init__(self, socks):
        self.socks = socks
        self.got: list[list[int]] = [[] for _ in socks]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll = select.epoll()
        for s in socks:
            s.setblocking(False)
            self._poll.register(s.fileno(), select.EPOLLIN)
        self._index = {s.fileno(): i for i, s in enumerate(socks)}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for fd, _ev in self._poll.poll(0.1):
                i = self._index[fd]
                while True:
                    try:
                        c, _addr = self.socks[i].accept()
                    except (BlockingIOError, ConnectionAbortedError):
                        break
                    cpu = c.getsockopt(socket.SOL_SOCKET, _sys.SO_INCOMING_CPU)
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                    c.close()
                    with self._lock:
                        self.got[i].append(cpu)

    def total(self) -> int:
        with self._lock:
            return sum(len(g) for g in self.got)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.total() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.total() >= n, f"accepted {self.total()} of {n} connections"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._poll.close()


class ClientLoop:
    """A thread pinned to one CPU opening connections back to back until stopped; counts failures."""

    def __init__(self, cpu: int, port: int, max_conns: int = 20000):
        self.cpu, self.port, self.max = cpu, port, max_conns
        self.ok, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        os.sched_setaffinity(0, {self.cpu})  # this thread only
        while not self._stop.is_set() and self.ok + len(self.errors) < self.max:
            c = socket.socket()
            try:
                handshake(c, (LOOPBACK[socket.AF_INET], self.port), timeout=10)
                c.recv(1)  # b"" or a reset: the server accepted it
                self.ok += 1
            except ConnectionResetError:
                self.ok += 1
            except OSError as e:
                self.errors.append(repr(e))
            finally:
                c.close()

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.ok < n and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        return self.ok


def test_cpu_offline_and_online_under_an_attached_selector(nodes, sel, group):
    """Steering stays right for the online CPUs, and no connection fails, while a CPU goes and comes back.

    A client loop on CPU 0 keeps connecting the whole time; every accepted
    connection (the loop's and the pinned clients') must sit on a socket of
    the node whose CPU processed its packets.
    """
    owner = node_of(nodes)
    victim = victim_cpu(nodes)
    loop_cpu = min(owner)
    socks, port = group(PER_DOMAIN * len(nodes))
    sel.attach(socks[0])
    sock_node = [sorted(nodes)[i // PER_DOMAIN] for i in range(len(socks))]
    for s, n in zip(socks, sock_node):
        sel.register(s, n)
    before = sel.stats()
    acceptor = Acceptor(socks)
    loop = ClientLoop(loop_cpu, port)
    pinned_total = 0
    try:
        loop.wait_for(20)
        with offline(victim):
            loop.wait_for(loop.ok + 20)
            for cpu in sorted(owner):
                if cpu != victim:
                    connect_pinned(cpu, port)
                    pinned_total += N
        loop.wait_for(loop.ok + 20)
        for cpu in sorted(owner):  # the victim too, back online
            connect_pinned(cpu, port)
            pinned_total += N
        looped = loop.stop()
        acceptor.wait_for(looped + pinned_total)
    finally:
        loop.stop()
        acceptor.stop()
    assert loop.errors == [], f"{len(loop.errors)} failed connections while CPU {victim} went offline and back"
    misplaced = {
        (sock_node[i], cpu): n
        for i, got in enumerate(acceptor.got)
        for cpu in set(got)
        if owner[cpu] != sock_node[i] and (n := got.count(cpu))
    }
    assert not misplaced, f"(socket's node, packet CPU): count of connections served off their node: {misplaced}"
    by_cpu = {c: sum(g.count(c) for g in acceptor.got) for c in owner}
    assert by_cpu[victim] == N, by_cpu  # only the pinned round after it came back
    st = stats_since(sel, before)
    assert (st["wildcard"], st["fallback"]) == (0, 0), st


def test_selector_made_while_a_cpu_is_offline_steers_it_once_online(nodes, group):
    """SMT switched off or a CPU hot-unplugged when the server started: once back, its node's packets stay local."""
    victim = victim_cpu(nodes)
    with offline(victim):
        sel = Selector("numa")
    with sel:
        check_steering(sel, group, nodes)
