"""Prometheus metrics against `numareuse stats --json`: two views of the same kernel counters.

A real server on loopback, attached with the CLI in a private bpffs (test_cli's fixtures),
clients pinned per CPU. Both views are read back to back with no traffic in between, so
they must agree exactly.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import urllib.request

import pytest
from conftest import open_fds
from prometheus_client.parser import text_string_to_metric_families
from test_cli import ask, cli, env, server  # noqa: F401  (env and server are fixtures)

from numareuse import NumaReuseError, _layout, _sys, metrics

N0, N1 = 7, 12  # connections from clients pinned to CPU 0 and to CPU 1


def syn_retrans() -> int:
    """TcpExt TCPSynRetrans of this network namespace: SYNs re-sent (each may run the program again)."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(rows[0], rows[1]))["TCPSynRetrans"])


def samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Sample name -> [(labels, value)], parsed by prometheus_client's own parser."""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.fixture
def attached(env, server):  # noqa: F811
    """Domain 0 with a socket, domain 1 without, one wildcard socket; N0 + N1 connections made.

    CPU 0's clients are local, CPU 1's go to the wildcard: two outcomes on two CPUs.
    """
    srv = server("--workers", 2, "--cpus", "0,-")
    cli("attach", "-p", srv.port, "-d", "cpu", "-q")
    resent = syn_retrans()
    assert set(ask(0, srv.port, N0)) == {0} and set(ask(1, srv.port, N1)) == {1}
    yield srv, syn_retrans() - resent
    cli("detach", "-p", srv.port)


def check(text: str, stats: list[dict], status: list[dict], resent: int) -> None:
    """Every series of ``text`` matches the JSON views of the same group."""
    got = samples(text)
    (st,), (gs,) = stats, status
    name = st["name"]
    assert all(lab.get("group", name) == name for ss in got.values() for lab, _ in ss)
    for counter, value in st["counters"].items():
        family, outcome = metrics.SERIES[counter]
        series = metrics.COUNTER_FAMILIES[family][0] + "_total"
        rows = [(lab, v) for lab, v in got[series] if outcome is None or lab["outcome"] == outcome]
        assert {lab["domain"] for lab, _ in rows} == {lab["cpu"] for lab, _ in rows} == {"0", "1"}  # domains=cpu
        assert sum(v for _, v in rows) == value, counter
    per_cpu = {(lab["outcome"], lab["cpu"]): v for lab, v in got["numareuse_selections_total"]}
    # a re-sent SYN runs the program again: at most `resent` extra, measured in this namespace
    assert N0 <= per_cpu["local", "0"] <= N0 + resent and N1 <= per_cpu["wildcard", "1"] <= N1 + resent
    assert per_cpu["local", "1"] == per_cpu["wildcard", "0"] == 0
    assert st["counters"]["local"] == per_cpu["local", "0"] and st["counters"]["wildcard"] == per_cpu["wildcard", "1"]
    assert got["numareuse_locality_ratio"] == [({"group": name}, pytest.approx(st["locality"], abs=5e-5))]
    want = {(str(d), "live"): 0 for d in ("0", "1", "wildcard")} | {(d, "closed"): 0 for d in ("0", "1", "wildcard")}
    for s in gs["sockets"]:
        want[str(s["domain"]), "live" if s["live"] else "closed"] += 1
    assert {(lab["domain"], lab["state"]): v for lab, v in got["numareuse_registered_sockets"]} == want
    assert want[("wildcard", "live")] == want[("0", "live")] == 1 and want[("1", "live")] == 0
    assert got["numareuse_program_info"] == [({"group": name, "id": str(gs["program_id"]), "domains": "cpu"}, 1.0)]
    assert got["numareuse_group_readable"] == [({"group": name}, 1.0)]
    assert not any(n.startswith(("process_", "python_", "numareuse_watch_")) for n in got)


def test_every_counter_has_one_series():
    by = {}
    for family, outcome in metrics.SERIES.values():
        by.setdefault(family, []).append(outcome)
    assert set(metrics.SERIES) == set(_layout.COUNTERS) and set(by) <= set(metrics.COUNTER_FAMILIES)
    assert by["selections"] and sorted(by["selections"]) == sorted(_layout.SELECTION_OUTCOMES)
    # migration outcomes are named as selection outcomes; migrated_unowned overlaps them: its own series
    assert sorted(by["migrations"]) == sorted(o.split("_", 1)[1] for o in _layout.MIGRATION_OUTCOMES)
    assert set(by["migrations"]) <= set(by["selections"]) and by["migrations_unowned"] == [None]


