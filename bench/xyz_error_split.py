"""How much of a model's XYZ error every frame of a clip shares, and how much changes from frame to frame.

For each scored sample of an evaluate.py report, the result's XYZ video and the true world points of the clip's
static pixels (those with a depth in every frame and on no moving object; the truth's world is its first camera's)
are aligned by one scale and one offset (least squares over the clip). The aligned error splits into its mean over
frames (the clip's geometry a little off, which moves no camera against another) and the rest (what moves each
frame's camera on its own), each as an RMS over the scene's spread. Prints the means per model and shape of the true
camera path (``bench/smooth_camera_paths.py``'s ``path_shape``) as a Markdown table.

    python bench/xyz_error_split.py --gt held-out/data \\
        --run shipped results/shipped/held-out reports/shipped/held-out \\
        --run full-xyz results/full-xyz-002000/held-out reports/full-xyz-002000/held-out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smooth_camera_paths import sample_path_shape
from fourdnex.evaluation.truth import Truth, clip_sources, load_truth
from fourdnex.geometry.cameras import unproject_depth


def error_split(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(shared, varying)``: the RMS of the mean over frames of ``s pred + o - truth`` and of the rest, over the RMS
    spread of ``truth`` about its mean; ``pred``, ``truth`` ``(F, N, 3)``, ``s`` and ``o`` fitted by least squares."""
    p, t = pred - pred.mean((0, 1)), truth - truth.mean((0, 1))
    error = (p * t).sum() / (p * p).sum() * p - t
    shared = error.mean(0)
    spread = np.sqrt((t**2).sum(-1).mean())
    return float(np.sqrt((shared**2).sum(-1).mean()) / spread), float(
        np.sqrt(((error - shared) ** 2).sum(-1).mean()) / spread
    )


def static_world_points(truth: Truth) -> tuple[np.ndarray, np.ndarray]:
    """The true world points ``(F, N, 3)`` of the pixels with a depth in every frame and on no moving object, and
    those pixels' mask ``(H, W)``."""
    keep = truth.valid.all(0) if truth.dynamic is None else truth.valid.all(0) & ~truth.dynamic.any(0)
    return unproject_depth(truth.depth.astype(np.float64), truth.K, truth.cam2world)[:, keep], keep


def split_run(gt: Path, results: Path, report: Path) -> dict[str, list[tuple[float, float]]]:
    """Per shape of the true path, each scored sample's :func:`error_split`."""
    sources = clip_sources(gt)
    out: dict[str, list[tuple[float, float]]] = {}
    for sample in json.loads((report / "metrics.json").read_text())["samples"]:
        shape = sample_path_shape(sample)
        if sample.get("status") != "scored" or shape is None:
            continue
        xyz = np.load(results / f"{sample['result']}.npz")["xyz"].astype(np.float64)
        truth = load_truth(gt, sources[sample["clip_id"]], *xyz.shape[:3])
        points, keep = static_world_points(truth)
        out.setdefault(shape, []).append(error_split(xyz[:, keep], points))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", type=Path, required=True, help="the held-out set's 4DNeX-10M tree (evaluate.py --gt)")
    parser.add_argument(
        "--run",
        nargs=3,
        action="append",
        required=True,
        metavar=("LABEL", "RESULTS", "REPORT"),
        help="a model: its name, its inference.py results and its evaluate.py report of them",
    )
    args = parser.parse_args()
    print("| model | true path | samples | shared error | frame-to-frame error |\n|---|---|---|---|---|")
    for label, results, report in args.run:
        for shape, rows in sorted(split_run(args.gt, Path(results), Path(report)).items()):
            shared, varying = np.mean(rows, axis=0)
            print(f"| {label} | {shape} | {len(rows)} | {shared:.4f} | {varying:.4f} |")


if __name__ == "__main__":
    main()
