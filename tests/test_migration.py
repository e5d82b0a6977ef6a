"""Migration of a closing listener's connections, on the real kernel (issue 12).

What the kernel does (Linux source, net/core/sock_reuseport.c, net/ipv4/inet_connection_sock.c,
net/ipv4/tcp_ipv4.c; migration appeared in 5.14):

* ``reuseport_stop_listen_sock(sk)`` runs when a listener leaves TCP_LISTEN (close() or
  shutdown()). If ``sock_net(sk)->ipv4.sysctl_tcp_migrate_req`` is set, OR the group's program
  has ``prog->expected_attach_type == BPF_SK_REUSEPORT_SELECT_OR_MIGRATE``, the socket moves to
  the group's closed section (``__reuseport_add_closed_sock``) and can hand its connections on;
  otherwise ``reuseport_detach_sock`` takes it out of the group at once.
* ``reuseport_migrate_sock(sk, migrating_sk, skb)`` picks the new listener. With a program of
  expected attach type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE it runs the program with
  ``ctx->migrating_sk`` set and ``ctx->sk`` = the closing listener (SK_PASS without a selection:
  ``reuseport_select_sock_by_hash``; SK_DROP: failure). With any other program (or none) it
  migrates by hash only when the sysctl is set, else it fails and the connection is dropped.
  So a SELECT_OR_MIGRATE program turns migration on for its own group, sysctl or not.
* Its callers: ``inet_csk_listen_stop`` (the accept queue: ESTABLISHED children, and TCP Fast
  Open children still in SYN_RECV), in close()/shutdown() on the calling CPU;
  ``reqsk_timer_handler`` (a NEW_SYN_RECV request when its SYN-ACK timer fires, no skb);
  ``tcp_v4_rcv`` (a NEW_SYN_RECV request when the final ACK arrives, skb = that ACK).

Method, after tools/testing/selftests/bpf/prog_tests/migrate_reuseport.c: an XDP program on lo
drops the final ACK of the handshake to hold connections in SYN_RECV (with TCP Fast Open, the
child is queued for accept at once) or NEW_SYN_RECV (a request socket); removing it lets the
client's retransmission or the SYN-ACK retransmission complete them.

Every scenario runs in a forked child in a fresh network namespace (sysctls, lo and its XDP
program are per namespace), where net.ipv4.tcp_migrate_req is checked to be 0: migration below
comes from the program's attach type alone. Domains "0;1": A and A2 in domain 0, B in domain 1,
W in the wildcard; clients pinned to CPU 0 queue on A (A2 is registered only after they
queued), and A closes on CPU 1, so a peer of domain 0 proves that the program used the closing
socket's own domain, not the CPU's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import select
import socket
import struct
import subprocess
import time
import traceback

import pytest
from conftest import need, pinned, resent

from numareuse import WILDCARD, Selector, _loader, _sys
from numareuse._layout import SELECTION_OUTCOMES
from numareuse.selector import queued

N = 12  # connections queued on A per scenario
PORT = 7070  # a fresh namespace has every port free
MSG = b"hello"

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_TCP_INFO = 11
_TCP_FASTOPEN = 23
_TCP_FASTOPEN_CONNECT = 30
_TCP_ESTABLISHED, _TCP_SYN_RECV = 1, 3
_SYN, _ACK = 0x02, 0x10
_BPF_PROG_TYPE_XDP = 6
_BPF_LINK_CREATE = 28
_BPF_XDP = 37

pytestmark = pytest.mark.usefixtures("kernel", "two_cpus")


@pytest.fixture
def migration():
    ok = _loader.kernel_version() >= _loader.MIGRATE_MIN_KERNEL
    need(ok, "needs BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (Linux 5.14)")


# -- a scenario in its own network namespace ---------------------------------


def _enter_netns() -> None:
    if _libc.unshare(_CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare(CLONE_NEWNET): {os.strerror(e)}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _sysctl(name: str, value: str | None = None) -> str:
    """Read (or write, then read) a sysctl of the current network namespace."""
    path = "/proc/sys/" + name.replace(".", "/")
    if value is not None:
        with open(path, "w") as f:
            f.write(value)
    with open(path) as f:
        return f.read().strip()


def in_netns(fn, timeout: float = 30, **kw) -> dict:
    """Run ``fn(**kw)`` in a forked child inside a new network namespace; its result dict.

    The child records the namespace's net.ipv4.tcp_migrate_req as ``sysctl_migrate_req``.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 0
        try:
            os.close(r)
            _enter_netns()
            out = {"ok": True, "sysctl_migrate_req": _sysctl("net.ipv4.tcp_migrate_req")}
            out.update(fn(**kw))
        except BaseException:
            out, status = {"ok": False, "error": traceback.format_exc()}, 1
        try:
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(status)
    os.close(w)
    data, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, 9)
                pytest.fail(f"the scenario in the namespace did not finish within {timeout} s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    out = pickle.loads(data)
    if not out["ok"]:
        pytest.fail("scenario failed in its namespace:\n" + out["error"])
    # migration below comes from the program's attach type alone, not from the sysctl
    assert out["sysctl_migrate_req"] == "0"
    return out


# -- XDP on the namespace's lo: hold handshakes (raw instructions, no compiler) ----


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def xdp_drop_program(port: int, flags: int) -> bytes:
    """XDP: drop IPv4 TCP segments to ``port`` whose SYN and ACK bits are ``flags``, pass the rest.

    ``flags`` _ACK drops the handshake's final ACK (and every later client segment);
    _SYN drops SYNs. lo carries an Ethernet header; loopback IPv4 has no IP options.
    """
    be_port = struct.unpack("<H", struct.pack("!H", port))[0]  # as a little-endian u16 load sees it
    ldx_w, ldx_h, ldx_b, mov_x, add_k, and_k, jgt_x, jne_k, mov_k, exit_ = (
        0x61, 0x69, 0x71, 0xBF, 0x07, 0x57, 0x2D, 0x55, 0xB7, 0x95)  # fmt: skip
    body = [
        (ldx_w, 2, 1, 0, 0),  # r2 = xdp->data
        (ldx_w, 3, 1, 4, 0),  # r3 = xdp->data_end
        (mov_x, 4, 2, 0, 0),
        (add_k, 4, 0, 0, 14 + 20 + 20),
        (jgt_x, 4, 3, "pass", 0),  # shorter than Ethernet + IPv4 + TCP headers
        (ldx_h, 5, 2, 12, 0),
        (jne_k, 5, 0, "pass", 0x0008),  # h_proto != ETH_P_IP (network order)
        (ldx_b, 5, 2, 14, 0),
        (jne_k, 5, 0, "pass", 0x45),  # not IPv4 with a 20-byte header
        (ldx_b, 5, 2, 14 + 9, 0),
        (jne_k, 5, 0, "pass", socket.IPPROTO_TCP),
        (ldx_h, 5, 2, 14 + 20 + 2, 0),
        (jne_k, 5, 0, "pass", be_port),  # tcp->dest
        (ldx_b, 5, 2, 14 + 20 + 13, 0),
        (and_k, 5, 0, 0, _SYN | _ACK),
        (jne_k, 5, 0, "pass", flags),
        (mov_k, 0, 0, 0, 1),  # XDP_DROP
        (exit_, 0, 0, 0, 0),
    ]
    tail = [(mov_k, 0, 0, 0, 2), (exit_, 0, 0, 0, 0)]  # pass: XDP_PASS
    out = b""
    for i, (code, dst, src, off, imm) in enumerate(body + tail):
        if off == "pass":
            off = len(body) - (i + 1)
        out += _insn(code, dst, src, off, imm)
    return out


class _LinkCreate(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32)]
    _fields_ += [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint64 * 4)]


