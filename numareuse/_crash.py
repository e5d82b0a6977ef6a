"""Crash injection for tests: NUMAREUSE_CRASH_AT=<step> kills this process with SIGKILL at that step.

Each step is a point between two kernel-visible changes (a map update, an
attach, a rename) where a real crash would leave partial state behind. The
tests kill the CLI, or a watcher's attach, at every one of them and check that
the next attach, detach and status converge, and that no connection failed.
"""

from __future__ import annotations

import os
import signal

STEPS = (
    "insert.put",  # a socket in its slot, its bookkeeping not yet written
    "insert.counted",  # bookkeeping and count written, the buckets not yet
    "move.vacated",  # a moving socket out of its old slot, not yet in its new one
    "compact.moved",  # a region's tail socket out of its slot, not yet in the hole
    "attach.staged",  # a new selector pinned under a staging name, not attached
    "attach.attached",  # its program attached, the pins not yet renamed into place
    "replace.cleared",  # a domain-spec change: all but one socket moved to the new selector, not yet attached
    "swap.loaded",  # a new program loaded over the pinned maps, not yet attached
    "detach.detached",  # the program detached, the state not yet removed
)


def point(step: str) -> None:
    """Die here if NUMAREUSE_CRASH_AT names this step; with NUMAREUSE_CRASH_ONCE=<path>, only the
    first process to get here dies (it creates the file), so that a retry, such as a watcher's next
    attach, runs through."""
    if os.environ.get("NUMAREUSE_CRASH_AT") != step:
        return
    once = os.environ.get("NUMAREUSE_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
