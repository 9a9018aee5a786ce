"""The report's figures (matplotlib, written as PNG): camera paths seen from above, per-frame metric curves, and the
worst samples' error maps.

Seen from above means the x-z plane of the first camera's frame (x right, z forward: OpenCV axes without the
downward y); the model's path is the one the ATE aligned onto the truth's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fourdnex.evaluation.report import mean_curves
from fourdnex.evaluation.run import Evaluation
from fourdnex.evaluation.scoring import METRICS
from fourdnex.files import atomic_path

#: Samples drawn in the camera-path figure (the first ones) and in the worst-samples figure.
PATH_SAMPLES, WORST_SAMPLES = 12, 3
#: The per-frame curves drawn, with ground truth and without.
CURVES = ["depth.median.absrel", "depth.median.delta1", "points.chamfer", "camera.ate", "rgb.psnr", "rgb.ssim"]
CURVES_NO_TRUTH = ["residual.median", "edges", "stability.static", "stability.motion"]
COLORS = {
    "model": "tab:red",
    "plane": "tab:gray",
    "mean_depth": "tab:olive",
    "first_frame": "tab:blue",
    "static_camera": "tab:purple",
}


def _save(figure, path: Path) -> None:
    """Write a figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, pil_kwargs={"compress_level": 1})


def _figure(rows: int, cols: int, width: float, height: float):
    """A figure of ``rows x cols`` panels of ``width x height`` inches (matplotlib's object API: no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def _grid(count: int, width: float, height: float):
    """A figure with ``count`` panels on a near-square grid; returns the figure and the axes, flattened."""
    cols = min(count, math.ceil(math.sqrt(count)))
    figure, axes = _figure(math.ceil(count / cols), cols, width, height)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, axes.flat[:count]


def camera_paths(evaluation: Evaluation, path: Path) -> None:
    """The recovered camera paths from above (aligned onto the true ones when there are)."""
    samples = evaluation.scored[:PATH_SAMPLES]
    figure, axes = _grid(len(samples), 3.2, 3.2)
    for ax, sample in zip(axes, samples, strict=True):
        model = sample.scores["model"]
        truth = evaluation.truth_paths.get(sample.name)
        if truth is not None:
            ax.plot(truth[:, 0], truth[:, 2], "k-", lw=2, label="truth")
            ax.plot(truth[0, 0], truth[0, 2], "ko", ms=4)
        ax.plot(model.path[:, 0], model.path[:, 2], "-", color=COLORS["model"], lw=1.5, label="model")
        ax.plot(model.path[0, 0], model.path[0, 2], "o", color=COLORS["model"], ms=4)
        ate = model.values.get("camera.ate")
        ax.set_title(sample.name + (f"  ATE {ate:.3g}" if ate is not None else ""), fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.locator_params(nbins=4)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("x", fontsize=8)
        ax.set_ylabel("z (forward)", fontsize=8)
    axes[0].legend(fontsize=7)
    figure.suptitle("Camera paths from above" + (" (model aligned onto the truth)" if evaluation.truth_paths else ""))
    _save(figure, path)


def per_frame(evaluation: Evaluation, path: Path) -> None:
    """Per-frame metric curves, each predictor's mean over the scored samples."""
    curves = mean_curves(evaluation)
    names = CURVES if evaluation.ground_truth is not None else CURVES_NO_TRUTH
    figure, axes = _grid(len(names), 4.2, 2.8)
    for ax, metric in zip(axes, names, strict=True):
        for predictor in evaluation.predictors:
            curve = curves[predictor].get(metric)
            if curve is not None and np.isfinite(curve).any():
                ax.plot(curve, color=COLORS[predictor], lw=2 if predictor == "model" else 1, label=predictor)
        label, better, _ = METRICS[metric]
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
        ax.set_xlabel("frame" if not metric.startswith(("stability", "camera.rpe")) else "frame pair", fontsize=8)
        ax.tick_params(labelsize=7)
    lines = {line.get_label(): line for ax in axes for line in ax.get_lines()}  # floors that draw the same line
    figure.legend(lines.values(), lines.keys(), loc="outside lower center", ncols=len(lines), fontsize=8)
    figure.suptitle("Per frame, mean over samples (floors with equal values draw over each other)")
    _save(figure, path)


def worst_samples(evaluation: Evaluation, path: Path) -> None:
    """The model's worst samples (largest depth AbsRel with ground truth, residual without): each at its worst frame,
    the image, the true and predicted depth and the relative error (with ground truth) or the residual."""
    samples = [s for s in evaluation.scored if s.scores["model"].worst is not None]
    samples = sorted(samples, key=lambda s: -s.scores["model"].worst["value"])[:WORST_SAMPLES]
    with_truth = evaluation.ground_truth is not None
    cols = 4 if with_truth else 2
    figure, axes = _figure(len(samples), cols, 3.2, 2.4)
    for row, sample in zip(axes, samples, strict=True):
        worst = sample.scores["model"].worst
        row[0].imshow(worst["rgb"])
        row[0].set_title(f"{sample.name} frame {worst['frame']}", fontsize=9)
        if with_truth:
            true, pred = worst["true"], worst["pred"]
            low, high = np.percentile(true[true > 0], [1, 99])
            row[1].imshow(true, cmap="turbo", vmin=low, vmax=high)
            row[1].set_title("true depth", fontsize=9)
            row[2].imshow(pred, cmap="turbo", vmin=low, vmax=high)
            row[2].set_title("model depth (median-aligned)", fontsize=9)
            error = np.where(true > 0, np.abs(pred - true) / np.where(true > 0, true, 1), np.nan)
            shown = row[3].imshow(error, cmap="magma", vmin=0, vmax=0.25)
            row[3].set_title(f"|d - g| / g (AbsRel {worst['value']:.3g})", fontsize=9)
        else:
            shown = row[1].imshow(worst["residual"], cmap="magma", vmin=0, vmax=max(1e-6, float(worst["value"])) * 2)
            row[1].set_title(f"residual / extent (p90 {worst['value']:.3g})", fontsize=9)
        figure.colorbar(shown, ax=row[-1], fraction=0.046)
        for ax in row:
            ax.set_axis_off()
    figure.suptitle("Worst samples (model)")
    _save(figure, path)


def write_plots(evaluation: Evaluation, out: str | Path) -> list[str]:
    """Every figure into ``out``; returns their file names (none when no sample was scored)."""
    if not evaluation.scored:
        return []
    out = Path(out)
    files = ["camera_paths.png", "per_frame.png", "worst_samples.png"]
    camera_paths(evaluation, out / files[0])
    per_frame(evaluation, out / files[1])
    worst_samples(evaluation, out / files[2])
    return files
