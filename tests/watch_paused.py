"""``numareuse watch`` whose socket scan can be held open, for tests/test_watch.py.

While the file $NUMAREUSE_TEST_ARM exists, each scan stops right after it took
its pidfd_getfd duplicates: it writes its pid to $NUMAREUSE_TEST_PAUSED and
waits until $NUMAREUSE_TEST_GO exists. A server reload can then land in the
middle of a scan, deterministically.
"""

from __future__ import annotations

import os
import time

from numareuse.cli.main import main

from numareuse import discovery

_real = discovery.find_sockets


def find_sockets(*a, **kw):
    out = _real(*a, **kw)
    if os.path.exists(os.environ["NUMAREUSE_TEST_ARM"]):
        with open(os.environ["NUMAREUSE_TEST_PAUSED"], "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["NUMAREUSE_TEST_GO"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    return out


discovery.find_sockets = find_sockets
if __name__ == "__main__":
    main(prog_name="numareuse")