class Xdp:
    """An XDP program attached to this namespace's lo through a BPF link (5.9+); detach() or exit removes it."""

    def __init__(self, port: int, flags: int):
        fd, err = _sys.prog_load(_BPF_PROG_TYPE_XDP, xdp_drop_program(port, flags), "nr_test_drop", 0, 1 << 16)
        if fd < 0:
            raise OSError(err[0], f"loading the XDP program: {os.strerror(err[0])}\n{err[1]}")
        try:
            attr = _LinkCreate(fd, socket.if_nametoindex("lo"), _BPF_XDP, 0)
            nr_bpf = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
            link = _libc.syscall(nr_bpf, _BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
            if link < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"attaching XDP to lo (BPF_LINK_CREATE): {os.strerror(e)}")
        finally:
            os.close(fd)  # the link holds the program
        self.link = link

    def detach(self) -> None:
        if self.link >= 0:
            os.close(self.link)
            self.link = -1


# -- sockets ---------------------------------------------------------------------


def tcp_info(sock) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)


def tcp_state(sock) -> int:
    return tcp_info(sock)[0]


def listener(fastopen: bool = False) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if fastopen:
        s.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN, 4 * N)
    s.bind(("127.0.0.1", PORT))
    s.listen(4 * N)
    return s


def in_syn_recv(port: int) -> int:
    """Sockets of this namespace's ``port`` in SYN_RECV (/proc/net/tcp state 03).

    Request sockets (NEW_SYN_RECV) show so, and so do TCP Fast Open children.
    """
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "03")


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def accept_all(listeners: dict[str, socket.socket], want: int, timeout: float) -> list[tuple[str, socket.socket]]:
    """Accept from every listener until ``want`` connections came or ``timeout`` passed."""
    got: list[tuple[str, socket.socket]] = []
    deadline = time.monotonic() + timeout
    for s in listeners.values():
        s.setblocking(False)
    while True:
        for name, s in listeners.items():
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                got.append((name, conn))
        if len(got) >= want or time.monotonic() > deadline:
            return got
        select.select(list(listeners.values()), [], [], max(0.0, min(0.05, deadline - time.monotonic())))


