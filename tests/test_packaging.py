"""The installed package works outside the source tree and installs no bare top-level module."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contents_and_use_outside_the_tree(kernel, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ROOT, "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("numareuse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"numareuse", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "numareuse/bpf/selector.bpf.c" in names and "numareuse/cli/main.py" in names
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([venv / "bin/pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    code = (
        "import socket, numareuse; from numareuse import Selector;"
        f"assert numareuse.__file__.startswith({str(venv)!r}), numareuse.__file__;"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1);"
        "s.bind(('127.0.0.1', 0)); s.listen();"
        "sel = Selector('0'); sel.attach(s); print(sel.register(s, 0)); sel.close()"
    )
    # click and psutil from the test venv (a .pth there, such as the editable numareuse's, is
    # not processed for a PYTHONPATH entry, so numareuse can only come from the wheel)
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    r = subprocess.run([venv / "bin/python", "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr
    r = subprocess.run([venv / "bin/numareuse", "--help"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "Examples:" in r.stdout
