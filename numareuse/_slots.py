"""The slot allocator: register, move, drain, compact, over the selector's maps.

The kernel maps are the single source of truth, so every process holding
their fds (a pre-fork master and its workers, the CLI through pinned state)
sees and changes the same registrations. Every change runs under the lock
and in an order that keeps the program's invariants:

* a slot below a region's count holds a live socket, or is a hole (or the
  slot of a socket closed since the last sweep) that the program probes past;
* a count is published only after its slot is filled;
* a bucket names a slot below the count, or NO_SLOT (the program then uses
  reciprocal_scale); a socket that joins takes ~1/n of the buckets, a socket
  that leaves hands its own to the others, so ~1/n of the flows move.

Inserting costs a fixed number of map operations whatever the fill (one batch
read of the region's cookies finds a hole); sweeping for closed sockets is
lazy (``refresh``, or a full region), since the program copes with them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import operator
import os
import socket
import struct
import threading
import time
import weakref

from . import _crash, _layout, _maps, _sys
from .errors import CapacityError, NumaReuseError, StateError

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_CR = struct.Struct("=II")  # cookie_region value: region, since (CLOCK_BOOTTIME s; 0 = registered)
MIGRATION_GRACE = 120  # s: a closed socket's requests may migrate this long (SYN-ACK retries: ~63 s)
LOCK_TIMEOUT = float(os.environ.get("NUMAREUSE_LOCK_TIMEOUT", "10"))


def _indexes(values: list[int], value: int) -> list[int]:
    """Where ``value`` is in ``values``: C-speed scans, so O(fill) costs little when it is rare."""
    out, i = [], -1
    with contextlib.suppress(ValueError):
        while True:
            i = values.index(value, i + 1)
            out.append(i)
    return out


def _level(shares: list[int], extra: int) -> list[int]:
    """How many of ``extra`` new units each share gets so that the shares end as level as can be
    (water-filling: the smallest are raised first; ties go to the earlier index)."""
    order = sorted(range(len(shares)), key=shares.__getitem__)
    vals = [shares[i] for i in order]
    k, total = 1, vals[0]
    while k < len(vals) and k * vals[k] - total <= extra:  # raising the k smallest to vals[k] fits
        total += vals[k]
        k += 1
    level, rem = divmod(extra + total, k)
    out = [0] * len(shares)
    for rank in range(k):
        out[order[rank]] = level - vals[rank] + (rank < rem)
    return out


def _now() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME)) or 1


class Lock:
    """Mutual exclusion between the threads and processes sharing one selector.

    A POSIX lock (lockf) on an inherited memfd belongs to a process, so a forked
    worker excludes its master without reopening anything (it may have dropped
    the privileges needed to). Waits are bounded: a holder that is frozen or
    stopped (SIGSTOP) makes the others fail with StateError after ``timeout``
    seconds instead of hanging (a master must still stop on SIGTERM).
    """

    def __init__(self, fd: int, timeout: float = LOCK_TIMEOUT):
        self.fd, self.timeout = fd, timeout
        self._threads = threading.Lock()
        _LOCKS.add(self)

    def _after_fork(self) -> None:
        # a thread of the parent may have held it at fork(): the child has no such thread
        self._threads = threading.Lock()

    def _holder(self) -> int:
        try:
            raw = fcntl.fcntl(self.fd, fcntl.F_GETLK, struct.pack("hhxxxxqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
            return struct.unpack("hhxxxxqqi4x", raw)[4]
        except OSError:
            return 0

    @contextlib.contextmanager
    def __call__(self, shared: bool = False):
        if not self._threads.acquire(timeout=self.timeout):
            raise StateError(f"the selector's lock is held by another thread for more than {self.timeout:g} s")
        try:
            mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
            deadline, pause = time.monotonic() + self.timeout, 0.0005
            while True:
                try:
                    fcntl.lockf(self.fd, mode)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    pid = self._holder()
                    who = f"pid {pid}" if pid > 0 else "another process"
                    raise StateError(
                        f"the selector's lock is held by {who} for more than {self.timeout:g} s (stopped or frozen?)",
                        errno=errno.EDEADLK,
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_LOCKS: weakref.WeakSet[Lock] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [lock._after_fork() for lock in list(_LOCKS)])


def socket_alive(fd: int) -> bool:
    """The socket is still usable in a group: a listening TCP or a bound UDP socket."""
    try:
        if _sys.sock_opt_int(fd, _sys.SO_PROTOCOL) == socket.IPPROTO_TCP:
            return bool(_sys.sock_opt_int(fd, _sys.SO_ACCEPTCONN))
        return True
    except OSError:
        return False


def live_fd(sock_fds: dict[int, int], cookie: int) -> int | None:
    """An fd of the socket with ``cookie`` if this process still holds one (forgotten if not)."""
    fd = sock_fds.get(cookie)
    if fd is None:
        return None
    try:
        if _sys.sock_cookie(fd) == cookie:
            return fd
    except OSError:
        pass
    del sock_fds[cookie]  # closed, or the number now names another file
    return None


def legacy_registrations(fds: dict[str, int], layout: _layout.Layout) -> list[dict]:
    """registrations() of layout-1 maps (not mappable), one bpf() call per element."""
    out = []
    for region in range(layout.nregions):
        n = _U32.unpack(_sys.map_lookup(fds["region_count"], _U32.pack(region), 4))[0]
        for i in range(min(n, layout.capacity)):
            slot = region * layout.capacity + i
            cookie = _U64.unpack(_sys.map_lookup(fds["slot_cookie"], _U32.pack(slot), 8))[0]
            if cookie:
                v = _sys.map_lookup(fds["sockarray"], _U32.pack(slot), 8)
                live = v is not None and _U64.unpack(v)[0] == cookie
                out.append({"slot": slot, "region": region, "cookie": cookie, "live": live})
    return out


def legacy_clear(fds: dict[str, int], layout: _layout.Layout) -> None:
    for region in range(layout.nregions):
        _sys.map_update(fds["region_count"], region, _U32.pack(0))
    for slot in range(layout.nslots):
        _sys.map_delete(fds["sockarray"], _U32.pack(slot))
        _sys.map_update(fds["slot_cookie"], slot, _U64.pack(0))


class Slots:
    """Slot bookkeeping over one selector's maps. Callers hold the lock for changes."""

    def __init__(self, fds: dict[str, int], layout: _layout.Layout, sock_fds: dict[int, int] | None = None):
        self.fds, self.layout = fds, layout
        self.cap, self.nb = layout.capacity, layout.nbuckets
        self.v = _maps.Views(fds, layout)
        # cookie -> an fd of that socket in this process (the caller's, not a dup)
        self.sock_fds: dict[int, int] = {} if sock_fds is None else sock_fds

    def close(self) -> None:
        self.v.close()

    # -- primitives -------------------------------------------------------

    def count(self, region: int) -> int:
        return self.v.get("region_count", region)

    def counts(self) -> list[int]:
        return self.v.span("region_count", 0, self.layout.nregions)

    def set_count(self, region: int, n: int, old: int) -> None:
        # through bpf(), not the mapping: a syscall orders the count after the
        # slot's fill on every CPU (a plain store may become visible first on arm64)
        _sys.map_update(self.fds["region_count"], region, _U32.pack(n))
        if (old == 0) != (n == 0):
            self.write_spill()

    def write_spill(self) -> None:
        """The list of regions with a socket, for the program's remote step (entries first, then k)."""
        nonempty = [r for r, n in enumerate(self.counts()) if n]
        for i, r in enumerate(nonempty):
            self.v.put("spill", 1 + i, r)
        _sys.map_update(self.fds["spill"], 0, _U32.pack(len(nonempty)))

    def slot_of(self, cookie: int) -> int | None:
        v = _sys.map_lookup(self.fds["slot_of"], _U64.pack(cookie), 4)
        return None if v is None else _U32.unpack(v)[0]

    def slot_cookie(self, slot: int) -> int:
        return self.v.get("slot_cookie", slot)

    def region_cookies(self, region: int, n: int) -> list[int]:
        return self.v.span("slot_cookie", region * self.cap, n)

    def live(self, slot: int, cookie: int | None = None) -> bool:
        """The slot holds a socket (``cookie``'s, when given: a sockarray lookup returns the cookie)."""
        v = _sys.map_lookup(self.fds["sockarray"], _U32.pack(slot), 8)
        return v is not None and (cookie is None or _U64.unpack(v)[0] == cookie)

    def region_entry(self, cookie: int) -> tuple[int, int] | None:
        v = _sys.map_lookup(self.fds["cookie_region"], _U64.pack(cookie), 8)
        return None if v is None else _CR.unpack(v)

    def set_region_entry(self, cookie: int, region: int, since: int = 0) -> None:
        try:
            _sys.map_update_u64key(self.fds["cookie_region"], cookie, _CR.pack(region, since))
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise
            self._collect_region_entries(force=True)
            _sys.map_update_u64key(self.fds["cookie_region"], cookie, _CR.pack(region, since))

    def live_fd(self, cookie: int) -> int | None:
        return live_fd(self.sock_fds, cookie)

    def _put(self, slot: int, fd: int, cookie: int) -> None:
        # socket first, bookkeeping after: the program only reads the sockarray
        try:
            _sys.map_update(self.fds["sockarray"], slot, _U64.pack(fd))
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            # EBUSY: the socket already sits in a sockarray. In ours, above a
            # count, when a crash came between this update and the next: find it.
            if not self._remove_orphan(cookie):
                raise NumaReuseError(
                    "the socket is already in another selector's sockarray (the kernel allows one): "
                    "detach that one first (numareuse detach, or close the other Selector)",
                    errno=errno.EBUSY,
                ) from None
            _sys.map_update(self.fds["sockarray"], slot, _U64.pack(fd))
        _crash.point("insert.put")
        self.v.put("slot_cookie", slot, cookie)
        _sys.map_update_u64key(self.fds["slot_of"], cookie, _U32.pack(slot))

    def _remove_orphan(self, cookie: int) -> bool:
        """Delete ``cookie``'s socket from any slot of our sockarray; True when it was there."""
        for slot in range(self.layout.nslots):
            if self.live(slot, cookie):
                _sys.map_delete(self.fds["sockarray"], _U32.pack(slot))
                return True
        return False

    # -- buckets ----------------------------------------------------------
    #
    # Each live index of a region owns buckets; bucket_count keeps how many,
    # and every share stays within one bucket of the others: a newcomer takes
    # its share one bucket at a time from the owners with the most, a leaver
    # hands its buckets one at a time to the owners with the fewest. Only the
    # buckets that change owner are written, so ~1/n of the flows move.

    def _table(self, region: int) -> bytes:
        """The region's buckets as raw memory: 8 bytes each, the owner in the first 4 (a memcpy)."""
        return self.v.span_bytes("buckets", region * self.nb, self.nb)

    def _shares(self, region: int, n: int) -> list[int]:
        return self.v.span("bucket_count", region * self.cap, n)

    def _write_shares(self, region: int, shares: list[int], changed: set[int]) -> None:
        base = region * self.cap
        for i in changed:
            self.v.put("bucket_count", base + i, shares[i])

    # Bucket chains: where an index's buckets are, so that a register or an
    # unregister that moves a few buckets finds them without scanning the table
    # (a scan of 4096 buckets costs 20-40 µs; a chain step well under 1 µs).
    # They live in the pad halves of the u32 elements (Views.get_pad), which the
    # program never reads: bucket_count's pad of index i holds 1 + the first
    # bucket of i's chain (0: none), buckets' pad of bucket b holds 1 + the next
    # bucket of the same owner (0: the end). They are hints: every bucket taken
    # from a chain is checked against the table, a chain shorter than the share
    # is rebuilt from the table, and bulk changes just drop a region's chains.

    def _unchain(self, region: int) -> None:
        """Drop the region's chains (after a bulk change); the next user rebuilds them."""
        self.v.put_pad_span("bucket_count", region * self.cap, [0] * self.cap)

    def _rechain(self, region: int) -> None:
        """Rebuild the region's chains from the table (one pass)."""
        table = self.v.span("buckets", region * self.nb, self.nb)
        nxt, heads = [0] * self.nb, [0] * self.cap
        cap = self.cap
        for b in range(self.nb - 1, -1, -1):
            o = table[b]
            if o < cap:
                nxt[b] = heads[o]
                heads[o] = b + 1
        self.v.put_pad_span("buckets", region * self.nb, nxt)
        self.v.put_pad_span("bucket_count", region * self.cap, heads)

    def _pop(self, region: int, idx: int) -> int:
        """A bucket of ``idx`` off its chain, else -1 (the chain is empty or stale)."""
        head = region * self.cap + idx
        h = self.v.get_pad("bucket_count", head)
        if not h or h > self.nb or self.v.get("buckets", region * self.nb + h - 1) != idx:
            return -1
        b = h - 1
        self.v.put_pad("bucket_count", head, self.v.get_pad("buckets", region * self.nb + b))
        return b

    def _push(self, region: int, idx: int, b: int) -> None:
        head = region * self.cap + idx
        self.v.put_pad("buckets", region * self.nb + b, self.v.get_pad("bucket_count", head))
        self.v.put_pad("bucket_count", head, b + 1)

    def _chain(self, region: int, idx: int, share: int) -> list[int] | None:
        """``idx``'s buckets from its chain, or None when the chain does not hold exactly ``share``."""
        out, seen = [], set()
        h = self.v.get_pad("bucket_count", region * self.cap + idx)
        base = region * self.nb
        while h and len(out) <= share:
            b = h - 1
            if b >= self.nb or b in seen or self.v.get("buckets", base + b) != idx:
                return None
            out.append(b)
            seen.add(b)
            h = self.v.get_pad("buckets", base + b)
        return out if len(out) == share else None

    def _find(self, table: bytes, idx: int, start: int = 0) -> int:
        """The first bucket at or after ``start`` that names ``idx``, else -1 (a C-speed scan):
        for when the chains and the shares disagree with the table."""
        pat = _U32.pack(idx)  # the owner half only: the pad half holds the chains
        pos = table.find(pat, start * 8)
        while pos >= 0 and pos % 8:
            pos = table.find(pat, pos + 1)
        return pos // 8 if pos >= 0 else -1

    def _owned(self, region: int, idx: int, share: int = 0) -> list[int]:
        """The buckets of ``region`` that name ``idx``; ``share``: how many it holds, if known."""
        if 0 < share <= 64:
            got = self._chain(region, idx, share)
            if got is None:
                self._rechain(region)
                got = self._chain(region, idx, share)
            if got is not None:
                return got
        if share > 32:  # many: C-speed index() over the table as a list beats a bytes find per bucket
            return _indexes(self.v.span("buckets", region * self.nb, self.nb), idx)
        table = self._table(region)
        out, b = [], self._find(table, idx)
        while b >= 0:
            out.append(b)
            b = self._find(table, idx, b + 1)
        return out

    def _write_buckets(self, region: int, buckets: list[int], owners: list[int]) -> None:
        base = region * self.nb
        if len(buckets) > 64:  # many: one pass over the table, each bucket still one u32 store
            table = self.v.span("buckets", base, self.nb)
            for b, owner in zip(buckets, owners):
                table[b] = owner
            self.v.put_span("buckets", base, table)
            return
        for b, owner in zip(buckets, owners):
            self.v.put("buckets", base + b, owner)

    def _take_buckets(self, region: int, idx: int, n: int, owners: int) -> None:
        """Give index ``idx`` (new in a region of ``n`` indexes, ``owners`` live) its share of buckets."""
        shares = self._shares(region, n)
        if owners <= 1 or not any(shares):
            self.v.fill("buckets", idx, region * self.nb, self.nb)
            self._unchain(region)
            shares = [0] * n
            shares[idx] = self.nb
            self._write_shares(region, shares, set(range(n)))
            return
        want = self.nb // owners
        if want > 16:  # few owners: level the donors down in bulk
            self._take_in_bulk(region, idx, n, shares, want)
            self._unchain(region)
            return
        table = None  # read only if a chain fails
        rechained = False
        taken, changed, nxt = [], {idx}, {}  # nxt: donor -> where a table scan for it goes on
        # the others' shares are level: the largest is nb / (owners - 1) rounded up, unless a
        # change was cut short (then the scan finds it)
        top, pos = -(-self.nb // (owners - 1)), 0
        if top not in shares:
            top = max(shares)
        while len(taken) < want and top > 0:
            try:
                donor = shares.index(top, pos)
            except ValueError:
                top, pos = top - 1, 0
                continue
            pos = donor + 1
            if donor == idx or shares[donor] <= want:
                continue
            # off the donor's chain; each bucket is written at once, so that the check of
            # a later pop (and a rebuild) sees it taken: a stale chain can name it twice
            b = self._pop(region, donor)
            if b < 0 and not rechained:
                self._rechain(region)
                rechained = True
                b = self._pop(region, donor)
            if b < 0:  # the share count is off (an interrupted change): scan the table
                if table is None:
                    table = self._table(region)
                b = self._find(table, donor, nxt.get(donor, 0))
                while b >= 0 and b in taken:
                    b = self._find(table, donor, b + 1)
                if b < 0:
                    continue
                nxt[donor] = b + 1
            self.v.put("buckets", region * self.nb + b, idx)
            taken.append(b)
            shares[donor] -= 1
            changed.add(donor)
        shares[idx] = len(taken)
        for b in taken:
            self._push(region, idx, b)
        self._write_shares(region, shares, changed)

    def _take_in_bulk(self, region: int, idx: int, n: int, shares: list[int], want: int) -> None:
        """_take_buckets for a large share: each donor keeps an equal part of what stays (the larger ones one more)."""
        donors = sorted((i for i in range(n) if shares[i] and i != idx), key=shares.__getitem__, reverse=True)
        if len(donors) == 1 and shares[donors[0]] == self.nb:  # the second owner: every other bucket, spread
            (d,) = donors
            taken = list(range(idx % 2, self.nb, 2))[:want]
            shares[d], shares[idx] = self.nb - len(taken), len(taken)
            self._write_buckets(region, taken, [idx] * len(taken))
            self._write_shares(region, shares, {d, idx})
            return
        stay = sum(shares[d] for d in donors) - want
        base, extra = divmod(stay, len(donors))
        table = self.v.span("buckets", region * self.nb, self.nb)
        taken, changed = [], {idx}
        for rank, d in enumerate(donors):
            pos = 0
            for _ in range(max(0, shares[d] - base - (rank < extra))):
                pos = table.index(d, pos)
                taken.append(pos)
                pos += 1
                shares[d] -= 1
            changed.add(d)
        shares[idx] = len(taken)
        self._write_buckets(region, taken, [idx] * len(taken))
        self._write_shares(region, shares, changed)

    def _hand_over(self, region: int, idx: int, to: list[int], n: int) -> None:
        """Give ``idx``'s buckets to the indexes ``to``, the fewest-holding first (NO_SLOT if none)."""
        shares = self._shares(region, n)
        mine = shares[idx] if idx < n else 0
        changed = {idx} if idx < n else set()
        if idx < n:
            shares[idx] = 0
        if not to:
            # nobody else is left, so only idx's buckets can name a slot: all go to the hash at once
            self.v.fill("buckets", _layout.NO_SLOT, region * self.nb, self.nb)
            self._unchain(region)
            self._write_shares(region, shares, changed)
            return
        if len(to) == 1 and mine + shares[to[0]] == self.nb:  # the one left takes every bucket
            self.v.fill("buckets", to[0], region * self.nb, self.nb)
            self._unchain(region)
            shares[to[0]] = self.nb
            self._write_shares(region, shares, changed | {to[0]})
            return
        gone = self._owned(region, idx, mine)
        live = list(operator.itemgetter(*to)(shares)) if len(to) > 1 else [shares[to[0]]]
        owners = []
        if len(gone) <= 64:  # a few: each to the one holding fewest (C-speed min and index)
            for _b in gone:
                j = live.index(min(live))
                live[j] += 1
                owners.append(to[j])
                shares[to[j]] += 1
                changed.add(to[j])
        else:  # many (so few sockets are left): levelled in one pass
            for j, k in enumerate(_level(live, len(gone))):
                if k:
                    owners += [to[j]] * k
                    shares[to[j]] += k
                    changed.add(to[j])
        if gone:
            if len(gone) <= 64:
                # chains before the table: cut short here, a chain names a bucket the table
                # does not give it yet (a check rejects it), never misses one it gives
                self.v.put_pad("bucket_count", region * self.cap + idx, 0)
                for b, o in zip(gone, owners):
                    self._push(region, o, b)
                self._write_buckets(region, gone, owners)
            else:
                self._write_buckets(region, gone, owners)
                self._unchain(region)
        self._write_shares(region, shares, changed)

    def _rename_buckets(self, region: int, old: int, new: int, n: int) -> None:
        """A socket moved from index ``old`` to ``new``: its buckets follow it (its flows stay)."""
        shares = self._shares(region, n)
        moved = self._owned(region, old, shares[old])
        self._write_buckets(region, moved, [new] * len(moved))
        if 0 < len(moved) <= 64:  # the chain's links stay; only its head moves
            base = region * self.cap
            self.v.put_pad("bucket_count", base + new, self.v.get_pad("bucket_count", base + old))
            self.v.put_pad("bucket_count", base + old, 0)
        else:
            self._unchain(region)
        shares[new], shares[old] = shares[old], 0
        self._write_shares(region, shares, {old, new})

    # -- changes (lock held) ----------------------------------------------

    def free_index(self, region: int) -> tuple[int, int, list[int]]:
        """(index to fill, count, cookies below it): a hole, else the tail; CapacityError when full.

        Only a full region is swept for closed sockets: the program copes with
        them, and a register must not cost a pass over the region.
        """
        for attempt in range(2):
            n = self.count(region)
            cookies = self.region_cookies(region, n)
            if 0 in cookies:
                return cookies.index(0), n, cookies
            if n < self.cap:
                return n, n, cookies
            if attempt == 0:
                self.sweep(region)
        name = "the wildcard" if region == self.layout.wildcard else f"domain {region}"
        raise CapacityError(f"{name} already holds {self.cap} sockets (capacity)")

    def insert(self, region: int, fd: int, cookie: int) -> None:
        """Put a socket that is in no slot into ``region``: a hole if there is one, else the tail."""
        idx, n, cookies = self.free_index(region)
        self._put(region * self.cap + idx, fd, cookie)
        self.set_region_entry(cookie, region)
        if idx == n:
            self.set_count(region, n + 1, n)  # publish last: the program never sees a slot before its socket
        _crash.point("insert.counted")
        # live ones, and this one (free_index found no hole when it returned the tail)
        owners = n + 1 if idx == n else len(cookies) - cookies.count(0) + 1
        self._take_buckets(region, idx, max(n, idx + 1), owners)

    def vacate(self, slot: int, cookie: int, gone: bool = False, compact: bool = True) -> None:
        """Take a socket out of its slot and compact the region.

        ``gone``: it closed (its slot is empty already); its cookie_region
        entry stays, dated, while its connections may migrate. ``compact``
        False leaves the hole (its buckets already went to the others).
        """
        region, idx = divmod(slot, self.cap)
        n = self.count(region)
        cookies = self.region_cookies(region, n)
        if 0 in cookies:
            others = [i for i, c in enumerate(cookies) if c and i != idx]
        else:  # no hole: every other index (built at C speed)
            others = [*range(idx), *range(idx + 1, n)]
        self._hand_over(region, idx, others, n)  # before the socket leaves: its flows move once
        _sys.map_delete(self.fds["sockarray"], _U32.pack(slot))
        _crash.point("move.vacated")
        _sys.map_delete(self.fds["slot_of"], _U64.pack(cookie))
        self.v.put("slot_cookie", slot, 0)
        if gone:
            entry = self.region_entry(cookie)
            if entry is not None and entry[1] == 0:
                self.set_region_entry(cookie, entry[0], _now())
        if idx < len(cookies):
            cookies[idx] = 0
        if compact:
            self._compact(region, cookies)

    def _compact(self, region: int, cookies: list[int]) -> None:
        """Fill holes from the region's tail where this process holds the tail's fd; shrink the count."""
        base, n = region * self.cap, len(cookies)
        new_n = n
        holes = _indexes(cookies, 0)
        while holes:
            last = new_n - 1
            if holes[-1] == last:  # trailing hole: just shrink
                holes.pop()
                new_n -= 1
                continue
            cookie = cookies[last]
            fd = self.live_fd(cookie)
            if fd is None or not self.live(base + last, cookie):
                break  # cannot move it: the hole stays, the program probes past it
            hole = holes.pop(0)
            _sys.map_delete(self.fds["sockarray"], _U32.pack(base + last))
            _crash.point("compact.moved")
            self._put(base + hole, fd, cookie)
            self._rename_buckets(region, last, hole, n)
            self.v.put("slot_cookie", base + last, 0)
            cookies[hole], cookies[last] = cookie, 0
            new_n -= 1
        if new_n != n:
            self.set_count(region, new_n, n)

    def sweep(self, region: int) -> int:
        """Drop the slots of closed sockets, repair live ones whose slot emptied; compact. Returns slots freed.

        An empty slot whose socket this process still holds, listening, is a
        socket that was shut down and listened again, or a move cut short by a
        crash: it is put back, not dropped.
        """
        base, n = region * self.cap, self.count(region)
        cookies = self.region_cookies(region, n)
        freed = 0
        for i, cookie in enumerate(cookies):
            if not cookie or self.live(base + i, cookie):
                continue
            fd = self.live_fd(cookie)
            if fd is not None and socket_alive(fd):
                with contextlib.suppress(OSError):
                    _sys.map_update(self.fds["sockarray"], base + i, _U64.pack(fd))
                    continue
            others = [j for j, c in enumerate(cookies) if c and j != i]
            self._hand_over(region, i, others, n)
            _sys.map_delete(self.fds["slot_of"], _U64.pack(cookie))
            self.v.put("slot_cookie", base + i, 0)
            entry = self.region_entry(cookie)
            if entry is not None and entry[1] == 0:
                self.set_region_entry(cookie, entry[0], _now())
            self.sock_fds.pop(cookie, None)
            cookies[i] = 0
            freed += 1
        self._compact(region, cookies)
        return freed

    def drain(self, cookie: int) -> bool:
        """Stop steering to a socket and mark it drained; False if it was not registered."""
        slot = self.slot_of(cookie)
        if slot is not None:
            self.vacate(slot, cookie)
        self.set_region_entry(cookie, _layout.REGION_DRAINED, _now())
        return slot is not None

    def clear(self) -> None:
        """Unregister every socket, counts first so that the program stops picking at once."""
        for region in range(self.layout.nregions):
            _sys.map_update(self.fds["region_count"], region, _U32.pack(0))
        _sys.map_update(self.fds["spill"], 0, _U32.pack(0))
        cookies = self.v.span("slot_cookie", 0, self.layout.nslots)
        for slot, cookie in enumerate(cookies):
            # every slot, not only those below the counts: an interrupted
            # operation may have left a socket above a count
            if cookie or self.live(slot):
                _sys.map_delete(self.fds["sockarray"], _U32.pack(slot))
                _sys.map_delete(self.fds["slot_of"], _U64.pack(cookie))
                self.v.put("slot_cookie", slot, 0)
        self.v.fill("buckets", _layout.NO_SLOT)
        self.v.fill("bucket_count", 0)
        for region in range(self.layout.nregions):
            self._unchain(region)

    def _collect_region_entries(self, force: bool = False) -> int:
        """Delete cookie_region entries of sockets closed more than MIGRATION_GRACE ago.

        ``force`` (the map is full): also the oldest undated-closed ones until a
        quarter of the map is free. Drained marks of sockets we hold stay.
        """
        fd, now = self.fds["cookie_region"], _now()
        entries = []
        for key in _sys.map_keys(fd, 8):
            v = _sys.map_lookup(fd, key, 8)
            if v is not None:
                entries.append((_U64.unpack(key)[0], *_CR.unpack(v)))
        stale = [c for c, _r, since in entries if since and now - since > MIGRATION_GRACE]
        if force and len(entries) - len(stale) > 3 * self.layout.entries("cookie_region") // 4:
            dated = sorted((since, c) for c, _r, since in entries if since and c not in self.sock_fds)
            stale += [c for _s, c in dated[: len(entries) // 4]]
        for c in set(stale):
            _sys.map_delete(fd, _U64.pack(c))
        return len(set(stale))

    # -- reading ----------------------------------------------------------

    def registrations(self) -> list[dict]:
        out = []
        for region, n in enumerate(self.counts()):
            base = region * self.cap
            for i, cookie in enumerate(self.region_cookies(region, n)):
                if cookie:
                    out.append(
                        {
                            "slot": base + i,
                            "region": region,
                            "cookie": cookie,
                            "live": self.live(base + i, cookie),
                        }
                    )
        return out

    def drained(self) -> set[int]:
        fd = self.fds["cookie_region"]
        out = set()
        for key in _sys.map_keys(fd, 8):
            v = _sys.map_lookup(fd, key, 8)
            if v is not None and _CR.unpack(v)[0] == _layout.REGION_DRAINED:
                out.add(_U64.unpack(key)[0])
        return out

    def bucket_shares(self, region: int) -> dict[int, int]:
        """index -> buckets it owns in ``region``, counted from the table (for tests and status)."""
        out: dict[int, int] = {}
        for owner in self.v.span("buckets", region * self.nb, self.nb):
            if owner != _layout.NO_SLOT:
                out[owner] = out.get(owner, 0) + 1
        return out

    def recorded_shares(self, region: int) -> dict[int, int]:
        """index -> buckets bucket_count says it owns (must equal bucket_shares)."""
        return {i: v for i, v in enumerate(self._shares(region, self.count(region))) if v}
