"""Fuzzing with hypothesis: bad input is refused cleanly, never a traceback, nothing changed.

Three surfaces: the domain-spec parser, every CLI command's arguments, and the
pre-fork master's control socket (what a hostile worker can send). Examples
are bounded for ``make test`` (NUMAREUSE_FUZZ_EXAMPLES, default below; the
master gets a fifth of them, it forks real processes); raise it for a longer
hunt: ``NUMAREUSE_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import types

import pytest
from click.testing import CliRunner
from conftest import _BPF_PROBLEM, need
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prefork_client import Server, control_socket_of, http_get

from numareuse import Topology, _sys, control, topology
from numareuse.errors import DomainSpecError

EXAMPLES = int(os.environ.get("NUMAREUSE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the tree; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
POSSIBLE = _sys.possible_cpus()
ONLINE = set(topology.online_cpus())

# -- the domain-spec parser ------------------------------------------------------

# CPU ids up to a few thousand: past the possible CPUs, yet cheap to expand today
cpu_id = st.integers(min_value=0, max_value=4200) | st.integers(min_value=0, max_value=POSSIBLE + 1)
cpu_item = cpu_id.map(str) | st.tuples(cpu_id, cpu_id).map(lambda r: f"{r[0]}-{r[1]}")
junk = st.sampled_from(["", " ", "-", "--", ",", ";", "x", "0x1", "1_0", "-1", "+1", "\t", "\n", "\u0661", "1e3"])
domain_part = st.lists(cpu_item | junk, min_size=0, max_size=4).map(",".join)
structured_spec = st.lists(domain_part, min_size=1, max_size=5).map(";".join)
named_spec = st.sampled_from(["numa", "llc", "cpu", " numa ", "NUMA", "cpus", "numa;llc"])
domain_spec = structured_spec | named_spec | st.text(max_size=16)


def _no_huge_numbers(text: str) -> str:
    """Digit runs past 5 digits cut down: a range like 0-99999999 expands in memory today."""
    return re.sub(r"\d{6,}", "99999", text)


@FUZZ
@given(spec=domain_spec.map(_no_huge_numbers))
@example(spec="0;1")
@example(spec=f"0-{POSSIBLE}")
@example(spec=";;")
def test_domain_spec_parses_or_is_refused(spec):
    try:
        topo = topology.parse(spec)
    except DomainSpecError as e:
        assert str(e) and "\n" not in str(e), repr(e)  # one line for the CLI's "Error: ..."
        return
    assert isinstance(topo, Topology)
    cpus = [c for d in topo.domains for c in d]
    assert len(cpus) == len(set(cpus)), f"{spec!r}: a CPU in two domains: {topo.domains}"
    assert all(0 <= c < POSSIBLE for c in cpus), f"{spec!r}: CPU ids past the possible CPUs: {topo.domains}"
    assert any(topo.domains), f"{spec!r}: no domain with a CPU"
    if spec.strip() not in ("numa", "llc", "cpu"):
        assert set(cpus) <= ONLINE and topo.ndomains == len(spec.split(";"))


_GIANT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: a spec must not need more
from numareuse import topology
from numareuse.errors import DomainSpecError
try:
    topology.parse(sys.argv[1])
except DomainSpecError as e:
    print("DomainSpecError", e)
"""