def outcome(client: socket.socket) -> str:
    """How a client ended: "ok" (the server answered), "reset" (ECONNRESET), "eof" or "timeout"."""
    client.settimeout(5)
    try:
        data = client.recv(16)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    return "ok" if data == b"ok" else "eof" if data == b"" else f"data {data!r}"


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


# -- the scenario ------------------------------------------------------------------


def close_a_with_queue(
    state: str = "established",
    how: str = "close",
    peers: tuple[str, ...] = ("A2", "B"),
    closer_cpu: int = 1,
    drain: bool = False,
    migrate: bool | None = None,
    synack_timer: bool = False,
) -> dict:
    """N connections on listener A (domain 0), in ``state``; then A is closed on ``closer_cpu``.

    ``state``: "established" (in A's accept queue), "syn_recv" (TCP Fast Open children in
    A's accept queue, final ACK dropped) or "new_syn_recv" (request sockets of A, final
    ACK dropped). ``peers``: the other listeners of the group: "A2" (domain 0, registered
    once the N are queued), "B" (domain 1), "W" (wildcard), "U" (in the group, never
    registered). ``drain``: sel.drain(A, 0) first. ``synack_timer`` (new_syn_recv): keep
    dropping ACKs until the SYN-ACK timers (1 s) migrated every request. Returns who accepted each connection,
    how each client ended and the counters.
    """
    fastopen = state == "syn_recv"
    if fastopen:
        # TFO_CLIENT_ENABLE | TFO_SERVER_ENABLE | TFO_CLIENT_NO_COOKIE | TFO_SERVER_COOKIE_NOT_REQD
        _sysctl("net.ipv4.tcp_fastopen", "519")
    out: dict = {}
    with Selector("0;1", migrate=migrate) as sel:
        out["migration"] = sel.migration
        socks = {"A": listener(fastopen)}
        socks.update((name, listener(fastopen)) for name in peers)
        sel.attach(socks["A"])
        sel.register(socks["A"], 0)
        if "B" in socks:
            sel.register(socks["B"], 1)
        if "W" in socks:
            sel.register(socks["W"], WILDCARD)
        xdp = Xdp(PORT, _ACK) if state != "established" else None
        clients, retrans = [], 0
        try:
            with pinned(0):  # SYNs processed on CPU 0: domain 0, and A is its only socket so far
                for _ in range(N):
                    c = socket.socket()
                    c.settimeout(5)
                    if fastopen:
                        c.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN_CONNECT, 1)
                        c.connect(("127.0.0.1", PORT))  # sends nothing yet
                        c.sendall(MSG)  # SYN with data
                        assert wait_until(lambda c=c: tcp_state(c) == _TCP_ESTABLISHED), "no SYN-ACK"
                    else:
                        c.connect(("127.0.0.1", PORT))
                    retrans += resent(c)
                    clients.append(c)
            with pinned(1):  # data sent (and, while dropped, re-sent) from CPU 1
                for c in clients:
                    if not fastopen:
                        c.sendall(MSG)
            want_queued = 0 if state == "new_syn_recv" else N
            wait_until(lambda: queued(socks["A"].fileno()) == want_queued)
            out["queued_a"] = queued(socks["A"].fileno())
            out["syn_recv_a"] = in_syn_recv(PORT)
            out["syn_retrans"] = retrans
            ports = {c.getsockname()[1]: i for i, c in enumerate(clients)}
            if "A2" in socks:
                sel.register(socks["A2"], 0)
            if drain:
                out["drained"] = sel.drain(socks["A"], timeout=0)
                out["drained_cookies"] = len(sel.drained())
            before, before_cpu = sel.stats(), sel.cpu_stats()
            with pinned(closer_cpu):
                if how == "close":
                    socks.pop("A").close()
                else:
                    socks["A"].shutdown(socket.SHUT_RDWR)
            peers_only = {k: v for k, v in socks.items() if k != "A"}
            accepted = []
            if state == "syn_recv":  # accept while the final ACK is still dropped: children in SYN_RECV
                accepted = accept_all(peers_only, N, 5)
                out["accepted_states"] = sorted({tcp_state(conn) for _, conn in accepted})
            if synack_timer:  # reqsk_timer_handler migrates each request, the clients' ACKs still dropped
                migrated_local = lambda: sel.stats()["migrated_local"] - before["migrated_local"]  # noqa: E731
                wait_until(lambda: migrated_local() >= N, 5)
            if xdp:
                xdp.detach()  # the client's re-sent data (or the SYN-ACK timer) completes the rest
            more = accept_all(peers_only, N - len(accepted), 5 if sel.migration else 0.5)
            accepted += more
            if "A" in socks:  # shut down, still open: no longer a listener
                out["a_listening"] = socks["A"].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            out["accepted_by"] = {}
            out["data_ok"] = 0
            for name, conn in accepted:
                conn.settimeout(5)
                peer = conn.getpeername()[1]
                out["accepted_by"][ports.get(peer, -1)] = name
                if conn.recv(16) == MSG:
                    out["data_ok"] += 1
                conn.sendall(b"ok")
            out["outcomes"] = [outcome(c) for c in clients]
            for _, conn in accepted:
                conn.close()
            out["stats"] = delta(sel.stats(), before)
            out["selection"] = before
            after_cpu = sel.cpu_stats()
            out["cpu_migrated_local"] = {
                cpu: after_cpu[cpu]["migrated_local"] - before_cpu[cpu]["migrated_local"] for cpu in after_cpu
            }
        finally:
            if xdp:
                xdp.detach()
            for c in clients:
                c.close()
            for s in socks.values():
                s.close()
    return out


