"""The ``numareuse`` command: a thin click layer over numareuse.control.

Nouns read (status, stats, topology), verbs change (attach, detach). Errors
are one line, ``Error: <command>: <cause>``, exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import click

from numareuse import NumaReuseError, VerifierError, control, topology
from numareuse._layout import DEFAULT_CAPACITY, MAX_CAPACITY
from numareuse.errors import from_oserror


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # the reader went away (| head): nothing left to say; a writer's change
            # either completed before its output or was rolled back by control
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except (NumaReuseError, OSError) as e:
            if isinstance(e, OSError):
                e = from_oserror(e, "system call")
            if os.environ.get("NUMAREUSE_DEBUG"):
                raise
            cmd = ctx.invoked_subcommand or ctx.info_name
            first, *rest = str(e).split("\n")
            click.echo(f"Error: {cmd}: {' '.join(first.split())}", err=True)
            if isinstance(e, VerifierError):  # the verifier log's last lines say why
                for line in rest:
                    click.echo(f"  {line}", err=True)
            ctx.exit(1)


def _reader() -> None:
    """Readers die quietly on a closed pipe (| head), as ls or ss do.

    Writers (attach, detach) must finish or roll back, so they keep Python's
    BrokenPipeError instead.
    """
    try:
        real_stdout = sys.stdout.fileno() == 1  # not when embedded (click's CliRunner)
    except (AttributeError, ValueError, OSError):
        real_stdout = False
    if real_stdout:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _readable(groups):
    """The groups whose state could be read; a line for each that could not, or for none."""
    if not groups:
        click.echo("no group attached in this network namespace")
    for g in groups:
        if "error" in g:
            click.echo(f"{g['name']}: {g['error']}")
        else:
            yield g


def _emit(data, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(data)


def _group_options(f):
    f = click.option("--ipv6", is_flag=True, help="The group is IPv6 (default IPv4).")(f)
    f = click.option("--udp", is_flag=True, help="The group is UDP (default TCP).")(f)
    f = click.option("--address", "-a", metavar="ADDR", help="Bound address, when the port is bound on several.")(f)
    f = click.option("--port", "-p", type=click.IntRange(1, 65535), required=True, help="The group's port.")(f)
    return f


def _netns_options(f):
    f = click.option(
        "--pid",
        type=click.IntRange(min=1),
        metavar="PID",
        help="In the network namespace of process PID (a container's).",
    )(f)
    f = click.option(
        "--netns",
        metavar="NAME|PATH",
        help="In network namespace NAME (/run/netns/NAME, as `ip netns` names them) or the one at PATH.",
    )(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="numareuse")
def main():
    """Keep a server's new connections on the NUMA domain that received them.

    numareuse attaches a BPF SK_REUSEPORT program to a running server's
    SO_REUSEPORT group: each new connection goes to a socket whose worker
    runs in the domain (NUMA node) of the CPU that processed the packet,
    else to a wildcard socket, else to the kernel's own choice. It never
    refuses a connection. Needs root.

    \b
    Examples:
      numareuse topology
      numareuse attach --port 8080
      numareuse status
      numareuse stats --watch 1
      numareuse detach --port 8080
    """


@main.command(
    epilog="""\b
