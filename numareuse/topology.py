"""Which CPU belongs to which domain.

A *domain* is a set of CPUs whose packets should be served by the same
sockets. ``numa`` uses the kernel's NUMA nodes (domain id = node id; nodes
with memory and no CPUs are not domains and do not shift other ids), ``llc``
groups CPUs that share a last-level cache, ``cpu`` makes every online CPU
its own domain (domain id = CPU id), and an explicit spec such as
``"0-1;2-3"`` makes one domain per ``;``-separated CPU list, in order.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from dataclasses import dataclass, field

from . import _sys
from .errors import DomainSpecError

# Roots of what is read; tests point them at a fake tree to build topologies
# (two nodes, an IRQ spanning them) that the test machine does not have.
SYS = "/sys"
PROC = "/proc"
MAX_DOMAINS = 64


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def possible_cpus() -> int:
    """How many CPU ids this machine can have (ids are below it), from the same root as the rest."""
    try:
        return _sys.parse_cpulist(_read(f"{SYS}/devices/system/cpu/possible"))[-1] + 1
    except (OSError, ValueError, IndexError):
        ids = [
            int(m.group(1))
            for p in glob.glob(f"{SYS}/devices/system/cpu/cpu[0-9]*")
            if (m := re.search(r"cpu(\d+)$", p))
        ]
        return max([*ids, *online_cpus()]) + 1


def online_cpus() -> list[int]:
    return _sys.parse_cpulist(_read(f"{SYS}/devices/system/cpu/online"))


def numa_nodes() -> dict[int, list[int]]:
    """node id -> its online CPUs (empty for memory-only nodes)."""
    online = set(online_cpus())
    nodes = {}
    for path in glob.glob(f"{SYS}/devices/system/node/node[0-9]*"):
        node = int(re.search(r"node(\d+)$", path).group(1))
        nodes[node] = [c for c in _sys.parse_cpulist(_read(f"{path}/cpulist")) if c in online]
    if not nodes:  # kernel without CONFIG_NUMA: one node with every CPU
        nodes[0] = sorted(online)
    return dict(sorted(nodes.items()))


def offline_cpu_nodes() -> dict[int, int]:
    """Offline CPU -> its node: sysfs keeps cpuN/nodeM while a present CPU is offline."""
    online = set(online_cpus())
    out = {}
    for path in glob.glob(f"{SYS}/devices/system/cpu/cpu[0-9]*/node[0-9]*"):
        m = re.search(r"cpu(\d+)/node(\d+)$", path)
        if m and int(m.group(1)) not in online:
            out[int(m.group(1))] = int(m.group(2))
    return out


def llc_groups() -> list[list[int]]:
    """Groups of online CPUs sharing their highest-level cache, ordered by first CPU."""
    groups: dict[tuple[int, ...], None] = {}
    for cpu in online_cpus():
        best_level, best = -1, [cpu]
        for idx in glob.glob(f"{SYS}/devices/system/cpu/cpu{cpu}/cache/index[0-9]*"):
            try:
                level = int(_read(f"{idx}/level"))
                if _read(f"{idx}/type") == "Instruction":
                    continue
                shared = _sys.parse_cpulist(_read(f"{idx}/shared_cpu_list"))
            except OSError:
                continue
            if level > best_level:
                best_level, best = level, shared
        groups[tuple(sorted(best))] = None
    online = set(online_cpus())
    return sorted(([c for c in g if c in online] for g in groups), key=lambda g: g[0])


@dataclass(frozen=True)
class Topology:
    """Domains as CPU lists: ``domains[d]`` is domain d's CPUs (empty = not a domain)."""

    spec: str
    domains: tuple[tuple[int, ...], ...]
    cpu_domain: dict[int, int] = field(compare=False)

    @property
    def ndomains(self) -> int:
        return len(self.domains)

    def valid(self, domain: int) -> bool:
        return 0 <= domain < self.ndomains and bool(self.domains[domain])

    def domain_of_cpus(self, cpus) -> int | None:
        """The domain holding every CPU in ``cpus``, or None when they span domains."""
        doms = {self.cpu_domain.get(c) for c in cpus}
        if len(doms) == 1:
            (d,) = doms
            return d
        return None

    def as_dict(self) -> dict:
        return {"spec": self.spec, "domains": {str(d): list(c) for d, c in enumerate(self.domains) if c}}


