"""A minimal pre-fork TCP/UDP server for end-to-end tests of the CLI, in nginx's model.

The master opens one SO_REUSEPORT socket per worker and forks; every worker
inherits every socket (as nginx's do), pins itself to its CPU and epoll-watches
only its own socket. Each TCP connection is answered with "<pid> <worker>\\n";
each UDP datagram with the same. Prints "ready <port> <pid,...>" when serving.

    python forkserver.py --workers 4 --cpus 0,1,0,1 [--port P] [--udp] [--ipv6]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys


def serve(i: int, sock: socket.socket, cpu: int | None, ready: int) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
    os.write(ready, b".")  # pinned and polling: the master may announce readiness
    os.close(ready)
    reply = f"{os.getpid()} {i}\n".encode()
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    while True:
        for _fd, _ev in ep.poll():
            try:
                if sock.type == socket.SOCK_STREAM:
                    c, _ = sock.accept()
                    c.sendall(reply)
                    c.close()
                else:
                    _, addr = sock.recvfrom(64)
                    sock.sendto(reply, addr)
            except (BlockingIOError, ConnectionError):
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", default="", help="comma-separated CPU per worker; '-' = unpinned")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("--ipv6", action="store_true")
    ap.add_argument("--no-reuseport", action="store_true")
    a = ap.parse_args()
    fam = socket.AF_INET6 if a.ipv6 else socket.AF_INET
    typ = socket.SOCK_DGRAM if a.udp else socket.SOCK_STREAM
    host = "::1" if a.ipv6 else "127.0.0.1"
    cpus = [None if c in ("-", "") else int(c) for c in a.cpus.split(",")] if a.cpus else [None] * a.workers
    socks, port = [], a.port
    for _ in range(a.workers if not a.no_reuseport else 1):
        s = socket.socket(fam, typ)
        if not a.no_reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        port = s.getsockname()[1]
        if typ == socket.SOCK_STREAM:
            s.listen(1024)
        s.setblocking(False)
        socks.append(s)
    pids = []
    r, w = os.pipe()
    for i, s in enumerate(socks):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            serve(i, s, cpus[i % len(cpus)], w)
            os._exit(0)
        pids.append(pid)
    os.close(w)
    got = b""
    while len(got) < len(socks):
        chunk = os.read(r, 64)
        if not chunk:
            sys.exit("a worker died before it was ready")
        got += chunk
    os.close(r)

    def stop(*_):
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in pids:
            try:
                os.waitpid(p, 0)
            except ChildProcessError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ready {port} {','.join(map(str, pids))}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
