"""Evaluate generated 4D results, with ground truth or without, beside trivial predictors (floors).

    python evaluate.py --results results/ --gt synthetic/data --out report/

``--results`` is a folder of results as inference.py writes them (``NNNNN.npz`` + ``NNNNN.json``); a result without
a registration (``NNNNN_reg.npz``, pm_registration.py) is registered first and the registration saved beside it.
``--gt`` is a 4DNeX-10M tree (any layout the dataset reader accepts, e.g. one fourdnex.data.synthetic wrote); which
clip each result shows comes from ``--mapping FILE.json`` (``{"00000": "dynamic/dynamic_3/10002"}``) or a
``clip_id`` in the result's ``.json``. Without ``--gt`` only the metrics that need no ground truth are computed.

Writes ``metrics.json`` (every number, per sample and in summary, with the rules and definitions), ``summary.md``
(the model against the floors, every sample) and PNG plots into ``--out``; exits non-zero when no sample could be
scored (the report says why).
"""

from __future__ import annotations

import argparse
import time

from fourdnex.cli import run
from fourdnex.evaluation.plots import write_plots
from fourdnex.evaluation.report import write_report
from fourdnex.evaluation.run import evaluate
from fourdnex.evaluation.truth import EvaluationError
from fourdnex.geometry.registration import RegistrationConfig


def main(args: argparse.Namespace) -> None:
    """Evaluate, then write the report; a run that scored no sample fails after writing it (it says why)."""
    start = time.perf_counter()
    config = RegistrationConfig(smooth_frames=args.smooth_frames)
    config.validate()
    evaluation = evaluate(args.results, args.out, args.gt, args.mapping, config)
    write_report(evaluation, args.out, write_plots(evaluation, args.out))
    if not evaluation.scored:
        raise EvaluationError(
            f"none of the {len(evaluation.samples)} samples could be scored (the reasons: {args.out}/summary.md)"
        )
    print(
        f"scored {len(evaluation.scored)} of {len(evaluation.samples)} samples in {time.perf_counter() - start:.1f} s;"
        f" report in {args.out}/summary.md"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="results folder (or one result file)")
    p.add_argument("--gt", default=None, help="ground truth: a 4DNeX-10M data folder")
    p.add_argument(
        "--mapping", default=None, help="JSON file: result number -> clip id (default: each .json's clip_id)"
    )
    p.add_argument("--out", required=True, help="report folder (created if missing)")
    p.add_argument(
        "--smooth_frames",
        type=float,
        default=RegistrationConfig.smooth_frames,
        help="register with the camera path smoothed over this many frames, as pm_registration.py --smooth_frames "
        "(default %(default)s); a saved registration fitted otherwise is fitted again",
    )
    return p


if __name__ == "__main__":
    run(main, build_parser())
