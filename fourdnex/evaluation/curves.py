"""Learning curves: evaluate.py's reports of a training run's checkpoints against the training samples each
checkpoint had seen, with the floors beside them (which do not change along a curve).

The layout read (the one ``scripts/train_demo.sh`` writes)::

    WORK/<run>/checkpoints/checkpoint-NNNNNN/trainer_state.json   the step and the run's settings (finetune.py)
    WORK/reports/<run>/checkpoint-NNNNNN/<set>/metrics.json      evaluate.py on that checkpoint's results of <set>
    WORK/reports/vae/round-trip/<set>/metrics.json               where present: the VAE's round trip of <set>'s
                                                                  truths (fourdnex.evaluation.roundtrip), the
                                                                  ceiling of any transformer on that VAE

and writes ``OUT/curves.json`` (every point: run, set, step, samples seen, the model's summary numbers, the
floors', the ceiling's where there is one), ``OUT/curves.md`` (each run's last point beside the floors and the
ceiling, per set) and ``OUT/curves.png`` (the model's numbers against samples seen, one panel per metric and set
scored at several checkpoints, the floors and the ceiling as lines).

    python -m fourdnex.evaluation.curves --work runs/demo --out runs/demo/curves
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fourdnex.cli import run
from fourdnex.errors import UsageError
from fourdnex.evaluation.report import table_cell
from fourdnex.evaluation.scoring import METRICS
from fourdnex.files import atomic_path, write_json, write_text

#: The numbers the curves follow (frame 0: what the image determines; the clip; points; cameras).
CURVE_METRICS = (
    "depth0.median.absrel",
    "depth0.median.delta1",
    "depth.median.absrel",
    "points.chamfer",
    "camera.ate",
    "camera.focal",
)
#: The floors drawn beside each metric (those that know nothing of the scene, and a still camera).
CURVE_FLOORS = ("plane", "mean_depth", "static_camera")


#: Where the VAE's round trips are reported, per set (the recipe's evaluate stage writes them).
CEILING_REPORTS = Path("reports") / "vae" / "round-trip"


def read_points(work: str | Path) -> list[dict]:
    """Every (run, checkpoint, set) report under ``WORK/reports`` with its checkpoint's samples seen, sorted."""
    work = Path(work)
    ceilings = {
        report.parent.name: {k: json.loads(report.read_text())["summary"]["model"].get(k) for k in CURVE_METRICS}
        for report in (work / CEILING_REPORTS).glob("*/metrics.json")
    }
    points = []
    for metrics in sorted((work / "reports").glob("*/checkpoint-*/*/metrics.json")):
        set_dir = metrics.parent
        checkpoint, run_name = set_dir.parent.name, set_dir.parent.parent.name
        state_file = work / run_name / "checkpoints" / checkpoint / "trainer_state.json"
        if not state_file.is_file():
            raise UsageError(f"{metrics}: no {state_file} for its checkpoint (the run's training state)")
        state = json.loads(state_file.read_text())
        config = state["config"]
        batch = config["train_batch_size"] * config["gradient_accumulation_steps"] * state["world_size"]
        summary = json.loads(metrics.read_text())["summary"]
        point = {
            "run": run_name,
            "set": set_dir.name,
            "step": state["step"],
            "samples_seen": state["step"] * batch,
            "model": {k: summary["model"].get(k) for k in CURVE_METRICS},
            "floors": {f: {k: summary[f].get(k) for k in CURVE_METRICS} for f in CURVE_FLOORS if f in summary},
        }
        if set_dir.name in ceilings:
            point["ceiling"] = ceilings[set_dir.name]
        points.append(point)
    if not points:
        raise UsageError(f"{work / 'reports'}: no report of a checkpoint (<run>/checkpoint-NNNNNN/<set>/metrics.json)")
    return sorted(points, key=lambda p: (p["set"], p["run"], p["step"]))


