"""Atomic file writes and video encoding: a killed run never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write arrays to an uncompressed ``.npz``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 24) -> None:
    """Encode ``(F, H, W, 3)`` uint8 frames as an H.264 mp4, atomically."""
    import imageio.v2 as imageio

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    with atomic_path(path) as tmp:
        # macro_block_size=1 keeps odd sizes as they are instead of resizing them.
        writer = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1)
        with contextlib.closing(writer):
            for frame in frames:
                writer.append_data(frame)


def read_video(path: str | Path) -> np.ndarray:
    """Decode a whole video into ``(F, H, W, 3)`` uint8 frames."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    with contextlib.closing(reader):
        return np.stack([np.asarray(frame) for frame in reader])
