"""The demo model's lineage as one learning curve: evaluate.py's reports of several models, each placed at the
training samples it had seen since the first of them, with the floors and the demo model's goals beside them.

A model continued from another (the recipe's ``FULL_FROM``) is a later point of the same curve, so the reports of a
lineage scored on the same scenes show what its steps bought, where the recipe's own curves stop at a run's end.
Draws one panel per metric (frame-0 depth AbsRel, the clip's depth AbsRel, Chamfer distance, ATE), a line per
held-out set, and prints the numbers as a Markdown table.

    python bench/lineage_curves.py --point shipped 0 reports/shipped \\
        --point full-fine 307200 reports/full-fine --point full-xyz 819200 reports/full-xyz-002000 \\
        --out docs/learning_curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.files import atomic_path

#: (metric, title, the floor it is drawn against, the goal: a number, or a share of that floor)
PANELS = (
    ("depth0.median.absrel", "frame-0 depth AbsRel", "plane", {"held-out": 0.08, "held-out-family": 0.12}),
    ("depth.median.absrel", "depth AbsRel, whole clip", "plane", {"held-out": 0.10}),
    ("points.chamfer", "Chamfer distance", "mean_depth", 0.5),
    ("camera.ate", "ATE", "static_camera", 1 / 3),
)


def read_lineage(points: list[tuple[str, int, Path]], sets: list[str]) -> dict[str, list[dict]]:
    """Per set, each model's ``{"label", "samples", "model": summary, "floors": {name: summary}}`` in order; models are
    ``(label, samples seen, evaluate.py output folder holding <set>/metrics.json)``."""
    lineage: dict[str, list[dict]] = {s: [] for s in sets}
    for label, samples, folder in points:
        for set_name in sets:
            metrics = folder / set_name / "metrics.json"
            if not metrics.is_file():
                raise SystemExit(f"{metrics}: no evaluate.py report of {label} on {set_name}")
            summary = json.loads(metrics.read_text())["summary"]
            floors = {name: values for name, values in summary.items() if name != "model"}
            lineage[set_name].append({"label": label, "samples": samples, "model": summary["model"], "floors": floors})
    return lineage


def goal_of(goal, floor: float | None, set_name: str) -> float | None:
    """The goal's value on a set: a number per set, or a share of the floor."""
    if isinstance(goal, dict):
        return goal.get(set_name)
    return None if floor is None else goal * floor


def plot_lineage(lineage: dict[str, list[dict]], path: Path) -> None:
    """One panel per metric of :data:`PANELS`; a line per set, its floor dashed and its goal dotted."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.0 * len(PANELS), 3.3), layout="constrained")
    axes = figure.subplots(1, len(PANELS))
    for ax, (metric, title, floor_name, goal) in zip(axes, PANELS, strict=True):
        for i, (set_name, models) in enumerate(lineage.items()):
            color = f"C{i}"
            x = [m["samples"] / 1e3 for m in models]
            ax.plot(x, [m["model"].get(metric) for m in models], "o-", color=color, label=set_name)
            for m in models:
                ax.annotate(
                    m["label"],
                    (m["samples"] / 1e3, m["model"].get(metric)),
                    fontsize=6,
                    color=color,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            floor = models[-1]["floors"].get(floor_name, {}).get(metric)
            if floor is not None and i == 0:
                ax.axhline(floor, linestyle="--", linewidth=1, color="gray", label=f"floor: {floor_name}")
            target = goal_of(goal, floor, set_name)
            if target is not None:
                ax.axhline(target, linestyle=":", linewidth=1.5, color=color, label=f"goal, {set_name}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training samples seen (thousands)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)


def lineage_markdown(lineage: dict[str, list[dict]]) -> str:
    """The drawn numbers, a row per model and set, then the floors."""
    header = "| set | model | samples seen | " + " | ".join(title for _, title, _, _ in PANELS) + " |"
    lines = [header, "|---" * (len(PANELS) + 3) + "|"]
    for set_name, models in lineage.items():
        for m in models:
            cells = " | ".join(f"{m['model'].get(metric, float('nan')):.4g}" for metric, *_ in PANELS)
            lines.append(f"| {set_name} | {m['label']} | {m['samples']:,} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--point",
        nargs=3,
        action="append",
        required=True,
        metavar=("LABEL", "SAMPLES", "REPORTS"),
        help="a model: its name, the training samples it had seen, the folder of its evaluate.py reports (one per set)",
    )
    parser.add_argument("--sets", nargs="+", default=["held-out", "held-out-family"], help="held-out sets to draw")
    parser.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    args = parser.parse_args()
    lineage = read_lineage([(label, int(n), Path(folder)) for label, n, folder in args.point], args.sets)
    plot_lineage(lineage, args.out)
    print(lineage_markdown(lineage))
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