@pytest.mark.parametrize("spec", ["0-99999999", "99999999", "0;4000000000-4000000001"])
def test_cpu_ids_past_the_possible_cpus_are_refused_before_anything_is_built(spec):
    """Today `--domains 0-99999999` expands 10^8 CPU ids (GBs); run under a 1 GiB address-space limit."""
    r = subprocess.run([sys.executable, "-c", _GIANT, spec], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("DomainSpecError"), (r.returncode, r.stdout, r.stderr[-300:])


# -- the CLI ---------------------------------------------------------------------

COMMANDS = ["attach", "detach", "status", "stats", "topology"]
OPTIONS = [
    "--port", "-p", "--address", "-a", "--udp", "--ipv6", "--domains", "-d", "--capacity", "--json",
    "--progress", "--quiet", "-P", "-q", "--prometheus", "--watch", "--count", "--help", "-h", "--bogus", "--",
]  # fmt: skip
ADDRESSES = ["127.0.0.1", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "256.0.0.1", "zz", "127.0.0.1%lo", ""]
NUMBERS = ["0", "1", "2", "-1", "0.1", "0.05", "65535", "65536", "1024", "1025", "99999", "nan", "inf", "1e9", "x"]


@pytest.fixture(scope="module")
def quiet_ports():
    """A TCP and a UDP port where nothing listens, held (bound, not listening, no SO_REUSEPORT) for the module."""
    while True:
        tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        tcp.bind(("::", 0))  # dual-stack: no one else can listen on this port, v4 or v6
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            udp.bind(("::", tcp.getsockname()[1]))
            break
        except OSError:
            tcp.close()
            udp.close()
    yield tcp.getsockname()[1]
    tcp.close()
    udp.close()


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, quiet_ports):
    """A private bpffs directory and run directory; whatever port a command names, it acts on the quiet one."""
    if _BPF_PROBLEM:
        need(False, _BPF_PROBLEM)
    tmp = tmp_path_factory.mktemp("fuzzcli")
    bpffs = tmp / "bpffs"
    bpffs.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("NUMAREUSE_BPFFS", str(bpffs))
    mp.setenv("NUMAREUSE_RUNDIR", str(tmp / "run"))
    # a fuzzed --port must never reach another engineer's server: control acts on the quiet port
    for name in ("attach", "detach"):
        real = getattr(control, name)
        mp.setattr(control, name, lambda port, *a, _real=real, **kw: _real(quiet_ports, *a, **kw))
    yield bpffs
    mp.undo()
    pinned = [os.path.join(r, f) for r, _, fs in os.walk(bpffs / "numareuse") for f in fs]
    subprocess.run(["umount", str(bpffs)], capture_output=True)
    assert not pinned, f"a command left pinned objects: {pinned}"


def _interrupting_sleep():
    """``time`` for the CLI module whose sleep is a Ctrl-C at the third call: ``stats --watch`` ends."""
    calls = []

    def sleep(_seconds):
        calls.append(1)
        if len(calls) >= 3:
            raise KeyboardInterrupt

    return types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep)


token = (
    st.sampled_from(OPTIONS)
    | st.sampled_from(COMMANDS)
    | st.sampled_from(ADDRESSES)
    | st.sampled_from(NUMBERS)
    | domain_spec
    | st.text(max_size=8)
).map(_no_huge_numbers)


@FUZZ
@given(command=st.sampled_from([*COMMANDS, "--help", "--version", "bogus", ""]), args=st.lists(token, max_size=7))
@example(command="attach", args=["--port", "1", "--domains", "0;1", "--json"])
@example(command="attach", args=["-p", "1", "--udp", "--ipv6", "-P"])
@example(command="stats", args=["--watch", "0.1"])
@example(command="stats", args=["--json", "--prometheus"])
def test_cli_arguments_exit_0_1_or_2_with_one_error_line(cli_env, monkeypatch, command, args):
    from numareuse.cli import main as climod

    monkeypatch.setattr(climod, "time", _interrupting_sleep())
    argv = [command, *args] if command else args
    r = CliRunner().invoke(climod.main, argv)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, (argv, out)
    assert r.exception is None or isinstance(r.exception, SystemExit), (argv, repr(r.exception), out)
    assert r.exit_code in (0, 1, 2), (argv, r.exit_code, out)
    if r.exit_code == 1:
        lines = [ln for ln in out.splitlines() if not ln.startswith("attach: ")]  # --progress lines
        assert len(lines) == 1 and lines[0].startswith("Error: "), (argv, out)


# -- the pre-fork master's control socket ----------------------------------------

WORKERS = 4  # on 2 CPUs: while one worker is replaced, the next example goes to another


@pytest.fixture(scope="module")
def master():
    need(_BPF_PROBLEM is None, _BPF_PROBLEM or "")
    need(len(os.sched_getaffinity(0)) >= 2, "needs at least 2 CPUs to make 2 virtual domains")
    srv = Server("--workers", str(WORKERS), "--domains", "cpu", "--affinity", "auto")
    try:
        yield srv.start()
    finally:
        srv.stop()


