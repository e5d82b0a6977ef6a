"""Fixtures for tests on a real multi-node NUMA topology.

Every test under tests/vm needs a machine with at least two NUMA nodes that
have CPUs: elsewhere it is skipped with the reason, or fails when
NUMAREUSE_REQUIRE_KERNEL=1. ``make vm-test`` boots such a machine (vm/run.sh);
so does vagrant/Vagrantfile. Both set NUMAREUSE_VM_NODES to the layout they
built ("0-1;2-3": node 0 has CPUs 0-1, node 1 CPUs 2-3), and the tests check
that the kernel reports exactly that layout.

Adding a test: request ``nodes`` ({node: [cpus]}) for the real layout, and
``sel`` for the module's one ``Selector(domains="numa")`` (a bcc compile
costs seconds under emulation, so each module shares one and every test gets
it detached and empty).
"""

from __future__ import annotations

import os

import pytest
from conftest import need

from numareuse import NotSupported, PermissionDenied, Selector, _sys, topology


def cpu_nodes() -> dict[int, list[int]]:
    """NUMA node -> its online CPUs, for the nodes that have CPUs."""
    return {n: cpus for n, cpus in topology.numa_nodes().items() if cpus}


@pytest.fixture(scope="session")
def nodes() -> dict[int, list[int]]:
    found = cpu_nodes()
    need(
        len(found) >= 2,
        f"needs a machine with >= 2 NUMA nodes with CPUs, this one has {len(found)}: run `make vm-test`",
    )
    return found


@pytest.fixture(autouse=True)
def _numa_machine(nodes):
    """Every test here needs the multi-node machine, whether it asks for ``nodes`` or not."""


@pytest.fixture(scope="session")
def expected_nodes() -> list[list[int]] | None:
    """CPU lists of the nodes with CPUs, as Linux numbers the layout the guest was booted with.

    NUMAREUSE_VM_NODES is in qemu's node order and may name memory-only nodes
    (empty lists); Linux numbers the nodes with CPUs first, in the order of
    their first CPU (ACPI's SRAT lists processors before memory). None when not told.
    """
    spec = os.environ.get("NUMAREUSE_VM_NODES")
    if not spec:
        return None
    return sorted((cpus for cpus in map(_sys.parse_cpulist, spec.split(";")) if cpus), key=min)


@pytest.fixture(scope="module")
def numa_selector(nodes):
    """One ``Selector(domains="numa")`` for the whole module."""
    try:
        s = Selector("numa")
    except (NotSupported, PermissionDenied) as e:
        need(False, f"numareuse cannot load its program here: {e}")
    with s:
        yield s


@pytest.fixture
def sel(numa_selector):
    """The module's selector, detached and with no registration.

    The previous test's group is closed by now (the ``group`` fixture closed
    its sockets): detach forgets it and refresh drops its dead slots.
    """
    numa_selector.detach()
    numa_selector.refresh()
    assert numa_selector.registrations() == [], "a previous test left a socket registered and open"
    return numa_selector


def stats_since(sel, before: dict[str, int]) -> dict[str, int]:
    """The selector's outcome counters since ``before`` (a shared selector counts across tests)."""
    return {k: v - before[k] for k, v in sel.stats().items()}
