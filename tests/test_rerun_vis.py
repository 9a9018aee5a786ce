"""rerun_vis.py writes a recording with points, cameras, images, depth and trajectory per result, and serves it on
this machine only unless asked otherwise."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fourdnex.geometry.results import save_result
from fourdnex.testing.scenes import make_truth

ROOT = Path(__file__).resolve().parents[1]


def test_recording_holds_every_layer_of_every_result(tmp_path):
    truth = make_truth(frames=3, height=24, width=32)
    for i in range(2):
        save_result(tmp_path, i, truth.rgb.numpy(), truth.xyz.numpy(), {})
    cmd = [
        sys.executable,
        str(ROOT / "pm_registration.py"),
        "--pkl_dir",
        str(tmp_path / "00000.npz"),
        "--device",
        "cpu",
    ]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    rrd = tmp_path / "scene.rrd"
    cmd = [
        sys.executable,
        str(ROOT / "rerun_vis.py"),
        "--pkl_dir",
        str(tmp_path),
        "--rr_recording",
        str(rrd),
        "--show_xyz",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from rerun.chunk import RrdReader

    paths = set(RrdReader(rrd).store().schema().entity_paths())
    registered = {
        f"/world/00000/{p}" for p in ("points", "xyz", "camera", "camera/image", "camera/image/depth", "trajectory")
    }
    assert registered <= paths
    assert "/world/00001/xyz" in paths and "/world/00001/camera" not in paths  # no registration for this one
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left behind
    assert np.load(tmp_path / "00000_reg.npz")["K"].shape == (3, 3, 3)


def _listening(port: int) -> set[str]:
    """The local addresses (IPv4, as in /proc/net/tcp) that listen on ``port``."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interruptible() -> None:
    """In the child, before Python starts: Ctrl-C's signal as in a terminal, also where these tests run with it
    ignored (started in the background by a script), so that SIGINT stops the server."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _serve(folder: Path, *extra: str) -> tuple[set[str], str]:
    """Start rerun_vis.py --serve, wait until its scene port listens, stop it; returns the addresses and output."""
    grpc, web = _free_port(), _free_port()
    cmd = [sys.executable, str(ROOT / "rerun_vis.py"), "--pkl_dir", str(folder), "--serve"]
    cmd += ["--grpc_port", str(grpc), "--web_port", str(web), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_interruptible)
    try:
        deadline = time.monotonic() + 60
        while not _listening(grpc) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        addresses = _listening(grpc)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    return addresses, output


def test_serve_binds_this_machine_only_unless_asked(tmp_path):
    truth = make_truth(frames=2, height=16, width=16)
    save_result(tmp_path, 0, truth.rgb.numpy(), truth.xyz.numpy(), {})
    addresses, output = _serve(tmp_path)
    assert addresses == {"127.0.0.1"}, output
    assert "ssh -L" in output and "--bind 0.0.0.0" in output
    addresses, output = _serve(tmp_path, "--bind", "0.0.0.0")
    assert addresses == {"0.0.0.0"}, output
    assert "ssh -L" not in output
