"""Connections lost when nginx closes listeners under load, with and without migration, by kernel path.

nginx (reuseport, pinned workers) under ``wrk -t2 -c16 -H 'Connection: close'``
reloads between 3 and 2 workers, so every second reload closes one listener
(the master drops the third worker's socket). Three arms, each in a network
namespace of its own (the sysctl is per namespace; the root namespace is never
changed):

* ``kernel``: no program, net.ipv4.tcp_migrate_req=0;
* ``kernel_migrate``: no program, net.ipv4.tcp_migrate_req=1 (the kernel
  migrates a closing listener's connections to a socket its hash picks);
* ``numareuse``: ``numareuse attach -d cpu`` after each reload.

Each arm counts failed requests (wrk) and the resets by kernel path
(bench/rsts.py): ``unmigrated`` is a closing listener's queued connection with
nowhere to go; ``handshake_vs_close`` is the kernel's race between a handshake's
last ACK and the close of its listener, which no steering can prevent.

    python -m bench.reload_race [--reloads 150] [--arms kernel,kernel_migrate,numareuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import free_port, git_commit, log, rsts, soak, write_json

ARMS = ("kernel", "kernel_migrate", "numareuse")
SHOWN = ("TcpOutRsts", "TcpEstabResets", "TcpExtTCPMigrateReqSuccess", "TcpExtTCPMigrateReqFailure")


def arm_run(arm: str, reloads: int) -> dict:
    """One arm, inside its namespace."""
    subprocess.run([soak.IP, "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1" if arm == "kernel_migrate" else "0")
    work, bpffs, env = soak.private_state("numareuse-race-")
    port = free_port()
    ng = soak.Nginx(work, port, sorted(os.sched_getaffinity(0)))
    nr = soak.Numareuse([sys.executable, "-m", "numareuse.cli.main"], env, port)
    census = rsts.RstCensus()
    try:
        ng.start(2)
        if arm == "numareuse":
            nr.attach("-d", "cpu")
        c0, r0 = soak.counters(), census.snapshot()
        wrk = soak.Wrk(f"http://127.0.0.1:{port}/", 3600, work / "wrk.out", 10)
        time.sleep(0.5)
        t0 = time.monotonic()
        for i in range(reloads):
            ng.reload(3 if i % 2 == 0 else 2)
            if arm == "numareuse":
                nr.attach("-d", "cpu")
            time.sleep(0.1)
        time.sleep(soak.TAIL)
        c1, r1 = soak.counters(), census.snapshot()  # before wrk's own teardown resets
        seconds = time.monotonic() - t0
        census_d = census.delta(r0, r1)
        w = wrk.stop()
        if arm == "numareuse":
            nr.detach()
    finally:
        ng.stop()
        census.close()
        subprocess.run(["umount", str(bpffs)], capture_output=True)
    d = soak.delta(c0, c1)
    return {
        "arm": arm,
        "reloads": reloads,
        "listener_closes": reloads // 2,
        "seconds": round(seconds, 1),
        "requests": w["requests"],
        "failed": sum(w["errors"].values()) + w["non2xx"],
        "wrk_errors": w["errors"],
        "rst_paths": census_d["paths"],
        **{k: d.get(k, 0) for k in SHOWN},
    }


def markdown(rows: list[dict]) -> str:
    out = [
        "| arm | listener closes | s | requests | failed | RSTs by kernel path | MigrateReq ok/fail |",
        "|---" * 7 + "|",
    ]
    for r in rows:
        paths = ", ".join(f"{k} {v}" for k, v in r["rst_paths"].items()) or "-"
        mig = f"{r['TcpExtTCPMigrateReqSuccess']}/{r['TcpExtTCPMigrateReqFailure']}"
        cells = (r["arm"], r["listener_closes"], r["seconds"], r["requests"], r["failed"], paths, mig)
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reloads", type=int, default=150, help="reloads per arm, half of them closing a listener")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"of: {','.join(ARMS)}")
    ap.add_argument("--out", default=str(soak.HERE / "reload-race-results.json"))
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        print(json.dumps(arm_run(args.inner, args.reloads)))
        return 0
    if os.geteuid() != 0:
        sys.exit("reload_race: needs root (network namespaces, bpffs, BPF programs)")
    arms = [a for a in args.arms.split(",") if a]
    if set(arms) - set(ARMS) or args.reloads < 2:
        ap.error(f"--arms: of {', '.join(ARMS)}; --reloads: 2 or more")
    rows = []
    for arm in arms:
        ns = f"numareuse-race-{os.getpid()}"
        subprocess.run([soak.IP, "netns", "add", ns], check=True)
        try:
            log(f"{arm}: {args.reloads} reloads under load")
            cmd = [soak.IP, "netns", "exec", ns, sys.executable, "-m", "bench.reload_race"]
            r = subprocess.run(
                [*cmd, "--inner", arm, "--reloads", str(args.reloads)], cwd=soak.REPO, stdout=subprocess.PIPE, text=True
            )
            if r.returncode:
                sys.exit(f"reload_race: the {arm} arm failed ({r.returncode})")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            log(f"  {rows[-1]['failed']} failed of {rows[-1]['requests']}, RSTs {rows[-1]['rst_paths']}")
        finally:
            soak._remove_netns(ns)
    write_json(args.out, {"arms": rows, "meta": {"kernel": os.uname().release, "commit": git_commit()}})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
