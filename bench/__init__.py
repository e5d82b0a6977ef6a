"""Benchmarks of numareuse against baselines measured in the same run: `make bench` runs bench.run."""

import os
import subprocess


def git_commit() -> str | None:
    """The checkout's short commit, recorded with each result file."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__), capture_output=True, text=True
        )
    except OSError:
        return None
    return r.stdout.strip() or None
