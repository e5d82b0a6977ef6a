"""The three-line numareuse integration in a minimal pre-fork server (run as root).

    python examples/minimal_prefork.py [port] [domains]     # e.g. 8080 cpu

One SO_REUSEPORT listener per CPU; the master attaches the program before
fork, each worker pins itself to its CPU and registers its own socket in the
domain it now runs in. The master keeps every socket, so a worker's socket
outlives the worker. Ctrl-C stops everything. For restarts, unprivileged
workers and graceful stop, see numareuse/examples/prefork.py.
"""

import os
import signal
import socket
import sys

from numareuse import CURRENT, Selector

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
cpus = sorted(os.sched_getaffinity(0))
listeners = []
for _ in cpus:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    listeners.append(s)

sel = Selector(domains=sys.argv[2] if len(sys.argv) > 2 else "numa")  # 1. master, before fork
sel.attach(listeners[0])  # 2. any socket of the group

pids = []
for i, cpu in enumerate(cpus):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.sched_setaffinity(0, {cpu})
        domain = sel.register(listeners[i], CURRENT)  # 3. worker, after setting its affinity
        sel.close()  # a worker's close only drops its fds
        while True:
            conn, _ = listeners[i].accept()
            conn.recv(65536)
            body = f"worker {i} pid {os.getpid()} cpu {cpu} domain {domain}\n".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            conn.close()
    pids.append(pid)

print(f"serving on 127.0.0.1:{port} with {len(pids)} workers; Ctrl-C to stop", flush=True)
try:
    signal.pause()
except KeyboardInterrupt:
    pass
finally:
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    sel.close()  # the master's close detaches the program
