"""bench/rsts.py: the soak tells a reset numareuse could cause from the kernel's own by its kernel path.

The census is checked on real resets of each path that a test can cause at will
(a close with linger 0, a SYN to a port nobody listens on, a listener closed with
a connection in its queue). The kernel's handshake_vs_close race cannot be caused
at will: its stack is the one the census recorded when the race reset a soak
request (kernel 6.18, nginx reloading with net.ipv4.tcp_migrate_req=1 and no
numareuse), and classify() is checked on it. Then the soak's verdict: a failure
is excused only one for one by such a reset, and a numareuse phase fails on an
unmigrated one.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import rsts, soak  # noqa: E402

# innermost first, as the census read it (the tracepoint's own frames dropped)
RACE_STACK = [
    "tcp_send_active_reset",
    "tcp_disconnect",
    "inet_child_forget",
    "inet_csk_complete_hashdance",
    "tcp_check_req",
    "tcp_v4_rcv",
    "ip_protocol_deliver_rcu",
    "ip_local_deliver_finish",
    "__netif_receive_skb_one_core",
    "process_backlog",
    "__napi_poll",
    "net_rx_action",
    "handle_softirqs",
    "do_softirq.part.0",
    "__local_bh_enable_ip",
    "__dev_queue_xmit",
    "ip_finish_output2",
    "ip_output",
    "__ip_queue_xmit",
    "__tcp_transmit_skb",
    "tcp_rcv_state_process",
    "tcp_v4_do_rcv",
    "__release_sock",
    "release_sock",
    "inet_stream_connect",
    "__sys_connect",
]
LISTEN_STOP_STACK = ["tcp_send_active_reset", "tcp_disconnect", "inet_csk_listen_stop", "__tcp_close", "tcp_close"]


@pytest.fixture(scope="module")
def census():
    from conftest import _BPF_PROBLEM, need

    need(_BPF_PROBLEM is None, _BPF_PROBLEM or "")
    c = rsts.RstCensus()  # a raw tracepoint needs no tracefs: a failure to load here is a defect
    yield c
    c.close()


def paths_during(census, fn) -> dict:
    before = census.snapshot()
    fn()
    deadline = time.monotonic() + 5
    while True:  # a reset sent from a softirq is counted by then, but give a loaded machine time
        d = census.delta(before, census.snapshot())["paths"]
        if d or time.monotonic() > deadline:
            return d
        time.sleep(0.01)


def test_a_close_with_linger_0_is_a_close(census):
    def close_with_linger_0():
        with socket.create_server(("127.0.0.1", 0)) as srv:
            c = socket.create_connection(srv.getsockname())
            a, _ = srv.accept()
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.close()
            c.close()

    assert paths_during(census, close_with_linger_0) == {rsts.CLOSE: 1}


def test_a_syn_to_a_closed_port_is_a_reply(census):
    def refused():
        with socket.socket() as s:  # a port bound and never listened on: nobody can take the SYN
            s.bind(("127.0.0.1", 0))
            with socket.socket() as c, pytest.raises(ConnectionRefusedError):
                c.connect(s.getsockname())

    assert paths_during(census, refused) == {rsts.REPLY: 1}


def test_a_listener_closed_with_a_queued_connection_is_unmigrated(census):
    def close_queued():
        srv = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(srv.getsockname())  # established, in the accept queue, never accepted
        srv.close()
        c.close()

    assert paths_during(census, close_queued) == {rsts.UNMIGRATED: 1}


def test_the_kernels_handshake_race_is_told_apart():
    assert rsts.classify(RACE_STACK) == rsts.RACE
    assert rsts.classify(LISTEN_STOP_STACK) == rsts.UNMIGRATED
    # a softirq's reset runs on top of whatever system call it interrupted: the innermost frame decides
    assert rsts.classify(RACE_STACK[:6] + LISTEN_STOP_STACK[2:]) == rsts.RACE
    assert rsts.classify(["tcp_v4_send_reset", "tcp_v4_rcv", "__tcp_close"]) == rsts.REPLY
    assert rsts.classify(["tcp_send_active_reset", "tcp_keepalive_timer"]) == rsts.OTHER


def row(**kw) -> dict:
    r = {"failed": 0, "stranded": 0, "rst_paths": {}}
    r.update({k: 0 for k in soak.MUST_BE_ZERO})
    r.update(kw)
    return r


def test_the_soak_excuses_a_failure_only_for_a_race_reset_one_for_one():
    reloads = soak.Phase("reloads", "numareuse", 1.0)
    assert soak.verdict(row(), reloads, []) == "ok"
    assert soak.verdict(row(failed=1, rst_paths={rsts.RACE: 1}), reloads, []) == "ok"
    assert soak.verdict(row(failed=2, rst_paths={rsts.RACE: 1}), reloads, []) == "FAIL: failed=2"
    assert soak.verdict(row(failed=1, rst_paths={rsts.CLOSE: 1}), reloads, []) == "FAIL: failed=1"
    # a reset that hit no request excuses nothing later, and a race reset is never a licence for others
    assert soak.verdict(row(failed=0, rst_paths={rsts.RACE: 3}), reloads, []) == "ok"
    # numareuse migrates a closing listener's queue: a connection reset from that queue fails the phase
    assert soak.verdict(row(failed=1, rst_paths={rsts.UNMIGRATED: 1}), reloads, []) == "FAIL: failed=1, unmigrated=1"
    # without numareuse, the same is the reference the table shows, never a failure
    reference = soak.Phase("reloads, no numareuse", "kernel", 1.0, judged=False)
    assert soak.verdict(row(failed=4, rst_paths={rsts.UNMIGRATED: 4}), reference, []) == "reference"
