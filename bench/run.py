"""`make bench`: numareuse against baselines measured in the same run.

Everything runs on this machine, in one run, so that every figure is a ratio
against a baseline measured alongside it on a small, noisy machine:

* the packet path (bench/steering.py): locality of four selection methods,
  connection rate against no program and SO_INCOMING_CPU (4 and 1024
  sockets), the per-selection cost from the kernel's own accounting
  (kernel.bpf_stats_enabled, restored afterwards) and its scaling with
  sockets and domains, with diagnostics for the cost at 1024 sockets;
* the controller (bench/controller.py), before (the previous release, layout
  1, from git history) and after: register/unregister, attach (library and
  CLI), Selector() time cold and cached, RSS and whether LLVM is mapped;
* pre-fork recycling errors in a network namespace of its own
  (bench/recycle.py), the domain-change window (bench/window.py), and
  `numareuse watch` (bench/watch.py, when it exists).

Writes bench/results.json and prints a markdown table. Virtual domains: one
per CPU this process may run on ("0;1" on a 2-CPU machine), with clients
pinned per CPU (their SYNs are processed there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import T0, controller, git_commit, log, recycle, steering, window, write_json
from .release import REPO, current, previous

HERE = Path(__file__).resolve().parent

# Targets (issues 5, 12, 13)
TARGET_RATE_RATIO = 0.97
TARGET_SELECT_VS_MINIMAL = 2.0
TARGET_SCALING = 1.3  # select ns at 256/1024 sockets and 64 domains within this factor of the small group
TARGET_ATTACH_S = 1.0
TARGET_REGISTER_US = 1000.0


class Plan:
    """Sizes of the run; --quick shrinks them for a smoke test."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.locality_per_cpu = 100 if quick else 200
        self.rate_rounds = 2 if quick else 5
        self.rate_seconds = 1.0 if quick else 3.0
        self.select_reps = 2 if quick else 5
        self.select_per_cpu = 200 if quick else 500
        self.release_select_rounds = 1 if quick else 3
        self.touched = (4, 32, 256)  # registered sockets of a 1024-socket group (diagnostic)
        self.register_reps = 30 if quick else 200
        self.attach_reps = 1 if quick else 3
        self.attach_workers = 16
        self.selector_reps = 1 if quick else 3
        self.recycle_seconds = 3 if quick else 15
        # as KERNEL-NOTES (one worker per domain, all recycling in step), and two per domain with
        # gunicorn's --max-requests-jitter: a closing worker's domain keeps a live socket
        self.recycle_configs = (
            {"name": "2 workers", "workers": 2, "max_requests": 1500, "jitter": 0},
            {"name": "4 workers, jitter", "workers": 4, "max_requests": 1500, "jitter": 750},
        )
        self.window_reps = 1 if quick else 2
        self.window_settle = 0.3 if quick else 0.5
        self.watch_rounds = 2 if quick else 5
        self.watch_idle = 3.0 if quick else 20.0


def domain_cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("bench: needs at least 2 CPUs to make 2 virtual domains")
    return cpus


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def measure_watch(plan, res, workdir: Path) -> None:
    """Reaction time and idle CPU of `numareuse watch`, by bench/watch.py (written by the watch work)."""
    if not (HERE / "watch.py").exists():
        note = "bench/watch.py is not on this branch yet: `numareuse watch` reaction time and idle CPU not measured"
        res["watch"] = {"skipped": note}
        log(f"watch: SKIPPED ({note})")
        return
    out = workdir / "watch.json"
    cmd = [sys.executable, "-m", "bench.watch", "--rounds", str(plan.watch_rounds), "--idle", str(plan.watch_idle)]
    r = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench.watch exited {r.returncode}: {r.stderr.strip()[-400:]}")
    res["watch"] = json.loads(out.read_text())
    log(f"watch: {r.stdout.strip()}")


# -- report ---------------------------------------------------------------------------

ROWS: list[dict] = []


