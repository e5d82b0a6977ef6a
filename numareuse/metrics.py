"""Prometheus metrics of the pinned groups: a prometheus_client Collector and its HTTP server.

Every scrape opens the groups of this network namespace under the shared lock, reads the
kernel maps and closes them again, as ``numareuse stats`` does; nothing is cached. Every
series carries ``group``, the name ``numareuse status`` prints (``tcp4 127.0.0.1:8080``,
``udp6 [::1]:53``): one stable label that says protocol, family, address and port.

    numareuse_selections_total{group,outcome,cpu,domain}   counter  outcome local|wildcard|remote|fallback
    numareuse_migrations_total{group,outcome,cpu,domain}   counter  a closing listener's connections, same outcomes
    numareuse_migrations_unowned_total{group,cpu,domain}   counter  of those, listener had no region
    numareuse_empty_slots_skipped_total{group,cpu,domain}  counter  slots of closed sockets probed past
    numareuse_locality_ratio{group}                        gauge    local / all selections (once there is one)
    numareuse_registered_sockets{group,domain,state}       gauge    state live|closed, domain 0..n-1|wildcard
    numareuse_program_info{group,id,domains}               info     the attached program's id and domain spec
    numareuse_group_readable{group}                        gauge    0 when the pinned state cannot be read
    numareuse_watch_reconciles_total                       counter  with a ReconcileStats only
    numareuse_watch_reconcile_errors_total                 counter
    numareuse_watch_last_success_timestamp_seconds         gauge    unix time, once a pass succeeded

``cpu`` is the CPU that processed the packet (the program's per-CPU counters) and
``domain`` that CPU's domain in the group's topology, ``none`` for a CPU in no domain.
"""

from __future__ import annotations

import dataclasses
import errno
import time

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector as _Collector

from . import _layout, control
from .errors import NumaReuseError, StateError
from .selector import WILDCARD, Selector
from .state import Store


def _series(counter: str) -> tuple[str, str | None]:
    if counter == "empty_skipped":
        return "empty_skipped", None
    if counter == "migrated_unowned":  # overlaps the migrated_* outcomes: a series of its own
        return "migrations_unowned", None
    if counter.startswith("migrate"):
        return "migrations", counter.split("_", 1)[-1]
    return "selections", counter


# The one table from kernel counters to series: counter name -> (family, outcome label).
SERIES: dict[str, tuple[str, str | None]] = {c: _series(c) for c in _layout.COUNTERS}

COUNTER_FAMILIES = {
    "selections": (
        "numareuse_selections",
        "Sockets selected for new connections (datagrams), by outcome: local = a socket of the packet's "
        "domain, wildcard = that domain had none, remote = another domain's (no wildcard socket either), "
        "fallback = none at all (the kernel's hash).",
        ["group", "outcome", "cpu", "domain"],
    ),
    "migrations": (
        "numareuse_migrations",
        "Connections of a closing listener placed by the program, by outcome (local = the listener's own domain).",
        ["group", "outcome", "cpu", "domain"],
    ),
    "migrations_unowned": (
        "numareuse_migrations_unowned",
        "Migrated connections whose closing listener had no region (drained or never registered), "
        "placed by the CPU's domain; also counted in numareuse_migrations_total.",
        ["group", "cpu", "domain"],
    ),
    "empty_skipped": (
        "numareuse_empty_slots_skipped",
        "Slots of closed sockets the program probed past.",
        ["group", "cpu", "domain"],
    ),
}


@dataclasses.dataclass
class ReconcileStats:
    """What a watcher did, for its metrics: passes run, passes that failed, unix time of the last good one."""

    reconciles: int = 0
    errors: int = 0
    last_success: float | None = None

    def record(self, ok: bool) -> None:
        """Count one reconcile pass."""
        self.reconciles += 1
        if ok:
            self.last_success = time.time()
        else:
            self.errors += 1


