"""The previous release (layout 1, from git history) and this one, as importable trees for subprocesses.

Both are laid out the same way: a directory holding ``numareuse/`` with
``numareuse/bpf -> ../bpf`` and ``numareuse/cli -> ../cli`` (the installed
package shape), put first on sys.path with PYTHONPATH and as the working
directory (``python -m`` puts the cwd first on sys.path). The previous
release is ``git archive`` of its commit, as tests/test_upgrade.py does; this
one is a tree of symlinks to the checkout, so uncommitted changes are measured
too. A measurement then runs the same script (bench/probe.py) or the same CLI
under each, in a fresh process, so "before" and "after" differ only in the
package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().with_name("probe.py")
LAST_LAYOUT_1 = "51af523"  # the last commit whose numareuse pinned layout version 1 (tests/test_upgrade.py)


class Release:
    """One numareuse tree that subprocesses import."""

    def __init__(self, name: str, tree: Path):
        self.name, self.tree = name, tree

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        env.update(extra)
        return env

    def probe(self, mode: str, args: dict, timeout: float = 300, **env: str) -> dict:
        """Run bench/probe.py ``mode`` in a fresh process of this release; its JSON result.

        ``-P``: the script's own directory (bench/) is not put on sys.path.
        """
        r = subprocess.run(
            [sys.executable, "-P", str(PROBE), mode, json.dumps(args)],
            cwd=self.tree,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            tail = "\n".join(r.stderr.strip().splitlines()[-6:])
            raise RuntimeError(f"probe {mode} under {self.name} failed (status {r.returncode}):\n{tail}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def cli_cmd(self, *args) -> list[str]:
        return [sys.executable, "-m", "numareuse.cli.main", *map(str, args)]

    def cli(self, *args, timeout: float = 120, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        r = subprocess.run(
            self.cli_cmd(*args), cwd=self.tree, env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.name}: numareuse {' '.join(map(str, args))}: {r.stderr.strip()}")
        return r


def _package_links(tree: Path) -> None:
    os.symlink("../bpf", tree / "numareuse" / "bpf")
    os.symlink("../cli", tree / "numareuse" / "cli")


def current(workdir: Path) -> Release:
    """This checkout as it is on disk (a tree of symlinks, pycache left out)."""
    tree = workdir / "current"
    tree.mkdir()
    (tree / "numareuse").mkdir()
    for src in (REPO / "numareuse").iterdir():
        if src.name != "__pycache__":
            os.symlink(src, tree / "numareuse" / src.name)
    os.symlink(REPO / "bpf", tree / "bpf")
    os.symlink(REPO / "cli", tree / "cli")
    _package_links(tree)
    return Release("current", tree)


def previous(workdir: Path) -> Release | None:
    """The layout-1 release from this repository's history, or None without git or its history."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    tree = workdir / "layout1"
    tree.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", LAST_LAYOUT_1, "numareuse", "bpf", "cli"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    _package_links(tree)
    return Release(f"layout 1 ({LAST_LAYOUT_1})", tree)
