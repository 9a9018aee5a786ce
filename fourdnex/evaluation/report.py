"""The report of an evaluation: ``metrics.json`` (every number, per sample and in summary, with the rules and the
metric definitions) and ``summary.md`` (the model against the floors, then every sample, scored or not).

In ``metrics.json`` a value that does not apply or cannot be computed is ``null`` and an infinite one (the PSNR of
identical images) is ``"inf"``; summaries are means over the scored samples that have a value (``null`` ones left
out), and ``summary_samples`` says over how many.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fourdnex.evaluation import metrics as m
from fourdnex.evaluation.floors import FLOORS
from fourdnex.evaluation.run import Evaluation
from fourdnex.evaluation.scoring import METRICS, TRUTH_METRICS
from fourdnex.files import write_json, write_text

RULES = {
    "alignments": m.ALIGNMENTS,
    "pixels": f"dense metrics read an evaluation grid of about {m.GRID_PIXELS} pixels per frame (every s-th row and "
    f"column from s // 2, s = round(sqrt(H W / {m.GRID_PIXELS}))); point clouds and reprojection a sparser grid of "
    f"about {m.POINT_PIXELS}",
    "units": "distances against ground truth are in units of the clip's median true depth; without ground truth, "
    "shares of the extent (the largest side of the bounding box of the registered points)",
    "ground_truth": "the clip prepared as training prepares it (first F frames, resized to cover H x W and "
    "centre-cropped), its geometry taken before the pointmap normalization; cameras in the first camera's frame",
    "registration": "results without NNNNN_reg.npz are registered with pm_registration.py's defaults and the file is "
    "saved beside them",
    "summary": "means over the scored samples that have a value (summary_samples: how many; a clip without a dynamic "
    "mask has no dynamic depth AbsRel); per-frame curves are means over samples frame by frame",
    "values": 'null: does not apply or cannot be computed; "inf": the PSNR of identical images',
}
#: The columns of the per-sample table, with ground truth and without.
SAMPLE_COLUMNS = [
    "depth.median.absrel",
    "depth.median.delta1",
    "depth.dynamic.absrel",
    "points.chamfer",
    "camera.ate",
    "rgb.psnr0",
]
SAMPLE_COLUMNS_NO_TRUTH = ["residual.p90", "edges", "stability.static", "path.jerk"]


def _number(x: float) -> float | str | None:
    """A float for JSON: 6 significant digits, ``None`` for NaN, ``"inf"`` for infinities."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.6g}")


def _summarized(evaluation: Evaluation) -> dict[str, dict[str, list[float]]]:
    """Per predictor and metric, the values of the scored samples that have one (not NaN), in sample order."""
    values: dict[str, dict[str, list[float]]] = {}
    for name in evaluation.predictors:
        values[name] = {metric: [] for metric in METRICS}
        for sample in evaluation.scored:
            for metric, value in sample.scores[name].values.items():
                if not math.isnan(value):
                    values[name][metric].append(value)
    return values


def summarize(evaluation: Evaluation) -> dict[str, dict[str, float]]:
    """Per predictor, the mean of every metric over the scored samples that have it (NaN if none has)."""
    return {
        name: {metric: float(np.mean(v)) if v else float("nan") for metric, v in values.items()}
        for name, values in _summarized(evaluation).items()
    }


def summary_samples(evaluation: Evaluation) -> dict[str, dict[str, int]]:
    """Per predictor, how many scored samples each metric's mean in :func:`summarize` is over."""
    return {name: {k: len(v) for k, v in values.items()} for name, values in _summarized(evaluation).items()}


def mean_curves(evaluation: Evaluation) -> dict[str, dict[str, np.ndarray]]:
    """Per predictor and curve, the frame-by-frame mean over the scored samples (NaN where none has the frame)."""
    curves: dict[str, dict[str, np.ndarray]] = {}
    for name in evaluation.predictors:
        stacks: dict[str, list[np.ndarray]] = {}
        for sample in evaluation.scored:
            for metric, curve in sample.scores[name].frames.items():
                stacks.setdefault(metric, []).append(np.where(np.isfinite(curve), curve, np.nan))
        curves[name] = {}
        for metric, stack in stacks.items():
            length = max(len(c) for c in stack)
            padded = np.stack([np.pad(c, (0, length - len(c)), constant_values=np.nan) for c in stack])
            counts = np.isfinite(padded).sum(0)
            curves[name][metric] = np.divide(
                np.nansum(padded, 0), counts, out=np.full(length, np.nan), where=counts > 0
            )
    return curves


