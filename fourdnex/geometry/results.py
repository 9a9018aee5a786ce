"""The result file format: one ``{i:05d}.npz`` (arrays) plus ``{i:05d}.json`` (settings) per generated sample.

``{i:05d}.npz``:
    rgb  (F, H, W, 3) uint8    the generated RGB video
    xyz  (F, H, W, 3) float32  the generated pointmap video, in the model's normalized space [-1, 1]
``{i:05d}.json``: prompt, image, seed, sizes, model and adapter, versions, timings (see inference.py).

No pickle is involved: results load with ``numpy.load(allow_pickle=False)``. The reference implementation's
``{i:05d}.pkl`` results are read by :mod:`fourdnex.geometry.legacy`, which refuses any pickle that would call a
function. Registration outputs (``{i:05d}_reg.npz``) are never taken for results.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fourdnex.errors import FourDNeXError
from fourdnex.files import read_npz, write_json, write_npz, write_video
from fourdnex.geometry.legacy import read_legacy

RESULT_NAME = re.compile(r"^\d{5}\.(npz|pkl)$")
#: The arrays of a result ``NNNNN.npz``, with their shapes, dtypes and meaning.
RESULT_ARRAYS = {
    "rgb": "(F, H, W, 3) uint8, the generated RGB video",
    "xyz": "(F, H, W, 3) float32, the generated pointmap video in the model's normalized space [-1, 1]",
}


class ResultError(FourDNeXError, ValueError):
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
    write_npz(path, **{name: getattr(result, name) for name in RESULT_ARRAYS})
    write_json(out_dir / f"{index:05d}.json", meta)
    return path


def to_uint8(video: np.ndarray, low: float) -> np.ndarray:
    """Float frames in [low, 1] -> uint8."""
    return np.round((video - low) / (1.0 - low) * 255.0).clip(0, 255).astype(np.uint8)


def write_sample(out_dir: str | Path, index: int, rgb: np.ndarray, xyz: np.ndarray, meta: dict) -> Path:
    """Every file of one generated sample, as inference.py writes them; each atomically, the json last.

    ``rgb`` is ``(F, H, W, 3)`` float in [0, 1], ``xyz`` the same shape in [-1, 1]. Writes ``{index:05d}_rgb.mp4``,
    ``{index:05d}_xyz.mp4``, ``{index:05d}.mp4`` (RGB | XYZ side by side), then the result files; returns the npz.
    """
    out_dir = Path(out_dir)
    rgb8, xyz8 = to_uint8(rgb, 0.0), to_uint8(xyz, -1.0)
    write_video(out_dir / f"{index:05d}_rgb.mp4", rgb8)
    write_video(out_dir / f"{index:05d}_xyz.mp4", xyz8)
    write_video(out_dir / f"{index:05d}.mp4", np.concatenate([rgb8, xyz8], axis=2))
    return save_result(out_dir, index, rgb8, xyz, meta)


def load_result(path: str | Path) -> Result:
    """Read a result ``.npz`` (and its ``.json`` when present) without unpickling anything, or a reference ``.pkl``
    through :class:`fourdnex.geometry.legacy.SafeUnpickler`."""
    path = Path(path)
    if path.suffix == ".pkl":
        try:
            result = Result(*read_legacy(path.read_bytes()), path=path)
        except OSError as err:
            raise ResultError(f"{path}: not readable ({err})") from err
        except ValueError as err:
            raise ResultError(f"{path}: {err}") from err
    else:
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"rgb", "xyz"} - set(data.files)
                if missing:
                    raise ResultError(f"{path}: missing arrays {sorted(missing)}")
                result = Result(data["rgb"], data["xyz"].astype(np.float32), path=path)
        except (OSError, ValueError, EOFError) as err:
            if isinstance(err, ResultError):
                raise
            raise ResultError(f"{path}: not a readable result file ({err})") from err
    meta_path = path.with_suffix(".json")
    if meta_path.exists():
        result.meta = json.loads(meta_path.read_text())
    result.validate()
    return result


def load_rgb(path: str | Path) -> np.ndarray:
    """Only the RGB video ``(F, H, W, 3)`` uint8 of a result (a reference ``.pkl`` is loaded whole)."""
    path = Path(path)
    if path.suffix == ".pkl":
        return load_result(path).rgb
    try:
        return read_npz(path, {"rgb"})["rgb"]
    except (OSError, ValueError, EOFError, KeyError) as err:
        raise ResultError(f"{path}: no readable rgb array ({err})") from err


def result_shape(path: str | Path) -> tuple[int, int, int]:
    """``(F, H, W)`` of a result file, read from the ``.npz``'s array headers without loading the arrays (a reference
    ``.pkl`` is loaded); raises ResultError if the file is unreadable, lacks ``rgb`` or ``xyz``, or their shapes
    differ."""
    path = Path(path)
    if path.suffix == ".pkl":
        return tuple(load_result(path).xyz.shape[:3])
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in ("rgb", "xyz"):
                if f"{name}.npy" not in archive.namelist():
                    raise ResultError(f"{path}: missing arrays ['{name}']")
                with archive.open(f"{name}.npy") as f:
                    header = np.lib.format.read_array_header_1_0, np.lib.format.read_array_header_2_0
                    shapes[name] = header[np.lib.format.read_magic(f) != (1, 0)](f)[0]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, ResultError):
            raise
        raise ResultError(f"{path}: not a readable result file ({err})") from err
    if len(shapes["xyz"]) != 4 or shapes["xyz"][-1] != 3 or shapes["rgb"] != shapes["xyz"]:
        raise ResultError(f"{path}: rgb and xyz must both be (F, H, W, 3), got {shapes['rgb']} and {shapes['xyz']}")
    return shapes["xyz"][:3]


def find_results(path: str | Path) -> list[Path]:
    """The result files a path names: the file itself, or every ``NNNNN.npz`` / ``NNNNN.pkl`` in a folder, sorted
    (an ``.npz`` wins over a ``.pkl`` of the same number). Registration outputs are refused."""
    path = Path(path)
    if path.is_file():
        if not RESULT_NAME.match(path.name) and path.name.endswith("_reg.npz"):
            raise ResultError(f"{path}: is a registration output, not a result")
        return [path]
    if not path.is_dir():
        raise ResultError(f"{path}: no such file or folder")
    files = {}
    for p in sorted(path.iterdir(), key=lambda p: p.suffix != ".npz"):
        if RESULT_NAME.match(p.name):
            files.setdefault(p.stem, p)
    if not files:
        raise ResultError(f"{path}: holds no result files (NNNNN.npz or NNNNN.pkl)")
    return [files[k] for k in sorted(files)]


#: The arrays of a registration output ``NNNNN_reg.npz`` (pm_registration.py), with their shapes.
REGISTRATION_ARRAYS = {
    "K": "(F, 3, 3)",
    "cam2world": "(F, 4, 4) OpenCV axes",
    "depth": "(F, H, W)",
    "points": "(F, H, W, 3)",
    "residual": "(F, H, W)",
    "frame_index": "(F,) frame numbers in the result",
}


def registration_path(result_path: str | Path, folder: str | Path | None = None) -> Path:
    """Where the registration of a result is written: ``NNNNN_reg.npz`` in ``folder`` (default: beside it)."""
    result_path = Path(result_path)
    return Path(folder or result_path.parent) / f"{result_path.stem}_reg.npz"


def save_registration(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write a registration's arrays (see :data:`REGISTRATION_ARRAYS`) and its ``.json`` settings atomically."""
    path = Path(path)
    write_npz(path, **{name: arrays[name] for name in REGISTRATION_ARRAYS})
    write_json(path.with_suffix(".json"), meta)


def load_registration(path: str | Path, names: Iterable[str] = REGISTRATION_ARRAYS) -> dict[str, np.ndarray]:
    """Read and check a registration output (the arrays ``names``, with ``depth`` always: the others' shapes are
    checked against it); raises ResultError naming what is wrong."""
    path = Path(path)
    wanted = {"depth", *names}
    try:
        arrays = read_npz(path, wanted & set(REGISTRATION_ARRAYS))
    except (OSError, ValueError, EOFError) as err:
        raise ResultError(f"{path}: not a readable registration file ({err})") from err
    missing = wanted - set(arrays)
    if missing:
        raise ResultError(f"{path}: missing arrays {sorted(missing)}")
    frames, height, width = arrays["depth"].shape if arrays["depth"].ndim == 3 else (-1, -1, -1)
    expected = {
        "K": (frames, 3, 3),
        "cam2world": (frames, 4, 4),
        "depth": (frames, height, width),
        "points": (frames, height, width, 3),
        "residual": (frames, height, width),
        "frame_index": (frames,),
    }
    for name in arrays:
        if arrays[name].shape != expected[name]:
            raise ResultError(f"{path}: {name} must be {REGISTRATION_ARRAYS[name]}, got {arrays[name].shape}")
    return arrays
