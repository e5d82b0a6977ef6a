"""The state layout shared by the BPF program and the controller.

The program gets every number here as a -D define (see ``defines``); nothing
is written twice. Bump LAYOUT_VERSION whenever a map, its size or meaning,
or a counter index changes: pinned state of an unknown version is refused,
and state of an older known version is upgraded in place (``_maps.upgrade``).
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUT_VERSION = 2
KNOWN_VERSIONS = (1, 2)  # versions this release reads; 1 is upgraded to 2

DEFAULT_CAPACITY = 256  # sockets per region, as FreeBSD's load-balancing group
MAX_CAPACITY = 1024
MAX_DOMAINS = 64
# Slots probed past empty ones in a region. The controller compacts regions, so
# an empty slot exists only between a socket's close and the next sweep; 8
# covers that many adjacent closes at a cost of at most 8 helper calls per
# region, and keeps the unrolled program small (verifier-friendly). The probe
# stops after n slots itself, so the bound does not depend on the capacity.
PROBE_MAX = 8

# Per-CPU counter indexes (0..3 as in layout 1). migrated_* count connections
# of a closing listener placed by the program (SELECT_OR_MIGRATE);
# migrated_unowned also counts those whose listener had no region (drained or
# never registered), which were placed by the CPU's domain instead.
COUNTERS = (
    "local",
    "wildcard",
    "fallback",
    "empty_skipped",
    "remote",
    "migrated_local",
    "migrated_wildcard",
    "migrated_fallback",
    "migrated_remote",
    "migrated_unowned",
)
NR_COUNTERS = 16
SELECTION_OUTCOMES = ("local", "wildcard", "remote", "fallback")
MIGRATION_OUTCOMES = ("migrated_local", "migrated_wildcard", "migrated_remote", "migrated_fallback")

# cookie_region values: 0..ndomains are regions; a drained socket has REGION_DRAINED.
REGION_DRAINED = 0xFFFFFFFE
NO_SLOT = 0xFFFFFFFF  # a bucket that names no slot

# Meta map: what the pinned maps were created with. Layout 1 had the first six.
META_KEYS = ("version", "ndomains", "capacity", "probe_max", "attach_type", "ncpus", "prog_hash", "nbuckets")

# Map names as the kernel shows them (bpftool map show); at most 15 chars.
MAPS = {
    "sockarray": "nr_sockarray",
    "cpu_domain": "nr_cpu_domain",
    "region_count": "nr_region_count",
    "counters": "nr_counters",
    "slot_cookie": "nr_slot_cookie",
    "slot_of": "nr_slot_of",
    "meta": "nr_meta",
    "cookie_region": "nr_cookie_regio",
    "buckets": "nr_buckets",
    "spill": "nr_spill",
    "bucket_count": "nr_bucket_count",
}
MAPS_V1 = ("sockarray", "cpu_domain", "region_count", "counters", "slot_cookie", "slot_of", "meta")
# maps the program reads (the others are the controller's bookkeeping)
PROGRAM_MAPS = ("sockarray", "cpu_domain", "region_count", "counters", "cookie_region", "buckets", "spill")
PROG_NAME = "numareuse_select"


def nbuckets(capacity: int) -> int:
    """Buckets per region: a power of two, 4 per slot, so shares differ by at most 1/4."""
    n = 64
    while n < 4 * capacity:
        n *= 2
    return n


@dataclass(frozen=True)
class Layout:
    """The sizes that every map and the program are built for."""

    ndomains: int
    capacity: int
    ncpus: int

    @property
    def nregions(self) -> int:
        return self.ndomains + 1

    @property
    def wildcard(self) -> int:
        return self.ndomains

    @property
    def nslots(self) -> int:
        return self.nregions * self.capacity

    @property
    def nbuckets(self) -> int:
        return nbuckets(self.capacity)

    def entries(self, key: str) -> int:
        return {
            "sockarray": self.nslots,
            "cpu_domain": self.ncpus,
            "region_count": self.nregions,
            "counters": NR_COUNTERS,
            "slot_cookie": self.nslots,
            "slot_of": self.nslots,
            "meta": len(META_KEYS),
            # closed sockets keep their entry while their connections may migrate
            "cookie_region": 2 * self.nslots,
            "buckets": self.nregions * self.nbuckets,
            "spill": self.nregions + 1,
            "bucket_count": self.nslots,  # buckets each slot owns (controller only)
        }[key]


def defines(layout: Layout, fds: dict[str, int], migrate: bool) -> dict[str, int]:
    """The -D defines for bpf/selector.bpf.c."""
    d = {
        "NR_DOMAINS": layout.ndomains,
        "CAPACITY": layout.capacity,
        "NR_BUCKETS": layout.nbuckets,
        "PROBE_MAX": PROBE_MAX,
        "HAVE_MIGRATE": int(migrate),
        "REGION_DRAINED": REGION_DRAINED,
        "LAYOUT_VERSION": LAYOUT_VERSION,
    }
    for key in PROGRAM_MAPS:
        d[f"{key.upper()}_FD"] = fds[key]
    for i, name in enumerate(COUNTERS):
        d[f"C_{name.upper()}"] = i
    return d