Examples:
  numareuse attach --port 8080                  # TCP/IPv4, domains = NUMA nodes
  numareuse attach -p 8080 --domains '0-7;8-15' # explicit CPU groups
  numareuse attach -p 53 --udp --ipv6 --json
  numareuse attach -p 8080 --netns blue         # a server in `ip netns add blue`
  numareuse attach -p 8080 --pid 4242           # in the network namespace of pid 4242
  numareuse attach -p 8080                      # again: re-scan workers, update"""
)
@_group_options
@_netns_options
@click.option(
    "--domains",
    "-d",
    default="numa",
    show_default=True,
    metavar="numa|llc|cpu|SPEC",
    help="How CPUs form domains: NUMA nodes, last-level-cache groups, single CPUs, or CPU lists like '0-3;4-7'.",
)
@click.option(
    "--capacity",
    type=click.IntRange(1, MAX_CAPACITY),
    default=None,
    help=f"Sockets per domain [default: {DEFAULT_CAPACITY}, or the attached group's].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--progress/--quiet",
    "-P/-q",
    default=None,
    help="Progress lines on stderr (default: when stderr is a terminal).",
)
def attach(port, address, udp, ipv6, netns, pid, domains, capacity, as_json, progress):
    """Attach NUMA-local steering to the SO_REUSEPORT group on a port.

    Finds every socket of the group in this network namespace (or the one
    --netns or --pid names) and the worker that accepts on each (the process
    whose epoll watches it; in a threaded server, the one thread that waits
    on it), gives each socket the domain holding all CPUs of its worker's
    affinity (else the wildcard), loads and attaches the selector, and pins
    it in bpffs so the steering outlives this command. Running it again
    re-scans and updates the registrations in place.
    """

    show = sys.stderr.isatty() if progress is None else progress

    def say(msg):
        if show:
            click.echo(f"attach: {msg}", err=True)

    report = control.attach(port, address, udp, ipv6, domains, capacity, progress=say, netns=netns, pid=pid)
    for w in report["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if report["action"] == "unchanged":
        click.echo(f"note: already attached to {_gname(report)}; nothing changed", err=True)

    def human(r):
        click.echo(
            f"{r['action']} {_gname(r)} program {r['program_id']} ({len(r['sockets'])} sockets, {r['seconds']} s)"
        )
        for c in r["changes"]:
            click.echo(f"  {c}")

    _emit(report, as_json, human)


def _gname(r) -> str:
    g = r["group"]
    host = f"[{g['address']}]" if g["family"] == 6 else g["address"]
    return f"{g['proto']}{g['family']} {host}:{g['port']}"


@main.command(
    epilog="""\b
Examples:
  numareuse detach --port 8080
  numareuse detach -p 53 --udp --ipv6
  numareuse detach -p 8080 --netns blue"""
)
@_group_options
@_netns_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def detach(port, address, udp, ipv6, netns, pid, as_json):
    """Detach the program from a group and remove its pinned state.

    The kernel's own hash balances the group again. Detaching what is not
    attached is a no-op with a note.
    """
    r = control.detach(port, address, udp, ipv6, netns=netns, pid=pid)
    if r["action"] == "none":
        click.echo(f"note: {r['note']}", err=True)
    _emit(r, as_json, lambda r: r["action"] == "detached" and click.echo(f"detached {_gname(r)}"))


@main.command(
    epilog="""\b
Examples:
  numareuse drain --port 8080 --sk 4242          # by cookie, as status shows it
  numareuse drain -p 8080 --owner 1234 --timeout 30  # every socket that pid accepts on
  numareuse undrain -p 8080 --sk 4242"""
)
@_group_options
@click.option("--sk", "cookies", multiple=True, metavar="COOKIE", help="A socket by cookie (sk:COOKIE in status).")
@click.option("--owner", type=click.IntRange(min=1), metavar="PID", help="Every socket this process accepts on.")
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=5.0, show_default=True, help="Seconds to wait for empty queues."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def drain(port, address, udp, ipv6, cookies, owner, timeout, as_json):
    """Stop steering new connections to sockets of an attached group.

    For a worker about to close its listener: numareuse stops sending it new
    connections, then waits until its accept queue is empty (the worker keeps
    accepting meanwhile), so that closing it loses nothing. Whatever is still
    queued when it closes migrates to a peer of its domain (Linux 5.14+).
    Drained sockets stay drained across `attach` and `watch` until
    `numareuse undrain`. Exit status 0 when every queue emptied or its
    server closed it, 1 on a time-out.
    """
    r = control.drain(port, address, udp, ipv6, _cookies(cookies), owner, timeout)
    _emit(r, as_json, lambda r: [click.echo(f"{s['sk']}: {s['result']}") for s in r["sockets"]])
    if any(s["result"] == "timeout" for s in r["sockets"]):
        raise NumaReuseError(f"a queue did not empty within {timeout:g} s (is its worker still accepting?)")


@main.command(
    epilog="""\b
Examples:
  numareuse undrain --port 8080 --sk 4242
  numareuse undrain -p 8080 --owner 1234"""
)
@_group_options
@click.option("--sk", "cookies", multiple=True, metavar="COOKIE", help="A socket by cookie (sk:COOKIE in status).")
@click.option("--owner", type=click.IntRange(min=1), metavar="PID", help="Every socket this process accepts on.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def undrain(port, address, udp, ipv6, cookies, owner, as_json):
    """Steer new connections to drained sockets again (in their owners' domains)."""
    r = control.drain(port, address, udp, ipv6, _cookies(cookies), owner, undo=True)
    _emit(r, as_json, lambda r: [click.echo(f"{s['sk']}: {s['result']}") for s in r["sockets"]])


def _cookies(values) -> tuple[int, ...]:
    out = []
    for v in values:
        text = v[3:] if v.startswith("sk:") else v
        if not text.isdigit():
            raise click.BadParameter(f"{v!r} is not a socket cookie (sk:1234 or 1234)", param_hint="--sk")
        out.append(int(text))
    return tuple(out)


@main.command(
    epilog="""\b
Examples:
  numareuse status
  numareuse status --netns blue
  numareuse status --json | jq '.[].sockets[] | select(.domain == "wildcard")'"""
)
@_netns_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (stable field names).")
def status(netns, pid, as_json):
    """Show every attached group and its sockets (sk:<cookie>, owner pid or pid/tid, domain)."""
    _reader()

    def human(groups):
        for g in _readable(groups):
            mig = "on" if g.get("migration") else "off (kernel < 5.14: a closing listener resets its queue)"
            click.echo(
                f"{g['name']}  domains={g['spec']}  program={g['program_id']}  sockets={len(g['sockets'])}"
                f"  migration={mig}"
            )
            for s in g["sockets"]:
                owners = ",".join(_owner(o) for o in s["owners"]) or "-"
                state = "" if s["live"] or s["live"] is None else "  (closed)"
                click.echo(f"  {s['sk']:<14} domain={s['domain']!s:<9} owner={owners}{state}")

    _emit(control.status(netns=netns, pid=pid), as_json, human)


def _owner(o) -> str:
    """pid/comm for a process, pid/tid comm for a thread."""
    return f"{o['pid']}/{o['tid']} {o['comm']}" if o.get("tid") else f"{o['pid']}/{o['comm']}"


@main.command(
    epilog="""\b
Examples:
  numareuse stats
  numareuse stats --watch 1          # rates every second, Ctrl-C to stop
  numareuse stats --netns blue
  numareuse stats --prometheus > /var/lib/node_exporter/numareuse.prom"""
)
@_netns_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--prometheus", is_flag=True, help="Print in the Prometheus text format.")
@click.option("--watch", type=click.FloatRange(min=0.1), metavar="SECONDS", help="Repeat every SECONDS with rates.")
@click.option("--count", type=click.IntRange(min=1), help="With --watch: stop after COUNT reports.")
def stats(netns, pid, as_json, prometheus, watch, count):
    """Selections per group by outcome, and the share served on the local domain.

    Outcomes: local (a socket of the packet's domain), wildcard (the domain
    had none), remote (neither had one: a socket of another domain),
    fallback (no registered socket at all: the kernel's hash), empty_skipped
    (slots of closed sockets probed past). migrated_* count the connections
    of closing listeners placed the same way (Linux 5.14+).
    """
    _reader()
    if as_json and prometheus:
        raise click.UsageError("choose one of --json and --prometheus")
    if prometheus and (netns is not None or pid is not None):
        with control.entered(netns=netns, pid=pid):  # metrics' Collector reads this thread's namespace
            return stats.callback(None, None, as_json, prometheus, watch, count)
    if not watch:
        _print_stats(None if prometheus else control.stats(netns=netns, pid=pid), as_json, prometheus, None, None)
        return
    prev, prev_t, n = None, None, 0
    try:
        while True:
            cur, now = None if prometheus else control.stats(netns=netns, pid=pid), time.monotonic()
            _print_stats(cur, as_json, prometheus, prev, (now - prev_t) if prev_t else None)
            prev, prev_t, n = cur, now, n + 1
            if count and n >= count:
                return
            sys.stdout.flush()
            time.sleep(watch)
    except KeyboardInterrupt:
        pass


def _print_stats(groups, as_json, prometheus, prev, dt):
    if prometheus:  # the series `watch --metrics` serves, read afresh (groups is None)
        from numareuse import metrics  # prometheus_client: only for the commands that serve or print it

        click.echo(metrics.render(), nl=False)
        return
    if dt:
        before = {g["name"]: g for g in prev or []}
        for g in groups:
            p = before.get(g["name"])
            if p and "counters" in g and "counters" in p:
                g["rates"] = {k: round((v - p["counters"][k]) / dt, 1) for k, v in g["counters"].items()}
    if as_json:
        click.echo(json.dumps(groups, sort_keys=True))
        return
    for g in _readable(groups):
        c = g["counters"]
        loc = "-" if g["locality"] is None else f"{100 * g['locality']:.1f}%"
        line = (
            f"{g['name']}  local={c['local']} wildcard={c['wildcard']} remote={c.get('remote', 0)} "
            f"fallback={c['fallback']} empty_skipped={c['empty_skipped']} locality={loc}"
        )
        migrated = {k[len("migrated_") :]: v for k, v in c.items() if k.startswith("migrated_") and v}
        if migrated:
            line += "  migrated: " + " ".join(f"{k}={v}" for k, v in migrated.items())
        if "rates" in g:
            r = g["rates"]
            line += f"  ({r['local']}/s local, {r['wildcard']}/s wildcard, {r['fallback']}/s fallback)"
        click.echo(line)


@main.command(
    name="topology",
    epilog="""\b
Examples:
  numareuse topology
  numareuse topology --json | jq '.interfaces[].rx_queues[] | select(.warning)'""",
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def topology_cmd(as_json):
    """Show CPUs -> NUMA nodes and LLC groups, and NIC RX queues -> IRQ -> CPUs -> node.

    Warns when one RX queue's IRQ affinity (or RPS CPUs) spans nodes: that
    queue's packets are processed on several nodes, which defeats steering.
    """
    _reader()

    def human(r):
        click.echo("NUMA nodes:")
        for n in r["nodes"]:
            if n["memory_only"]:
                cpus = "none (memory only, not a domain)"
            else:
                cpus = _cpulist(n["cpus"]) or "none online"
                if n.get("offline_cpus"):
                    cpus += f" (offline: {_cpulist(n['offline_cpus'])}, kept in the domain)"
            click.echo(f"  node {n['node']}: cpus {cpus}")
        click.echo("Last-level cache groups:")
        for i, g in enumerate(r["llc_groups"]):
            click.echo(f"  llc {i}: cpus {_cpulist(g)}")
        click.echo("Interfaces (RX queue -> IRQ -> CPUs -> node):")
        for i in r["interfaces"]:
            click.echo(f"  {i['name']}" + (f" ({i['device']})" if i["device"] else ""))
            for q in i["rx_queues"]:
                irq = f"irq {q['irq']}" if "irq" in q else "no irq found"
                cpus = q.get("rps_cpus") or q.get("cpus")
                via = "rps " if q.get("rps_cpus") else ""
                where = f" -> {via}cpus {_cpulist(cpus)} -> node {','.join(map(str, q['nodes']))}" if cpus else ""
                click.echo(f"    {q['queue']}: {irq}{where}")
                if "warning" in q:
                    click.echo(f"    warning: {i['name']} {q['queue']} {q['warning']}", err=True)

    _emit(topology.report(), as_json, human)


def _cpulist(cpus) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@main.command(
    epilog="""\b
Examples:
  numareuse watch --port 8080 --domains numa
  numareuse watch -p 8080 -p 8443                  # two groups, same options
  numareuse watch --group tcp4:8080 --group udp6:[::1]:53 --domains cpu
  numareuse watch --config /etc/numareuse/watch.toml
  numareuse watch -c watch.toml --metrics 127.0.0.1:9465
  kill -HUP <pid>                                  # re-read the config file
  kill -TERM <pid>                                 # stop; the steering stays"""
)
@click.option(
    "--port", "-p", "ports", type=click.IntRange(1, 65535), multiple=True, help="A group's port (repeatable)."
)
@click.option(
    "--group",
    "-g",
    "group_args",
    multiple=True,
    metavar="[tcp|udp][4|6]:[ADDR:]PORT",
    help="A group, e.g. tcp4:8080, udp6:[::1]:53, tcp:10.0.0.1:80 (repeatable).",
)
@click.option("--address", "-a", metavar="ADDR", help="Bound address for every --port.")
@click.option("--udp", is_flag=True, help="--port groups are UDP (default TCP).")
@click.option("--ipv6", is_flag=True, help="--port groups are IPv6 (default IPv4).")
@click.option(
    "--domains",
    "-d",
    default="numa",
    show_default=True,
    metavar="numa|llc|cpu|SPEC",
    help="How CPUs form domains, for every --port and --group.",
)
@click.option("--capacity", type=click.IntRange(1, MAX_CAPACITY), default=None, help="Sockets per domain.")
@click.option("--netns", metavar="NAME|PATH", help="The groups live in this network namespace (ip netns name or path).")
@click.option("--pid", type=click.IntRange(min=1), help="The groups live in this process's network namespace.")
@click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False), help="Read the groups from a TOML file."
)
@click.option(
    "--interval",
    type=click.FloatRange(0.01, 3600),
    default=None,
    help="Seconds between polls of what the kernel sends no event for [default: 0.5].",
)
@click.option(
    "--detach-on-exit", is_flag=True, default=None, help="On SIGTERM, detach every group (default: leave it)."
)
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics (numareuse.metrics) on this address.")
@click.option("--verbose", "-v", is_flag=True, help="Also log debugging lines.")
def watch(
    ports, group_args, address, udp, ipv6, domains, capacity, netns, pid, config_path, interval, detach_on_exit,
    metrics, verbose,
):  # fmt: skip
    """Keep groups steered as a fresh attach would, as servers change.

    Attaches each group, then follows it: new sockets registered, closed
    ones dropped, workers whose affinity changed moved, owners found again
    after a reload or a worker restart, a restarted server's new sockets
    adopted, CPU hotplug followed. Process events come from the kernel's
    proc connector; what has no event (listen, bind, affinity) is polled
    every --interval. Runs until SIGTERM, which leaves the steering in
    place (pinned) unless --detach-on-exit. SIGHUP re-reads --config (a bad
    new file is logged and the old one kept). A group whose server is gone,
    or a port with no socket yet, is waited for. One log line per change.

    The config file (TOML): optional top-level interval, detach_on_exit,
    metrics; one [[group]] table per group with the keys port (required),
    address, udp, ipv6, domains, capacity, netns, pid. See
    examples/watch.toml.
    """
    from numareuse import watch as w

    if config_path and (ports or group_args):
        raise w.ConfigError("give the groups either in --config or as --port/--group, not both")
    common = dict(domains=domains, capacity=capacity, netns=netns, pid=pid)
    if config_path:
        if any(v not in (None, "numa") for v in common.values()) or address or udp or ipv6:
            raise w.ConfigError("group options (--domains, --address, --udp, ...) go into the config file's [[group]]s")
        config = w.load_config(config_path)
    else:
        if not ports and not group_args:
            raise w.ConfigError("nothing to watch: give --port, --group or --config")
        groups = [w.make_group(f"--port {p}: ", port=p, address=address, udp=udp, ipv6=ipv6, **common) for p in ports]
        groups += [w.parse_group_arg(a, **common) for a in group_args]
        keys = [g.key for g in groups]
        dup = next((g for g in groups if keys.count(g.key) > 1), None)
        if dup:
            raise w.ConfigError(f"group {dup} is given twice")
        config = w.Config(groups)
    if interval is not None:
        config.overrides["interval"] = interval
    if detach_on_exit:
        config.overrides["detach_on_exit"] = True
    if metrics:
        try:
            w.parse_hostport(metrics)
        except ValueError as e:
            raise w.ConfigError(f"--metrics: {e}") from None
        config.overrides["metrics"] = metrics
    config.apply_overrides()
    w.setup_logging(verbose)
    sys.exit(w.run(config))


if __name__ == "__main__":
    main()
