"""Fuzzing pinned ``meta`` contents: a corrupt meta is refused with one line, and changes nothing.

The meta map says what the pinned maps were built with; whatever it holds,
reading it gives a Layout or a StateError, the CLI answers with one line
(never a traceback), the attached program keeps steering, and detach still
removes everything.
"""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import Server, ask, cli, env, error_of, pinned_groups, server  # noqa: F401  (fixtures)

from numareuse import StateError, _layout, _maps, _sys

EXAMPLES = int(os.environ.get("NUMAREUSE_FUZZ_EXAMPLES", "25"))
U64 = st.integers(min_value=0, max_value=2**64 - 1)
SMALL = st.one_of(st.none(), st.integers(min_value=-3, max_value=2**64 - 1), st.integers(min_value=0, max_value=2000))


@settings(max_examples=EXAMPLES * 8, deadline=None)
@given(st.fixed_dictionaries({k: SMALL for k in _layout.META_KEYS}))
def test_check_meta_gives_a_layout_or_a_state_error(meta):
    try:
        layout = _maps.check_meta(meta)
    except StateError:
        return
    assert 1 <= layout.ndomains <= _layout.MAX_DOMAINS and 1 <= layout.capacity <= _layout.MAX_CAPACITY


def _meta_fd(bpffs) -> int:
    netns = os.listdir(os.path.join(bpffs, "numareuse"))[0]
    (name,) = os.listdir(os.path.join(bpffs, "numareuse", netns))
    return _sys.obj_get(os.path.join(bpffs, "numareuse", netns, name, "meta"))


def test_corrupt_pinned_meta_is_refused_and_changes_nothing(env, server):  # noqa: F811
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.integers(min_value=0, max_value=len(_layout.META_KEYS) - 1), U64, min_size=1, max_size=4))
    def check(writes):
        fd = _meta_fd(env)
        try:
            saved = {i: _sys.map_lookup(fd, struct.pack("=I", i), 8) for i in range(len(_layout.META_KEYS))}
            for i, v in writes.items():
                _sys.map_update(fd, i, struct.pack("=Q", v))
            try:
                r = cli("status", "--json", ok=False)
                assert r.exit_code == 0, r.stderr  # a reader reports the bad group, it does not fail
                (g,) = json.loads(r.stdout)
                r = cli("attach", "-p", srv.port, "-d", "cpu", "-q", ok=False)
                if "error" in g:
                    assert any(w in g["error"] for w in ("meta", "layout", "incomplete")), g["error"]
                    error_of(r)  # exactly one line, exit 1
                else:
                    assert r.exit_code == 0, r.stderr  # a meta the maps agree with
                assert set(ask(0, srv.port)) == {0} and set(ask(1, srv.port)) == {1}  # still steering
            finally:
                for i, v in saved.items():
                    _sys.map_update(fd, i, v)
        finally:
            os.close(fd)
        after = json.loads(cli("attach", "-p", srv.port, "-d", "cpu", "--json").stdout)
        assert after["action"] in ("unchanged", "updated"), after

    check()
    cli("detach", "-p", srv.port)
    assert pinned_groups(env) == []


def test_corrupt_meta_then_detach_removes_everything(env, server):  # noqa: F811
    srv = server("--workers", 2, "--cpus", "0,1")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    fd = _meta_fd(env)
    try:
        _sys.map_update(fd, 2, struct.pack("=Q", 7))  # capacity 7: nbuckets and the sockarray disagree
    finally:
        os.close(fd)
    assert "corrupt meta" in error_of(cli("attach", "-p", srv.port, "-d", "cpu", ok=False))
    cli("detach", "-p", srv.port)
    assert pinned_groups(env) == []
