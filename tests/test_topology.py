"""Topology parsing and the topology report, on the real sysfs and on fake trees.

The fake trees give layouts this one-node machine lacks: two nodes with
interleaved CPUs, a memory-only node, an RX queue whose IRQ spans nodes.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from numareuse.cli.main import main

from numareuse import DomainSpecError, topology


def fake_tree(root, nodes: dict[int, str], online: str, irqs: dict[int, tuple[str, str]], rxq: int = 0):
    """nodes: id -> every CPU of the node (the kernel's node cpulist then shows the online ones);
    irqs: irq -> (name, affinity cpulist) of eth0's device; rxq: its RX queues."""
    from numareuse._sys import parse_cpulist

    sysd, procd = root / "sys", root / "proc"
    procd.mkdir()
    (sysd / "devices/system/cpu").mkdir(parents=True)
    (sysd / "devices/system/cpu/online").write_text(online + "\n")
    up = set(parse_cpulist(online))
    for n, cpus in nodes.items():
        d = sysd / f"devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(",".join(str(c) for c in parse_cpulist(cpus) if c in up) + "\n")
        for c in parse_cpulist(cpus):  # sysfs keeps cpuN/nodeM, offline CPUs included
            (sysd / f"devices/system/cpu/cpu{c}").mkdir(exist_ok=True)
            os.symlink(d, sysd / f"devices/system/cpu/cpu{c}/node{n}")
    dev = sysd / "devices/pci0000:00/0000:00:04.0"
    (dev / "msi_irqs").mkdir(parents=True)
    net = sysd / "class/net/eth0"
    (net / "queues").mkdir(parents=True)
    os.symlink(dev, net / "device")
    lines = ["           CPU0       CPU1"]
    for i, (irq, (name, aff)) in enumerate(sorted(irqs.items())):
        (dev / "msi_irqs" / str(irq)).write_text("msix\n")
        (procd / f"irq/{irq}").mkdir(parents=True)
        (procd / f"irq/{irq}/effective_affinity_list").write_text(aff + "\n")
        lines.append(f" {irq}:   1   2   PCI-MSIX-0000:00:04.0   {i}-edge   {name}")
    for q in range(rxq):
        (net / f"queues/rx-{q}").mkdir()
        (net / f"queues/rx-{q}/rps_cpus").write_text("0\n")
    (procd / "interrupts").write_text("\n".join(lines) + "\n")
    return sysd, procd


@pytest.fixture
def fake(tmp_path, monkeypatch):
    def make(**kw):
        sysd, procd = fake_tree(tmp_path, **kw)
        monkeypatch.setattr(topology, "SYS", str(sysd))
        monkeypatch.setattr(topology, "PROC", str(procd))

    return make


def test_interleaved_nodes_and_a_memory_only_node(fake):
    fake(nodes={0: "0,2", 1: "1,3", 2: ""}, online="0-3", irqs={})
    t = topology.parse("numa")
    assert t.domains == ((0, 2), (1, 3))  # node 2 has no CPU: not a domain, shifts nothing
    assert t.cpu_domain == {0: 0, 2: 0, 1: 1, 3: 1}
    rep = topology.report()
    assert {n["node"]: n["memory_only"] for n in rep["nodes"]} == {0: False, 1: False, 2: True}
    assert "node 2: cpus none (memory only, not a domain)" in CliRunner().invoke(main, ["topology"]).stdout


def test_memory_only_node_in_the_middle_keeps_node_ids(fake):
    fake(nodes={0: "0-1", 1: "", 2: "2-3"}, online="0-3", irqs={})
    t = topology.parse("numa")
    assert t.domains == ((0, 1), (), (2, 3)) and not t.valid(1) and t.valid(2)


def test_offline_cpu_stays_in_its_nodes_domain(fake):
    """The cpu -> domain map is written once: a CPU offline now must be local when it is back."""
    fake(nodes={0: "0-1", 1: "2-3", 2: "4"}, online="0-2", irqs={})
    t = topology.parse("numa")
    assert t.domains == ((0, 1), (2, 3), (4,)) and t.cpu_domain[3] == 1
    assert topology.parse("cpu").domains == ((0,), (1,), (2,))  # explicit kinds take online CPUs only
    with pytest.raises(DomainSpecError, match="not online"):
        topology.parse("0-1;3")
    nodes = {n["node"]: n for n in topology.report()["nodes"]}
    assert (nodes[1]["cpus"], nodes[1]["offline_cpus"], nodes[1]["memory_only"]) == ([2], [3], False)
    assert (nodes[2]["cpus"], nodes[2]["offline_cpus"], nodes[2]["memory_only"]) == ([], [4], False)
    out = CliRunner().invoke(main, ["topology"]).stdout
    assert "node 1: cpus 2 (offline: 3, kept in the domain)" in out and "node 2: cpus none online" in out


def test_rx_queue_irq_spanning_nodes_is_warned(fake):
    fake(
        nodes={0: "0-1", 1: "2-3"},
        online="0-3",
        irqs={40: ("virtio3-config", "0"), 41: ("virtio3-input.0", "1"), 42: ("virtio3-input.1", "1-2")},
        rxq=2,
    )
    (eth0,) = topology.interfaces()
    q0, q1 = eth0["rx_queues"]
    assert (q0["irq"], q0["cpus"], q0["nodes"]) == (41, [1], [0]) and "warning" not in q0
    assert (q1["irq"], q1["cpus"], q1["nodes"]) == (42, [1, 2], [0, 1])
    assert "nodes [0, 1]" in q1["warning"]
    r = CliRunner().invoke(main, ["topology"])
    assert r.exit_code == 0
    assert "rx-1: irq 42 -> cpus 1-2 -> node 0,1" in r.stdout
    assert "warning: eth0 rx-1 processed on CPUs of nodes [0, 1]" in r.stderr
    rep = json.loads(CliRunner().invoke(main, ["topology", "--json"]).stdout)
    assert rep["interfaces"][0]["rx_queues"][1]["warning"]


def test_real_machine_topology_is_consistent():
    t = topology.parse("numa")
    online = set(topology.online_cpus())
    assert set(t.cpu_domain) == online  # every online CPU in exactly one domain
    assert set(topology.parse("cpu").cpu_domain) == online
    assert {c for g in topology.parse("llc").domains for c in g} == online


@pytest.mark.parametrize("spec", ["", ";", "0-", "a", "1-0", "0;;1", "0-1;1"])
def test_bad_specs(spec):
    with pytest.raises(DomainSpecError):
        topology.parse(spec)