def test_stats_prometheus_matches_json(attached):
    _srv, resent = attached
    fds = open_fds()
    text = cli("stats", "--prometheus").stdout
    stats = json.loads(cli("stats", "--json").stdout)
    assert open_fds() <= fds  # each scrape closes what it opened
    check(text, stats, json.loads(cli("status", "--json").stdout), resent)
    assert "numareuse_selections_total{" in text and "# TYPE numareuse_selections_total counter" in text
    watched = cli("stats", "--prometheus", "--watch", "0.1", "--count", "2").stdout
    assert watched.count("# TYPE numareuse_selections_total counter") == 2


def test_serve_over_http_matches_json(attached):
    _srv, resent = attached
    httpd = metrics.serve("127.0.0.1", 0, metrics.Collector())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_port}/metrics", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        stats = json.loads(cli("stats", "--json").stdout)
    finally:
        httpd.shutdown()
        httpd.server_close()
    check(text, stats, json.loads(cli("status", "--json").stdout), resent)


@pytest.mark.parametrize(
    "text",
    ["9100", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:0", "127.0.0.1:65536", "::1:9100", "[::1]x:1"],
)
def test_bad_listen_address_is_refused(text):
    with pytest.raises(NumaReuseError, match="is not HOST:PORT") as e:
        metrics.parse_listen(text)
    assert "\n" not in str(e.value)


def test_listen_addresses_parse():
    assert metrics.parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert metrics.parse_listen("[::1]:9100") == ("::1", 9100)
    assert metrics.parse_listen(":9100") == ("0.0.0.0", 9100)
    assert metrics.parse_listen("localhost:9100") == ("localhost", 9100)


def test_serve_refuses_busy_foreign_and_unknown_addresses(env):  # noqa: F811
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    threads, fds = threading.active_count(), open_fds()
    try:
        cases = [
            (("127.0.0.1", busy.getsockname()[1]), "Address already in use"),
            (("192.0.2.1", 9100), "not an address of this host"),  # TEST-NET-1: on no host
            (("no-such-host.invalid", 9100), "cannot serve metrics on no-such-host.invalid:9100"),
        ]
        for (host, port), why in cases:
            with pytest.raises(NumaReuseError, match=why) as e:
                metrics.serve(host, port, metrics.Collector())
            assert str(e.value).startswith("cannot serve metrics on ") and "\n" not in str(e.value)
        assert threading.active_count() == threads and open_fds() <= fds  # no server thread, no socket left
    finally:
        busy.close()


def test_reconcile_series_only_when_given(env):  # noqa: F811
    assert not any(n.startswith("numareuse_watch_") for n in samples(metrics.render()))
    rs = metrics.ReconcileStats()
    col = metrics.Collector(reconcile=rs)
    got = samples(metrics.render(col))
    assert got["numareuse_watch_reconciles_total"] == [({}, 0.0)]
    assert got["numareuse_watch_reconcile_errors_total"] == [({}, 0.0)]
    assert "numareuse_watch_last_success_timestamp_seconds" not in got  # no pass succeeded yet
    t0 = time.time()
    rs.record(ok=False)
    rs.record(ok=True)
    rs.record(ok=True)
    got = samples(metrics.render(col))
    assert got["numareuse_watch_reconciles_total"] == [({}, 3.0)]
    assert got["numareuse_watch_reconcile_errors_total"] == [({}, 1.0)]
    ((_, when),) = got["numareuse_watch_last_success_timestamp_seconds"]
    assert when == rs.last_success and t0 <= when <= time.time()
    assert not any(n.startswith("numareuse_selections") for n in got)  # no group attached: no group series


def test_unreadable_group_is_a_zero_not_a_failed_scrape(attached, env):  # noqa: F811
    (netns,) = os.listdir(os.path.join(env, "numareuse"))
    (name,) = os.listdir(os.path.join(env, "numareuse", netns))
    meta = _sys.obj_get(os.path.join(env, "numareuse", netns, name, "meta"))
    try:
        _sys.map_update(meta, 0, struct.pack("=Q", _layout.LAYOUT_VERSION + 1))  # state of another version
        got = samples(cli("stats", "--prometheus").stdout)
        _sys.map_update(meta, 0, struct.pack("=Q", _layout.LAYOUT_VERSION))
    finally:
        os.close(meta)
    assert got["numareuse_group_readable"] == [({"group": f"tcp4 127.0.0.1:{attached[0].port}"}, 0.0)]
    assert set(got) == {"numareuse_group_readable"}  # nothing misread from it


def test_watch_health_is_served(kernel):
    """`watch --metrics` serves the watcher's Health through the same collector."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from numareuse import watch

    health = watch.Health(reconciles=3, errors=1, last_success=1234.5)
    srv = metrics.serve_watch("127.0.0.1", 0, health)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.server_port}/metrics", timeout=10).read().decode()
    finally:
        srv.shutdown()
        srv.server_close()
    got = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert got["numareuse_watch_reconciles_total"] == 3
    assert got["numareuse_watch_reconcile_errors_total"] == 1
    assert got["numareuse_watch_last_success_timestamp_seconds"] == 1234.5