def at_close(out: dict) -> dict:
    """The counters that moved from A's close on, but empty_skipped: {name: count}.

    No SYN is sent after that (every client connected before), so this is the
    program's work for A's connections alone, exactly.
    """
    return {k: v for k, v in out["stats"].items() if v and k != "empty_skipped"}


def assert_selection_local(out: dict) -> None:
    """The N SYNs were steered to A as domain-0 traffic; only a re-sent SYN can add a run."""
    local = out["selection"]["local"]
    assert N <= local <= N + out["syn_retrans"], out["selection"]
    assert out["selection"]["wildcard"] == out["selection"]["remote"] == out["selection"]["fallback"] == 0


def assert_all(out: dict, name: str) -> None:
    assert out["accepted_by"] == {i: name for i in range(N)}, out["accepted_by"]
    assert out["outcomes"] == ["ok"] * N, out["outcomes"]
    assert out["data_ok"] == N


# -- tests -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_established_queue_goes_to_the_closing_sockets_own_domain(how, migration):
    """A closes on CPU 1 (domain 1): its queued connections still go to A2 of A's domain 0."""
    out = in_netns(close_a_with_queue, how=how)
    assert out["migration"] is True
    assert out.get("a_listening", 0) == 0
    assert out["queued_a"] == N and out["syn_recv_a"] == 0  # all N in A's accept queue, established
    assert_selection_local(out)
    assert_all(out, "A2")  # none on B, none reset
    assert at_close(out) == {"migrated_local": N}
    # close() migrated the accept queue on the closing CPU: the program ran on CPU 1, chose domain 0
    assert out["cpu_migrated_local"] == {0: 0, 1: N}


