"""The kernel's NUMA layout as numareuse reads it, on a real multi-node machine."""

from __future__ import annotations

import os

from conftest import pinned

from numareuse import topology


def test_numa_domains_are_the_nodes(nodes, expected_nodes):
    topo = topology.parse("numa")
    assert topo.ndomains == len(nodes) >= 2
    assert {d: list(cpus) for d, cpus in enumerate(topo.domains)} == nodes
    if expected_nodes is not None:  # the layout vm/run.sh (or the Vagrantfile) booted
        assert [list(cpus) for cpus in topo.domains] == expected_nodes
    assert topo.cpu_domain == {c: n for n, cpus in nodes.items() for c in cpus}


def test_current_domain_is_the_node_of_the_pinned_cpu(nodes):
    topo = topology.parse("numa")
    old = os.sched_getaffinity(0)
    for node, cpus in nodes.items():
        for cpu in cpus:
            with pinned(cpu):
                assert topology.current_domain(topo) == node
        os.sched_setaffinity(0, set(cpus))  # an affinity spanning one whole node is that node
        try:
            assert topology.current_domain(topo) == node
        finally:
            os.sched_setaffinity(0, old)