def _from_groups(spec: str, groups: list[list[int]]) -> Topology:
    if len(groups) > MAX_DOMAINS:
        raise DomainSpecError(f"{len(groups)} domains, at most {MAX_DOMAINS} are supported")
    cpu_domain: dict[int, int] = {}
    for d, cpus in enumerate(groups):
        for c in cpus:
            if c in cpu_domain:
                raise DomainSpecError(f"CPU {c} is in domains {cpu_domain[c]} and {d}")
            cpu_domain[c] = d
    if not any(groups):
        raise DomainSpecError(f"domain spec {spec!r} gives no domain with a CPU")
    return Topology(spec, tuple(tuple(g) for g in groups), cpu_domain)


def parse(spec: str) -> Topology:
    """Build a topology from ``numa``, ``llc``, ``cpu`` or ``"0-1;2-3"``."""
    spec = spec.strip()
    if spec == "numa":
        nodes = numa_nodes()
        # A CPU offline now (hot-unplugged, SMT switched off) stays in its node's domain: the
        # cpu -> domain map is written once, and its packets must stay local when it is back.
        for cpu, node in offline_cpu_nodes().items():
            nodes[node] = sorted({*nodes.get(node, []), cpu})
        groups = [nodes.get(n, []) for n in range(max(n for n, c in nodes.items() if c) + 1)]
        return _from_groups(spec, groups)
    if spec == "llc":
        return _from_groups(spec, llc_groups())
    if spec == "cpu":
        online = online_cpus()
        return _from_groups(spec, [[c] if c in online else [] for c in range(max(online) + 1)])
    online = set(online_cpus())
    limit = possible_cpus()
    groups = []
    for part in spec.split(";"):
        try:
            cpus = _sys.parse_cpulist(part, limit)
        except OverflowError as e:
            raise DomainSpecError(
                f"domain spec {spec!r} names CPU {e.args[0]}: this machine's CPU ids are 0..{limit - 1}"
            ) from None
        except ValueError:
            raise DomainSpecError(
                f"domain spec {spec!r} does not parse: expected numa, llc, cpu or CPU lists like '0-1;2-3'"
            ) from None
        if not cpus:
            raise DomainSpecError(f"domain spec {spec!r} has an empty domain")
        offline = [c for c in cpus if c not in online]
        if offline:
            raise DomainSpecError(f"domain spec {spec!r} names CPUs that are not online: {offline}")
        groups.append(cpus)
    return _from_groups(spec, groups)


@contextlib.contextmanager
def pinned(cpu: int):
    """Run the block on one CPU (this thread), then restore the affinity.

    A client pinned this way has its loopback SYNs processed on that CPU: how
    tests, benchmarks and the demo steer deterministically on any machine.
    """
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def current_domain(topo: Topology) -> int | None:
    """The caller's domain, as FreeBSD's CURDOM.

    If the calling thread's CPU affinity lies inside one domain, that domain
    (the worker pinned itself there, so this stays true when it migrates);
    otherwise the domain of the CPU it runs on now. None when that CPU is in
    no domain.
    """
    d = topo.domain_of_cpus(os.sched_getaffinity(0))
    if d is not None:
        return d
    return topo.cpu_domain.get(_sys.sched_getcpu())


def _irq_cpus(irq: int) -> list[int]:
    for name in ("effective_affinity_list", "smp_affinity_list"):
        try:
            return _sys.parse_cpulist(_read(f"{PROC}/irq/{irq}/{name}"))
        except (OSError, ValueError):
            continue
    return []


