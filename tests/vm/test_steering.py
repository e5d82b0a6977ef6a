"""Steering on real NUMA nodes: ``Selector(domains="numa")``, clients pinned to every CPU.

Over loopback a pinned client's packet is processed on its own CPU, so a
client on a CPU of node n must reach one of node n's sockets, every time.
"""

from __future__ import annotations

import socket

import pytest
from conftest import connect_from, drain, pinned

from numareuse import CURRENT, WILDCARD

from .conftest import stats_since

N = 24  # connections (or datagrams, each from a new source port) per CPU
PER_NODE = 2  # sockets per node

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
TYPES = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


@pytest.mark.parametrize("type_", TYPES.values(), ids=list(TYPES))
@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_each_node_served_by_its_own_sockets(sel, nodes, group, family, type_):
    socks, port = group(PER_NODE * len(nodes), family, type_)
    sel.attach(socks[0])
    mine = {}  # node -> indexes of its sockets
    for i, s in enumerate(socks):
        node = sorted(nodes)[i // PER_NODE]
        assert sel.register(s, node) == node
        mine.setdefault(node, []).append(i)
    before = sel.stats()
    for node, cpus in nodes.items():
        for cpu in cpus:
            assert connect_from(cpu, family, port, N, type_) == N
            got = drain(socks)
            local = [got[i] for i in mine[node]]
            assert sum(local) == N, f"client on CPU {cpu} (node {node}): {got}"
            assert all(local), f"client on CPU {cpu}: both of node {node}'s sockets should get some: {got}"
    total = N * sum(len(c) for c in nodes.values())
    st = stats_since(sel, before)
    # the drains above prove the exact placement; the counters prove no other outcome. Under
    # emulation a SYN can be sent again (its timer fires before the first is processed) and
    # run the program once more: local may exceed the connections, never the other outcomes
    assert (st["wildcard"], st["fallback"], st["empty_skipped"]) == (0, 0, 0), st
    assert total <= st["local"] <= total + total // 20, st


def test_node_without_sockets_falls_back_to_the_wildcard(sel, nodes, group):
    first, *others = sorted(nodes)
    socks, port = group(2 * PER_NODE)
    sel.attach(socks[0])
    served, wildcard = socks[:PER_NODE], socks[PER_NODE:]
    for s in served:
        sel.register(s, first)
    for s in wildcard:
        sel.register(s, WILDCARD)
    before = sel.stats()
    for cpu in nodes[first]:
        assert connect_from(cpu, socket.AF_INET, port, N) == N
        got = drain(socks)
        assert sum(got[:PER_NODE]) == N and all(got[:PER_NODE]), f"CPU {cpu} of node {first}: {got}"
    far = [cpu for node in others for cpu in nodes[node]]
    for cpu in far:
        assert connect_from(cpu, socket.AF_INET, port, N) == N
        got = drain(socks)
        assert sum(got[PER_NODE:]) == N and all(got[PER_NODE:]), f"CPU {cpu}, a node with no socket: {got}"
    st = stats_since(sel, before)
    assert st["fallback"] == 0 and st["local"] >= N * len(nodes[first]) and st["wildcard"] >= N * len(far), st
    # (a SYN sent again under emulation runs the program once more: see above)
    assert st["local"] + st["wildcard"] <= N * (len(nodes[first]) + len(far)) * 21 // 20, st


def test_register_current_from_each_node(sel, nodes, group):
    """As FreeBSD's CURDOM: a socket registered from a CPU of node n serves node n."""
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    cpus = sorted(node_of)
    socks, port = group(len(cpus))  # one socket per CPU, registered from that CPU
    sel.attach(socks[0])
    for cpu, s in zip(cpus, socks):
        with pinned(cpu):
            assert sel.register(s, CURRENT) == node_of[cpu]
    for cpu in cpus:
        assert connect_from(cpu, socket.AF_INET, port, N) == N
        got = drain(socks)
        assert sum(n for c, n in zip(cpus, got) if node_of[c] == node_of[cpu]) == N, f"CPU {cpu}: {got}"
