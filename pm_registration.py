"""Cameras, depth and registered point clouds from generated pointmap videos.

For every result ``NNNNN.npz`` (or a reference ``NNNNN.pkl``) writes ``NNNNN_reg.npz`` (K, cam2world, depth, points,
residual, frame_index) and ``NNNNN_reg.json`` (settings, diagnostics), and with ``--export`` a folder
``NNNNN_export/`` for other tools (PLY, COLMAP, nerfstudio, depth + cameras; see fourdnex/geometry/exports.py).

Example:
    python pm_registration.py --pkl_dir results/ --export ply colmap nerfstudio depth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fourdnex.cli import field_flag, run, settings
from fourdnex.errors import UsageError
from fourdnex.geometry.exports import DEPTH_FORMATS, EXPORTS, export_all
from fourdnex.geometry.registration import RegistrationConfig, RegistrationError, check_pointmap, register_result
from fourdnex.geometry.results import find_results, load_result, registration_path, save_registration
from fourdnex.runtime import device_of


def _frames(count: int, start: int, end: int | None, gap: int, where: Path) -> np.ndarray:
    """The frame numbers ``start:end:gap`` selects from ``count`` frames."""
    if gap < 1:
        raise UsageError(f"--frame_gap must be >= 1, got {gap}")
    index = np.arange(count)[start:end:gap]
    if len(index) == 0:
        raise UsageError(f"{where}: frames {start}:{end}:{gap} select none of its {count} frames")
    return index


def main(args: argparse.Namespace) -> None:
    """Register every result the input names; validates all inputs before writing anything."""
    config = settings(RegistrationConfig, args)
    config.validate()
    if args.ply_stride < 1:
        raise UsageError(f"--ply_stride must be >= 1, got {args.ply_stride}")
    device = device_of(args.device)
    files = find_results(args.pkl_dir)
    for path in tqdm(files, desc="checking", disable=len(files) < 2):  # fail before writing anything
        xyz = load_result(path).xyz
        try:
            check_pointmap(xyz[_frames(len(xyz), args.start_frame, args.end_frame, args.frame_gap, path)])
        except RegistrationError as err:
            raise RegistrationError(f"{path}: {err}") from err

    for path in tqdm(files, desc="registering"):
        result = load_result(path)
        index = _frames(len(result.xyz), args.start_frame, args.end_frame, args.frame_gap, path)
        out_dir = Path(args.out_dir or path.parent)
        out_dir.mkdir(parents=True, exist_ok=True)
        arrays, info = register_result(result.xyz, index, config, device)
        frames = {"start": args.start_frame, "end": args.end_frame, "gap": args.frame_gap, "count": len(index)}
        meta = {"source": str(path), "frames": frames, **info}
        save_registration(registration_path(path, out_dir), arrays, meta)
        if args.export:
            export_all(
                out_dir / f"{path.stem}_export",
                args.export,
                arrays,
                result.rgb[index],
                args.depth_format,
                args.ply_stride,
            )
        tqdm.write(
            json.dumps({"result": path.name, "seconds": meta["seconds"], "mean_residual": meta["mean_residual"]})
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line (the reference's ``--pkl_dir`` names the input)."""
    p = argparse.ArgumentParser(prog="pm_registration.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pkl_dir", "--input", dest="pkl_dir", required=True, help="results folder, or one result file")
    p.add_argument("--out_dir", default=None, help="where outputs go (default: beside each result)")
    p.add_argument("--start_frame", type=int, default=0)
    p.add_argument("--end_frame", type=int, default=None, help="exclusive; default: the last frame")
    p.add_argument("--frame_gap", type=int, default=1, help="use every N-th frame")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    field_flag(p, RegistrationConfig, "iterations", type=int, help="refinement (LM) steps (default %(default)s)")
    field_flag(p, RegistrationConfig, "samples", type=int, help="pixels per frame for the fit (default %(default)s)")
    field_flag(
        p,
        RegistrationConfig,
        "shared_intrinsics",
        "--per_frame_intrinsics",
        action="store_false",
        help="fit one K per frame (default: one shared K)",
    )
    field_flag(
        p,
        RegistrationConfig,
        "smooth_frames",
        type=float,
        help="smooth the camera path over time by a Gaussian of this many frames; 0: each frame's own camera "
        "(default %(default)s)",
    )
    field_flag(p, RegistrationConfig, "seed", type=int)
    p.add_argument("--export", nargs="*", choices=EXPORTS, default=[], help="exports to write into NNNNN_export/")
    p.add_argument("--depth_format", choices=DEPTH_FORMATS, default="png16")
    p.add_argument("--ply_stride", type=int, default=1, help="keep every N-th pixel along rows and columns in PLYs")
    return p


if __name__ == "__main__":
    run(main, build_parser())
