"""Kernel headers for bcc's run-time compile.

bcc needs a kernel build tree. Debian ships headers split over two
directories (``linux-headers-X-common`` and ``linux-headers-X-<arch>``) and
none for a custom running kernel; the headers are only used for declarations,
so a merged tree of symlinks over both works on newer kernels. We build it
once in a cache directory and point BCC_KERNEL_SOURCE at it, touching nothing
system-wide.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

from .errors import NotSupported


def cache_dir() -> str:
    if os.environ.get("NUMAREUSE_CACHE"):
        return os.environ["NUMAREUSE_CACHE"]
    if os.geteuid() == 0:
        return "/var/cache/numareuse"
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "numareuse")


def _version_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in os.path.basename(path).replace("-", ".").split(".")]


def ensure_kernel_source() -> str | None:
    """Set BCC_KERNEL_SOURCE when the running kernel has no build tree; return the tree used."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return os.environ["BCC_KERNEL_SOURCE"]
    if os.path.exists(f"/lib/modules/{os.uname().release}/build/include"):
        return None
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    pairs = []
    for common in glob.glob("/usr/src/linux-headers-*-common"):
        archdir = common[: -len("common")] + arch
        if os.path.isdir(archdir):
            pairs.append((common, archdir))
    if not pairs:
        raise NotSupported(
            "kernel headers for bcc: none for this kernel; install Debian's linux-headers-amd64 (make setup does)"
        )
    common, archdir = max(pairs, key=lambda p: _version_key(p[1]))
    tree = os.path.join(cache_dir(), "kernel-headers", os.path.basename(archdir))
    if not os.path.isdir(tree):
        os.makedirs(os.path.dirname(tree), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(tree))
        try:
            # common first, then the arch tree over it (its generated headers win)
            subprocess.run(["cp", "-rs", f"{common}/.", tmp], check=True)
            subprocess.run(["cp", "-rsf", f"{archdir}/.", tmp], check=True)
            os.rename(tmp, tree)
        except (OSError, subprocess.CalledProcessError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(tree):  # a concurrent builder may have won the rename
                raise NotSupported(f"kernel headers for bcc: cannot build a merged tree in {tree}: {e}") from e
    os.environ["BCC_KERNEL_SOURCE"] = tree
    return tree
