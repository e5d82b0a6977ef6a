"""The state layout shared by the BPF program and the controller.

The program gets every number here as a -D define (see ``defines``); nothing
is written twice. Bump LAYOUT_VERSION whenever a map, its size or meaning,
or a counter index changes: pinned state of another version is refused.
"""

from __future__ import annotations

LAYOUT_VERSION = 1

DEFAULT_CAPACITY = 256  # sockets per region, as FreeBSD's load-balancing group
MAX_CAPACITY = 1024
# Slots probed past empty ones in a region. The controller compacts regions on
# every change, so an empty slot exists only between a socket's close and the
# next sweep; 8 covers that many adjacent closes at a cost of at most 8 helper
# calls per region, and keeps the unrolled program small (verifier-friendly).
PROBE_MAX = 8

# Per-CPU counter indexes. 4..7 are reserved (for example for migration).
COUNTERS = ("local", "wildcard", "fallback", "empty_skipped")
NR_COUNTERS = 8

# Meta map: what the pinned maps were created with.
META_KEYS = ("version", "ndomains", "capacity", "probe_max", "attach_type", "ncpus")

# Map names as the kernel shows them (bpftool map show); at most 15 chars.
MAPS = {
    "sockarray": "nr_sockarray",
    "cpu_domain": "nr_cpu_domain",
    "region_count": "nr_region_count",
    "counters": "nr_counters",
    "slot_cookie": "nr_slot_cookie",
    "slot_of": "nr_slot_of",
    "meta": "nr_meta",
}
PROG_NAME = "numareuse_select"


def defines(ndomains: int, capacity: int, fds: dict[str, int]) -> dict[str, int]:
    """The -D defines for bpf/selector.bpf.c."""
    d = {
        "NR_DOMAINS": ndomains,
        "CAPACITY": capacity,
        "PROBE_MAX": min(PROBE_MAX, capacity),
        "SOCKARRAY_FD": fds["sockarray"],
        "CPU_DOMAIN_FD": fds["cpu_domain"],
        "REGION_COUNT_FD": fds["region_count"],
        "COUNTERS_FD": fds["counters"],
        "LAYOUT_VERSION": LAYOUT_VERSION,
    }
    for i, name in enumerate(COUNTERS):
        d[f"C_{name.upper()}"] = i
    return d
