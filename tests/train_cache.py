"""A tiny training cache written by build_wan_dataset.py from synthetic 4DNeX-10M clips (tests only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fourdnex.data.raycast import TEXTURE_FAMILIES
from fourdnex.data.synthetic import write_tree

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "example" / "tiny-wan-i2v"


def build_cache(
    root: Path, num_clips: int = 2, size: int | tuple[int, int] = 32, num_frames: int = 9, cond_num_frames: int = 9,
    tree_size: int | tuple[int, int] = 40, seed: int = 3, families: tuple[str, ...] = TEXTURE_FAMILIES,
) -> Path:  # fmt: skip
    """Render ``num_clips`` synthetic clips of ``tree_size`` pixels (square, or height and width; scenes of
    ``seed``, textures of ``families``) and cache them at ``size`` with ``build_wan_dataset.py`` and the tiny model."""
    (tree_h, tree_w), (height, width) = (t if isinstance(t, tuple) else (t, t) for t in (tree_size, size))
    data_dir = write_tree(root / "source", num_clips=num_clips, num_frames=num_frames, height=tree_h, width=tree_w,
                          seed=seed, families=families)  # fmt: skip
    spec = importlib.util.spec_from_file_location("build_wan_dataset", ROOT / "build_wan_dataset.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = root / "cache"
    args = ["--data_dir", str(data_dir), "--out", str(out), "--model_path", str(TINY_MODEL), "--device", "cpu"]
    args += ["--num_frames", str(num_frames), "--cond_num_frames", str(cond_num_frames)]
    args += ["--resolution_h", str(height), "--resolution_w", str(width)]
    cli.main(cli.build_parser().parse_args(args))
    return out