def test_syn_recv_fastopen_children_go_to_the_closing_sockets_own_domain(migration):
    """TCP Fast Open children in A's accept queue, still in SYN_RECV (final ACK dropped)."""
    out = in_netns(close_a_with_queue, state="syn_recv")
    assert out["queued_a"] == N and out["syn_recv_a"] == N  # all N in A's accept queue, in SYN_RECV
    assert out["accepted_states"] == [_TCP_SYN_RECV]  # accepted before their handshake completed
    assert_selection_local(out)
    assert_all(out, "A2")
    assert at_close(out) == {"migrated_local": N}
    assert out["cpu_migrated_local"] == {0: 0, 1: N}


def test_new_syn_recv_requests_go_to_the_closing_sockets_own_domain(migration):
    """Request sockets of A (final ACK dropped) migrate when their ACK or SYN-ACK timer comes."""
    out = in_netns(close_a_with_queue, state="new_syn_recv")
    assert out["queued_a"] == 0 and out["syn_recv_a"] == N  # none for accept: N requests in SYN_RECV
    assert_selection_local(out)
    assert_all(out, "A2")
    # once per request: in tcp_v4_rcv on the client's re-sent segment (sent from CPU 1),
    # or in reqsk_timer_handler (on CPU 0, where the SYN was); either way domain 0's A2
    assert at_close(out) == {"migrated_local": N}


def test_new_syn_recv_requests_migrate_on_the_synack_timer(migration):
    """The SYN-ACK timer's path (reqsk_timer_handler), the final ACKs dropped until it ran for all."""
    out = in_netns(close_a_with_queue, state="new_syn_recv", synack_timer=True)
    assert out["queued_a"] == 0 and out["syn_recv_a"] == N
    assert_selection_local(out)
    assert_all(out, "A2")
    assert at_close(out) == {"migrated_local": N}
    # the timer is pinned to the CPU that took the SYN (0), whichever CPU closed A
    assert out["cpu_migrated_local"] == {0: N, 1: 0}


def test_no_peer_in_the_domain_goes_to_the_wildcard(migration):
    out = in_netns(close_a_with_queue, peers=("B", "W"))
    assert out["queued_a"] == N
    assert_selection_local(out)
    assert_all(out, "W")
    assert at_close(out) == {"migrated_wildcard": N}
    assert out["stats"]["empty_skipped"] == N  # each probed A's emptied slot once, then took W


def test_no_peer_in_the_domain_nor_wildcard_goes_to_another_domain(migration):
    out = in_netns(close_a_with_queue, peers=("B",))
    assert out["queued_a"] == N
    assert_selection_local(out)
    assert_all(out, "B")  # never reset
    # each migration counted once, by the remote step, which passes over A's own region
    st = at_close(out)
    assert st == {"migrated_remote": N}, st
    assert out["stats"]["empty_skipped"] == N  # A's emptied slot, probed once by each migration


