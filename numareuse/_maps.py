"""The selector's kernel maps: creation, layout, meta, pinning, and upgrades.

* ``sockarray``     REUSEPORT_SOCKARRAY; region r holds slots r*capacity ..
                    r*capacity+count[r]-1; regions 0..ndomains-1 are domains,
                    region ndomains is the wildcard
* ``region_count``  ARRAY, live slot count per region (read by the program)
* ``cpu_domain``    ARRAY, cpu -> domain (ndomains = none: go to the wildcard)
* ``counters``      PERCPU_ARRAY, outcomes counted by the program
* ``buckets``       ARRAY, region*nbuckets + (hash % nbuckets) -> slot index
* ``spill``         ARRAY, [0] = k, [1..k] = the regions that have a socket
* ``cookie_region`` HASH, socket cookie -> region (or drained), read by the
                    program when a listener closes; kept after a close while
                    its connections may still migrate
* ``bucket_count``  ARRAY, slot -> buckets it owns; controller only
* ``slot_cookie``   ARRAY, slot -> socket cookie (0 = hole); controller only
* ``slot_of``       HASH, socket cookie -> slot; controller only
* ``meta``          ARRAY, layout version, sizes and program hash
"""

from __future__ import annotations

import contextlib
import os
import resource
import struct

from . import _layout, _sys
from .errors import NotSupported, StateError, from_oserror

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

_TYPES = {
    "sockarray": (_sys.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8),
    "cpu_domain": (_sys.BPF_MAP_TYPE_ARRAY, 4, 4),
    "region_count": (_sys.BPF_MAP_TYPE_ARRAY, 4, 4),
    "counters": (_sys.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8),
    "slot_cookie": (_sys.BPF_MAP_TYPE_ARRAY, 4, 8),
    "slot_of": (_sys.BPF_MAP_TYPE_HASH, 8, 4),
    "meta": (_sys.BPF_MAP_TYPE_ARRAY, 4, 8),
    "cookie_region": (_sys.BPF_MAP_TYPE_HASH, 8, 4),
    "buckets": (_sys.BPF_MAP_TYPE_ARRAY, 4, 4),
    "spill": (_sys.BPF_MAP_TYPE_ARRAY, 4, 4),
    "bucket_count": (_sys.BPF_MAP_TYPE_ARRAY, 4, 4),
}

MIN_KERNEL_SOCKARRAY = "BPF_MAP_TYPE_REUSEPORT_SOCKARRAY (Linux 4.19)"


def _raise_memlock() -> None:
    # Before 5.11 map memory is charged to RLIMIT_MEMLOCK (often 64 KiB), and
    # creation fails with EPERM; later kernels charge the memory cgroup.
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE (a container): as far as the hard limit goes
        with contextlib.suppress(ValueError, OSError):
            hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))


def close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    fds.clear()


def create(layout: _layout.Layout, keys=None) -> dict[str, int]:
    """New, empty maps for ``layout`` (all of them, or ``keys``); fds owned by the caller."""
    _raise_memlock()
    fds: dict[str, int] = {}
    try:
        for key in keys or _layout.MAPS:
            mtype, ks, vs = _TYPES[key]
            try:
                fds[key] = _sys.map_create(mtype, ks, vs, layout.entries(key), _layout.MAPS[key])
            except OSError as e:
                if e.errno == 22 and key == "sockarray":
                    raise NotSupported(f"the kernel refused a map: needs {MIN_KERNEL_SOCKARRAY}") from e
                raise from_oserror(e, f"creating BPF map {_layout.MAPS[key]}") from e
        if "buckets" in fds:
            fill(fds["buckets"], layout.entries("buckets"), _layout.NO_SLOT)
    except BaseException:
        close_fds(fds)
        raise
    return fds


def fill(fd: int, n: int, value: int) -> None:
    """Set every u32 element of an n-element array to ``value``."""
    step = 4096
    for first in range(0, n, step):
        keys = list(range(first, min(n, first + step)))
        _sys.map_update_batch(fd, keys, _U32.pack(value) * len(keys))


def write_cpu_domains(fd: int, layout: _layout.Layout, cpu_domain: dict[int, int]) -> None:
    keys = list(range(layout.ncpus))
    _sys.map_update_batch(fd, keys, b"".join(_U32.pack(cpu_domain.get(c, layout.ndomains)) for c in keys))


