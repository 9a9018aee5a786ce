"""Every number evaluate.py computes on a fixed set of synthetic samples, saved so that a change to the evaluation code
can be shown to keep them bit for bit.

Writes synthetic ground truth (fourdnex.data.synthetic) and a stand-in model's results (the truth corrupted by
fourdnex.testing.corrupted) at two sizes, one result made unregistrable, then evaluates them: with ground truth in
one thread and in worker processes, and without ground truth. Saves, per run, sample and predictor, every value,
per-frame curve, camera path and worst-frame map, the samples' status, and the report's ``metrics.json`` without its
timings, into one ``.npz`` (no Python objects). Compare two runs on the same inputs (``--work``): the synthetic videos
are not encoded bit for bit alike twice. ``--compare`` reads such a file and lists every entry that differs in
value, dtype or shape (exit status 1 if any does).

    python bench/evaluation_numbers.py --work inputs --save before.npz
    python bench/evaluation_numbers.py --work inputs --compare before.npz
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.data.synthetic import write_tree
from fourdnex.evaluation.report import metrics_json
from fourdnex.evaluation.run import Evaluation, evaluate
from fourdnex.testing.corrupted import write_corrupted

#: (frames, height, width, clips): the tests' size (every grid the whole image) and one whose grids are strided.
SIZES = ((9, 32, 48, 5), (5, 240, 360, 2))


def _arrays(prefix: str, value, out: dict[str, np.ndarray]) -> None:
    """``value`` (nested dicts of numbers, arrays, strings, None) flattened into ``out`` under ``prefix/...``."""
    if isinstance(value, dict):
        for key, item in value.items():
            _arrays(f"{prefix}/{key}", item, out)
    elif value is None:
        out[prefix + ":none"] = np.zeros(0)
    else:
        out[prefix] = np.asarray(value)


def numbers(label: str, evaluation: Evaluation) -> dict[str, np.ndarray]:
    """Everything ``evaluation`` found, flattened (timings left out)."""
    out: dict[str, np.ndarray] = {}
    for sample in evaluation.samples:
        prefix = f"{label}/{sample.name}"
        _arrays(prefix, {"status": sample.status, "registration": sample.registration, "clip": sample.clip_id}, out)
        out[f"{prefix}/predictors"] = np.array(list(sample.scores))
        for name, score in sample.scores.items():
            out[f"{prefix}/{name}/order"] = np.array(list(score.values))
            _arrays(f"{prefix}/{name}", {"values": score.values, "frames": score.frames}, out)
            _arrays(f"{prefix}/{name}/path", score.path, out)
            _arrays(f"{prefix}/{name}/worst", score.worst, out)
    _arrays(f"{label}/truth_paths", evaluation.truth_paths, out)
    report = metrics_json(evaluation)
    for sample in report["samples"]:
        sample.pop("seconds")
    out[f"{label}/metrics.json"] = np.array(json.dumps(report, sort_keys=False))
    return out


def write_inputs(folder: Path, frames: int, height: int, width: int, clips: int) -> None:
    """A synthetic tree and its corrupted results in ``folder``; result 00001 cannot be registered."""
    data = write_tree(folder / "synthetic", clips, frames, height, width)
    results = folder / "results"
    write_corrupted(data, results, frames, height, width)
    with np.load(results / "00001.npz") as arrays:  # frame 1 collapsed to one point: no camera fits it
        rgb, xyz = arrays["rgb"], arrays["xyz"].copy()
    xyz[1] = 0.5
    np.savez(results / "00001.npz", rgb=rgb, xyz=xyz)


def record(work: Path) -> dict[str, np.ndarray]:
    """Run the evaluations on the inputs in ``work`` (written first where missing); return every number."""
    out: dict[str, np.ndarray] = {}
    for frames, height, width, clips in SIZES:
        size = f"{frames}x{height}x{width}"
        data, results = work / size / "synthetic" / "data", work / size / "results"
        if not results.is_dir():
            write_inputs(work / size, frames, height, width, clips)
        runs = [("truth, one thread", 1, data), ("truth, workers", 2, data), ("no truth", 2, None)]
        for index, (label, workers, gt) in enumerate(runs):
            folder = work / size / f"results{index}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(results, folder)  # every run computes its registrations
            evaluation = evaluate(folder, work / size / f"report{index}", gt, workers=workers)
            evaluation.results = Path(f"results{index}")
            evaluation.ground_truth = None if gt is None else Path("synthetic")
            out |= numbers(f"{size}/{label}", evaluation)
    return out


def compare(saved: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> list[str]:
    """Every key whose array differs between ``saved`` and ``now`` (NaN equal to NaN), or that only one has."""
    differ = sorted(set(saved) ^ set(now))
    for key in sorted(set(saved) & set(now)):
        a, b = saved[key], now[key]
        same = a.dtype == b.dtype and a.shape == b.shape
        same = same and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        if not same:
            differ.append(key)
    return differ


def main(args: argparse.Namespace) -> None:
    """Record, then save or compare."""
    with tempfile.TemporaryDirectory() as temporary:
        now = record(Path(args.work or temporary))
    print(f"{len(now)} entries recorded", file=sys.stderr)
    if args.save:
        np.savez_compressed(args.save, **now)
    if args.compare:
        with np.load(args.compare, allow_pickle=False) as saved:
            differ = compare(dict(saved), now)
        print(f"{len(differ)} of {len(now)} entries differ from {args.compare}" + "".join(f"\n  {k}" for k in differ))
        if differ:
            sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", default=None, help="write every number into this .npz")
    p.add_argument("--compare", default=None, help="compare every number with this .npz (exit 1 if any differs)")
    p.add_argument(
        "--work",
        default=None,
        help="folder of the inputs, written there once and reused (videos are not encoded bit for bit alike twice); "
        "default: a temporary one",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
