"""Compile once, load many times, and keep LLVM out of the controller.

bcc compiles ``bpf/selector.bpf.c`` in a short-lived child
(``numareuse._compile``) with placeholder map fds; its instructions are cached
on disk under a key of everything that shapes them (the source, every
non-fd ``-D`` value, the kernel headers and the bcc library). This process
then patches each ``BPF_PSEUDO_MAP_FD`` immediate with the real map fd and
loads the program itself with BPF_PROG_LOAD, so no process that holds a
selector ever maps bcc or LLVM, and a cached program loads in milliseconds.
"""

from __future__ import annotations

import base64
import errno
import functools
import glob
import hashlib
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
from importlib import resources

from . import _headers, _layout, _sys
from .errors import NotSupported, PermissionDenied, VerifierError

# Placeholder fds in the compiled code: 'NR' and the map's index in PROGRAM_MAPS.
_PLACEHOLDER = 0x4E520000
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_COMPILE_TIMEOUT = 300  # seconds; a compile on an emulated CPU takes about 5
MIGRATE_MIN_KERNEL = (5, 14)


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def migration_supported() -> bool:
    """BPF_SK_REUSEPORT_SELECT_OR_MIGRATE and ctx->migrating_sk exist (5.14+).

    NUMAREUSE_NO_MIGRATE=1 behaves as an older kernel (tests use it).
    """
    return os.environ.get("NUMAREUSE_NO_MIGRATE") != "1" and kernel_version() >= MIGRATE_MIN_KERNEL


def _placeholders() -> dict[str, int]:
    return {key: _PLACEHOLDER + i for i, key in enumerate(_layout.PROGRAM_MAPS)}


@functools.cache
def _bcc_identity() -> tuple:
    """What identifies the compiler: bcc's library files (its LLVM is linked in)."""
    libs = sorted(glob.glob("/usr/lib/*/libbcc.so*") + glob.glob("/usr/lib/libbcc.so*"))
    return tuple((os.path.basename(p), os.stat(p).st_size, int(os.stat(p).st_mtime)) for p in libs if os.path.exists(p))


def _cache_dir() -> str:
    return os.path.join(_headers.cache_dir(), "programs")


def _source() -> str:
    return resources.files("numareuse.bpf").joinpath("selector.bpf.c").read_text()


def compiled(layout: _layout.Layout, migrate: bool) -> bytes:
    """The program's instructions with placeholder map fds, from the cache or a fresh compile."""
    tree = _headers.ensure_kernel_source()
    defines = _layout.defines(layout, _placeholders(), migrate)
    key_src = json.dumps([_source(), sorted(defines.items()), tree, _bcc_identity()], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = os.path.join(_cache_dir(), f"{key}.bin")
    try:
        with open(path, "rb") as f:
            insns = f.read()
        if insns and len(insns) % 8 == 0:
            return insns
    except OSError:
        pass
    insns = _compile_in_child(defines)
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=_cache_dir(), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(insns)
        os.rename(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a compile next time
    return insns


def _compile_in_child(defines: dict[str, int]) -> bytes:
    env = dict(os.environ)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "numareuse._compile"],
            input=json.dumps({"defines": defines}),
            capture_output=True,
            text=True,
            env=env,
            timeout=_COMPILE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise VerifierError(f"compiling the BPF program took more than {_COMPILE_TIMEOUT} s") from None
    if r.returncode == 3:
        raise NotSupported(r.stderr.strip().splitlines()[-1])
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise VerifierError("\n".join(lines[-8:]) or f"the compiler exited with status {r.returncode}")
    return base64.b64decode(json.loads(r.stdout)["insns"])


def patch(insns: bytes, fds: dict[str, int]) -> bytes:
    """Replace each placeholder map fd in a ld_imm64 instruction with the real fd."""
    by_placeholder = {ph: fds[key] for key, ph in _placeholders().items()}
    out = bytearray(insns)
    i = 0
    while i < len(out):
        code, regs = out[i], out[i + 1]
        if code == _LD_IMM64:
            if regs >> 4 == _PSEUDO_MAP_FD:
                (imm,) = struct.unpack_from("=i", out, i + 4)
                if imm not in by_placeholder:
                    raise VerifierError(f"compiled program names an unknown map fd {imm:#x}")
                struct.pack_into("=i", out, i + 4, by_placeholder[imm])
            i += 16  # ld_imm64 takes two instruction slots
            continue
        i += 8
    return bytes(out)


def program_hash(insns: bytes) -> int:
    """64-bit identity of a program (before fds are patched), recorded in meta."""
    return int.from_bytes(hashlib.sha256(insns).digest()[:8], "little")


def load(layout: _layout.Layout, fds: dict[str, int], migrate: bool | None = None) -> tuple[int, int, int]:
    """Load the selector over ``fds``; returns (program fd, program hash, attach type).

    ``migrate`` None: SELECT_OR_MIGRATE where the kernel has it, else SELECT.
    """
    if migrate is None:
        migrate = migration_supported()
    insns = compiled(layout, migrate)
    attach = _sys.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate else _sys.BPF_SK_REUSEPORT_SELECT
    code = patch(insns, fds)
    fd, err = _sys.prog_load(_sys.BPF_PROG_TYPE_SK_REUSEPORT, code, _layout.PROG_NAME, attach)
    if fd < 0:
        fd, err = _sys.prog_load(_sys.BPF_PROG_TYPE_SK_REUSEPORT, code, _layout.PROG_NAME, attach, 1 << 20)
    if fd >= 0:
        return fd, program_hash(insns), attach
    e, log = err
    if e in (errno.EPERM, errno.EACCES) and not log:
        raise PermissionDenied("loading the BPF program: needs root (CAP_BPF and CAP_NET_ADMIN)", errno=e)
    if e == errno.EINVAL and not log:
        raise NotSupported("the kernel refused the program: needs BPF_PROG_TYPE_SK_REUSEPORT (Linux 4.19)")
    tail = "\n".join([ln for ln in log.splitlines() if ln.strip()][-8:])
    raise VerifierError(f"loading the BPF program failed: {os.strerror(e)}\n{tail}", errno=e)
