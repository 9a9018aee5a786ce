"""Two models scored on the same held-out scenes, compared scene by scene: the mean of each metric's paired difference
and its 95 % bootstrap interval over the scenes.

Reads two evaluate.py reports (``metrics.json``) of the same set; the scenes both scored are paired by clip. For each
metric of :data:`METRICS` with a value on every paired scene, the differences (B minus A; non-finite ones, such as a
moving-object score on a scene without moving objects, dropped) are resampled with replacement ``--draws`` times from
one generator seeded ``--seed``, the metrics drawn in the order listed; a metric missing on some scene prints only the
two reports' summaries. ``--by_shape`` compares the ATE alone, split by the shape of the true camera path
(``bench/smooth_camera_paths.py``'s ``path_shape``), with a fresh generator, straight before curved, and counts the
scenes where B is lower. Prints a Markdown table.

    python bench/paired_scores.py reports/full-xyz-002000/held-out reports/full-xyz-t-002000/held-out
    python bench/paired_scores.py reports/full-xyz-002000/held-out reports/full-xyz-t-002000/held-out --by_shape
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smooth_camera_paths import sample_path_shape

#: The metrics compared, in the order their intervals are drawn.
METRICS = (
    "depth.median.absrel",
    "depth0.median.absrel",
    "depth0.median.delta1",
    "depth.dynamic.absrel",
    "points.chamfer",
    "camera.ate",
    "camera.rpe_trans",
    "camera.rpe_rot",
    "camera.focal",
    "rgb.psnr0",
    "rgb.psnr",
)


def read_report(report: Path) -> tuple[dict[str, dict], dict[str, float]]:
    """``({clip_id: sample}, summary)`` of an evaluate.py report's scored samples and the model's summary."""
    metrics_file = report / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"{metrics_file}: no evaluate.py report")
    metrics = json.loads(metrics_file.read_text())
    samples = {s["clip_id"]: s for s in metrics["samples"] if "scores" in s}
    return samples, metrics["summary"]["model"]


def bootstrap_interval(differences: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the mean of ``differences`` resampled with replacement ``draws`` times."""
    means = [rng.choice(differences, len(differences)).mean() for _ in range(draws)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_row(metric: str, pairs: np.ndarray, draws: int, rng: np.random.Generator) -> dict:
    """One row from ``pairs`` ``(N, 2)`` of A's and B's values on the same scenes: ``{"metric", "scenes", "a", "b",
    "difference", "interval"}``, the difference (B minus A) and its interval over the scenes where it is finite
    (``scenes`` counts them), ``a`` and ``b`` the means of their finite values."""
    differences = pairs[:, 1] - pairs[:, 0]
    differences = differences[np.isfinite(differences)]
    row = {"metric": metric, "scenes": len(differences)}
    row |= {"a": float(np.nanmean(pairs[:, 0])), "b": float(np.nanmean(pairs[:, 1]))}
    return row | {"difference": float(differences.mean()), "interval": bootstrap_interval(differences, draws, rng)}


def paired_rows(a: Path, b: Path, draws: int, seed: int) -> list[dict]:
    """Per metric: ``{"metric", "scenes", "a", "b"}`` and, where every paired scene has it, ``"difference"`` and
    ``"interval"`` over the scenes whose difference is finite (``scenes`` counts them); ``a`` and ``b`` are the means
    over the paired scenes, or the summaries where a scene lacks the metric."""
    (samples_a, summary_a), (samples_b, summary_b) = read_report(a), read_report(b)
    clips = sorted(set(samples_a) & set(samples_b))
    if not clips:
        raise SystemExit(f"{a} and {b}: no scene scored in both")
    rng = np.random.default_rng(seed)
    rows = []
    for metric in METRICS:
        if metric not in summary_a:
            continue
        try:
            pairs = np.array(
                [[samples_a[c]["scores"]["model"][metric], samples_b[c]["scores"]["model"][metric]] for c in clips],
                dtype=float,
            )
        except (KeyError, TypeError):
            rows.append({"metric": metric, "scenes": len(clips), "a": summary_a[metric], "b": summary_b[metric]})
            continue
        rows.append(paired_row(metric, pairs, draws, rng))
    return rows


def paired_by_shape(a: Path, b: Path, draws: int, seed: int) -> list[dict]:
    """The ATE's paired comparison per shape of the true path (straight, then curved), with ``"lower"``: the scenes
    where ``b``'s ATE is the lower."""
    (samples_a, _), (samples_b, _) = read_report(a), read_report(b)
    groups: dict[str, list[tuple[float, float]]] = {"straight": [], "curved": []}
    for clip in sorted(set(samples_a) & set(samples_b)):
        shape = sample_path_shape(samples_a[clip])
        if shape is None:
            continue
        groups[shape].append(
            (samples_a[clip]["scores"]["model"]["camera.ate"], samples_b[clip]["scores"]["model"]["camera.ate"])
        )
    rng = np.random.default_rng(seed)
    rows = []
    for shape, pairs in groups.items():
        if not pairs:
            continue
        values = np.array(pairs)
        rows.append(
            paired_row(f"camera.ate, {shape}", values, draws, rng) | {"lower": int((values[:, 1] < values[:, 0]).sum())}
        )
    return rows


def rows_markdown(rows: list[dict], a: Path, b: Path) -> str:
    """The rows as a Markdown table (the intervals with the differences' signs)."""
    lines = [f"| metric | scenes | A: {a} | B: {b} | B - A | 95 % interval | B lower on |", "|---" * 7 + "|"]
    for row in rows:
        if "interval" not in row:
            summaries = f"{row['a']:.4f} | {row['b']:.4f}"
            lines.append(f"| {row['metric']} | {row['scenes']} | {summaries} | summaries only | | |")
            continue
        low, high = row["interval"]
        lower = row.get("lower", "")
        lines.append(
            f"| {row['metric']} | {row['scenes']} | {row['a']:.4f} | {row['b']:.4f} | {row['difference']:+.4f} "
            f"| [{low:+.4f}, {high:+.4f}] | {lower} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first model's evaluate.py report (holds metrics.json)")
    parser.add_argument("b", type=Path, help="the second model's report of the same set")
    parser.add_argument("--by_shape", action="store_true", help="the ATE alone, by the true path's shape")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamples of the scenes")
    parser.add_argument("--seed", type=int, default=0, help="the resampling generator's seed")
    args = parser.parse_args()
    compare = paired_by_shape if args.by_shape else paired_rows
    print(rows_markdown(compare(args.a, args.b, args.draws, args.seed), args.a, args.b))


if __name__ == "__main__":
    main()
