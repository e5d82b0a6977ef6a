"""Child process: compile bpf/selector.bpf.c with bcc and print its instructions.

Run by ``_loader`` as ``python -m numareuse._compile`` so that bcc and LLVM
(about 120 MiB) are mapped only in this short-lived process, never in a
controller or a pre-fork master. Input (stdin, JSON): ``{"defines": {...}}``
with placeholder map fds; output (stdout, JSON): ``{"insns": <base64>}``.
Nothing is loaded into the kernel here.
"""

from __future__ import annotations

import base64
import json
import sys
from importlib import resources

from . import _layout


def main() -> int:
    req = json.load(sys.stdin)
    try:
        from bcc import BPF
    except ImportError:
        print("bcc Python bindings: install Debian's python3-bpfcc (make setup does)", file=sys.stderr)
        return 3
    src = resources.files("numareuse.bpf").joinpath("selector.bpf.c").read_text()
    cflags = [f"-D{k}={v}" for k, v in req["defines"].items()]
    try:
        b = BPF(text=src.encode(), cflags=cflags)
        insns = b.dump_func(_layout.PROG_NAME.encode())
    except Exception as e:  # bcc raises bare Exception for compile errors
        print(f"compiling the BPF program failed: {e}", file=sys.stderr)
        return 1
    json.dump({"insns": base64.b64encode(insns).decode()}, sys.stdout)
    b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
