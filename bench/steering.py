"""The packet path: locality, connection rate and per-selection cost against baselines in the same run.

Virtual domains: one per CPU this process may run on ("0;1" on a 2-CPU
machine), with clients pinned per CPU (over loopback their SYNs are
processed there). Baselines: no program (the kernel's hash), SO_INCOMING_CPU
with no program (6.2+), the selftest-style minimal program (one socket per
domain), a no-op program (the floor of the kernel's accounting) and, for the
cost at many sockets, the minimal program spread over n sockets.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time

from numareuse import Selector, Topology, _sys

from . import log
from . import workload as wl
from .programs import Baselines, Spread, bpf_stats, run_stats

RATE_ARMS = ("kernel_hash", "so_incoming_cpu", "numareuse")


def spec_of(cpus: list[int]) -> str:
    return ";".join(str(c) for c in cpus)  # domain d = CPU cpus[d]


def many_domains(cpus: list[int], n: int) -> Topology:
    """n domains of which only the first and the last have CPUs (first CPU, the others)."""
    groups: list[tuple[int, ...]] = [()] * n
    groups[0], groups[-1] = (cpus[0],), tuple(cpus[1:])
    cpu_domain = {c: d for d, g in enumerate(groups) for c in g}
    return Topology(f"bench-{n}", tuple(groups), cpu_domain)


def numareuse_group(stack, sel: Selector, n: int, domains: list[int], registered: int | None = None):
    """A new group of ``n`` sockets, socket i in ``domains[i % len(domains)]``; (sockets, port, dom_of).

    Domains are interleaved in the group's order, so that SO_INCOMING_CPU's
    linear scan from the hashed socket finds its CPU's socket within
    len(domains) steps (its best case). Only the first ``registered`` (default
    all) sockets of each domain are registered.
    """
    socks, port = wl.group(n)
    stack.callback(wl.close_all, socks)
    sel.attach(socks[0])
    dom_of = [domains[i % len(domains)] for i in range(n)]
    for i, s in enumerate(socks):
        if registered is None or i // len(domains) < registered:
            sel.register(s, dom_of[i])
    return socks, port, dom_of


# -- locality -------------------------------------------------------------------


def _locality_pass(cpus, port, socks, dom_of, per_cpu, alive) -> tuple[int, int, set[int]]:
    local = total = 0
    used: set[int] = set()
    live = [s for i, s in enumerate(socks) if alive[i]]
    idx = [i for i in range(len(socks)) if alive[i]]
    for d, cpu in enumerate(cpus):
        counts = wl.served_by(cpu, port, live, per_cpu)
        local += sum(c for i, c in zip(idx, counts) if dom_of[i] == d)
        total += sum(counts)
        used |= {i for i, c in zip(idx, counts) if c}
    return local, total, used


def measure_locality(cpus, plan, res) -> None:
    """Fraction of connections served by a socket of the client's domain, 2 sockets per domain.

    Then the first socket of domain 0 is closed (the one the minimal program
    holds) and it is measured again: domain 0 still has a live socket.
    """
    nd = len(cpus)
    loc, loc_closed, used_frac = {}, {}, {}
    for mode in ("kernel_hash", "so_incoming_cpu", "selftest_minimal", "numareuse"):
        with contextlib.ExitStack() as stack:
            socks, port = wl.group(2 * nd)
            stack.callback(wl.close_all, socks)
            dom_of = [i // 2 for i in range(len(socks))]
            sel = None
            if mode == "so_incoming_cpu":
                # 6.2+: with no program, the group prefers a socket whose SO_INCOMING_CPU is the packet's CPU
                for i, s in enumerate(socks):
                    s.setsockopt(socket.SOL_SOCKET, _sys.SO_INCOMING_CPU, cpus[dom_of[i]])
            elif mode == "selftest_minimal":
                base = Baselines(max(cpus) + 1)
                stack.callback(base.close)
                for d, cpu in enumerate(cpus):
                    base.place(cpu, socks[2 * d])  # one socket per domain: the second one idles
                _sys.attach_reuseport_prog(socks[0].fileno(), base.minimal_fd)
            elif mode == "numareuse":
                sel = stack.enter_context(Selector(spec_of(cpus)))
                sel.attach(socks[0])
                for i, s in enumerate(socks):
                    sel.register(s, dom_of[i])
            alive = [True] * len(socks)
            local, total, used = _locality_pass(cpus, port, socks, dom_of, plan.locality_per_cpu, alive)
            loc[mode] = local / total
            used_frac[mode] = len(used) / len(socks)
            socks[0].close()
            alive[0] = False
            local2, total2, _ = _locality_pass(cpus, port, socks, dom_of, plan.locality_per_cpu, alive)
            loc_closed[mode] = local2 / total2
            extra = ""
            if sel:
                st = sel.stats()
                extra = f", program: local {st['local']} wildcard {st['wildcard']} fallback {st['fallback']}"
            log(
                f"locality {mode}: {loc[mode]:.3f} ({total} connections, {len(used)}/{len(socks)} sockets used); "
                f"one socket of domain 0 closed: {loc_closed[mode]:.3f}{extra}"
            )
    res["locality"] = loc
    res["locality_one_closed"] = loc_closed
    res["sockets_used"] = used_frac


# -- connection rate ---------------------------------------------------------------


def measure_conn_rate(cpus, plan, res, nsocks: int, arms=RATE_ARMS, key: str = "conn_rate") -> None:
    """Connections/s (connect + accept + close) with numareuse attached vs the baselines' arms.

    One group of ``nsocks`` sockets, one accepting worker per CPU serving its
    domain's sockets (epoll), one closed-loop client per CPU. Only the
    steering changes between arms, on the same live group: no program (the
    kernel's hash), no program with each socket's SO_INCOMING_CPU set (6.2+:
    locality without a program, so that numareuse / so_incoming_cpu isolates
    the program's own cost), and the numareuse program. Each round runs every
    arm once, in a rotated order so that drift cancels; a ratio is the median
    of the per-round ratios.
    """
    nd = len(cpus)
    with contextlib.ExitStack() as stack:
        sel = stack.enter_context(Selector(spec_of(cpus), capacity=max(256, -(-nsocks // nd))))
        socks, port, dom_of = numareuse_group(stack, sel, nsocks, list(range(nd)))

        def steer(arm: str) -> None:
            if arm == "numareuse":
                sel.attach(socks[0])
            else:
                sel.detach()
            for i, s in enumerate(socks):
                cpu = cpus[dom_of[i]] if arm == "so_incoming_cpu" else -1  # -1: off again
                s.setsockopt(socket.SOL_SOCKET, _sys.SO_INCOMING_CPU, cpu)

        workers = {cpu: [s for i, s in enumerate(socks) if dom_of[i] == d] for d, cpu in enumerate(cpus)}
        server = wl.Server(workers)
        bases = [a for a in arms if a != "numareuse"]
        try:
            steer("numareuse")
            wl.connection_rate(cpus, port, min(1.0, plan.rate_seconds))  # warm-up, not counted
            rates: dict[str, list[float]] = {a: [] for a in arms}
            ratios: dict[str, list[float]] = {b: [] for b in bases}
            errors = 0
            slow: dict[str, list[int]] = {a: [] for a in arms}
            before = sel.stats()
            for r in range(plan.rate_rounds):
                k = r % len(arms)
                got = {}
                for arm in arms[k:] + arms[:k]:
                    steer(arm)
                    got[arm], err, n_slow = wl.connection_rate(cpus, port, plan.rate_seconds)
                    errors += err
                    rates[arm].append(got[arm])
                    slow[arm].append(n_slow)
                for b in bases:
                    ratios[b].append(got["numareuse"] / got[b])
                log(
                    f"{key} ({nsocks} sockets) round {r + 1}/{plan.rate_rounds}: "
                    + ", ".join(f"{a} {got[a]:.0f}/s" + (f" ({slow[a][-1]} slow)" if slow[a][-1] else "") for a in arms)
                    + "; numareuse/"
                    + ", ".join(f"{b} {ratios[b][-1]:.3f}" for b in bases)
                )
            steer("kernel_hash")
            after = sel.stats()
        finally:
            accepted = server.stop()
    out = {
        "sockets": nsocks,
        **{f"{a}_per_s": statistics.median(rates[a]) for a in arms},
        **{f"ratio_vs_{b}": statistics.median(ratios[b]) for b in bases},
        **{f"round_ratios_vs_{b}": ratios[b] for b in bases},
        "rounds": plan.rate_rounds,
        "seconds_per_arm": plan.rate_seconds,
        "client_errors": errors,
        "slow_connections": slow,
        "accepted": accepted,
        "numareuse_selections": {k: after[k] - before[k] for k in ("local", "wildcard", "remote", "fallback")},
    }
    res[key] = out


# -- per-selection cost ---------------------------------------------------------------


def _drive(cpus, setup, per_cpu) -> tuple[int, int]:
    """Connections from every CPU to one setup; the (run_time_ns, run_cnt) they cost its program."""
    ns0, cnt0 = run_stats(setup["prog_fd"])
    for cpu in cpus:
        wl.served_by(cpu, setup["port"], setup["socks"], per_cpu)
    ns1, cnt1 = run_stats(setup["prog_fd"])
    return ns1 - ns0, cnt1 - cnt0


def measure_select_ns(cpus, plan, res) -> None:
    """Per-selection cost from run_time_ns / run_cnt, every setup measured in interleaved repetitions.

    Scaling: 4, 256 and 1024 sockets (capacity 512, 2 domains) against the
    4-socket group, and 64 domains against 2 (4 sockets, capacity 256).
    Diagnostics for the cost at 1024 sockets: the same 1024-socket group with
    only 4, 32 or 256 of its sockets registered (same maps and program, fewer
    distinct sockets touched), and the minimal program spread over 4 and over
    1024 sockets (no numareuse logic at all), and over 128 sockets whose
    sockarray pointers share 16 cache lines or sit on 128 (stride 8).
    """
    nd = len(cpus)
    all_domains = list(range(nd))
    with contextlib.ExitStack() as stack:
        setups: dict[str, dict] = {}

        def add_numareuse(name, domains_arg, n, domains, capacity=256, registered=None):
            t = time.perf_counter()
            sel = stack.enter_context(Selector(domains_arg, capacity=capacity))
            socks, port, _ = numareuse_group(stack, sel, n, domains, registered)
            setups[name] = {"prog_fd": sel.prog_fd, "socks": socks, "port": port, "sel": sel}
            took = time.perf_counter() - t
            log(f"select_ns set-up {name}: {len(socks)} sockets, {sel.ndomains} domains ({took:.1f} s)")

        add_numareuse("numareuse", spec_of(cpus), 2 * nd, all_domains)  # = domains_2
        base = Baselines(max(cpus) + 1)
        stack.callback(base.close)
        for name, fd in (("selftest_minimal", base.minimal_fd), ("noop", base.noop_fd)):
            socks, port = wl.group(2 * nd)
            stack.callback(wl.close_all, socks)
            if name == "selftest_minimal":
                for d, cpu in enumerate(cpus):
                    base.place(cpu, socks[2 * d])
            _sys.attach_reuseport_prog(socks[0].fileno(), fd)
            setups[name] = {"prog_fd": fd, "socks": socks, "port": port}
        add_numareuse("domains_64", many_domains(cpus, 64), 4, [0, 63])
        for n in (4, 256, 1024):
            add_numareuse(f"sockets_{n}", spec_of(cpus), n, all_domains, capacity=512)
        for touched in plan.touched:
            add_numareuse(f"touch_{touched}", spec_of(cpus), 1024, all_domains, 512, registered=touched // nd)
        for n, stride in ((4, 1), (1024, 1), (128, 1), (128, 8)):
            sp = Spread(n, stride)
            stack.callback(sp.close)
            socks, port = wl.group(n)
            stack.callback(wl.close_all, socks)
            sp.fill(socks)
            _sys.attach_reuseport_prog(socks[0].fileno(), sp.prog_fd)
            name = f"spread_{n}" + (f"_stride_{stride}" if stride > 1 else "")
            setups[name] = {"prog_fd": sp.prog_fd, "socks": socks, "port": port}

        samples: dict[str, list[float]] = {k: [] for k in setups}
        runs = dict.fromkeys(setups, 0)
        with bpf_stats():
            for k in setups:  # warm-up, not counted
                _drive(cpus, setups[k], 20)
            for rep in range(plan.select_reps):
                order = list(setups) if rep % 2 == 0 else list(reversed(setups))
                for k in order:
                    ns, cnt = _drive(cpus, setups[k], plan.select_per_cpu)
                    if cnt:
                        samples[k].append(ns / cnt)
                        runs[k] += cnt
                done = ", ".join(f"{k} {samples[k][-1]:.0f}" for k in setups if samples[k])
                log(f"select_ns rep {rep + 1}/{plan.select_reps} (ns): {done}")
        for k in setups:
            s = setups[k].get("sel")
            if s is not None:
                st = s.stats()
                if st["local"] == 0 or st["fallback"] or st["wildcard"] or st["remote"]:
                    log(f"WARNING: {k} counters {st}: selections were not all local")
    med = {k: statistics.median(v) for k, v in samples.items()}
    res["select_ns"] = {k: med[k] for k in ("numareuse", "selftest_minimal", "noop")}
    res["select_ns_scaling"] = {
        "sockets_4": med["sockets_4"],
        "sockets_256": med["sockets_256"],
        "sockets_1024": med["sockets_1024"],
        "domains_2": med["numareuse"],
        "domains_64": med["domains_64"],
    }
    res["select_ns_diagnostic"] = {
        **{f"group_1024_touching_{t}": med[f"touch_{t}"] for t in plan.touched},
        "group_1024_touching_1024": med["sockets_1024"],
        "spread_minimal_4": med["spread_4"],
        "spread_minimal_1024": med["spread_1024"],
        "spread_minimal_128": med["spread_128"],
        "spread_minimal_128_stride_8": med["spread_128_stride_8"],
    }
    res["select_runs"] = runs
    res["select_ns_samples"] = samples


def measure_select_releases(cpus, plan, res, rels) -> None:
    """ns per selection of the previous release's program (layout 1) and this one's, 4 and 1024 sockets.

    Each in a fresh process of its release (bench/probe.py), alternating, with
    kernel.bpf_stats_enabled on; the median over the rounds.
    """
    args = {
        "spec": spec_of(cpus),
        "cpus": cpus,
        "sizes": [2 * len(cpus), 1024],
        "reps": plan.select_reps,
        "per_cpu": plan.select_per_cpu,
    }
    got: dict[str, dict[str, list[float]]] = {k: {} for k in rels}
    with bpf_stats():
        for _round in range(plan.release_select_rounds):
            for key, rel in rels.items():
                for n, r in rel.probe("select", args)["sizes"].items():
                    if r["ns"] is not None:
                        got[key].setdefault(n, []).append(r["ns"])
    out = {k: {n: statistics.median(v) for n, v in sizes.items()} for k, sizes in got.items()}
    for key, sizes in out.items():
        log(f"select_ns ({rels[key].name}): " + ", ".join(f"{n} sockets {v:.1f} ns" for n, v in sizes.items()))
    res["select_ns_releases"] = {"args": args, **out}
