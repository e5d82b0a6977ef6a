"""What the CLI does, as a library: attach, detach, status, stats on running servers.

attach either completes or leaves the system as it found it: a new selector is
pinned under a staging name before its program is attached and renamed into
place after, a failure re-attaches what was there before (or detaches), and a
crash in between leaves pins that the next attach or detach finishes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

from . import _crash, discovery, topology
from ._layout import COUNTERS, DEFAULT_CAPACITY, LAYOUT_VERSION, SELECTION_OUTCOMES
from .errors import NotInGroupError, NumaReuseError, ProcessGone, StateError
from .selector import WILDCARD, Selector
from .state import Group, Netns, Store, parse_name, require_root


def _domain_name(d: int) -> str | int:
    return "wildcard" if d == WILDCARD else d


def attach(
    port: int,
    address: str | None = None,
    udp: bool = False,
    ipv6: bool = False,
    domains: str = "numa",
    capacity: int | None = None,
    progress=lambda msg: None,
    *,
    netns: str | None = None,
    pid: int | None = None,
) -> dict:
    """Attach (or update) NUMA-local steering for the group on ``port``; returns a report.

    ``capacity`` None keeps an attached group's capacity (256 for a new one).
    ``netns`` (a name under /run/netns or a path) or ``pid`` (that process's)
    picks the network namespace; default: this one.
    """
    require_root()
    topo = topology.parse(domains)  # a bad spec fails here, before anything is touched
    t0 = time.monotonic()
    with Netns.resolve(netns, pid) as ns, _store(ns, create=True) as store:
        for note in store.adopt_legacy():
            progress(note)
        progress(f"scanning sockets on port {port}" + (f" in {ns.what}" if ns.foreign else ""))
        warnings: list[str] = []
        group, socks = discovery.find_sockets(port, address, udp, ipv6, ns=ns, progress=progress, warn=warnings.append)
        try:
            discovery.assign_domains(socks, topo)
            progress(f"found {len(socks)} sockets of {group}")
            for note in store.recover(group):
                progress(note)
            if store.exists(group):
                report = _update(store, group, socks, topo, capacity, progress)
            else:
                report = _fresh(store, group, socks, topo, capacity or DEFAULT_CAPACITY, progress)
        finally:
            discovery.close_all(socks)
        report["netns"] = ns.as_dict()
        report["warnings"] = warnings
    report["seconds"] = round(time.monotonic() - t0, 3)
    return report


@contextlib.contextmanager
def _store(ns: Netns, create: bool = False, shared: bool = False):
    """The locked Store of ``ns``; its older-release state is judged by the sockets bound in ``ns``."""
    store = Store(create=create, ns=ns, has_sockets=lambda g: discovery.has_group(g, ns))
    with store.locked(shared=shared):
        yield store


@contextlib.contextmanager
def entered(*, netns: str | None = None, pid: int | None = None):
    """Run the block in the network namespace ``netns`` or ``pid`` names (the calling thread only):
    for code that reads "this" namespace's state, as metrics' Collector does."""
    with Netns.resolve(netns, pid) as ns, ns.entered():
        yield ns


def _info(group: Group, topo: topology.Topology, socks) -> dict:
    return {
        "group": group.as_dict(),
        "spec": topo.spec,
        "sockets": {str(s.cookie): s.as_dict() for s in socks},
        "updated": time.time(),
    }


def _fresh(store: Store, group, socks, topo, capacity, progress, replacing: Selector | None = None) -> dict:
    progress(f"loading the selector ({topo.ndomains} domains, capacity {capacity})")
    sel = Selector(topo, capacity=capacity)
    before: dict[int, int] = {}
    staged = None
    try:
        sel.use_group(socks[0].fd)
        try:
            staged = store.stage(group, sel)  # pinned before attached: a crash leaves it findable
            _crash.point("attach.staged")
            drained: set[int] = set()
            if replacing is not None:
                before = {r["cookie"]: r["domain"] for r in replacing.registrations() if r["live"]}
                drained = replacing.drained()
                for s in socks:
                    replacing.use_group(s.fd)  # its compaction may move any of them

            def move(s) -> None:
                # a socket fits in one sockarray only: out of the old one, into the new one
                if replacing is not None:
                    replacing.unregister(s.fd, compact=False)  # no moves in a selector on its way out
                if s.cookie in drained:
                    sel.drain(s.fd, timeout=0, grace=0)  # stays drained in the new selector
                else:
                    sel.register(s.fd, s.domain)

            # Fill the new selector before its program sees a packet. When it replaces
            # one, the sockets move one at a time and the old program keeps steering to
            # those still in it (another domain's, when its own are gone: never the
            # kernel's hash); the new program is attached while one socket is left in
            # the old selector, and that one moves last.
            for s in socks[:-1]:
                move(s)
            if replacing is not None:
                _crash.point("replace.cleared")
                sel.attach(socks[0].fd)  # atomically replaces the old program
                move(socks[-1])
                replacing.clear()  # what is left: slots of sockets closed since
            else:
                move(socks[-1])
                sel.attach(socks[0].fd)
            _crash.point("attach.attached")
            store.commit(staged, group, _info(group, topo, socks))
        except BaseException:
            _undo(sel, socks, replacing, before)
            if staged and os.path.isdir(staged):
                shutil.rmtree(staged, ignore_errors=True)
            raise
        progress(f"attached program id {sel.program_info()['id']}")
        return {
            "action": "attached",
            "group": group.as_dict(),
            "program_id": sel.program_info()["id"],
            "sockets": [s.as_dict() for s in socks],
            "changes": [f"+ sk:{s.cookie} -> {_domain_name(s.domain)}" for s in socks],
        }
    finally:
        sel.close()


def _undo(sel: Selector, socks, replacing: Selector | None, before: dict[int, int]) -> None:
    """Put back what _fresh changed: the old program with its own registrations, or none."""
    if replacing is None:
        if sel.attached:
            sel.detach(socks[0].fd)
        return
    sel.clear()
    replacing.attach(socks[0].fd)
    sel.forget_attached()  # what is attached now is not ours to detach on close
    for s in socks:
        replacing.use_group(s.fd)
    for s in socks:
        if s.cookie in before:  # the old selector's own domains, not the new topology's
            with contextlib.suppress(NumaReuseError):
                replacing.register(s.fd, before[s.cookie])


def _update(store: Store, group, socks, topo, capacity, progress) -> dict:
    old = store.open(group.name)
    try:
        if old.topology.domains != topo.domains or capacity not in (None, old.capacity):
            progress("domains or capacity changed: building a new selector and swapping it in")
            capacity = capacity or old.capacity
            report = _fresh(store, group, socks, topo, capacity, progress, replacing=old)
            report["action"] = "replaced"
            return report
        for s in socks:
            old.use_group(s.fd)  # the group, and every socket compaction may move
        changes = []
        if old.layout_version != LAYOUT_VERSION or not old.current_program():
            changes.append(_swap_program(store, group, old, socks, topo, progress))
        have = {r["cookie"]: r["domain"] for r in old.registrations() if r["live"]}
        drained = old.drained()
        for s in socks:
            if s.cookie in drained:
                continue  # drained by its owner or an operator: only `numareuse undrain` steers to it again
            if have.get(s.cookie) != s.domain:
                old.register(s.fd, s.domain)
                was = "-" if s.cookie not in have else _domain_name(have[s.cookie])
                changes.append(f"{'+' if was == '-' else '~'} sk:{s.cookie} {was} -> {_domain_name(s.domain)}")
        freed = old.refresh()
        if freed:
            changes.append(f"- {freed} closed socket(s) dropped")
        old.attach(socks[0].fd)  # the same program again: repairs a detach done behind our back
        store.write_info(group, _info(group, topo, socks))
        progress("up to date" if not changes else f"{len(changes)} change(s)")
        return {
            "action": "updated" if changes else "unchanged",
            "group": group.as_dict(),
            "program_id": old.program_info()["id"],
            "sockets": [s.as_dict() for s in socks],
            "changes": changes,
        }
    finally:
        old.close()


def _swap_program(store: Store, group, sel: Selector, socks, topo, progress) -> str:
    """Load this release's program over the pinned maps (upgrading layout 1), swap it in, pin again.

    The maps, and so every registration, stay: the kernel replaces the
    attached program atomically, so no connection is left to the kernel's
    hash. Staged and exchanged as a fresh attach is, so a crash leaves
    either the old or the new pins, both complete.
    """
    old_id = sel.program_info()["id"]
    was = f"layout {sel.layout_version}" if sel.layout_version != LAYOUT_VERSION else "program"
    progress(f"the pinned {was} differs from this numareuse's: loading the new program over the same maps")
    if sel.layout_version != LAYOUT_VERSION:
        sel.upgrade()
    else:
        sel.reload_program()
    staged = store.stage(group, sel)
    _crash.point("swap.loaded")
    try:
        sel.attach(socks[0].fd)
        store.commit(staged, group, _info(group, topo, socks))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return f"* program {old_id} -> {sel.program_info()['id']} ({was} upgraded, same maps)"


def _match(store: Store, port: int, address, udp, ipv6) -> list[str]:
    out = []
    for name in store.groups():
        g = group_of(store, name)
        if g.port == port and g.proto == ("udp" if udp else "tcp") and g.family == (6 if ipv6 else 4):
            if address is None or g.address == address:
                out.append(name)
    return out


def group_of(store: Store, name: str) -> Group:
    info = store.info(name).get("group")
    if info:
        return Group(**info)
    group = parse_name(name)
    if group is None:  # groups() lists only names that parse
        raise StateError(f"unrecognised state directory {name}")
    return group


def detach(
    port: int,
    address: str | None = None,
    udp: bool = False,
    ipv6: bool = False,
    *,
    netns: str | None = None,
    pid: int | None = None,
) -> dict:
    """Detach the program from the group on ``port`` and remove its pinned state."""
    require_root()
    with Netns.resolve(netns, pid) as ns, _store(ns) as store:
        store.adopt_legacy()
        store.recover_all()  # an interrupted attach may have left only a staging directory
        names = _match(store, port, address, udp, ipv6)
        if not names:
            return {"action": "none", "note": f"nothing attached by numareuse on port {port}"}
        if len(names) > 1:
            addrs = ", ".join(group_of(store, n).address for n in names)
            raise NumaReuseError(f"port {port} is attached on several addresses ({addrs}): choose one with --address")
        name = names[0]
        group = group_of(store, name)
        try:
            _, socks = discovery.find_sockets(port, group.address, udp, ipv6, ns=ns)
        except (NotInGroupError, ProcessGone):
            socks = []  # the server is gone: so is the group and its program
        # any other error (no permission to take a socket) keeps the state: the
        # program is still attached and a later detach must find it
        try:
            detached = bool(socks) and Selector.detach_group(socks[0].fd)
        finally:
            discovery.close_all(socks)
        _crash.point("detach.detached")
        with contextlib.suppress(StateError):
            sel = store.open(name)
            try:
                sel.clear()  # release the sockets now: the maps are freed some ms later (EBUSY till then)
            finally:
                sel.close()
        store.remove(name)
        return {"action": "detached", "group": group.as_dict(), "program_was_attached": detached}


def _one_group(store: Store, port: int, address, udp, ipv6) -> str:
    names = _match(store, port, address, udp, ipv6)
    if not names:
        raise NotInGroupError(f"nothing attached by numareuse on port {port}: attach first")
    if len(names) > 1:
        addrs = ", ".join(group_of(store, n).address for n in names)
        raise NumaReuseError(f"port {port} is attached on several addresses ({addrs}): choose one with --address")
    return names[0]


def _targets(socks, cookies, owner: int | None, what: str):
    chosen = [s for s in socks if s.cookie in cookies or (owner is not None and owner in {h.pid for h in s.owners})]
    if not chosen:
        raise NotInGroupError(f"no socket of the group matches {what}")
    return chosen


def drain(
    port: int,
    address: str | None = None,
    udp: bool = False,
    ipv6: bool = False,
    cookies: tuple[int, ...] = (),
    owner: int | None = None,
    timeout: float = 5.0,
    undo: bool = False,
    *,
    netns: str | None = None,
    pid: int | None = None,
) -> dict:
    """Stop steering new connections to some sockets of an attached group (``undo``: steer again).

    The sockets are chosen by cookie or by owner pid. Draining waits up to
    ``timeout`` s for each socket's accept queue to empty (its owner keeps
    accepting); our duplicates are closed as soon as the server closes its
    own, so that a close is never delayed (it migrates what is left).
    """
    require_root()
    what = " or ".join([f"sk:{c}" for c in cookies] + ([f"owner pid {owner}"] if owner is not None else []))
    if not what:
        raise NumaReuseError("name the sockets: --sk COOKIE or --owner PID")
    with Netns.resolve(netns, pid) as ns, _store(ns) as store:
        name = _one_group(store, port, address, udp, ipv6)
        group = group_of(store, name)
        _, socks = discovery.find_sockets(port, group.address, udp, ipv6, ns=ns)
        try:
            sel = store.open(name)
            try:
                chosen = _targets(socks, set(cookies), owner, what)
                topo = sel.topology
                discovery.assign_domains(chosen, topo)
                for s in socks:
                    sel.use_group(s.fd)
                for s in chosen:
                    if undo:
                        sel.register(s.fd, s.domain)
                    else:
                        sel.drain(s.fd, timeout=0, grace=0)  # the mark now; the wait below, unlocked
            finally:
                sel.close()
            keep = {s.cookie for s in chosen}
            for s in socks:  # hold only what we wait on
                if s.cookie not in keep and s.fd >= 0:
                    os.close(s.fd)
                    s.fd = -1
        except BaseException:
            discovery.close_all(socks)
            raise
    try:
        results = {s.cookie: ("registered" if undo else _wait_empty(s, timeout)) for s in chosen}
    finally:
        discovery.close_all(socks)
    return {
        "action": "undrained" if undo else "drained",
        "group": group.as_dict(),
        "sockets": [{"sk": f"sk:{c}", "cookie": c, "result": r} for c, r in results.items()],
    }


def _wait_empty(s, timeout: float) -> str:
    """Wait for a drained socket's queue to empty: 'empty', 'closed' (by its server) or 'timeout'."""
    from .selector import queued

    deadline = time.monotonic() + timeout
    time.sleep(0.05)  # handshakes already in flight to it
    while True:
        if not any(_holds(h, s.inode) for h in s.holders):
            os.close(s.fd)  # the server closed it: ours must not keep it listening
            s.fd = -1
            return "closed"
        if queued(s.fd) == 0:
            return "empty"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(0.01)