def row(section, metric, baseline="—", value="—", ratio="—", target="—", met=None) -> None:
    ROWS.append(
        {
            "section": section,
            "metric": metric,
            "baseline": baseline,
            "numareuse": value,
            "ratio": ratio,
            "target": target,
            "met": met,
        }
    )


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _us(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _j(vals, fmt) -> str:
    return " / ".join(fmt(v) for v in vals)


def rows_steering(res) -> None:
    s = "packet path"
    if "locality" in res:
        loc, closed, used = res["locality"], res["locality_one_closed"], res["sockets_used"]
        bases = ("kernel_hash", "so_incoming_cpu", "selftest_minimal")
        for name, d in (
            ("locality: served in the client's domain (2 sockets/domain)", loc),
            ("locality, one of domain 0's 2 sockets closed", closed),
        ):
            nr = d["numareuse"]
            row(
                s,
                name + " — vs kernel hash / SO_INCOMING_CPU / selftest minimal",
                _j((d[b] for b in bases), lambda v: f"{v:.2f}")
                + (f" (minimal uses {used['selftest_minimal']:.0%} of sockets)" if d is loc else ""),
                f"{nr:.3f}",
                _j((nr / d[b] if d[b] else float("inf") for b in bases), lambda v: f"{v:.2f}"),
                "1.0",
                nr == 1.0,
            )
    for key, label in (("conn_rate", "4 sockets"), ("conn_rate_1024", "1024 sockets")):
        cr = res.get(key)
        if not cr:
            continue
        for b, bl in (("kernel_hash", "no program (kernel hash)"), ("so_incoming_cpu", "SO_INCOMING_CPU, no program")):
            if f"ratio_vs_{b}" not in cr:
                continue
            rr = cr[f"round_ratios_vs_{b}"]
            ratio = cr[f"ratio_vs_{b}"]
            slow = {a: sum(v) for a, v in cr.get("slow_connections", {}).items() if a in (b, "numareuse") and sum(v)}
            note = f" (connections > 0.2 s: {', '.join(f'{a} {n}' for a, n in slow.items())})" if slow else ""
            row(
                s,
                f"connections/s, {label}, vs {bl}{note}",
                _k(cr[f"{b}_per_s"]),
                _k(cr["numareuse_per_s"]),
                f"{ratio:.3f} (rounds {min(rr):.2f}..{max(rr):.2f})",
                f">= {TARGET_RATE_RATIO}",
                ratio >= TARGET_RATE_RATIO,
            )
    sn = res.get("select_ns")
    if sn:
        r = sn["numareuse"] / sn["selftest_minimal"]
        row(
            s,
            "select ns (kernel-accounted) vs selftest minimal",
            f"{sn['selftest_minimal']:.1f}",
            f"{sn['numareuse']:.1f}",
            f"{r:.2f}",
            f"<= {TARGET_SELECT_VS_MINIMAL}",
            r <= TARGET_SELECT_VS_MINIMAL,
        )
        row(s, "select ns of a no-op program (the accounting's floor)", f"{sn['noop']:.1f}")
        sc = res["select_ns_scaling"]
        for big, small, label in (
            ("sockets_256", "sockets_4", "256 sockets vs 4"),
            ("sockets_1024", "sockets_4", "1024 sockets vs 4"),
            ("domains_64", "domains_2", "64 domains vs 2"),
        ):
            r = sc[big] / sc[small]
            row(
                s,
                f"select ns, {label}",
                f"{sc[small]:.1f}",
                f"{sc[big]:.1f}",
                f"{r:.2f}",
                f"<= {TARGET_SCALING}",
                r <= TARGET_SCALING,
            )
        dg = res["select_ns_diagnostic"]
        touched = [k for k in dg if k.startswith("group_1024_touching_")]
        t0 = dg[touched[0]]
        row(
            s,
            "diagnostic: one 1024-socket group, selections over "
            + " / ".join(k.rsplit("_", 1)[1] for k in touched)
            + " registered sockets",
            f"{t0:.1f}",
            _j((dg[k] for k in touched), lambda v: f"{v:.1f}"),
            _j((dg[k] / t0 for k in touched), lambda v: f"{v:.2f}"),
        )
        sp4, sp1024 = dg["spread_minimal_4"], dg["spread_minimal_1024"]
        row(
            s,
            f"diagnostic: minimal program spread over 1024 sockets vs 4 (+{sp1024 - sp4:.0f} ns; numareuse "
            f"+{sc['sockets_1024'] - sc['sockets_4']:.0f} ns)",
            f"{sp4:.1f}",
            f"{sp1024:.1f}",
            f"{sp1024 / sp4:.2f}",
        )
        if "spread_minimal_128_stride_8" in dg:
            a, b = dg["spread_minimal_128"], dg["spread_minimal_128_stride_8"]
            row(
                s,
                "diagnostic: minimal program over 128 sockets, sockarray pointers on 16 cache lines vs on 128",
                f"{a:.1f}",
                f"{b:.1f}",
                f"{b / a:.2f}",
            )

    sr = res.get("select_ns_releases")
    if sr and "before" in sr and "after" in sr:
        sizes = list(sr["after"])
        b, a = [sr["before"][n] for n in sizes], [sr["after"][n] for n in sizes]
        row(
            s,
            f"select ns, layout 1 (baseline) vs this release, {' / '.join(sizes)} sockets (fresh processes)",
            _j(b, lambda v: f"{v:.1f}"),
            _j(a, lambda v: f"{v:.1f}"),
            _j((x / y for x, y in zip(a, b)), lambda v: f"{v:.2f}"),
        )


def rows_controller(res) -> None:
    s = "controller (baseline: layout 1)"
    reg = res.get("register")
    if reg and "after" in reg:
        fills = list(reg["after"])
        for op in ("register", "unregister"):
            for stat in ("median_us", "p99_us"):
                a = [reg["after"][f][op][stat] for f in fills]
                b = [reg["before"][f][op][stat] for f in fills] if "before" in reg else None
                where = "into a region holding" if op == "register" else "from a region holding"
                sizes = fills if op == "register" else [int(f) + 1 for f in fills]
                tgt, met = "—", None
                if stat == "median_us":
                    tgt, met = f"< {TARGET_REGISTER_US:.0f} µs", max(a) < TARGET_REGISTER_US
                row(
                    s,
                    f"{op} µs ({stat.split('_')[0]}), {where} {' / '.join(map(str, sizes))} (capacity 1024)",
                    _j(b, _us) if b else "—",
                    _j(a, _us),
                    _j((x / y for x, y in zip(a, b)), lambda v: f"{v:.2f}") if b else "—",
                    tgt,
                    met,
                )
    rd = res.get("register_diagnostic")
    if rd:
        for fill, ops in rd["bpf_calls"].items():
            for op, v in ops.items():
                calls = v["bpf_calls"]
                batch = calls.get("lookup_batch", {"calls": 0, "elements": 0})
                where = "into" if op == "register" else "from"
                held = int(fill) + (op == "unregister")
                row(
                    s,
                    f"diagnostic: this release's {op} {where} a region holding {held} (capacity 1024): bpf() "
                    "syscalls and their time",
                    "—",
                    f"{sum(c['calls'] for c in calls.values()):.0f} calls ({batch['calls']:.0f} batch lookups of "
                    f"{batch['elements']:.0f} elements) take {sum(c['us'] for c in calls.values()):.0f} of "
                    f"{v['median_us']:.0f} µs",
                )
        lb = rd["lookup_batch_us"]
        row(
            s,
            "diagnostic: one BPF_MAP_LOOKUP_BATCH of " + " / ".join(lb) + " u32 array entries, µs",
            "—",
            _j(lb.values(), _us),
        )
    at = res.get("attach_library")
    if at and "after" in at:
        sizes = list(at["after"])
        a = [at["after"][n]["seconds"] for n in sizes]
        b = [at["before"][n]["seconds"] for n in sizes] if "before" in at else None
        row(
            s,
            f"attach s (library: Selector() + attach + register all), {' / '.join(sizes)} sockets",
            _j(b, lambda v: f"{v:.3f}") if b else "—",
            _j(a, lambda v: f"{v:.3f}"),
            _j((x / y for x, y in zip(a, b)), lambda v: f"{v:.2f}") if b else "—",
            f"< {TARGET_ATTACH_S} s",
            max(a) < TARGET_ATTACH_S,
        )
    ac = res.get("attach_cli")
    if ac and "after" in ac:
        a = ac["after"]["seconds"]
        b = ac.get("before", {}).get("seconds")
        row(
            s,
            f"attach s (`numareuse attach`, a {ac['workers']}-worker server, fresh CLI process)",
            f"{b:.3f}" if b else "—",
            f"{a:.3f}",
            f"{a / b:.2f}" if b else "—",
            f"< {TARGET_ATTACH_S} s",
            a < TARGET_ATTACH_S,
        )
    se = res.get("selector")
    if se and "after_cold" in se:
        cold, cached, before = se["after_cold"], se["after_cached"], se.get("before")
        row(
            s,
            "Selector() s: before first in a process (imports bcc) / again; after cold cache / cached",
            f"{before['first_s']:.3f} / {before['again_s']:.3f}" if before else "—",
            f"{cold['first_s']:.3f} / {cached['first_s']:.3f}",
            f"{cold['first_s'] / before['first_s']:.2f} / {cached['first_s'] / before['again_s']:.2f}"
            if before
            else "—",
        )
        bd = res.get("selector_breakdown")
        if bd:
            row(
                s,
                "diagnostic: cached Selector() of this release: maps / cache read / BPF_PROG_LOAD (verifier) s",
                "—",
                f"{bd['maps_s']:.3f} / {bd['cached_program_s']:.3f} / {bd['prog_load_s']:.3f}",
            )
        mib = 1024
        row(
            s,
            "controller RSS growth from a Selector() (fresh process): cold cache / cached",
            f"+{before['rss_delta_kib'] / mib:.1f} MiB" if before else "—",
            f"+{cold['rss_delta_kib'] / mib:.1f} / +{cached['rss_delta_kib'] / mib:.1f} MiB",
            f"{cold['rss_delta_kib'] / max(before['rss_delta_kib'], 1):.3f}" if before else "—",
            "no LLVM in the controller",
            not (cold["llvm_mapped"] or cached["llvm_mapped"]),
        )
        row(
            s,
            "LLVM (libLLVM/libclang) mapped in the controller",
            ("yes" if before["llvm_mapped"] else "no") if before else "—",
            "yes" if (cold["llvm_mapped"] or cached["llvm_mapped"]) else "no",
        )
        if cached.get("verified_insns"):
            b = (
                f"{before['xlated_insns']} / {before['verified_insns']}"
                if before and before.get("verified_insns")
                else "—"
            )
            row(
                s,
                "program: instructions / instructions the verifier processed (Selector()'s BPF_PROG_LOAD)",
                b,
                f"{cached['xlated_insns']} / {cached['verified_insns']}",
                f"{cached['verified_insns'] / before['verified_insns']:.1f}"
                if before and before.get("verified_insns")
                else "—",
            )


def rows_recycling(res) -> None:
    s = "pre-fork recycling"
    rc = res.get("recycling")
    if not rc:
        return

    def per(c):
        return c["errors_per_100k"] or 0.0

    for conf in rc["configs"]:
        if "numareuse" not in conf:
            continue
        kh, km, nr = conf["kernel_hash"], conf["kernel_hash_migrate"], conf["numareuse"]
        jit = f" + up to {conf['jitter']}" if conf["jitter"] else ""
        row(
            s,
            f"errors per 100k requests, {conf['workers']} workers each exiting after {conf['max_requests']}{jit} "
            f"requests, wrk {rc['wrk']} — vs kernel hash / + tcp_migrate_req=1",
            f"{per(kh):.1f} / {per(km):.1f}",
            f"{per(nr):.1f}" + (f" ({nr['timeout']} wrk timeouts)" if nr["timeout"] else ""),
            " / ".join(f"{per(nr) / per(c):.2f}" if per(c) else "—" for c in (kh, km)),
            "0",
            nr["errors"] == 0,
        )
        row(
            s,
            f"requests (errors), {conf['workers']} workers — vs kernel hash / + tcp_migrate_req=1",
            f"{kh['requests']} ({kh['errors']}) / {km['requests']} ({km['errors']})",
            f"{nr['requests']} ({nr['errors']})",
            " / ".join(f"{nr['requests'] / c['requests']:.2f}" if c["requests"] else "—" for c in (kh, km)),
        )
        c, mig = nr["counters"], nr.get("migrated")
        row(
            s,
            f"migrated connections, {conf['workers']} workers: local / all migrated (migrated_local / all)",
            "—",
            f"{c['migrated_local']} / {mig} = {nr['migrated_locality']:.2f}" if mig else "none migrated",
            "—",
        )


def rows_window(res) -> None:
    s = "domain change"
    dc = res.get("domain_change")
    if not dc or "after" not in dc:
        return
    a, b = dc["after"], dc.get("before")
    row(
        s,
        "window: fallback selections per change (" + ", then ".join(dc["changes"]) + "), median (max)",
        f"{b['window_median']} ({b['window_max']})" if b else "—",
        f"{a['window_median']} ({a['window_max']})",
        f"{a['window_median'] / b['window_median']:.2f}" if b and b["window_median"] else "—",
    )
    row(
        s,
        "failed connects during the changes (pinned clients in a loop)",
        f"{b['failed']} of {b['connections'] + b['failed']}" if b else "—",
        f"{a['failed']} of {a['connections'] + a['failed']}",
        "—",
        "0",
        a["failed"] == 0,
    )


def rows_watch(res) -> None:
    w = res.get("watch")
    if not w:
        return
    if "skipped" in w:
        row("watch", "`numareuse watch` reaction time, idle CPU", value=f"skipped: {w['skipped']}")
        return
    react = w.get("reaction_s", {})
    for k, v in react.items():
        vals = [x for x in v if x == x]  # no NaN (not registered in time)
        if vals:
            row(
                "watch",
                f"reaction s, {k.replace('_', ' ')} (median, max)",
                value=f"{statistics.median(vals):.3f}, {max(vals):.3f}",
                target="< 1 s",
                met=max(vals) < 1.0 and len(vals) == len(v),
            )
    idle = w.get("idle")
    if idle and "cpu_share" in idle:
        share = idle["cpu_share"]
        what = f"idle CPU of the watcher, {idle.get('workers')}-worker nginx"
        row("watch", what, value=f"{100 * share:.2f} %", target="< 1 %", met=share < 0.01)


def build_rows(res) -> list[dict]:
    ROWS.clear()
    for f in (rows_steering, rows_controller, rows_recycling, rows_window, rows_watch):
        try:
            f(res)
        except (KeyError, TypeError, ZeroDivisionError, ValueError) as e:
            row("report", f"{f.__name__}: figures incomplete ({e!r})")
    for phase, err in res.get("errors", {}).items():
        row("errors", f"phase {phase} failed", value=err.splitlines()[-1][:200])
    return list(ROWS)


def markdown(rows) -> str:
    out = [
        "| | figure | baseline | numareuse | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    last = None
    for r in rows:
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        sec = r["section"] if r["section"] != last else ""
        last = r["section"]
        cells = (sec, r["metric"], r["baseline"], r["numareuse"], r["ratio"], r["target"], met)
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter run (smoke test, noisier figures)")
    ap.add_argument("--out", default=str(HERE / "results.json"), help="where to write the JSON results")
    ap.add_argument("--only", help="comma-separated phases to run (default all): " + ", ".join(PHASES))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: needs root (CAP_BPF, CAP_NET_ADMIN) to load programs and set kernel.bpf_stats_enabled")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (sysctl, netns, mounts)
    raise_fd_limit(16384)
    cpus = domain_cpus()
    plan = Plan(args.quick)
    only = set(args.only.split(",")) if args.only else set(PHASES)
    unknown = only - set(PHASES)
    if unknown:
        sys.exit(f"bench: unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    res: dict = {"errors": {}}
    log(f"{len(cpus)} virtual domains (CPUs {cpus}); {'quick' if args.quick else 'full'} run")
    workdir = Path(tempfile.mkdtemp(prefix="numareuse-bench-"))
    try:
        rels = {"after": current(workdir)}
        prev = previous(workdir)
        if prev is not None:
            rels = {"before": prev, **rels}
        else:
            log("no git history: the previous release (layout 1) is not measured; no before figures")
        for name, fn in PHASES.items():
            if name not in only:
                continue
            try:
                fn(cpus, plan, res, rels, workdir)
            except Exception as e:  # noqa: BLE001 - one failed phase must not lose the others' figures
                res["errors"][name] = "".join(traceback.format_exception_only(e)).strip()
                log(f"phase {name} FAILED: {res['errors'][name]}")
                if os.environ.get("BENCH_DEBUG"):
                    traceback.print_exc()
    finally:
        for d in workdir.glob("bpffs-*"):
            subprocess.run(["umount", str(d)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    rows = build_rows(res)
    res["table"] = rows
    res["meta"] = {
        "kernel": platform.release(),
        "cpus": cpus,
        "python": platform.python_version(),
        "commit": git_commit(),
        "quick": args.quick,
        "phases": sorted(only),
        "duration_s": round(time.monotonic() - T0, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(args.out, res)
    log(f"wrote {args.out} in {res['meta']['duration_s']} s")
    print(markdown(rows))
    return 1 if res["errors"] else 0


PHASES = {
    "controller": lambda cpus, plan, res, rels, wd: controller.measure_controller(cpus, plan, res, rels, wd),
    "locality": lambda cpus, plan, res, rels, wd: steering.measure_locality(cpus, plan, res),
    # connection rates before bpf_stats: the kernel's accounting would slow the numareuse arm
    "conn_rate": lambda cpus, plan, res, rels, wd: steering.measure_conn_rate(cpus, plan, res, 2 * len(cpus)),
    "conn_rate_1024": lambda cpus, plan, res, rels, wd: steering.measure_conn_rate(
        cpus, plan, res, 1024, ("so_incoming_cpu", "numareuse"), "conn_rate_1024"
    ),
    "select_ns": lambda cpus, plan, res, rels, wd: steering.measure_select_ns(cpus, plan, res),
    "select_ns_releases": lambda cpus, plan, res, rels, wd: steering.measure_select_releases(cpus, plan, res, rels),
    "recycling": lambda cpus, plan, res, rels, wd: recycle.measure_recycling(cpus, plan, res),
    "domain_change": lambda cpus, plan, res, rels, wd: window.measure_domain_change(cpus, plan, res, rels, wd),
    "watch": lambda cpus, plan, res, rels, wd: measure_watch(plan, res, wd),
}


if __name__ == "__main__":
    sys.exit(main())
