"""Every documented size loads and steers: capacities 1..1024, 1..64 domains, bounded domain specs."""

from __future__ import annotations

import os
import resource
import socket

import pytest
from conftest import connect_from, drain

from numareuse import CapacityError, DomainSpecError, Selector, topology
from numareuse.topology import Topology

N = 10


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 8, 9, 1023, 1024])
def test_every_capacity_loads_and_steers(kernel, two_cpus, group, capacity):
    """3..7 used to fail to load (the probe bound followed the capacity; the verifier gave up)."""
    per = min(capacity, 3)
    socks, port = group(2 * per)
    with Selector("0;1", capacity=capacity) as sel:
        sel.attach(socks[0])
        for i, s in enumerate(socks):
            sel.register(s, i // per)
        if capacity == per:  # full: one more is refused, and nothing moved
            with pytest.raises(CapacityError):
                sel.register(socks[0], 1)
            assert len(sel.registrations()) == 2 * per
        for cpu in (0, 1):
            assert connect_from(cpu, socket.AF_INET, port, N).ok == N
            got = drain(socks)
            assert sum(got[cpu * per : (cpu + 1) * per]) == N, (cpu, got)


def _wide(ndomains: int) -> Topology:
    """``ndomains`` domains on this machine: the CPUs that exist get one each, the rest have none."""
    cpus = sorted(os.sched_getaffinity(0))
    groups = [(cpus[d],) if d < len(cpus) else () for d in range(ndomains)]
    return Topology(f"{ndomains} domains", tuple(groups), {c: d for d, g in enumerate(groups) for c in g})


@pytest.mark.parametrize("ndomains", [1, 2, 63, 64])
def test_every_domain_count_loads_and_steers(kernel, two_cpus, group, ndomains):
    socks, port = group(4)
    with Selector(_wide(ndomains), capacity=16) as sel:
        sel.attach(socks[0])
        for i, s in enumerate(socks):
            sel.register(s, i % min(ndomains, 2))
        assert connect_from(0, socket.AF_INET, port, N).ok == N
        got = drain(socks)
        mine = got if ndomains == 1 else got[0::2]  # domain 0's sockets (with one domain, every socket)
        assert sum(mine) == N and sum(got) == N, got


def test_a_1024_socket_group_in_one_region(kernel, group, many_fds):
    socks, port = group(1024)
    with Selector("0", capacity=1024) as sel:
        sel.attach(socks[0])
        for s in socks:
            sel.register(s, 0)
        assert len(sel.registrations()) == 1024
        assert sel._slots.bucket_shares(0) == sel._slots.recorded_shares(0)
        assert set(sel._slots.bucket_shares(0).values()) == {sel.layout.nbuckets // 1024}
        assert connect_from(0, socket.AF_INET, port, N).ok == N
        assert sum(drain(socks)) == N


def test_65_domains_are_refused(kernel):
    with pytest.raises(DomainSpecError, match="at most 64"):
        Selector(";".join(["0"] * 65))


@pytest.mark.parametrize("spec", ["0-99999999", "0;4294967296", "0-1;1048576"])
def test_huge_cpu_ids_are_refused_before_anything_is_built(spec):
    """Used to expand the range first and exhaust memory."""
    with pytest.raises(DomainSpecError, match="CPU ids are 0.."):
        topology.parse(spec)


def test_possible_cpus_without_the_sysfs_file(tmp_path, monkeypatch):
    """A fake sysfs (or an odd kernel) without cpu/possible: the CPU directories bound the ids."""
    cpu = tmp_path / "devices/system/cpu"
    for c in range(3):
        (cpu / f"cpu{c}").mkdir(parents=True)
    (cpu / "online").write_text("0-2\n")
    monkeypatch.setattr(topology, "SYS", str(tmp_path))
    assert topology.possible_cpus() == 3
    with pytest.raises(DomainSpecError, match="CPU ids are 0..2"):
        topology.parse("0;3")
