"""How much of a model's camera error is frame-to-frame jitter: evaluate.py's ATE with the registered camera centres
smoothed over time.

For each scored sample of one or more evaluate.py reports (``metrics.json``: the aligned predicted and the true camera
centres of every frame, ``camera_path``), the predicted centres are smoothed by a Gaussian of ``sigma`` frames as the
registration's ``--smooth_frames`` smooths them (:func:`fourdnex.geometry.registration.smooth_cameras`: weights to 3
sigma, the ends held), aligned onto the true ones again by one Sim(3) (Umeyama, as evaluate.py aligns them) and scored
as evaluate.py scores the ATE: the RMS distance to the true centres in the clip's units (the sample's own ATE over its
RMS in the path's units gives the unit). The true centres smoothed the same way and scored against themselves say how
much real motion such smoothing would take away. ``--gcv`` adds a smoother that chooses its own strength per clip: the
Whittaker smoother (least squares with a penalty on the path's second differences), its weight chosen by generalized
cross-validation, on the predicted and on the true centres. ``--by_shape`` prints instead each report's ATE and RPE
translation as scored, split by the shape of the true path: straight (its largest second difference under :data:`CURVED`
of its largest step) or curved. Prints the mean over samples per report and column as a Markdown table. Reads JSON only.

    python bench/smooth_camera_paths.py runs/demo/reports/full/checkpoint-001200/held-out-image --sigmas 1 2 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.evaluation.metrics import apply_sim3, sim3_align
from fourdnex.geometry.registration import smooth_cameras


def rms_distance(path: np.ndarray, truth: np.ndarray) -> float:
    """RMS distance between the points of ``path (F, 3)`` and ``truth (F, 3)``, frame by frame."""
    return float(np.sqrt(np.mean(np.sum((path - truth) ** 2, axis=1))))


def rms_to(path: np.ndarray, truth: np.ndarray) -> float:
    """RMS distance of ``path (F, 3)`` to ``truth (F, 3)`` after the Sim(3) of the one onto the other."""
    scale, rotation, translation = sim3_align(path, truth)
    return rms_distance(apply_sim3(path, scale, rotation, translation), truth)


#: A true path is curved where its largest second difference (any axis) exceeds this share of its largest step.
CURVED = 0.05


def path_shape(truth: np.ndarray) -> str:
    """``"straight"`` or ``"curved"``: the shape of a true camera path ``(F, 3)``, ``F >= 3`` (see :data:`CURVED`)."""
    step = np.abs(np.diff(truth, axis=0)).max()
    bend = np.abs(np.diff(truth, 2, axis=0)).max()
    return "curved" if bend > CURVED * step else "straight"


def sample_path_shape(sample: dict) -> str | None:
    """The :func:`path_shape` of an evaluate.py report sample's true camera path; ``None`` where the report holds no
    path of at least 3 frames (nothing to bend)."""
    truth = (sample.get("camera_path") or {}).get("truth", [])
    return path_shape(np.asarray(truth, np.float64)) if len(truth) >= 3 else None


def ates_by_shape(report: Path) -> dict[str, dict[str, float]]:
    """Per shape of the true path (:func:`path_shape`): the samples, their mean ATE and RPE translation as scored."""
    metrics = json.loads((report / "metrics.json").read_text())
    groups: dict[str, list[tuple[float, float]]] = {}
    for sample in metrics["samples"]:
        shape = sample_path_shape(sample)
        if shape is None:
            continue
        scores = sample["scores"]["model"]
        groups.setdefault(shape, []).append((scores["camera.ate"], scores["camera.rpe_trans"]))
    return {
        shape: {"samples": len(v), "ATE": float(np.mean([a for a, _ in v])), "RPE": float(np.mean([r for _, r in v]))}
        for shape, v in sorted(groups.items())
    }


#: The Whittaker smoother's weights that generalized cross-validation chooses among (log-spaced).
GCV_WEIGHTS = 10.0 ** np.arange(-3.0, 6.01, 0.25)


def whittaker_gcv(path: np.ndarray) -> np.ndarray:
    """``path (F, 3)`` smoothed by ``z = argmin |z - path|^2 + w |D2 z|^2`` (``D2``: second differences over frames),
    ``w`` of :data:`GCV_WEIGHTS` minimizing the generalized cross-validation score ``F RSS / (F - tr(S))^2`` of the
    smoother matrix ``S = (I + w D2^T D2)^-1``. A path with no second differences (a line) is returned as it is."""
    frames = len(path)
    if frames < 3:
        return path
    penalty = np.diff(np.eye(frames), 2, axis=0)
    penalty = penalty.T @ penalty
    best, smoothed = np.inf, path
    for weight in GCV_WEIGHTS:
        smoother = np.linalg.inv(np.eye(frames) + weight * penalty)
        z = smoother @ path
        score = frames * np.sum((path - z) ** 2) / (frames - np.trace(smoother)) ** 2
        if score < best:
            best, smoothed = score, z
    return smoothed


def smooth_centres(path: np.ndarray, sigma: float) -> np.ndarray:
    """Camera centres ``(F, 3)`` smoothed over time as the registration smooths its cameras' centres."""
    world2cam = torch.eye(4, dtype=torch.float64).repeat(len(path), 1, 1)
    world2cam[:, :3, 3] = -torch.from_numpy(path)  # unrotated cameras: the centre is minus the translation
    return -smooth_cameras(world2cam, sigma)[:, :3, 3].numpy()


