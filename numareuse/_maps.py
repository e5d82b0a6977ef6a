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

import array
import contextlib
import mmap
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


# Arrays the controller maps into its memory (BPF_F_MMAPABLE): reading a region's
# cookies, counts, buckets and shares is then a memory read, not one bpf() call per
# element (the kernel's batch lookup copies element by element, ~0.5 us each).
MAPPED = ("region_count", "slot_cookie", "buckets", "spill", "bucket_count")
MIN_KERNEL_MMAPABLE = "BPF_F_MMAPABLE array maps (Linux 5.5)"


def create(layout: _layout.Layout, keys=None) -> dict[str, int]:
    """New, empty maps for ``layout`` (all of them, or ``keys``); fds owned by the caller."""
    _raise_memlock()
    fds: dict[str, int] = {}
    try:
        for key in keys or _layout.MAPS:
            mtype, ks, vs = _TYPES[key]
            flags = _sys.BPF_F_MMAPABLE if key in MAPPED else 0
            try:
                fds[key] = _sys.map_create(mtype, ks, vs, layout.entries(key), _layout.MAPS[key], flags)
            except OSError as e:
                if e.errno == 22 and key == "sockarray":
                    raise NotSupported(f"the kernel refused a map: needs {MIN_KERNEL_SOCKARRAY}") from e
                if e.errno == 22 and flags:
                    raise NotSupported(f"the kernel refused a map: needs {MIN_KERNEL_MMAPABLE}") from e
                raise from_oserror(e, f"creating BPF map {_layout.MAPS[key]}") from e
        if "buckets" in fds:
            with Views(fds, layout, ("buckets",)) as v:
                v.fill("buckets", _layout.NO_SLOT)
    except BaseException:
        close_fds(fds)
        raise
    return fds


class Views:
    """The MAPPED arrays of a selector in this process's memory.

    ``u32`` arrays have 8-byte elements in memory (the kernel rounds the
    element size up to 8), so element i of a u32 array is ``view[2 * i]``;
    ``get``/``put`` hide that. Stores are plain aligned stores the program
    sees at once; a store that must be ordered after a syscall's effect (a
    count published after its slot is filled) goes through bpf() instead.
    """

    def __init__(self, fds: dict[str, int], layout: _layout.Layout, keys=MAPPED):
        self._mms: list[mmap.mmap] = []
        self._views: dict[str, memoryview] = {}
        self.raw: dict[str, mmap.mmap] = {}
        self.stride: dict[str, int] = {}
        try:
            for key in keys:
                vs = _TYPES[key][2]
                size = -(-layout.entries(key) * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
                try:
                    mm = mmap.mmap(fds[key], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError as e:
                    raise StateError(f"map {_layout.MAPS[key]} cannot be mapped ({e.strerror}): not layout 2") from e
                self._mms.append(mm)
                self.raw[key] = mm
                self._views[key] = memoryview(mm).cast("Q" if vs == 8 else "I")
                self.stride[key] = 1 if vs == 8 else 2
        except BaseException:
            self.close()
            raise

    def get(self, key: str, i: int) -> int:
        return self._views[key][i * self.stride[key]]

    def put(self, key: str, i: int, value: int) -> None:
        self._views[key][i * self.stride[key]] = value

    def span(self, key: str, first: int, n: int) -> list[int]:
        """Elements first..first+n-1 as a list (a C-speed copy)."""
        st = self.stride[key]
        return self._views[key][first * st : (first + n) * st : st].tolist()

    def span_bytes(self, key: str, first: int, n: int) -> bytes:
        """The raw memory of elements first..first+n-1 (8 bytes each)."""
        return self.raw[key][first * 8 : (first + n) * 8]

    def put_span(self, key: str, first: int, values: list[int]) -> None:
        """Elements first.. = values, one element-sized store each (a C-speed copy)."""
        st, view = self.stride[key], self._views[key]
        view[first * st : (first + len(values)) * st : st] = array.array(view.format, values)

    # The upper 4 bytes of a u32 array's 8-byte element: memory the program cannot read
    # (the verifier bounds it to value_size) and no syscall writes (they copy value_size).
    # The controller keeps its own hints there (the bucket chains of _slots).

    def get_pad(self, key: str, i: int) -> int:
        return self._views[key][2 * i + 1]

    def put_pad(self, key: str, i: int, value: int) -> None:
        self._views[key][2 * i + 1] = value

    def put_pad_span(self, key: str, first: int, values: list[int]) -> None:
        self._views[key][2 * first + 1 : 2 * (first + len(values)) : 2] = array.array("I", values)

    def fill(self, key: str, value: int, first: int = 0, n: int | None = None) -> None:
        st, view = self.stride[key], self._views[key]
        count = (len(view) // st - first) if n is None else n
        view[first * st : (first + count) * st : st] = array.array(view.format, [value]) * count

    def close(self) -> None:
        for v in self._views.values():
            v.release()
        self._views.clear()
        for mm in self._mms:
            mm.close()
        self._mms.clear()
        self.raw.clear()

    def __enter__(self) -> Views:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_cpu_domains(fd: int, layout: _layout.Layout, cpu_domain: dict[int, int]) -> None:
    for cpu in range(layout.ncpus):  # once per selector: no batch call needed (5.6+)
        _sys.map_update(fd, cpu, _U32.pack(cpu_domain.get(cpu, layout.ndomains)))


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
        _check_sizes(fds, check_meta(meta), directory)
    except BaseException:
        close_fds(fds)
        raise
    prog = fds.pop("prog")
    return fds, prog, meta


def _check_sizes(fds: dict[str, int], layout: _layout.Layout, directory: str) -> None:
    """Every pinned map has the size its meta implies: a corrupt meta is refused, never used."""
    for key in ("sockarray", "cpu_domain", "region_count", "slot_cookie"):  # the same in layouts 1 and 2
        got = _sys.map_info(fds[key])["max_entries"]
        if got != layout.entries(key):
            raise StateError(
                f"pinned state {directory} does not match its meta: {key} has {got} entries, "
                f"meta implies {layout.entries(key)}"
            )


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


UPGRADED_FROM_V1 = (
    "counters",
    "cookie_region",
    "buckets",
    "spill",
    "bucket_count",
    "meta",
    "region_count",
    "slot_cookie",
)


def upgrade_v1(fds: dict[str, int], layout: _layout.Layout) -> dict[str, int]:
    """New maps for what layout 2 changed, filled from the layout-1 state; returns them.

    The sockarray, cpu_domain and slot_of of layout 1 mean the same in
    layout 2 and are kept, so every socket stays in its slot. counters grow
    from 8 to 16 entries (seeded with the old values, so nothing counted is
    lost); region_count and slot_cookie are copied into mappable arrays.
    """
    new = create(layout, UPGRADED_FROM_V1)
    try:
        for i in range(8):
            raw = _sys.map_lookup(fds["counters"], _U32.pack(i), 8 * layout.ncpus)
            if raw:
                _sys.map_update(new["counters"], i, raw)
        for r in range(layout.nregions):
            _sys.map_update(new["region_count"], r, _sys.map_lookup(fds["region_count"], _U32.pack(r), 4))
        with Views(new, layout, ("slot_cookie",)) as v:
            for slot in range(layout.nslots):
                cookie = _U64.unpack(_sys.map_lookup(fds["slot_cookie"], _U32.pack(slot), 8))[0]
                if cookie:
                    v.put("slot_cookie", slot, cookie)
    except BaseException:
        close_fds(new)
        raise
    return new
