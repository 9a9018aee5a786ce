"""How a model's focal lengths miss the truth: by a bias (every scene too wide or too narrow) or by compression (the
field of view pulled toward the middle of the set's range).

Reads the registrations that evaluate.py saved in a results folder (``NNNNN_reg.npz``, each sample's intrinsics per
frame) and each clip's true intrinsics (its 4DNeX-10M data folder; ``--mapping`` as evaluate.py's). Per sample, the
predicted and true focal lengths (fx and fy; the mean of the frames' logs). Prints:

- the bias: the geometric mean of predicted over true focal length (1: none);
- the slope of log predicted on log true focal length over the samples (1: the model follows each scene's field of
  view; 0: it gives every scene one focal length);
- the focal error as evaluate.py scores it (the mean of ``|f - f*| / f*`` over fx and fy, frames and samples), the
  same with the bias divided out, and the error of one constant focal length (the set's median true one, evaluate.py's
  mean-depth floor when the set's focal lengths are the generator's).

    python bench/focal_scatter.py --results results/held-out --gt held-out/data --mapping held-out/inputs/mapping.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def focal_scatter(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Predicted and true focal lengths ``(N, F, 2)`` (samples, frames, fx and fy) -> ``{"bias", "slope", "error",
    "unbiased_error", "constant_error"}`` as the module's docstring defines them."""
    predicted, true = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape or predicted.ndim != 3 or predicted.shape[-1] != 2 or len(predicted) < 2:
        raise ValueError(f"two (N >= 2, F, 2) arrays of focal lengths are needed, got {predicted.shape}, {true.shape}")
    log_predicted, log_true = np.log(predicted).mean((1, 2)), np.log(true).mean((1, 2))  # (N,)
    bias = float(np.exp((log_predicted - log_true).mean()))
    constant = np.median(true.reshape(-1, 2), axis=0)  # (2,): fx, fy

    def error(focal: np.ndarray) -> float:
        return float(np.mean(np.abs(focal - true) / true))

    return {
        "bias": bias,
        "slope": float(np.polyfit(log_true, log_predicted, 1)[0]),
        "error": error(predicted),
        "unbiased_error": error(predicted / bias),
        "constant_error": error(np.broadcast_to(constant, true.shape)),
    }


def read_focals(results: Path, gt: Path, mapping: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The predicted and true focal lengths ``(N, F, 2)`` of every result with a saved registration."""
    from fourdnex.evaluation.truth import clip_sources, load_truth

    sources = clip_sources(gt)
    predicted, true = [], []
    for number, clip in sorted(mapping.items()):
        registration = results / f"{number}_reg.npz"
        if not registration.is_file():
            raise SystemExit(f"{registration}: no registration (run evaluate.py on {results} first)")
        if clip not in sources:
            raise SystemExit(f"{gt}: no clip {clip} (result {number})")
        with np.load(registration) as saved:
            K, (frames, height, width) = saved["K"], saved["depth"].shape
        truth = load_truth(gt, sources[clip], frames, height, width)
        predicted.append(K[:, [0, 1], [0, 1]])
        true.append(truth.K[:, [0, 1], [0, 1]])
    return np.stack(predicted), np.stack(true)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="a results folder that evaluate.py has scored")
    parser.add_argument("--gt", type=Path, required=True, help="its ground truth: a 4DNeX-10M data folder")
    parser.add_argument("--mapping", type=Path, required=True, help="JSON: result number -> clip id")
    args = parser.parse_args()
    if not args.mapping.is_file():
        raise SystemExit(f"{args.mapping}: no such mapping file")
    scatter = focal_scatter(*read_focals(args.results, args.gt, json.loads(args.mapping.read_text())))
    print("| results | bias | slope | focal error | without the bias | one constant focal |")
    print("|---|---|---|---|---|---|")
    values = " | ".join(f"{scatter[k]:.3f}" for k in ("bias", "slope", "error", "unbiased_error", "constant_error"))
    print(f"| {args.results} | {values} |")


if __name__ == "__main__":
    main()
