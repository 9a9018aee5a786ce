"""Evaluation benchmark: seconds per sample of evaluate.py's stages at a real result size, on this machine.

Writes synthetic ground truth (fourdnex.data.synthetic, one clip per layout in turn) and a stand-in model's results
(the truth corrupted by fourdnex.testing.corrupted), then evaluates them three times: with ground truth and no
registration files (they are computed and saved), with ground truth and the registrations present, and without
ground truth. Prints a markdown table of the mean seconds per sample of each stage (wall clock, from the report's
records: the samples' stages overlap when evaluate() runs them in several worker processes), the wall seconds per
sample of the whole run and its CPU seconds per sample (all processes and threads).

Example (the BENCHMARKS.md run):
    python bench/bench_evaluation.py --samples 3 --frames 49 --height 480 --width 720
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.data.synthetic import write_tree
from fourdnex.evaluation.plots import write_plots
from fourdnex.evaluation.report import write_report
from fourdnex.evaluation.run import evaluate
from fourdnex.testing.corrupted import write_corrupted

#: The stages a report records per sample: preparing the ground truth, reading the result and its registration (or
#: registering it), scoring the model, building and scoring the floors.
STAGES = ["truth", "registration", "score", "floors"]


def row(cells) -> str:
    """A markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def cpu_seconds() -> float:
    """CPU seconds of this process and of its ended children (evaluate()'s workers), all their threads."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed_run(label: str, results: Path, out: Path, gt: Path | None) -> str:
    """Evaluate and write the report; one table row of mean seconds per sample."""
    start, cpu = time.perf_counter(), cpu_seconds()
    evaluation = evaluate(results, out, gt)
    report_start = time.perf_counter()
    write_report(evaluation, out, write_plots(evaluation, out))
    report = time.perf_counter() - report_start
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    count = len(evaluation.samples)
    means = {s: np.mean([x.seconds.get(s, 0.0) for x in evaluation.samples]) for s in STAGES}
    scoring = means["registration"] + means["score"] + means["floors"]
    registration = {x.registration for x in evaluation.samples}
    cells = [label, count, "/".join(sorted(registration))]
    cells += [f"{means[s]:.2f}" for s in STAGES]
    cells += [f"{scoring:.2f}", f"{report / count:.2f}", f"{wall / count:.2f}", f"{cpu / count:.2f}"]
    return row(cells)


def main(args: argparse.Namespace) -> None:
    """Write the inputs, run the three evaluations, print the table."""
    name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"`python {' '.join(sys.argv)}`\n")
    print(
        f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{os.getloadavg()[0]:.1f} at start; {args.samples} samples of {args.frames} x {args.height} x {args.width}\n"
    )
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        start = time.perf_counter()
        data = write_tree(work / "synthetic", args.samples, args.frames, args.height, args.width)
        write_corrupted(data, work / "results", args.frames, args.height, args.width)
        print(f"inputs written in {time.perf_counter() - start:.0f} s\n", file=sys.stderr)
        header = ["run", "samples", "registration", "truth s", "read / register s", "model s", "floors s"]
        header += ["per sample s (without truth)", "report s", "wall s", "CPU s"]
        table = [row(header), row(["---"] * len(header))]
        runs = [
            ("ground truth, registration computed", work / "report1", data),
            ("ground truth, registration read", work / "report2", data),
            ("no ground truth, registration read", work / "report3", None),
        ]
        for label, out, gt in runs:
            table.append(timed_run(label, work / "results", out, gt))
            print(table[-1], file=sys.stderr)
    print("Mean seconds per sample:\n")
    print("\n".join(table))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--work", default=None, help="folder for the temporary inputs and reports (default: the system's)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
