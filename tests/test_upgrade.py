"""Live upgrades: layout-1 state left by the previous release, and a changed program, swapped under load.

The layout-1 state is made by the real previous release, taken from this
repository's history, so the test upgrades exactly what users have pinned.
Both upgrades load the new program over the kept maps and let the kernel
swap it atomically: no connection may fail and none may fall to the kernel's
hash (the ``fallback`` counter stays 0), and the program id changes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading

import pytest
from conftest import LOOPBACK, pinned
from test_cli import Server, ask, cli, env, server  # noqa: F401  (fixtures)

from numareuse import _sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAST_LAYOUT_1 = "51af523"  # the last commit whose numareuse pinned layout version 1


@pytest.fixture
def old_release(tmp_path):
    """The layout-1 numareuse as an importable tree (its package maps bpf/ and cli/ into numareuse/)."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("needs this repository's git history (the previous release)")
    tree = tmp_path / "old"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", REPO, "archive", LAST_LAYOUT_1, "numareuse", "bpf", "cli"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    os.symlink("../bpf", tree / "numareuse" / "bpf")
    os.symlink("../cli", tree / "numareuse" / "cli")
    return tree


def old_cli(tree, *args):
    environ = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "numareuse.cli.main", *map(str, args)]
    r = subprocess.run(cmd, env=environ, cwd=tree, capture_output=True)  # cwd: -m puts it first on sys.path
    assert r.returncode == 0, r.stderr.decode()
    return r


class Load:
    """Pinned clients connecting in a loop until stopped; counts every failed connect."""

    def __init__(self, port: int):
        self.port, self.ok, self.failed = port, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(cpu,)) for cpu in (0, 1)]

    def _run(self, cpu: int) -> None:
        with pinned(cpu):
            while not self._stop.is_set():
                try:
                    c = socket.create_connection((LOOPBACK[socket.AF_INET], self.port), timeout=5)
                    c.recv(64)
                    c.close()
                    self.ok += 1
                except OSError as e:
                    self.failed.append(repr(e))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


def _status(port) -> dict:
    (g,) = [g for g in json.loads(cli("status", "--json").stdout) if g["group"]["port"] == port]
    return g


def _counters(port) -> dict:
    (g,) = [g for g in json.loads(cli("stats", "--json").stdout) if g["group"]["port"] == port]
    return g["counters"]


def test_layout_1_state_is_upgraded_in_place_under_load(env, server, old_release):  # noqa: F811
    srv = server("--workers", 4, "--cpus", "0,0,1,1")
    old_cli(old_release, "attach", "-p", srv.port, "-d", "cpu", "-q")
    before = _status(srv.port)
    assert before["layout"] == 1
    regs = {s["cookie"]: s["domain"] for s in before["sockets"]}
    with Load(srv.port) as load:
        r = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "--json").stdout)
    assert load.failed == [] and load.ok > 0
    assert any("layout 1 upgraded" in c for c in r["changes"]), r["changes"]
    after = _status(srv.port)
    assert after["layout"] == 2 and after["migration"] is True
    assert after["program_id"] != before["program_id"]
    assert {s["cookie"]: s["domain"] for s in after["sockets"]} == regs  # every socket kept its domain
    c = _counters(srv.port)
    assert c["fallback"] == 0, c  # no connection was left to the kernel's hash during the swap
    for cpu, mine in ((0, {0, 1}), (1, {2, 3})):
        assert set(ask(cpu, srv.port)) == mine
    assert json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "--json").stdout)["action"] == "unchanged"
    cli("detach", "-p", srv.port)


def test_a_changed_program_is_swapped_over_the_same_maps(env, server):  # noqa: F811
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    before = _status(srv.port)
    netns = os.listdir(os.path.join(env, "numareuse"))[0]
    (name,) = os.listdir(os.path.join(env, "numareuse", netns))
    meta = _sys.obj_get(os.path.join(env, "numareuse", netns, name, "meta"))
    try:  # as if an older numareuse had loaded another program: its hash differs
        _sys.map_update(meta, 6, struct.pack("=Q", 12345))
    finally:
        os.close(meta)
    with Load(srv.port) as load:
        r = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "--json").stdout)
    assert load.failed == [] and load.ok > 0
    assert any("program upgraded" in c for c in r["changes"]), r["changes"]
    after = _status(srv.port)
    assert after["program_id"] != before["program_id"]
    assert {s["cookie"] for s in after["sockets"]} == {s["cookie"] for s in before["sockets"]}
    assert _counters(srv.port)["fallback"] == 0
    assert set(ask(0, srv.port)) == {0} and set(ask(1, srv.port)) == {1}
    cli("detach", "-p", srv.port)


def _old_counters(bpffs) -> int:
    """An fd of the pinned counters map of the (one) group, to read it after its pins are gone."""
    netns = os.listdir(os.path.join(bpffs, "numareuse"))[0]
    (name,) = os.listdir(os.path.join(bpffs, "numareuse", netns))
    return _sys.obj_get(os.path.join(bpffs, "numareuse", netns, name, "counters"))


def _fallback(counters_fd: int) -> int:
    ncpus = _sys.possible_cpus()
    raw = _sys.map_lookup(counters_fd, struct.pack("=I", 2), 8 * ncpus)  # index 2: fallback
    return sum(struct.unpack(f"={ncpus}Q", raw))


@pytest.mark.parametrize("change", [["--capacity", 8], ["-d", "0-1"]], ids=["capacity", "spec"])
def test_a_domain_spec_change_under_load_leaves_nothing_to_the_hash(env, server, change):  # noqa: F811
    """New maps are needed (a socket fits in one sockarray), but the sockets move one at a time."""
    srv = server("--workers", 4, "--cpus", "0,0,1,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    old = _old_counters(env)
    try:
        with Load(srv.port) as load:
            r = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", *change, "--json").stdout)
        assert r["action"] == "replaced"
        assert load.failed == [] and load.ok > 0
        assert _fallback(old) == 0  # the old program never left a connection to the kernel's hash
    finally:
        os.close(old)
    assert _counters(srv.port)["fallback"] == 0  # nor did the new one
    cli("detach", "-p", srv.port)