def test_remote_step_never_hands_connections_to_an_unregistered_listener(migration):
    """A's domain has no other socket, no wildcard: every connection to B, none to U (in the group, not registered)."""
    out = in_netns(close_a_with_queue, peers=("B", "U"))
    assert out["queued_a"] == N
    assert_all(out, "B")
    assert at_close(out) == {"migrated_remote": N}


@pytest.mark.parametrize("closer_cpu, peer", [(0, "A2"), (1, "B")])
def test_drained_socket_closed_is_placed_by_the_closing_cpus_domain(closer_cpu, peer, migration):
    """A drained socket has no region: what is still queued goes by the CPU that closes it."""
    out = in_netns(close_a_with_queue, drain=True, closer_cpu=closer_cpu)
    assert out["drained"] is False and out["drained_cookies"] == 1  # timeout 0: N still queued
    assert out["queued_a"] == N
    assert_selection_local(out)
    assert_all(out, peer)  # accepted, none reset
    assert at_close(out) == {"migrated_unowned": N, "migrated_local": N}
    assert out["stats"]["empty_skipped"] == 0  # drain took A out of its slot: nothing to probe past
    assert out["cpu_migrated_local"][closer_cpu] == N


def test_without_migration_the_queue_is_reset():
    """migrate=False and the sysctl at 0: what migration saves. Every queued connection is lost."""
    out = in_netns(close_a_with_queue, migrate=False)
    assert out["migration"] is False
    assert out["queued_a"] == N
    assert_selection_local(out)
    assert out["accepted_by"] == {}  # A2 and B got none
    assert out["outcomes"] == ["reset"] * N  # connect() had succeeded, then RST
    assert at_close(out) == {} and out["stats"]["empty_skipped"] == 0  # the program never ran at close


def test_no_migrate_environment_turns_migration_off(monkeypatch):
    monkeypatch.setenv("NUMAREUSE_NO_MIGRATE", "1")
    out = in_netns(close_a_with_queue)
    assert out["migration"] is False
    assert out["outcomes"] == ["reset"] * N and out["accepted_by"] == {}
    assert at_close(out) == {}


def _one_syn_dropped() -> dict:
    """A client whose first SYN is dropped (XDP) connects with the SYN it sends again at ~1 s."""
    with Selector("0;1") as sel:
        a = listener()
        sel.attach(a)
        sel.register(a, 0)
        xdp = Xdp(PORT, _SYN)
        c = socket.socket()
        try:
            with pinned(0):
                c.setblocking(False)
                err = c.connect_ex(("127.0.0.1", PORT))
                assert err == errno.EINPROGRESS, err
                # spin, never sleep: an idle CPU's timers run on another CPU
                # (kernel.timer_migration), and the SYN re-sent from there would be
                # selected in another domain (see conftest.handshake)
                end = time.monotonic() + 0.2
                while time.monotonic() < end:  # the first SYN is gone meanwhile
                    pass
                xdp.detach()
                poll = select.poll()
                poll.register(c, select.POLLOUT)
                end = time.monotonic() + 5
                while not poll.poll(0):
                    assert time.monotonic() < end, "no connection after the SYN was sent again"
            assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            accepted = accept_all({"A": a}, 1, 2)
            for _, conn in accepted:
                conn.close()
            return {"retrans": resent(c), "stats": sel.stats(), "accepted": len(accepted)}
        finally:
            xdp.detach()
            c.close()
            a.close()


def test_total_retrans_counts_a_resent_syn(migration):
    """The measurement the counter checks rely on: tcpi_total_retrans after connect = SYNs sent again."""
    out = in_netns(_one_syn_dropped)
    assert out["retrans"] == 1, out
    assert out["accepted"] == 1, out
    # the dropped SYN never reached the listener: the program ran once, for the re-sent one
    runs = {k: out["stats"][k] for k in SELECTION_OUTCOMES}
    assert runs == {"local": 1, "wildcard": 0, "remote": 0, "fallback": 0}, out
