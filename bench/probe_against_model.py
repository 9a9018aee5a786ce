"""A model's frame-0 depth error against the depth probe's, scene by scene: do they fail on the same scenes?

``bench/depth_probe.py --json`` keeps each held-out scene's frame-0 AbsRel (``held_out_frames``); an evaluate.py
report keeps each scored sample's ``depth0.median.absrel`` by clip id. Both are the same measure (the frame's
depth scaled onto its truth by the median ratio over evaluate.py's grid pixels). For the scenes both scored, per
report: the mean and median of each, the correlation of their logarithms (scenes hard for one and for the other), the
share of scenes the model reads better than the probe, and, given a second probe run (another seed), the same
correlation between the two probes: the most that two readings of one input can agree.

    python bench/probe_against_model.py --probe probe-seed0.json --probe probe-seed1.json \\
        --report held-out reports/model/held-out --report held-out-family reports/model/held-out-family
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.paired_scores import read_report


def model_errors(report: Path) -> dict[str, float]:
    """Each scored sample's frame-0 depth AbsRel in an evaluate.py report folder, by clip id."""
    samples, _ = read_report(report)
    return {clip: sample["scores"]["model"]["depth0.median.absrel"] for clip, sample in samples.items()}


def probe_errors(probe: Path, set_name: str) -> dict[str, float]:
    """Each held-out scene's frame-0 AbsRel in a depth probe's JSON, for the held-out set ``set_name``."""
    frames = json.loads(probe.read_text())["held_out_frames"]
    if set_name not in frames:
        raise SystemExit(f"{probe}: no held-out set {set_name!r} (it has {', '.join(sorted(frames))})")
    return {clip: row["absrel"] for clip, row in frames[set_name].items()}


def compare(model: dict[str, float], probes: list[dict[str, float]]) -> dict[str, float]:
    """The numbers of one set over the scenes the model and every probe scored."""
    scenes = sorted(set(model).intersection(*probes))
    if len(scenes) < 3:
        raise SystemExit(f"only {len(scenes)} scenes are scored by both the model and the probe")
    m = np.array([model[s] for s in scenes])
    p = np.array([probes[0][s] for s in scenes])
    row = {
        "scenes": len(scenes),
        "model_mean": float(m.mean()),
        "model_median": float(np.median(m)),
        "probe_mean": float(p.mean()),
        "probe_median": float(np.median(p)),
        "log_correlation": float(np.corrcoef(np.log(m), np.log(p))[0, 1]),
        "model_better_share": float((m < p).mean()),
    }
    if len(probes) > 1:
        q = np.array([probes[1][s] for s in scenes])
        row["probe_seeds_log_correlation"] = float(np.corrcoef(np.log(p), np.log(q))[0, 1])
    return row


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--probe", type=Path, action="append", required=True,
        help="a depth probe's --json (a second run, another seed, gives the probes' agreement)",
    )  # fmt: skip
    parser.add_argument(
        "--report", nargs=2, action="append", required=True, metavar=("SET", "REPORT"),
        help="a held-out set's name in the probe's JSON and the model's evaluate.py report folder on it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if len(args.probe) > 2:
        parser.error("give one or two --probe runs")
    for path in args.probe:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
    rows = {}
    for set_name, report in args.report:
        rows[set_name] = compare(model_errors(Path(report)), [probe_errors(p, set_name) for p in args.probe])
    print("| set | scenes | model: mean / median | probe: mean / median | log correlation | model better on | "
          "probe seeds' log correlation |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for set_name, r in rows.items():
        seeds = f"{r['probe_seeds_log_correlation']:.2f}" if "probe_seeds_log_correlation" in r else ""
        print(f"| {set_name} | {r['scenes']} | {r['model_mean']:.4f} / {r['model_median']:.4f} | "
              f"{r['probe_mean']:.4f} / {r['probe_median']:.4f} | {r['log_correlation']:.2f} | "
              f"{r['model_better_share']:.0%} | {seeds} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