def write_meta(fd: int, layout: _layout.Layout, attach_type: int, prog_hash: int) -> None:
    meta = dict(
        version=_layout.LAYOUT_VERSION,
        ndomains=layout.ndomains,
        capacity=layout.capacity,
        probe_max=_layout.PROBE_MAX,
        attach_type=attach_type,
        ncpus=layout.ncpus,
        prog_hash=prog_hash,
        nbuckets=layout.nbuckets,
    )
    for i, k in enumerate(_layout.META_KEYS):
        _sys.map_update(fd, i, _U64.pack(meta[k]))


def read_meta(fd: int) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for i, k in enumerate(_layout.META_KEYS):
        try:
            raw = _sys.map_lookup(fd, _U32.pack(i), 8)
        except OSError:
            raw = None
        out[k] = _U64.unpack(raw)[0] if raw else None
    return out


def check_meta(meta: dict) -> _layout.Layout:
    """The layout pinned ``meta`` describes; StateError for an unknown version or nonsense sizes."""
    version = meta.get("version")
    if version not in _layout.KNOWN_VERSIONS:
        raise StateError(
            f"pinned state has layout version {version}, this numareuse reads "
            f"{', '.join(map(str, _layout.KNOWN_VERSIONS))}: detach it with the numareuse that attached it"
        )
    nd, cap, ncpus = meta.get("ndomains"), meta.get("capacity"), meta.get("ncpus")
    if not (
        isinstance(nd, int)
        and 1 <= nd <= _layout.MAX_DOMAINS
        and isinstance(cap, int)
        and 1 <= cap <= _layout.MAX_CAPACITY
        and isinstance(ncpus, int)
        and 1 <= ncpus <= 1 << 16
    ):
        raise StateError(f"pinned state has a corrupt meta map (ndomains={nd}, capacity={cap}, ncpus={ncpus})")
    if version == _layout.LAYOUT_VERSION and meta.get("nbuckets") != _layout.nbuckets(cap):
        raise StateError(f"pinned state has a corrupt meta map (nbuckets={meta.get('nbuckets')})")
    return _layout.Layout(nd, cap, ncpus)


def keys_of(version: int) -> tuple[str, ...]:
    return _layout.MAPS_V1 if version == 1 else tuple(_layout.MAPS)


def open_pinned(directory: str) -> tuple[dict[str, int], int, dict]:
    """(map fds, program fd, meta) of a pinned group; StateError if incomplete or unknown."""
    fds: dict[str, int] = {}
    try:
        for key in ("meta", "prog"):
            fds[key] = _obj_get(directory, key)
        meta = read_meta(fds["meta"])
        check_meta(meta)
        for key in keys_of(meta["version"]):
            if key not in fds:
                fds[key] = _obj_get(directory, key)
    except BaseException:
        close_fds(fds)
        raise
    prog = fds.pop("prog")
    return fds, prog, meta


def _obj_get(directory: str, key: str) -> int:
    try:
        return _sys.obj_get(os.path.join(directory, key))
    except FileNotFoundError:
        raise StateError(f"pinned state {directory} is incomplete: {key} is missing") from None
    except OSError as e:
        raise from_oserror(e, f"opening pinned {key} in {directory}") from e


def pin(fds: dict[str, int], prog_fd: int, directory: str) -> None:
    for key, fd in fds.items():
        _sys.obj_pin(fd, os.path.join(directory, key))
    _sys.obj_pin(prog_fd, os.path.join(directory, "prog"))


def upgrade_v1(fds: dict[str, int], layout: _layout.Layout) -> dict[str, int]:
    """Add the maps layout 2 has and layout 1 had not, filled from the v1 state; returns them.

    The sockarray, cpu_domain, region_count, slot_cookie and slot_of of
    layout 1 mean the same in layout 2 and are kept (their sockets never
    leave their slots); counters grow from 8 to 16 entries and get a new map,
    seeded with the old values so that nothing counted is lost.
    """
    new = create(layout, ("counters", "cookie_region", "buckets", "spill", "bucket_count", "meta"))
    try:
        for i in range(8):
            raw = _sys.map_lookup(fds["counters"], _U32.pack(i), 8 * layout.ncpus)
            if raw:
                _sys.map_update(new["counters"], i, raw)
    except BaseException:
        close_fds(new)
        raise
    return new