def curves_markdown(points: list[dict]) -> str:
    """Each run's last point per set beside the floors, as markdown tables."""
    lines = []
    for set_name in sorted({p["set"] for p in points}):
        here = [p for p in points if p["set"] == set_name]
        last = {p["run"]: p for p in here}  # sorted by step: the last one wins
        lines += [f"### {set_name}", "", "| run | samples seen | " + " | ".join(METRICS[k][0] for k in CURVE_METRICS)]
        lines[-1] += " |"
        lines.append("|---" * (len(CURVE_METRICS) + 2) + "|")
        for name, point in last.items():
            cells = " | ".join(table_cell(point["model"][k]) for k in CURVE_METRICS)
            lines.append(f"| {name} | {point['samples_seen']:,} | {cells} |")
        floors = here[-1]["floors"]
        for floor, values in floors.items():
            lines.append(f"| floor: {floor} | | " + " | ".join(table_cell(values[k]) for k in CURVE_METRICS) + " |")
        if "ceiling" in here[-1]:
            cells = " | ".join(table_cell(here[-1]["ceiling"][k]) for k in CURVE_METRICS)
            lines.append(f"| ceiling: the VAE's round trip | | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(points: list[dict], path: Path) -> None:
    """The model's numbers against samples seen, a panel per metric (rows) and set scored at several checkpoints
    (columns; every set where none is), floors as lines; one colour per run."""
    from matplotlib.figure import Figure

    runs = sorted({p["run"] for p in points})
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # one colour per run in every panel
    steps = {}
    for p in points:
        steps.setdefault((p["set"], p["run"]), set()).add(p["step"])
    curved = sorted({s for (s, _), seen in steps.items() if len(seen) > 1})  # the sets with curves, not single points
    sets = curved or sorted({p["set"] for p in points})
    figure = Figure(figsize=(4.0 * len(sets), 2.6 * len(CURVE_METRICS)), layout="constrained")
    axes = figure.subplots(len(CURVE_METRICS), len(sets), squeeze=False)
    for row, metric in enumerate(CURVE_METRICS):
        for col, set_name in enumerate(sets):
            ax = axes[row, col]
            here = [p for p in points if p["set"] == set_name]
            for name in runs:
                mine = [p for p in here if p["run"] == name and p["model"][metric] is not None]
                if mine:
                    ax.plot(
                        [p["samples_seen"] for p in mine],
                        [p["model"][metric] for p in mine],
                        "o-",
                        label=name,
                        color=colors[name],
                    )
            for floor, values in (here[-1]["floors"] if here else {}).items():
                if values.get(metric) is not None:
                    ax.axhline(values[metric], linestyle="--", linewidth=1, color="gray")
                    ax.annotate(floor, (0, values[metric]), xycoords=("axes fraction", "data"), fontsize=7)
            ceiling = (here[-1].get("ceiling") or {}).get(metric) if here else None
            if ceiling is not None:
                ax.axhline(ceiling, linestyle=":", linewidth=1.5, color="black")
                ax.annotate("VAE round trip", (0, ceiling), xycoords=("axes fraction", "data"), fontsize=7)
            ax.set_xscale("log")
            ax.set_title(f"{METRICS[metric][0]} — {set_name}", fontsize=9)
            ax.set_xlabel("training samples seen", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)


def main(args: argparse.Namespace) -> None:
    """Collect the curves of ``--work`` into ``--out``."""
    points = read_points(args.work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "curves.json", points)
    write_text(out / "curves.md", curves_markdown(points))
    plot_curves(points, out / "curves.png")
    print(f"{len(points)} points of {len({p['run'] for p in points})} runs written to {out}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.evaluation.curves``."""
    parser = argparse.ArgumentParser(
        prog="fourdnex.evaluation.curves", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", required=True, help="the recipe's work folder (runs and reports/)")
    parser.add_argument("--out", required=True, help="where curves.json, curves.md and curves.png go")
    return parser


if __name__ == "__main__":
    run(main, build_parser())
