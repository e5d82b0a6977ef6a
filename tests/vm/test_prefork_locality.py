"""The bundled pre-fork server (numareuse.examples.prefork) with workers on every node of a real NUMA machine.

Workers pinned one per CPU register ``CURRENT`` under ``--domains numa``, as
nginx workers with ``worker_cpu_affinity auto`` would: every request from a
client on node n must be answered by a worker of node n (full locality).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from conftest import assert_runs, pinned
from prefork_client import Server, http_get

N = 24  # requests per CPU, each on a new connection: a new steering decision


@pytest.fixture
def prefork():
    made: list[Server] = []

    def start(*args: str) -> Server:
        made.append(Server(*args))
        return made[-1]

    yield start
    for p in made:
        p.stop()


def test_workers_on_every_node_serve_only_their_node(nodes, prefork):
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    srv = prefork("--workers", str(len(node_of)), "--affinity", "auto", "--domains", "numa")
    # a bcc compile under emulation takes a while
    port = int(srv.wait_for(r"^ready port=(\d+) .*numareuse=on", timeout=120).group(1))
    workers = {int(i): (set(map(int, cpus.split(","))), d) for i, cpus, d in re.findall(
        r"^worker (\d+) pid=\d+ cpus=([\d,]+) domain=(\S+)", "\n".join(srv.lines), re.M)}  # fmt: skip
    # worker i is pinned to CPU i and registered in that CPU's node
    assert {i: d for i, (_, d) in workers.items()} == {cpu: str(node_of[cpu]) for cpu in node_of}
    again = 0
    for cpu, node in sorted(node_of.items()):
        with pinned(cpu):
            got = [http_get("127.0.0.1", port, timeout=10) for _ in range(N)]
        again += sum(a["resent"] for a in got)
        assert {a["domain"] for a in got} == {str(node)}, f"client on CPU {cpu} (node {node}): {got}"
        assert {node_of[a["cpu"]] for a in got} == {node}  # and the answering worker ran there
        by_worker = Counter(a["index"] for a in got)
        assert set(by_worker) == {i for i, (cpus, _) in workers.items() if node_of[min(cpus)] == node}, (
            f"client on CPU {cpu}: every worker of node {node} should answer some: {dict(by_worker)}"
        )
    srv.stop()
    stats = srv.wait_for(r"^stats local=(\d+) wildcard=(\d+) fallback=(\d+)")
    local, wildcard, fallback = map(int, stats.groups())
    # every request above was answered on its node; a SYN sent again under emulation may
    # run the program once more (measured per connection), never take another outcome
    assert (wildcard, fallback) == (0, 0)
    assert_runs(local, N * len(node_of), again, "local")
    srv.wait_for(r"^stopped detached=yes")
