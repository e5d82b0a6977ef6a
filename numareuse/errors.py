"""numareuse's error tree: one base class, one subclass per cause, each with an errno.

``wrap`` translates OSError into these once, at the public boundary, so no
OSError or traceback reaches a caller of the public API.
"""

from __future__ import annotations

import errno as _errno
import functools


class NumaReuseError(Exception):
    """Base class. ``errno`` is what the FreeBSD socket option would have returned."""

    errno = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class DomainError(NumaReuseError):
    """A domain outside WILDCARD, CURRENT, 0..ndomains-1 (EINVAL)."""

    errno = _errno.EINVAL


class DomainSpecError(NumaReuseError):
    """A domain spec that does not parse or names offline CPUs (EINVAL)."""

    errno = _errno.EINVAL


class NotInGroupError(NumaReuseError):
    """The socket is not a listening TCP / bound UDP socket of the attached
    SO_REUSEPORT group, or nothing is attached (ENOENT)."""

    errno = _errno.ENOENT


class CapacityError(NumaReuseError):
    """A region has no free slot (ENOSPC)."""

    errno = _errno.ENOSPC


class NotSupported(NumaReuseError):
    """The kernel lacks a feature; names it and the first kernel that has it (EOPNOTSUPP)."""

    errno = _errno.EOPNOTSUPP


class PermissionDenied(NumaReuseError):
    """Missing privilege (EPERM)."""

    errno = _errno.EPERM


class VerifierError(NumaReuseError):
    """The kernel's verifier refused the program; the message ends with its log's last lines."""

    errno = _errno.EINVAL


class StateError(NumaReuseError):
    """Pinned state that is missing, partial, or of another layout version."""

    errno = _errno.ESTALE


class ProcessGone(NumaReuseError):
    """A process exited while we worked on it (ESRCH)."""

    errno = _errno.ESRCH


def from_oserror(e: OSError, what: str) -> NumaReuseError:
    """The numareuse error for an OSError raised while doing ``what``."""
    cause = f"{what}: {e.strerror or e}"
    if e.errno in (_errno.EPERM, _errno.EACCES):
        return PermissionDenied(f"{cause} (needs root: CAP_BPF, CAP_NET_ADMIN and CAP_SYS_PTRACE)", errno=e.errno)
    if e.errno == _errno.ESRCH:
        return ProcessGone(cause)
    if e.errno in (_errno.ENOSYS, _errno.EOPNOTSUPP, _errno.ENOPROTOOPT):
        # ENOPROTOOPT: a socket option this kernel does not know (SO_ATTACH_REUSEPORT_EBPF
        # is 4.6+, SO_COOKIE 4.x, SO_DETACH_REUSEPORT_BPF newer): name it in ``what``
        return NotSupported(f"{cause} (the kernel does not know this socket option)", errno=e.errno)
    return NumaReuseError(cause, errno=e.errno)


def wrap(what: str):
    """Decorator: OSError inside becomes the matching NumaReuseError."""

    def deco(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except OSError as e:
                raise from_oserror(e, what) from e

        return inner

    return deco
