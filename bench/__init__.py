"""Benchmarks of numareuse against baselines measured in the same run: `make bench` runs bench.run."""

import json
import os
import socket
import subprocess
import sys
import time

T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr, with the seconds since the bench started."""
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def git_commit() -> str | None:
    """The checkout's short commit, recorded with each result file."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__), capture_output=True, text=True
        )
    except OSError:
        return None
    return r.stdout.strip() or None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds now (the kernel's pick, released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_json(path: str, obj) -> None:
    """Write a result file whole or not at all (temp file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def join_or_kill(p, timeout: float = 10) -> None:
    """Wait for a worker process to stop by itself, else kill it."""
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
