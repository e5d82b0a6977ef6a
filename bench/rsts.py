"""Every TCP RST the kernel sends, counted by the kernel code path that sent it.

A BPF program on the raw tracepoint ``tcp_send_reset`` (no tracefs needed) counts
each reset by its kernel stack; :meth:`RstCensus.snapshot` reads the counts and
:meth:`RstCensus.delta` turns two snapshots into counts per *path*, a name for what
made the kernel reset the connection:

- ``handshake_vs_close``: a handshake's last ACK completed the connection while its
  listener was being closed (``inet_csk_complete_hashdance`` found the listener no
  longer listening, and ``inet_child_forget`` reset the child). The kernel checks the
  listener's state before it builds the child and queues the child afterwards; a
  close in between resets the connection whatever chose the listener, with or
  without numareuse, and whether or not migration is on (``python -m
  bench.reload_race`` measures it, README "Soak test").
- ``unmigrated``: a closing listener's queued connection found no other listener
  (``inet_csk_listen_stop``): what migration (numareuse's SELECT_OR_MIGRATE
  program, or ``tcp_migrate_req``) is there to prevent.
- ``reply``: an answer to a segment that met no socket (a SYN to a port with no
  listener), a TIME_WAIT socket, or a socket whose state rejects it
  (``tcp_v4_send_reset``/``tcp_v6_send_reset``, outside the paths above).
- ``close``: a connection closed with unread data or with linger 0 (by its
  application, or by the kernel for a process that died).
- ``other``: any other path (the stack is kept, for a look).

The soak uses it to tell a reset numareuse could cause from the kernel's own,
by evidence rather than by allowance: see bench/soak.py.
"""

from __future__ import annotations

PROGRAM = r"""
BPF_STACK_TRACE(stacks, 1024);
BPF_HASH(counts, int, u64, 1024);

RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
    int id = stacks.get_stackid(ctx, 0);
    counts.increment(id);
    return 0;
}
"""

RACE, UNMIGRATED, REPLY, CLOSE, OTHER, UNKNOWN = (
    "handshake_vs_close",
    "unmigrated",
    "reply",
    "close",
    "other",
    "unknown stack",
)


FRAMES = {
    "inet_csk_listen_stop": UNMIGRATED,
    "inet_csk_complete_hashdance": RACE,
    "inet_csk_reqsk_queue_add": RACE,
    "tcp_v4_send_reset": REPLY,
    "tcp_v6_send_reset": REPLY,
    "__tcp_close": CLOSE,
    "tcp_close": CLOSE,
}


def classify(frames: list[str]) -> str:
    """The path of one reset, from its kernel stack (innermost first, symbol names).

    The innermost known frame decides: a softirq that resets a connection can run on
    top of any system call (a listener's close included), whose frames lie below it.
    """
    for name in frames:
        if name in FRAMES:
            return FRAMES[name]
    return OTHER


class RstCensus:
    """The loaded program; ``snapshot()`` returns {stack id: resets so far}."""

    def __init__(self):
        from numareuse import _headers

        _headers.ensure_kernel_source()
        from bcc import BPF  # LLVM at run time: a benchmark's tool, never loaded in a serving process

        self.bpf = BPF(text=PROGRAM.encode())
        self._paths: dict[int, tuple[str, list[str]]] = {}

    def snapshot(self) -> dict[int, int]:
        return {k.value: v.value for k, v in self.bpf[b"counts"].items()}

    def path(self, stack_id: int) -> tuple[str, list[str]]:
        if stack_id not in self._paths:
            if stack_id < 0:  # the stack map was full, or a hash collision: the stack is lost
                self._paths[stack_id] = (UNKNOWN, [])
            else:
                frames = [self.bpf.ksym(a).decode(errors="replace") for a in self.bpf[b"stacks"].walk(stack_id)]
                self._paths[stack_id] = (classify(frames), frames)
        return self._paths[stack_id]

    def delta(self, before: dict[int, int], after: dict[int, int]) -> dict:
        """Resets between two snapshots: {"paths": {path: n}, "other_stacks": [...]}."""
        paths: dict[str, int] = {}
        others = []
        for sid, n in after.items():
            d = n - before.get(sid, 0)
            if d <= 0:
                continue
            path, frames = self.path(sid)
            paths[path] = paths.get(path, 0) + d
            if path in (OTHER, UNKNOWN):
                others.append({"n": d, "stack": frames[:12]})
        return {"paths": dict(sorted(paths.items())), "other_stacks": others}

    def close(self) -> None:
        self.bpf.cleanup()
