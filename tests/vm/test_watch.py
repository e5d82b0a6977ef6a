"""``numareuse watch`` on real NUMA nodes: a reload of nginx, and a CPU offline and back online.

Domains are the real nodes (``--domains numa``); nginx's workers are pinned
one per CPU with worker_cpu_affinity, and clients pinned to each CPU must be
served by the workers of that CPU's node, by every one of them.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import need
from test_cli import cli, env  # noqa: F401  (fixture)
from test_watch import NGINX, Nginx, Watcher, check_clients, registered, steered, wait_for

from .test_layouts import offline, victim_cpu

DEADLINE = 90.0  # s: an attach builds a selector with clang under emulation
pytestmark = pytest.mark.timeout(400)


def mask(cpu: int, width: int) -> str:
    """nginx's worker_cpu_affinity mask for one CPU: '0100' is CPU 2."""
    return "".join("1" if c == cpu else "0" for c in reversed(range(width)))


@pytest.fixture
def vm_nginx(tmp_path):
    need(os.path.exists(NGINX), "nginx (Debian nginx-light) is not installed")
    made = []

    def start(cpus):
        width = max(cpus) + 1
        n = Nginx(tmp_path / "nginx", None, len(cpus), affinity=" ".join(mask(c, width) for c in cpus))
        n.affinity = lambda cs: " ".join(mask(c, max(cs) + 1) for c in cs)
        made.append(n)
        return n

    (tmp_path / "nginx").mkdir()
    yield start
    for n in made:
        n.stop()


@pytest.fixture
def vm_watcher(env, tmp_path):  # noqa: F811
    made = []

    def start(*args):
        w = Watcher(tmp_path, *args)
        made.append(w)
        return w

    yield start
    for w in made:
        print(f"watcher {w.proc.pid} log:", *w.log, sep="\n  ")  # shown when the test failed
        w.kill()


def node_of(nodes: dict[int, list[int]]) -> dict[int, int]:
    return {c: n for n, cpus in nodes.items() for c in cpus}


def test_watch_follows_a_reload_across_nodes(nodes, vm_nginx, vm_watcher):
    dom = node_of(nodes)
    every = sorted(dom)
    srv = vm_nginx([cpus[0] for cpus in nodes.values()])  # one worker per node
    w = vm_watcher("--port", srv.port, "--domains", "numa")
    wait_for("one worker per node steered", steered(srv, dom.get), deadline=DEADLINE)

    def serving(cpu):
        return {pid for pid, c in srv.workers.items() if dom[c] == dom[cpu]}

    check_clients(srv, cpus=every, serving=serving)
    srv.reload(len(every), srv.affinity(every))  # one worker per CPU: new sockets, new owners
    regs = wait_for("a worker per CPU steered", steered(srv, dom.get), deadline=DEADLINE)
    assert sorted(r["domain"] for r in regs.values()) == sorted(dom[c] for c in every)
    check_clients(srv, cpus=every, serving=serving)
    assert not [ln for ln in w.log if "error" in ln], w.log


def test_watch_follows_a_cpu_offline_and_online(nodes, vm_nginx, vm_watcher):
    dom = node_of(nodes)
    every = sorted(dom)
    victim = victim_cpu(nodes)
    srv = vm_nginx(every)
    w = vm_watcher("--port", srv.port, "--domains", "numa")
    regs = wait_for("a worker per CPU steered", steered(srv, dom.get), deadline=DEADLINE)
    (pid,) = srv.on(victim)
    (cookie,) = [c for c, r in regs.items() if r["owners"][0]["pid"] == pid]
    with offline(victim):
        # the worker could run on the victim only: asleep, its affinity reads empty (its mask
        # holds no active CPU); once woken, the kernel has widened it to span the nodes.
        # Either way a fresh attach puts its socket in the wildcard.
        aff = os.sched_getaffinity(pid)
        assert victim not in aff and (not aff or len({dom[c] for c in aff}) > 1), aff
        wait_for("its socket in the wildcard", lambda: registered(srv.port)[cookie]["domain"] == "wildcard")
        others = [c for c in every if c != victim]
        check_clients(
            srv, cpus=others, serving=lambda cpu: {p for p, c in srv.workers.items() if dom[c] == dom[cpu] and p != pid}
        )
    os.sched_setaffinity(pid, {victim})  # as a reload or an operator would pin it again
    wait_for("the worker back in its node", steered(srv, dom.get), deadline=DEADLINE)
    check_clients(srv, cpus=every, serving=lambda cpu: {p for p, c in srv.workers.items() if dom[c] == dom[cpu]})
    w.wait_log(rf"~ sk:{cookie} {dom[victim]} -> wildcard", deadline=DEADLINE)
    w.wait_log(rf"~ sk:{cookie} wildcard -> {dom[victim]}", deadline=DEADLINE)


