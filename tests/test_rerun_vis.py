"""rerun_vis.py writes a recording with points, cameras, images, depth and trajectory per result."""

import subprocess
import sys
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
