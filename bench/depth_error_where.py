"""Where a model's frame-0 depth error lies, over registered results and their ground truth.

For each result (``NNNNN.npz`` with its registration ``NNNNN_reg.npz`` beside it, as evaluate.py or
pm_registration.py writes), frame 0's registered depth is scaled to the truth by the median ratio, as evaluate.py's
``depth0.median.absrel`` is, and its per-pixel AbsRel is split:

* by spatial scale: the prediction and the truth each averaged over squares of 8 and 16 pixels (the latent grid of a
  Wan VAE, and the transformer's tokens at patch size 2) and upsampled again, against each other (``coarse``: the
  error in the layout at that scale); the truth so averaged against the truth (``truth at``: what a prediction
  exact at that scale and flat within it would score);
* at depth edges (pixels whose log-depth gradient exceeds 0.05 per pixel) and on smooth surfaces;
* on moving objects (the truth's dynamic mask, where a clip has one);
* by image third (top, middle, bottom).

Prints one Markdown table: the mean and the median over the results of each.

    python bench/depth_error_where.py --results runs/demo/results/held-out --gt runs/demo/held-out/data \\
        --mapping runs/demo/held-out/inputs/mapping.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fourdnex.evaluation.metrics import align_depth
from fourdnex.evaluation.truth import clip_sources, load_truth, read_mapping

EDGE = 0.05  # log-depth change per pixel above which a pixel is on a depth edge


def _absrel(pred: np.ndarray, true: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-pixel AbsRel of ``pred`` aligned to ``true`` as evaluate.py's median rule aligns it, at the ``valid``
    pixels."""
    scale, _ = align_depth(pred[valid], true[valid], "median")
    return np.abs(pred[valid] * scale - true[valid]) / true[valid]


def _averaged(depth: np.ndarray, size: int) -> np.ndarray:
    """``depth`` (H, W) averaged over ``size`` x ``size`` squares and upsampled bilinearly to H x W."""
    low = F.avg_pool2d(torch.from_numpy(depth.astype(np.float32))[None, None], size)
    return F.interpolate(low, size=depth.shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def where(pred: np.ndarray, true: np.ndarray, dynamic: np.ndarray | None) -> dict[str, float]:
    """The split errors of one frame: ``pred`` and ``true`` (H, W) depths, 0 where undefined."""
    valid = (true > 0) & (pred > 0)
    error = np.full(true.shape, np.nan)
    error[valid] = _absrel(pred, true, valid)
    row = {"all pixels": np.nanmean(error)}
    for size in (8, 16):
        row[f"coarse, {size} px"] = _absrel(_averaged(pred, size), _averaged(true, size), valid).mean()
        row[f"truth at {size} px"] = _absrel(_averaged(true, size), true, valid).mean()
    gy, gx = np.gradient(np.log(np.maximum(true, 1e-6)))
    edge = valid & (np.hypot(gx, gy) > EDGE)
    row["edges"] = np.nanmean(error[edge]) if edge.any() else np.nan
    row["edge share of pixels"] = edge[valid].mean()
    row["smooth surfaces"] = np.nanmean(error[valid & ~edge])
    moving = valid & dynamic if dynamic is not None else None
    row["moving objects"] = np.nanmean(error[moving]) if moving is not None and moving.any() else np.nan
    third = true.shape[0] // 3
    for name, rows in (("top third", slice(0, third)), ("middle third", slice(third, 2 * third))):
        row[name] = np.nanmean(error[rows])
    row["bottom third"] = np.nanmean(error[2 * third :])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="registered results (NNNNN.npz, NNNNN_reg.npz)")
    parser.add_argument("--gt", type=Path, required=True, help="the ground truth: a 4DNeX-10M tree")
    parser.add_argument("--mapping", type=Path, required=True, help="result name -> clip id (evaluate.py's)")
    args = parser.parse_args(argv)
    mapping, clips = read_mapping(args.mapping), clip_sources(args.gt)
    rows = []
    for registration in sorted(args.results.glob("*_reg.npz")):
        name = registration.name.removesuffix("_reg.npz")
        if name not in mapping:
            sys.exit(f"{registration}: {name} is not in {args.mapping}")
        depth = np.load(registration)["depth"]
        truth = load_truth(args.gt, clips[mapping[name]], len(depth), *depth.shape[1:])
        rows.append(where(depth[0], truth.depth[0], None if truth.dynamic is None else truth.dynamic[0]))
    if not rows:
        sys.exit(f"{args.results}: no registered results (NNNNN_reg.npz); run evaluate.py or pm_registration.py first")
    print(f"{len(rows)} results, frame 0\n\n| frame-0 depth AbsRel | mean | median |\n|---|---|---|")
    for key in rows[0]:
        values = np.array([row[key] for row in rows], float)
        print(f"| {key} | {np.nanmean(values):.4f} | {np.nanmedian(values):.4f} |")


if __name__ == "__main__":
    main()