def metrics_json(evaluation: Evaluation) -> dict:
    """The content of ``metrics.json``."""
    metrics = {k: v for k, v in METRICS.items() if evaluation.ground_truth is not None or k not in TRUTH_METRICS}
    samples = []
    for sample in evaluation.samples:
        entry = {
            "result": sample.name,
            "clip_id": sample.clip_id,
            "frames": sample.frames,
            "size": list(sample.size),
            "status": sample.status,
            "registration": sample.registration or None,
            "seconds": {k: round(v, 3) for k, v in sample.seconds.items()},
            "scores": {name: {k: _number(v) for k, v in s.values.items()} for name, s in sample.scores.items()},
            "per_frame": {
                name: {k: [_number(x) for x in v] for k, v in s.frames.items()} for name, s in sample.scores.items()
            },
        }
        if "model" in sample.scores:
            entry["camera_path"] = {"model": np.round(sample.scores["model"].path, 6).tolist()}
            if sample.name in evaluation.truth_paths:
                entry["camera_path"]["truth"] = np.round(evaluation.truth_paths[sample.name], 6).tolist()
        samples.append(entry)
    summary, counts = summarize(evaluation), summary_samples(evaluation)
    return {
        "results": str(evaluation.results),
        "ground_truth": str(evaluation.ground_truth) if evaluation.ground_truth is not None else None,
        "samples_total": len(evaluation.samples),
        "samples_scored": len(evaluation.scored),
        "rules": RULES,
        "metrics": {
            k: {"label": label, "better": better, "definition": text} for k, (label, better, text) in metrics.items()
        },
        "floors": {k: v for k, v in FLOORS.items() if k in evaluation.predictors},
        "summary": {name: {k: _number(summary[name][k]) for k in metrics} for name in evaluation.predictors},
        "summary_samples": {name: {k: counts[name][k] for k in metrics} for name in evaluation.predictors},
        "samples": samples,
    }


def table_cell(x: float | None) -> str:
    """A number as a table shows it: 3 significant digits, ``—`` where there is none."""
    if x is None or math.isnan(x):
        return "—"
    return "∞" if math.isinf(x) else f"{x:.3g}"


def _mean_cell(x: float, samples: int, scored: int) -> str:
    """A summary mean as the table shows it, with ``(n=...)`` when it is over fewer than the ``scored`` samples."""
    return table_cell(x) + (f" (n={samples})" if 0 < samples < scored else "")


def summary_markdown(evaluation: Evaluation, plots: list[str]) -> str:
    """The content of ``summary.md``."""
    with_truth = evaluation.ground_truth is not None
    metrics = [k for k in METRICS if with_truth or k not in TRUTH_METRICS]
    summary, counts = summarize(evaluation), summary_samples(evaluation)
    names = evaluation.predictors
    scored = len(evaluation.scored)
    lines = [
        "# Evaluation",
        "",
        f"Results: `{evaluation.results}`, {len(evaluation.samples)} samples, {scored} scored. Ground truth: "
        + (f"`{evaluation.ground_truth}`." if with_truth else "none (only the metrics that need none)."),
        "",
        "## Model against the floors",
        "",
        f"Means over the {scored} scored samples, or over the n of them that have a value where a cell says (n=...) "
        "(the dynamic depth AbsRel needs a clip with a dynamic mask). The floors are trivial predictors scored by the "
        "same code (defined below): a model should beat every one of them.",
        "",
        "| metric | better | " + " | ".join(n.replace("_", " ") for n in names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for metric in metrics:
        label, better, _ = METRICS[metric]
        cells = (_mean_cell(summary[n][metric], counts[n][metric], scored) for n in names)
        lines.append(f"| {label} | {better} | " + " | ".join(cells) + " |")
    columns = SAMPLE_COLUMNS if with_truth else SAMPLE_COLUMNS_NO_TRUTH
    lines += [
        "",
        "## Samples",
        "",
        "The model's numbers per sample; a sample that could not be scored says why.",
        "",
        "| result | clip | status | registration | " + " | ".join(METRICS[c][0] for c in columns) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for sample in evaluation.samples:
        values = sample.scores["model"].values if "model" in sample.scores else {}
        cells = " | ".join(table_cell(values.get(c)) for c in columns)
        lines.append(
            f"| {sample.name} | {sample.clip_id or '—'} | {sample.status} | {sample.registration or '—'} | {cells} |"
        )
    lines += ["", "## Rules", ""]
    lines += [f"- **{k}**: {v}" for k, v in RULES.items() if k != "alignments"]
    lines += [f"- **alignment {k}**: {v}" for k, v in m.ALIGNMENTS.items()]
    lines += ["", "## Metrics", ""]
    lines += [f"- `{k}` ({METRICS[k][0]}, {METRICS[k][1]} is better): {METRICS[k][2]}" for k in metrics]
    lines += ["", "## Floors", ""]
    lines += [f"- **{k}**: {FLOORS[k]}" for k in names if k in FLOORS]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(evaluation: Evaluation, out: str | Path, plots: list[str]) -> None:
    """Write ``metrics.json`` and ``summary.md`` into ``out`` (atomically)."""
    out = Path(out)
    write_json(out / "metrics.json", metrics_json(evaluation))
    write_text(out / "summary.md", summary_markdown(evaluation, plots))
