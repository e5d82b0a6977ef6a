"""The benchmark's own machinery (no timing asserted: speed belongs to `make bench`).

Before/after figures are only worth anything if each subprocess really
imports the release it names: PYTHONPATH must beat the venv's editable
install, and the layout-1 tree must be the one from git history.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import recycle, release  # noqa: E402


@pytest.fixture
def releases(tmp_path):
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("needs this repository's git history (the previous release)")
    prev = release.previous(tmp_path)
    assert prev is not None
    return {"before": prev, "after": release.current(tmp_path)}


def test_each_release_probe_imports_its_own_tree(kernel, two_cpus, releases):
    from numareuse._headers import ensure_kernel_source

    tree = ensure_kernel_source()
    env = {"BCC_KERNEL_SOURCE": tree} if tree else {}
    args = {"spec": "0-1", "capacity": 1024, "fills": [0, 2], "reps": 2}
    for key, rel in releases.items():
        got = rel.probe("register", args, **env)
        assert got["numareuse_file"] == str(rel.tree / "numareuse"), (key, got["numareuse_file"])
        assert set(got["fills"]) == {"0", "2"}
        for fill in got["fills"].values():
            assert fill["register"]["n"] == 2 and fill["unregister"]["n"] == 2
    # the layout-1 tree is the previous release: its layout module says version 1
    layout = (releases["before"].tree / "numareuse" / "_layout.py").read_text()
    assert "LAYOUT_VERSION = 1" in layout


def test_wrk_report_is_parsed():
    text = """Running 15s test @ http://127.0.0.1:8081/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms    2.31ms  40.12ms   95.12%
    Req/Sec     4.52k   612.33     6.01k    70.00%
  135014 requests in 15.02s, 11.07MB read
  Socket errors: connect 0, read 85, write 31, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   8989.08
"""
    got = recycle.parse_wrk(text)
    assert got["requests"] == 135014 and got["seconds"] == 15.02
    assert (got["connect"], got["read"], got["write"], got["timeout"], got["non_2xx"]) == (0, 85, 31, 2, 3)
    assert got["errors"] == 121
    clean = recycle.parse_wrk("  2000 requests in 1.00s, 1MB read\n")
    assert clean["requests"] == 2000 and clean["errors"] == 0
