"""``numareuse watch`` on real NUMA nodes: a reload of nginx, and a CPU offline and back online.

Domains are the real nodes (``--domains numa``); nginx's workers are pinned
one per CPU with worker_cpu_affinity, and clients pinned to each CPU must be
served by the workers of that CPU's node, by every one of them.
"""

from __future__ import annotations

import os

import pytest
from conftest import need
from test_cli import env  # noqa: F401  (fixture)
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
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)


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
        # the kernel broke the worker's affinity (it could run on the victim only): it now
        # spans the nodes, so a fresh attach would put its socket in the wildcard
        aff = os.sched_getaffinity(pid)
        assert victim not in aff and len({dom[c] for c in aff}) > 1, aff
        wait_for("its socket in the wildcard", lambda: registered(srv.port)[cookie]["domain"] == "wildcard")
        others = [c for c in every if c != victim]
        check_clients(
            srv, cpus=others, serving=lambda cpu: {p for p, c in srv.workers.items() if dom[c] == dom[cpu] and p != pid}
        )
    os.sched_setaffinity(pid, {victim})  # as a reload or an operator would pin it again
    wait_for("the worker back in its node", steered(srv, dom.get), deadline=DEADLINE)
    check_clients(srv, cpus=every, serving=lambda cpu: {p for p, c in srv.workers.items() if dom[c] == dom[cpu]})
    w.wait_log(rf"~ sk:{cookie} {dom[victim]} -> wildcard")
    w.wait_log(rf"~ sk:{cookie} wildcard -> {dom[victim]}")
