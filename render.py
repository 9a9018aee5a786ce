"""Novel views of generated 4D results: every frame's registered point cloud seen along a new camera path.

For every result ``NNNNN.npz`` (or ``NNNNN.pkl``) of ``--pkl_dir`` and its registration ``NNNNN_reg.npz`` from
pm_registration.py, renders the registered points, coloured by the result's RGB, from a camera path defined relative
to the registered cameras (or read from a JSON file), by z-buffered splatting (fourdnex/geometry/render.py), and
writes ``OUT/NNNNN/``: ``novel.mp4``, ``preview.mp4`` (input | novel), ``mask/`` (the pixels no point covers: what
a video inpainting model must fill), ``depth/``, ``cameras.json`` + ``cameras.npz`` (the path's cameras) and
``render.json``. README.md, "Novel views (render.py)", specifies every file.

Example:
    python render.py --pkl_dir results/ --path orbit --angle 30 --out results/novel
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

from fourdnex import __version__
from fourdnex.cli import run
from fourdnex.errors import UsageError
from fourdnex.geometry.exports import DEPTH_FORMATS
from fourdnex.geometry.paths import CAMERA_PATHS, PATH_PARAMETERS, CameraPath
from fourdnex.geometry.render import (
    SPLAT_SCALE,
    RenderError,
    find_registration,
    load_path,
    render_result,
    write_novel_views,
)
from fourdnex.geometry.results import find_results, load_result, registration_path
from fourdnex.runtime import device_of

PARAMETER_FLAGS = ("angle", "turns", "distance")


def _camera_path(args: argparse.Namespace) -> CameraPath | Path:
    """The ``--path`` preset with the path flags given, or the path file."""
    given = {name: getattr(args, name) for name in PARAMETER_FLAGS if getattr(args, name) is not None}
    if args.path in CAMERA_PATHS:
        unused = [name for name in given if name not in PATH_PARAMETERS[args.path]]
        if unused:
            takes = ", ".join(f"--{name}" for name in PATH_PARAMETERS[args.path]) or "no parameters"
            raise UsageError(f"--{unused[0]} does not apply to --path {args.path} (it takes {takes})")
        return replace(CAMERA_PATHS[args.path], **given)
    path = Path(args.path)
    if path.suffix != ".json" or not path.is_file():
        raise UsageError(f"--path {args.path}: neither one of {', '.join(CAMERA_PATHS)} nor an existing .json file")
    if given:
        raise UsageError(f"--{next(iter(given))} applies to generated paths, not to a path file")
    return path


def main(args: argparse.Namespace) -> None:
    """Check every input first (so bad input writes nothing), then render and write each result."""
    path = _camera_path(args)
    if args.max_residual is not None and args.max_residual < 0:
        raise UsageError(f"--max_residual must be >= 0, got {args.max_residual}")
    if args.splat_scale <= 0:
        raise UsageError(f"--splat_scale must be positive, got {args.splat_scale}")
    device = device_of(args.device)
    files = find_results(args.pkl_dir)
    for result in tqdm(files, desc="checking", disable=len(files) < 2):
        reg = find_registration(result, args.reg_dir)
        if isinstance(path, Path):
            load_path(path, *reg["depth"].shape)

    for result in tqdm(files, desc="results", disable=len(files) < 2):
        reg = find_registration(result, args.reg_dir)
        rgb = load_result(result).rgb
        start = time.perf_counter()
        try:
            views, K, cam2world, info = render_result(
                rgb, reg, path, args.max_residual, args.splat_scale, device, desc=f"rendering {result.stem}"
            )
        except RenderError as err:
            raise RenderError(f"{result}: {err}") from err
        meta = {
            "source": str(result),
            "registration": str(registration_path(result, args.reg_dir)),
            "path": asdict(path) if isinstance(path, CameraPath) else {"file": str(path)},
            "max_residual": args.max_residual,
            "splat_scale": args.splat_scale,
            **info,
            "device": str(device),
            "seconds": round(time.perf_counter() - start, 3),
            "axes": "opencv, camera-to-world, in the registration's world",
            "version": __version__,
        }
        out = Path(args.out) / result.stem
        write_novel_views(out, views, rgb[reg["frame_index"]], K.numpy(), cam2world.numpy(), reg["frame_index"],
                          args.depth_format, meta)  # fmt: skip
        tqdm.write(json.dumps({"result": result.name, "out": str(out), "coverage": info["coverage"]["mean"]}))


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--pkl_dir`` as in pm_registration.py and rerun_vis.py)."""
    presets = CAMERA_PATHS
    p = argparse.ArgumentParser(
        prog="render.py",
        description=__doc__.split("\n\n")[0],
        epilog="Paths start at the input view on the first frame and reach their full move on the last. A move is "
        "stated in the first camera's axes and carries every registered camera, so the input's own camera motion is "
        "kept; orbit and spiral turn about the scene centre, the point on the first camera's optical axis at the "
        "scene depth (the median depth of the first frame). Output files: README.md, 'Novel views (render.py)'.",
    )
    p.add_argument("--pkl_dir", "--input", dest="pkl_dir", required=True, help="results folder, or one result file")
    p.add_argument("--out", required=True, help="output folder; each result's files go into OUT/NNNNN/")
    p.add_argument("--reg_dir", default=None, help="where NNNNN_reg.npz files are (default: beside the results)")
    p.add_argument(
        "--path",
        default="orbit",
        help=f"{', '.join(presets)}, or a cameras.json file with one camera per registered frame (or one for all): "
        "orbit turns about the scene centre (--angle), spiral circles the input view on a widening spiral (--angle, "
        "--turns), dolly moves along the optical axis (--distance), fixed shows every frame from the first frame's "
        "camera (default: orbit)",
    )
    p.add_argument(
        "--angle",
        type=float,
        default=None,
        help=f"degrees: orbit's turn about the scene centre at the last frame, positive to the right (default "
        f"{presets['orbit'].angle:g}); spiral's angular radius at the last frame (default {presets['spiral'].angle:g})",
    )
    p.add_argument(
        "--turns",
        type=float,
        default=None,
        help=f"spiral: turns around the input view over the clip, counter-clockwise on screen "
        f"(default {presets['spiral'].turns:g})",
    )
    p.add_argument(
        "--distance",
        type=float,
        default=None,
        help=f"dolly: travel along the first camera's optical axis at the last frame, in scene depths; positive "
        f"moves towards the scene, 1 would reach its centre (default {presets['dolly'].distance:g})",
    )
    p.add_argument(
        "--max_residual",
        type=float,
        default=None,
        help="leave out points whose registration residual (pointmap units, see NNNNN_reg.npz) exceeds this "
        "(default: keep all)",
    )
    p.add_argument(
        "--splat_scale",
        type=float,
        default=SPLAT_SCALE,
        help="splat side over the source pixel's footprint: larger closes holes where the new camera sees a surface "
        f"more squarely than the input did, and moves edges by up to half the extra size (default {SPLAT_SCALE:g}; "
        "measurements in BENCHMARKS.md)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (CUDA when available)")
    p.add_argument("--depth_format", choices=DEPTH_FORMATS, default="png16", help="per-frame depth files")
    return p


if __name__ == "__main__":
    run(main, build_parser())