def as_fresh_attach(srv, domain_of_cpu):
    """Registrations as a fresh attach would make them now: each socket in the domain holding all
    of its owner's CPUs (from its affinity now), else the wildcard."""

    def ok():
        regs = registered(srv.port)
        if len(regs) != len(srv.workers) or not all(r["live"] and len(r["owners"]) == 1 for r in regs.values()):
            return None
        for r in regs.values():
            doms = {domain_of_cpu(c) for c in os.sched_getaffinity(r["owners"][0]["pid"])}
            want = doms.pop() if len(doms) == 1 else "wildcard"
            if r["domain"] != want:
                return None
        return regs

    return ok


def test_watch_rebuilds_a_cpu_spec_selector_when_a_cpu_goes(nodes, vm_nginx, vm_watcher):
    every = sorted(c for cpus in nodes.values() for c in cpus)
    victim = victim_cpu(nodes)
    srv = vm_nginx(every)
    w = vm_watcher("--port", srv.port, "--domains", "cpu")
    wait_for("a worker per CPU steered", steered(srv), deadline=DEADLINE)
    (pid,) = srv.on(victim)
    with offline(victim):
        # the spec "cpu" now gives other domains: a new selector is built and swapped in
        w.wait_log(rf"tcp4 \*:{srv.port}: replaced", deadline=DEADLINE)
        wait_for("registrations of a fresh attach", as_fresh_attach(srv, lambda c: c), deadline=DEADLINE)
        (g,) = [g for g in json.loads(cli("status", "--json").stdout) if g["group"]["port"] == srv.port]
        assert sorted(map(int, g["domains"])) == [c for c in every if c != victim]
        others = [c for c in every if c != victim]
        check_clients(srv, cpus=others)
    os.sched_setaffinity(pid, {victim})
    wait_for("every worker on its CPU's domain again", steered(srv), deadline=DEADLINE)
    w.wait_log(rf"tcp4 \*:{srv.port}: replaced", count=2, deadline=DEADLINE)
    check_clients(srv, cpus=every)


def test_watch_waits_while_an_explicit_spec_names_an_offline_cpu(nodes, vm_nginx, vm_watcher):
    dom = node_of(nodes)
    every = sorted(dom)
    victim = victim_cpu(nodes)
    spec = ";".join(",".join(map(str, cpus)) for _, cpus in sorted(nodes.items()))
    srv = vm_nginx(every)
    w = vm_watcher("--port", srv.port, "--domains", spec)
    before = wait_for("a worker per CPU steered", steered(srv, dom.get), deadline=DEADLINE)
    (pid,) = srv.on(victim)

    def mates(cpu):
        return {p for p, c in srv.workers.items() if dom[c] == dom[cpu]}

    with offline(victim):
        w.wait_log(rf"waiting: domain spec '{spec}' names CPUs that are not online: \[{victim}\]", deadline=DEADLINE)
        # the attached selector stays as it was and steers on
        assert {c: r["domain"] for c, r in registered(srv.port).items()} == {c: r["domain"] for c, r in before.items()}
        check_clients(srv, cpus=[c for c in every if c != victim], serving=mates)
    # back online: caught up with what a fresh attach computes now (the kernel may have widened
    # the victim worker's affinity when it woke while its CPU was away)
    wait_for("caught up", as_fresh_attach(srv, dom.get), deadline=DEADLINE)
    os.sched_setaffinity(pid, {victim})
    wait_for("every worker on its node again", steered(srv, dom.get), deadline=DEADLINE)
    check_clients(srv, cpus=every, serving=mates)
    assert len([ln for ln in w.log if "waiting: domain spec" in ln]) == 1, w.log