def _ready_workers(srv: Server) -> dict[int, int]:
    """index -> pid of each worker's latest ready incarnation that was not killed since."""
    pids, killed = {}, set()
    for line in list(srv.lines):
        if m := re.match(r"^worker (\d+) pid=(\d+) cpus=", line):
            pids[int(m.group(1))] = int(m.group(2))
        elif m := re.match(r"^worker (\d+) pid=(\d+)(:| exited)", line):
            killed.add(int(m.group(2)))
    return {i: p for i, p in pids.items() if p not in killed}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expected(raw: bytes) -> str:
    """The protocol, as the master must apply it: killed, reply, logged or ignored."""
    if len(raw) > 4096:
        return "killed"  # the master reads 4096 bytes: the rest of a message is cut off
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):
        return "killed"
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        return "killed"
    op = msg["op"]
    if op == "register":
        return "reply"
    if op == "ready":
        ok = (
            isinstance(msg.get("cpus"), list)
            and all(_is_int(c) for c in msg["cpus"])
            and (msg.get("domain") is None or _is_int(msg.get("domain")))
            and msg.get("path") in ("direct", "master", "off")
            and _is_int(msg.get("uid"))
        )
        return "logged" if ok else "killed"
    if op == "error":
        return "ignored"  # after start-up a worker's error changes nothing
    return "killed"


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
protocol_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["register", "ready", "error", "stop", ""]) | st.text(max_size=6)},
    optional={
        "domain": st.integers(min_value=-3, max_value=3) | json_value,
        "cpus": st.lists(st.integers(min_value=-1, max_value=4)) | json_value,
        "path": st.sampled_from(["direct", "master", "off", "direct\nready port=1"]) | json_value,
        "uid": st.integers(min_value=0, max_value=70000) | json_value,
        "error": st.text(max_size=20),
    },
)
control_message = (
    st.binary(max_size=64)
    | json_value.map(lambda v: json.dumps(v).encode())
    | protocol_like.map(lambda v: json.dumps(v).encode())
    | st.sampled_from([1, 10, 1500, 2040, 2100]).map(lambda k: b"[" * k + b"]" * k)
)


def _ask(ctl: socket.socket, msg: dict) -> dict:
    ctl.send(json.dumps(msg).encode())
    return json.loads(ctl.recv(4096))


def test_control_messages_never_stop_the_master(master):
    """Whatever a worker sends on its control socket, the master lives on: the worker is killed
    (and replaced), refused, or obeyed, exactly as the protocol says; steering is intact after."""
    srv = master
    domain_of = {i: i % 2 for i in range(WORKERS)}  # --affinity auto on 2 CPUs, --domains cpu
    turn = [0]

    @settings(FUZZ, max_examples=max(5, EXAMPLES // 5))
    @given(raw=control_message)
    @example(raw=b"[" * 1500 + b"]" * 1500)  # deeper than Python's recursion limit
    @example(raw=b'{"op": "register", "domain": 0}')
    @example(raw=b'{"op": "ready", "cpus": [0], "domain": 0, "path": "direct\\nready port=1", "uid": 0}')
    def one(raw):
        deadline = time.monotonic() + 15
        while not (ready := _ready_workers(srv)):
            assert time.monotonic() < deadline, "no worker ready:\n" + "\n".join(srv.lines)
            time.sleep(0.02)
        index = sorted(ready)[turn[0] % len(ready)]
        turn[0] += 1
        pid, mark = ready[index], len(srv.lines)
        want = _expected(raw)
        ctl = control_socket_of(pid)
        ctl.settimeout(10)  # the worker's end may be non-blocking: the flag is shared with our duplicate
        try:
            try:
                ctl.send(raw)
            except OSError as e:  # EMSGSIZE for a message past the socket's buffer: never sent
                assert want == "killed" and len(raw) > 4096, e
                return
            if want == "killed":
                srv.wait_for(rf"^worker {index} pid={pid}: bad control message .*; killing it", start=mark)
            elif want == "reply":
                reply = json.loads(ctl.recv(4096))
                assert isinstance(reply.get("ok"), bool), reply
                if reply["ok"]:  # the worker's own socket moved: put it back
                    assert _ask(ctl, {"op": "register", "domain": domain_of[index]})["ok"]
            elif want == "logged":
                srv.wait_for(rf"^worker {index} pid={pid} cpus=", start=mark)
            # the master read it and goes on serving this worker (no kill): it answers a request
            if want != "killed":
                assert _ask(ctl, {"op": "register", "domain": domain_of[index]}) == {
                    "ok": True,
                    "domain": domain_of[index],
                }
        finally:
            ctl.close()
        assert srv.proc.poll() is None, "the master died:\n" + "\n".join(srv.lines)

    one()
    assert srv.proc.poll() is None
    assert not [ln for ln in srv.lines if "Traceback" in ln], "\n".join(srv.lines)
    deadline = time.monotonic() + 15
    while len(_ready_workers(srv)) < WORKERS:  # every killed worker replaced
        assert time.monotonic() < deadline, "\n".join(srv.lines)
        time.sleep(0.05)
    for cpu in (0, 1):
        with topology.pinned(cpu):
            got = {http_get("127.0.0.1", srv.port)["index"] % 2 for _ in range(10)}
        assert got == {cpu}, f"client on CPU {cpu} answered by workers of domains {got}"