class Collector(_Collector):
    """The pinned groups of this network namespace as Prometheus series, read at each scrape.

    ``reconcile``: the watcher's ReconcileStats; its series appear only when given.
    """

    def __init__(self, reconcile: ReconcileStats | None = None):
        self.reconcile = reconcile

    def _families(self) -> dict:
        used = {family for family, _ in SERIES.values()}  # no migrations family on a layout without them
        f = {
            k: CounterMetricFamily(name, doc, labels=lab)
            for k, (name, doc, lab) in COUNTER_FAMILIES.items()
            if k in used
        }
        f["locality"] = GaugeMetricFamily(
            "numareuse_locality_ratio", "Share of selections served on the packet's domain.", labels=["group"]
        )
        f["sockets"] = GaugeMetricFamily(
            "numareuse_registered_sockets",
            "Sockets registered per domain; closed = closed but still in a slot until the next sweep.",
            labels=["group", "domain", "state"],
        )
        f["program"] = InfoMetricFamily("numareuse_program", "The group's program.", labels=["group"])
        f["readable"] = GaugeMetricFamily(
            "numareuse_group_readable", "1 when the group's pinned state was read, else 0.", labels=["group"]
        )
        if self.reconcile is not None:
            f["reconciles"] = CounterMetricFamily("numareuse_watch_reconciles", "Reconcile passes run.")
            f["errors"] = CounterMetricFamily("numareuse_watch_reconcile_errors", "Reconcile passes that failed.")
            f["last_success"] = GaugeMetricFamily(
                "numareuse_watch_last_success_timestamp_seconds", "Unix time of the last successful reconcile."
            )
        return f

    def describe(self):
        # the names only: registering the collector must not read the kernel maps
        return list(self._families().values())

    def collect(self):
        f = self._families()
        store = Store()
        with store.locked(shared=True):
            for name in store.groups():
                label = str(control.group_of(store, name))
                try:
                    sel = store.open(name)
                except StateError:
                    f["readable"].add_metric([label], 0)
                    continue
                try:
                    self._group(sel, label, store.info(name).get("spec", "pinned"), f)
                finally:
                    sel.close()
                f["readable"].add_metric([label], 1)
        if self.reconcile is not None:
            r = self.reconcile
            f["reconciles"].add_metric([], r.reconciles)
            f["errors"].add_metric([], r.errors)
            if r.last_success is None:
                del f["last_success"]
            else:
                f["last_success"].add_metric([], r.last_success)
        return list(f.values())

    @staticmethod
    def _group(sel: Selector, label: str, spec: str, f: dict) -> None:
        topo = sel.topology
        sums: dict[str, int] = {}
        for cpu, counters in sorted(sel.cpu_stats().items()):
            if cpu not in topo.cpu_domain and not any(counters.values()):
                continue  # a possible CPU in no domain that never ran the program
            domain = str(topo.cpu_domain.get(cpu, "none"))
            for counter, value in counters.items():
                family, outcome = SERIES[counter]
                lab = [label, str(cpu), domain] if outcome is None else [label, outcome, str(cpu), domain]
                f[family].add_metric(lab, value)
                if family == "selections":
                    sums[outcome] = sums.get(outcome, 0) + value
        total = sum(sums.values())
        if total:
            f["locality"].add_metric([label], sums.get("local", 0) / total)
        domains = [*(d for d in range(topo.ndomains) if topo.valid(d)), WILDCARD]
        sockets = {(d, state): 0 for d in domains for state in ("live", "closed")}  # zeros too
        for r in sel.registrations():
            key = (r["domain"], "live" if r["live"] else "closed")
            sockets[key] = sockets.get(key, 0) + 1
        for (d, state), n in sockets.items():
            f["sockets"].add_metric([label, "wildcard" if d == WILDCARD else str(d), state], n)
        f["program"].add_metric([label], {"id": str(sel.program_info()["id"]), "domains": spec})


def registry(collector: Collector | None = None) -> CollectorRegistry:
    """A registry holding only ``collector`` (a new Collector by default): no process metrics."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(Collector() if collector is None else collector)
    return reg


def render(collector: Collector | None = None) -> str:
    """The Prometheus text format of one scrape (``numareuse stats --prometheus``)."""
    return generate_latest(registry(collector)).decode()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every IPv4 address) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address needs brackets
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise NumaReuseError(
            f"metrics address {text!r} is not HOST:PORT (such as 127.0.0.1:9100, [::1]:9100 or :9100)",
            errno=errno.EINVAL,
        )
    return host or "0.0.0.0", int(port)


def serve(host: str, port: int, collector: Collector):
    """Serve ``collector`` at http://host:port/metrics in a daemon thread; returns the server.

    prometheus_client's own server over a registry of this collector only. Stop it with
    ``server.shutdown(); server.server_close()``; ``server.server_port`` is the port bound
    (``port`` 0 picks a free one).
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry(collector))
    except OSError as e:  # socket.gaierror too: a name that does not resolve
        cause = e.strerror or str(e)
        if e.errno == errno.EADDRNOTAVAIL:
            cause += " (not an address of this host)"
        code = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EADDRNOTAVAIL
        raise NumaReuseError(f"cannot serve metrics on {where}: {cause}", errno=code) from None
    return server


def serve_watch(host: str, port: int, health):
    """Serve the groups' series and ``health`` (numareuse.watch.Health: reconciles, errors, last_success)
    on HOST:PORT in a daemon thread, for ``numareuse watch --metrics``."""
    return serve(host, port, Collector(reconcile=health))
