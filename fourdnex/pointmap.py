"""The result file format: one ``{i:05d}.npz`` (arrays) plus ``{i:05d}.json`` (settings) per generated sample.

``{i:05d}.npz``:
    rgb  (F, H, W, 3) uint8    the generated RGB video
    xyz  (F, H, W, 3) float32  the generated pointmap video, in the model's normalized space [-1, 1]
``{i:05d}.json``: prompt, image, seed, sizes, model and adapter, versions, timings (see inference.py).

No pickle is involved: results load with ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import write_json, write_npz

RESULT_NAME = re.compile(r"^\d{5}\.npz$")


class ResultError(ValueError):
    """A results file or folder that cannot be used; the message names the file and the problem."""


@dataclass
class Result:
    """One generated sample: RGB ``(F, H, W, 3)`` uint8 and XYZ ``(F, H, W, 3)`` float32 in [-1, 1]."""

    rgb: np.ndarray
    xyz: np.ndarray
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def validate(self) -> None:
        """Raise ResultError unless the arrays have the documented shapes and finite values."""
        where = self.path or "result"
        if self.rgb.ndim != 4 or self.rgb.shape[-1] != 3:
            raise ResultError(f"{where}: rgb must be (F, H, W, 3), got {self.rgb.shape}")
        if self.xyz.shape != self.rgb.shape:
            raise ResultError(f"{where}: xyz must match rgb's shape {self.rgb.shape}, got {self.xyz.shape}")
        if not np.isfinite(self.xyz).all():
            raise ResultError(f"{where}: xyz holds NaN or infinite values")


def save_result(out_dir: str | Path, index: int, rgb: np.ndarray, xyz: np.ndarray, meta: dict) -> Path:
    """Write ``{index:05d}.npz`` and ``{index:05d}.json`` into ``out_dir`` atomically; returns the npz path."""
    result = Result(np.asarray(rgb, np.uint8), np.asarray(xyz, np.float32), meta)
    result.validate()
    out_dir = Path(out_dir)
    path = out_dir / f"{index:05d}.npz"
    write_npz(path, rgb=result.rgb, xyz=result.xyz)
    write_json(out_dir / f"{index:05d}.json", meta)
    return path


def load_result(path: str | Path) -> Result:
    """Read a result ``.npz`` (and its ``.json`` when present) without unpickling anything."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"rgb", "xyz"} - set(data.files)
            if missing:
                raise ResultError(f"{path}: missing arrays {sorted(missing)}")
            result = Result(data["rgb"], data["xyz"].astype(np.float32), path=path)
    except (OSError, ValueError) as err:
        if isinstance(err, ResultError):
            raise
        raise ResultError(f"{path}: not a readable result file ({err})") from err
    meta_path = path.with_suffix(".json")
    if meta_path.exists():
        result.meta = json.loads(meta_path.read_text())
    result.validate()
    return result


def find_results(path: str | Path) -> list[Path]:
    """The result files a path names: the file itself, or every ``NNNNN.npz`` in a folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ResultError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if RESULT_NAME.match(p.name))
    if not files:
        raise ResultError(f"{path}: holds no result files (NNNNN.npz)")
    return files
