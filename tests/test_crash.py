"""Crash injection: the CLI is killed with SIGKILL at every step that leaves partial state behind.

For each step (numareuse._crash.STEPS) a real `numareuse` process is killed
there (NUMAREUSE_CRASH_AT), while pinned clients keep connecting. Then:
every connection attempt made meanwhile was accepted; the next `attach`
converges (every live socket registered in its worker's domain, exact
steering); `status` reads it; `detach` removes everything.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys

import pytest
from test_cli import Server, ask, cli, env, pinned_groups, server  # noqa: F401  (fixtures)
from test_upgrade import Load
from test_watch import watcher  # noqa: F401  (fixture)

from numareuse import _crash, _sys


def crashing(step: str, *args) -> None:
    """Run `numareuse ARGS` with NUMAREUSE_CRASH_AT=step: it must reach the step and die there."""
    environ = dict(os.environ, NUMAREUSE_CRASH_AT=step)
    r = subprocess.run([sys.executable, "-m", "numareuse.cli.main", *map(str, args)], env=environ, capture_output=True)
    assert r.returncode == -signal.SIGKILL, f"{step} was not reached: {r.returncode} {r.stderr.decode()}"


def _tamper_program_hash(bpffs) -> None:
    netns = os.listdir(os.path.join(bpffs, "numareuse"))[0]
    (name,) = [n for n in os.listdir(os.path.join(bpffs, "numareuse", netns)) if not n.startswith("tmp_")]
    meta = _sys.obj_get(os.path.join(bpffs, "numareuse", netns, name, "meta"))
    try:
        _sys.map_update(meta, 6, struct.pack("=Q", 12345))
    finally:
        os.close(meta)


def _setup(step: str, srv, bpffs) -> list:
    """Bring the server to the state the step needs; returns the args of the command that crashes there."""
    port = srv.port
    if step in ("insert.put", "insert.counted", "attach.staged", "attach.attached"):
        return ["attach", "-p", port, "-d", "cpu", "-q"]
    cli("attach", "-p", port, "-d", "cpu", "-q")
    if step in ("move.vacated", "compact.moved"):
        os.sched_setaffinity(srv.pids[0], {1})  # worker 0 moves to domain 1: its slot empties, the tail fills it
        return ["attach", "-p", port, "-d", "cpu", "-q"]
    if step == "replace.cleared":
        return ["attach", "-p", port, "-d", "cpu", "--capacity", 8, "-q"]
    if step == "swap.loaded":
        _tamper_program_hash(bpffs)
        return ["attach", "-p", port, "-d", "cpu", "-q"]
    if step == "detach.detached":
        return ["detach", "-p", port]
    raise AssertionError(f"no set-up for {step}")


@pytest.mark.parametrize("step", _crash.STEPS)
def test_a_crash_at_every_step_converges_and_loses_no_connection(env, server, step):  # noqa: F811
    srv = server("--workers", 4, "--cpus", "0,0,1,1")
    args = _setup(step, srv, env)
    with Load(srv.port) as load:
        crashing(step, *args)
        if args[0] == "detach":
            cli("detach", "-p", srv.port)  # finishes the interrupted detach
            assert pinned_groups(env) == []
            cli("attach", "-p", srv.port, "-d", "cpu", "-q")
        else:
            cli(*args)  # the same command again converges
    assert_converged(srv, load, [1, 0, 1, 1] if step in ("move.vacated", "compact.moved") else [0, 0, 1, 1])
    cli("detach", "-p", srv.port)
    assert pinned_groups(env) == []


def assert_converged(srv, load, want: list[int]) -> None:
    """No connect failed; every live socket is registered, worker i's in domain want[i]; steering is exact."""
    assert load.failed == [], load.failed[:3]
    assert load.ok > 0
    (g,) = json.loads(cli("status", "--json").stdout)
    socks = [s for s in g["sockets"] if s["domain"] != "drained"]
    assert len(socks) == 4 and all(s["live"] for s in socks), socks
    by_pid = {o["pid"]: s["domain"] for s in socks for o in s["owners"]}
    assert [by_pid[p] for p in srv.pids] == want
    for cpu in (0, 1):
        got = ask(cpu, srv.port)
        assert all(want[i] == cpu for i in got), (cpu, got)  # every answer from a worker of the client's domain


@pytest.mark.parametrize("step", ("insert.put", "insert.counted", "attach.staged", "attach.attached"))
def test_a_watcher_whose_attach_is_killed_at_a_step_retries_and_converges(env, server, watcher, tmp_path, step):  # noqa: F811
    """The steps of a first attach, in the child a watcher forks for it: the child is killed once
    (NUMAREUSE_CRASH_ONCE), the watcher logs it, stays up, and its retry steers every socket."""
    srv = server("--workers", 4, "--cpus", "0,0,1,1")
    once = tmp_path / "crashed"
    crash = {"NUMAREUSE_CRASH_AT": step, "NUMAREUSE_CRASH_ONCE": str(once)}
    w = watcher("--port", srv.port, "--domains", "cpu", extra_env=crash)
    with Load(srv.port) as load:
        w.wait_log(r"error: the attach process died \(signal 9\) without a report")
        w.wait_log(r", program \d+")  # the retry attached
    assert once.exists()
    assert_converged(srv, load, [0, 0, 1, 1])
    assert w.stop() == 0, w.log  # SIGTERM: a clean exit, the steering stays
    cli("detach", "-p", srv.port)
    assert pinned_groups(env) == []
