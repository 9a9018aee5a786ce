"""Every file fourdnex writes goes through here: atomic writes (a killed run never leaves a file that looks
complete) of text, JSON, arrays, images, tensors and videos; and video decoding (PyAV) and ``.npz`` reading."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import zipfile
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


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Write one array as ``.npy``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """An 8-bit ``(H, W, 3)`` / ``(H, W)`` or 16-bit gray ``(H, W)`` PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write torch tensors (detached, made contiguous, on the CPU) to a safetensors file, atomically; the folder is
    created if needed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write arrays to an uncompressed ``.npz``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


#: Readers of the .npy headers np.save writes, by format version.
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npz(path: str | Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays ``names`` (default: all) of an ``.npz``, without unpickling anything: a member stored uncompressed
    (as :func:`write_npz` writes them) is memory-mapped copy-on-write, so nothing is copied or checksummed before it
    is read and a write never reaches the file; a compressed member is read whole. Raises ValueError (or OSError)
    for a file that is not such an archive, is cut short or holds Python objects."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if names is not None and name not in names:
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    with archive.open(info) as member:
                        arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                    continue
                f.seek(info.header_offset)
                local = f.read(30)  # a member's local header: 30 bytes, then its name and extra field
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise ValueError(f"member {info.filename} has no local header")
                name_length, extra_length = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_length + extra_length)
                version = np.lib.format.read_magic(f)
                if version not in _NPY_HEADERS:
                    raise ValueError(f"member {info.filename} is an .npy of format {version}, not 1.0 or 2.0")
                shape, fortran, dtype = _NPY_HEADERS[version](f)
                if dtype.hasobject:
                    raise ValueError(f"member {info.filename} holds Python objects")
                order = "F" if fortran else "C"
                mapped = np.prod(shape) > 0  # a memory map cannot be empty
                arrays[name] = (
                    np.asarray(np.memmap(f, dtype, "c", f.tell(), shape, order))
                    if mapped
                    else np.empty(shape, dtype, order)
                )
    except zipfile.BadZipFile as err:
        raise ValueError(f"not an npz archive ({err})") from err
    return arrays


def write_video(path: str | Path, frames: np.ndarray, fps: int = 24) -> None:
    """Encode ``(F, H, W, 3)`` uint8 RGB frames as an H.264 mp4 (libx264 through PyAV, crf 18, no macroblock tree),
    atomically. The same frames always give the same video: with libx264's macroblock tree (its default) PyAV 18.1's
    build coded each of five synthetic 96 x 144 clips differently from one call to the next (its SIMD code reads
    memory it did not write; ``asm=0`` is deterministic too), and without it the clips decode 2.0 dB nearer the frames
    (38.6 against 36.6 dB) in 15 % more bytes (BENCHMARKS.md, "Reproducible videos").

    Even sizes are stored as yuv420p, which every player shows; an odd height or width is stored as yuv444p, which
    needs no even size, so the video keeps exactly the frames' size.
    """
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (F, H, W, 3) uint8 with F >= 1, got {frames.shape} {frames.dtype}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    height, width = frames.shape[1:3]
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "x264-params": "no-mbtree=1"})
        stream.height, stream.width = height, width
        stream.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder still holds


#: Frames of at least this many pixels are decoded on FFmpeg's threads. On 16 CPUs the demo recipe's 96 x 144 clips
#: read faster without them (one reader 9 %, eight reader threads 19 %) and a 480 x 720 clip 14 % faster with them
#: (BENCHMARKS.md, "Reading videos").
THREADED_DECODE_PIXELS = 100_000


def read_video(path: str | Path, indices: list[int] | None = None) -> np.ndarray:
    """Decode a video through PyAV into ``(N, H, W, 3)`` uint8 RGB frames: all of them, or frames ``indices``.

    Frames are numbered from 0 in display order and returned in the order of ``indices`` (decoding stops after the
    last one asked for). Raises ValueError when the video has no video stream or ends before a wanted frame, and
    PyAV's ``av.FFmpegError`` when the file cannot be opened or decoded.
    """
    import av

    if indices is not None and (not indices or min(indices) < 0):
        raise ValueError(f"indices must be a non-empty list of frame numbers >= 0, got {indices}")
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices)
    frames = {}
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height >= THREADED_DECODE_PIXELS:
            stream.thread_type = "AUTO"  # threaded decoding; frames still come out in display order
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None or i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i == last:
                break
    if not frames:
        raise ValueError(f"video {path} holds no frames")
    if last is not None and last not in frames:
        raise ValueError(f"video {path} ends before frame {last}")
    return np.stack([frames[i] for i in (frames if indices is None else indices)])