def _irq_names() -> dict[int, str]:
    names = {}
    try:
        with open(f"{PROC}/interrupts") as f:
            ncpu = len(f.readline().split())
            for line in f:
                parts = line.split()
                if parts and parts[0].rstrip(":").isdigit():
                    names[int(parts[0].rstrip(":"))] = " ".join(parts[1 + ncpu :])
    except OSError:
        pass
    return names


def _mask_cpus(mask: str) -> list[int]:
    bits = int(mask.replace(",", "") or "0", 16)
    return [i for i in range(bits.bit_length()) if bits >> i & 1]


def interfaces() -> list[dict]:
    """Each network interface's RX queues, their IRQs, the CPUs those run on, and the nodes.

    A queue whose IRQ affinity (or RPS CPUs) spans NUMA nodes gets a warning:
    its packets are processed on several nodes, which defeats NUMA steering.
    """
    node_of = {c: n for n, cpus in numa_nodes().items() for c in cpus}
    irq_names = _irq_names()
    out = []
    for path in sorted(glob.glob(f"{SYS}/class/net/*")):
        ifname = os.path.basename(path)
        rxq = sorted(glob.glob(f"{path}/queues/rx-*"), key=lambda p: int(p.rsplit("-", 1)[1]))
        dev = os.path.realpath(f"{path}/device") if os.path.exists(f"{path}/device") else None
        irqs: list[int] = []
        for d in [dev, os.path.dirname(dev)] if dev else []:
            if os.path.isdir(f"{d}/msi_irqs"):
                irqs = sorted(int(i) for i in os.listdir(f"{d}/msi_irqs"))
                break
        # queue IRQs: names mentioning rx / TxRx / comp / the interface, not config or events
        qirqs = [
            i
            for i in irqs
            if re.search(r"rx|comp|input|" + re.escape(ifname), irq_names.get(i, ""), re.I)
            and not re.search(r"config|event|async|ctrl", irq_names.get(i, ""), re.I)
        ]
        queues = []
        for n, q in enumerate(rxq):
            qi = {"queue": os.path.basename(q)}
            if n < len(qirqs):
                cpus = _irq_cpus(qirqs[n])
                qi.update(irq=qirqs[n], irq_name=irq_names.get(qirqs[n], ""), cpus=cpus)
            try:
                rps = _mask_cpus(_read(f"{q}/rps_cpus"))
            except OSError:
                rps = []
            if rps:
                qi["rps_cpus"] = rps
            cpus = rps or qi.get("cpus", [])
            nodes = sorted({node_of[c] for c in cpus if c in node_of})
            qi["nodes"] = nodes
            if len(nodes) > 1:
                qi["warning"] = f"processed on CPUs of nodes {nodes}: packets of one queue reach several domains"
            queues.append(qi)
        out.append({"name": ifname, "device": os.path.basename(dev) if dev else None, "rx_queues": queues})
    return out


def report() -> dict:
    """Everything ``numareuse topology`` shows."""
    nodes = numa_nodes()
    offline: dict[int, list[int]] = {}
    for cpu, node in sorted(offline_cpu_nodes().items()):
        offline.setdefault(node, []).append(cpu)
    llc = llc_groups()
    llc_of = {c: i for i, g in enumerate(llc) for c in g}
    node_of = {c: n for n, cpus in nodes.items() for c in cpus}
    return {
        "cpus": [{"cpu": c, "node": node_of.get(c), "llc": llc_of.get(c)} for c in online_cpus()],
        "nodes": [
            {"node": n, "cpus": cpus, "offline_cpus": offline.get(n, []), "memory_only": not cpus and n not in offline}
            for n, cpus in nodes.items()
        ],
        "llc_groups": llc,
        "interfaces": interfaces(),
    }
