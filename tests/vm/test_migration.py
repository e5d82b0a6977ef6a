"""Migration across real NUMA nodes: a closing listener's queue goes to a peer of its own node.

``Selector(domains="numa")`` is loaded as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, which turns
migration on for its group without net.ipv4.tcp_migrate_req (checked to be 0 in the guest:
see tests/test_migration.py for the kernel functions). Listener A and its peer A2 serve node n,
B serves the other node; clients on a CPU of node n queue on A (A2 is registered after), then A
is closed from a CPU of the other node. The program runs there, in close(), and must pick by
the closing socket's node: every queued connection is accepted by A2, none by B, none reset.
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from conftest import need, pinned, resent

from numareuse.selector import queued

from .conftest import stats_since

N = 12  # connections queued on A


def _tcp_migrate_req() -> str:
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        return f.read().strip()


def _accept_all(socks: dict, timeout: float = 10) -> dict[int, str]:
    """Client port -> name of the listener that accepted it, answering each with b"ok"."""
    got: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    for s in socks.values():
        s.setblocking(False)
    while time.monotonic() < deadline:
        for name, s in socks.items():
            while True:
                try:
                    conn, peer = s.accept()
                except BlockingIOError:
                    break
                got[peer[1]] = name
                conn.sendall(b"ok")
                conn.close()
        if len(got) >= N:
            break
        select.select(list(socks.values()), [], [], 0.05)
    return got


@pytest.mark.parametrize("order", ["first", "last"], ids=["node0-closed-on-node1", "node1-closed-on-node0"])
def test_queue_of_a_closing_listener_stays_on_its_node(sel, nodes, group, order):
    need(sel.migration, "the kernel has no BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (Linux 5.14)")
    assert _tcp_migrate_req() == "0"  # migration below comes from the program's attach type alone
    node, other = sorted(nodes) if order == "first" else sorted(nodes)[::-1]
    (a, a2, b), port = group(3)
    sel.attach(a)
    sel.register(a, node)
    sel.register(b, other)
    clients, retrans = [], 0
    start = sel.stats()
    try:
        with pinned(nodes[node][0]):  # SYNs processed on node `node`: A is its only socket so far
            for _ in range(N):
                c = socket.create_connection(("127.0.0.1", port), timeout=30)
                retrans += resent(c)
                clients.append(c)
        assert queued(a.fileno()) == N
        syn = stats_since(sel, start)
        # the N SYNs were local to node `node`; only a SYN sent again (emulation) can add a run
        assert N <= syn["local"] <= N + retrans and syn["wildcard"] == syn["remote"] == syn["fallback"] == 0, syn
        sel.register(a2, node)
        before, before_cpu = sel.stats(), sel.cpu_stats()
        closer = nodes[other][-1]
        with pinned(closer):  # close() migrates the accept queue here, on the other node
            a.close()
        by_port = _accept_all({"A2": a2, "B": b})
        ports = [c.getsockname()[1] for c in clients]
        assert by_port == {p: "A2" for p in ports}, by_port  # none on B
        replies = []
        for c in clients:
            try:
                replies.append(c.recv(8))
            except ConnectionResetError:
                replies.append("reset")
        assert replies == [b"ok"] * N  # none reset
        st = stats_since(sel, before)
        assert {k: v for k, v in st.items() if v and k != "empty_skipped"} == {"migrated_local": N}, st
        after_cpu = sel.cpu_stats()
        ran = {cpu: after_cpu[cpu]["migrated_local"] - before_cpu[cpu]["migrated_local"] for cpu in after_cpu}
        assert ran == {cpu: N if cpu == closer else 0 for cpu in after_cpu}  # on the other node's CPU
    finally:
        for c in clients:
            c.close()