def smoothed_ates(report: Path, sigmas: list[float], gcv: bool = False) -> dict[str, float]:
    """Mean ATE of a report's samples as scored, with the predicted centres smoothed by each sigma, and of the true
    centres smoothed by each sigma against themselves (all in the clips' units)."""
    metrics = json.loads((report / "metrics.json").read_text())
    sums: dict[str, list[float]] = {}
    for sample in metrics["samples"]:
        path = sample.get("camera_path") or {}
        if "model" not in path or len(path["model"]) < 2:
            continue
        pred, truth = np.asarray(path["model"], np.float64), np.asarray(path["truth"], np.float64)
        raw, ate = rms_to(pred, truth), sample["scores"]["model"]["camera.ate"]
        if raw == 0:
            continue
        unit = raw / ate  # the path's units per clip unit
        sums.setdefault("as scored", []).append(ate)
        for sigma in sigmas:
            smooth = smooth_centres(pred, sigma)
            sums.setdefault(f"sigma {sigma:g}", []).append(rms_to(smooth, truth) / unit)
            true_smooth = smooth_centres(truth, sigma)
            moved = rms_distance(true_smooth, truth) / unit
            sums.setdefault(f"truth, sigma {sigma:g}", []).append(moved)
        if gcv:
            sums.setdefault("GCV", []).append(rms_to(whittaker_gcv(pred), truth) / unit)
            moved = rms_distance(whittaker_gcv(truth), truth) / unit
            sums.setdefault("truth, GCV", []).append(moved)
    return {key: float(np.mean(values)) for key, values in sums.items()} | {"samples": len(sums.get("as scored", []))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="evaluate.py output folders (each holds metrics.json)")
    parser.add_argument("--sigmas", nargs="+", type=float, default=[1.0, 2.0, 3.0], help="Gaussian widths, frames")
    parser.add_argument("--gcv", action="store_true", help="add the Whittaker smoother with its weight chosen by GCV")
    parser.add_argument("--by_shape", action="store_true", help="ATE and RPE as scored by the true path's shape")
    args = parser.parse_args()
    if args.by_shape:
        print("| report | true path | samples | ATE | RPE translation |\n|---|---|---|---|---|")
        for report in args.reports:
            for shape, row in ates_by_shape(report).items():
                print(f"| {report} | {shape} | {row['samples']} | {row['ATE']:.4f} | {row['RPE']:.4f} |")
        return
    rows = {str(report): smoothed_ates(report, args.sigmas, args.gcv) for report in args.reports}
    columns = ["as scored"] + [f"sigma {s:g}" for s in args.sigmas] + [f"truth, sigma {s:g}" for s in args.sigmas]
    columns += ["GCV", "truth, GCV"] if args.gcv else []
    print("| report | samples | ATE " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, row in rows.items():
        print(f"| {name} | {row['samples']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
