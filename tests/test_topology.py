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
    """nodes: id -> cpulist; irqs: irq -> (name, affinity cpulist) of eth0's device; rxq: its RX queues."""
    sysd, procd = root / "sys", root / "proc"
    procd.mkdir()
    (sysd / "devices/system/cpu").mkdir(parents=True)
    (sysd / "devices/system/cpu/online").write_text(online + "\n")
    for n, cpus in nodes.items():
        d = sysd / f"devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
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


def test_memory_only_node_in_the_middle_keeps_node_ids(fake):
    fake(nodes={0: "0-1", 1: "", 2: "2-3"}, online="0-3", irqs={})
    t = topology.parse("numa")
    assert t.domains == ((0, 1), (), (2, 3)) and not t.valid(1) and t.valid(2)


def test_offline_cpus_are_in_no_domain(fake):
    fake(nodes={0: "0-1", 1: "2-3"}, online="0-2", irqs={})
    t = topology.parse("numa")
    assert t.domains == ((0, 1), (2,))
    with pytest.raises(DomainSpecError, match="not online"):
        topology.parse("0-1;3")


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