def _holds(h, inode: int) -> bool:
    try:
        return os.readlink(f"/proc/{h.pid}/fd/{h.fd}") == f"socket:[{inode}]"
    except OSError:
        return False


def status(*, netns: str | None = None, pid: int | None = None) -> list[dict]:
    """Every pinned group of a network namespace (default: this one), with its sockets."""
    out = []
    with Netns.resolve(netns, pid) as ns, _store(ns, shared=True) as store:
        for name in store.groups():
            out.append({**_group_status(store, name), "netns": ns.as_dict()})
    return out


def _group_status(store: Store, name: str) -> dict:
    group = group_of(store, name)
    info = store.info(name)
    try:
        sel = store.open(name)
    except StateError as e:
        return {"group": group.as_dict(), "name": str(group), "error": str(e)}
    try:
        owners = info.get("sockets", {})
        socks = []
        for r in sel.registrations():
            o = owners.get(str(r["cookie"]), {})
            procs = [{"tid": None, **p} for p in o.get("owners", []) if _alive(p["pid"], p.get("tid"))]
            socks.append(
                {
                    "sk": f"sk:{r['cookie']}",
                    "cookie": r["cookie"],
                    "domain": _domain_name(r["domain"]),
                    "live": r["live"],
                    "slot": r["slot"],
                    "owners": procs,
                }
            )
        for cookie in sorted(sel.drained()):
            o = owners.get(str(cookie), {})
            procs = [{"tid": None, **p} for p in o.get("owners", []) if _alive(p["pid"], p.get("tid"))]
            socks.append(
                {
                    "sk": f"sk:{cookie}",
                    "cookie": cookie,
                    "domain": "drained",
                    "live": None,
                    "slot": None,
                    "owners": procs,
                }
            )
        return {
            "name": str(group),
            "group": group.as_dict(),
            "layout": sel.layout_version,
            "migration": sel.migration,
            "spec": sel.topology.spec,
            "domains": {str(d): list(c) for d, c in enumerate(sel.topology.domains) if c},
            "program_id": sel.program_info()["id"],
            "capacity": sel.capacity,
            "sockets": socks,
        }
    finally:
        sel.close()


def _alive(pid: int, tid: int | None = None) -> bool:
    if tid is not None:
        return os.path.exists(f"/proc/{pid}/task/{tid}")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stats(*, netns: str | None = None, pid: int | None = None) -> list[dict]:
    """Outcome counters of every pinned group of a network namespace, with the locality share."""
    out = []
    with Netns.resolve(netns, pid) as ns, _store(ns, shared=True) as store:
        for name in store.groups():
            group = group_of(store, name)
            try:
                sel = store.open(name)
            except StateError as e:
                out.append({"name": str(group), "group": group.as_dict(), "error": str(e), "netns": ns.as_dict()})
                continue
            try:
                c = sel.stats()
            finally:
                sel.close()
            total = sum(c[k] for k in SELECTION_OUTCOMES)
            out.append(
                {
                    "name": str(group),
                    "group": group.as_dict(),
                    "counters": c,
                    "selections": total,
                    "locality": round(c["local"] / total, 4) if total else None,
                    "netns": ns.as_dict(),
                }
            )
    return out


assert COUNTERS[:3] == ("local", "wildcard", "fallback")
