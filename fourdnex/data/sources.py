"""Where training clips come from: one discovery over a 4DNeX-10M tree, its captions, and a reader per clip format.

Discovery walks ``--data_dir`` as the 4DNeX reference does: every leaf folder under ``dynamic/`` that holds no
``.npz`` (a folder of ``.npz`` clips is their container), every ``.npz`` under ``dynamic/``, and every ``.npz`` under
``static/``. Each such entry, written relative to ``--data_dir`` (folders with a trailing ``/``), must fit exactly one
layout of :data:`LAYOUTS`; an entry that fits none becomes a failure record naming the entry and the layouts it
could have had, never a silent skip. Other files (GIF previews, notes) are listed as ignored.

Every range in a name is inclusive: ``<start>-<end>`` covers ``end - start + 1`` frames (in npz names a ``.png``
after either number is accepted, as the reference's parser accepts it). The range must agree with
the frames the clip holds (depth files, npz frames); a clip where it does not is a failure naming both numbers.
A clip's id is its entry's path without ``.npz`` or the trailing ``/`` (``dynamic/dynamic_1/10000/part_0-48``);
clips are processed in the sorted order of their ids. Captions: ``caption/<subset>_with_caption_upload.csv``, columns
``number`` (the integer caption id) and ``caption``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import textwrap
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from fourdnex.cli import run
from fourdnex.errors import FourDNeXError, UsageError
from fourdnex.files import read_npz, read_video
from fourdnex.geometry.cameras import intrinsics_from_integer_centres, quaternion_to_rotation, unproject_depth

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: The clip formats, each with its reader.
ClipFormat = Literal["monst3r", "dynamic_npz", "static_npz"]


class ClipError(FourDNeXError, ValueError):
    """A clip that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Layout:
    """One rule of the discovery: where a clip lies, its format, where its RGB frames and its caption id come from.

    ``pattern`` is matched against the whole entry path (relative to ``--data_dir``); its groups are ``subset``,
    ``video`` (the caption id, written ``caption_id`` in ``form``) and, for ranged names, ``start`` and ``end``.
    ``rgb`` is the RGB source relative to ``--data_dir`` with ``{subset}`` and ``{video}`` filled in; videos are
    named without their extension (any of VIDEO_EXTENSIONS); None: the npz holds its own images.
    """

    name: str
    form: str  # the rule as people read it
    pattern: str
    format: ClipFormat  # the reader
    rgb: str | None
    rgb_kind: str  # "video", "images" (a folder) or "video or images" ("" when the npz holds the images)
    frames: str  # which RGB frames, in words
    caption_id: str = "<video>"

    @property
    def kind(self) -> str:
        """``dynamic`` or ``static``: the top-level folder the rule lives in."""
        return self.form.split("/", 1)[0]

    @property
    def folder(self) -> bool:
        """Whether the entry is a folder (MonST3R-style) rather than an ``.npz`` file."""
        return self.form.endswith("/")

    def rgb_text(self, quote: str = "") -> str:
        """Where the RGB frames come from, in words (paths and placeholders between ``quote`` marks)."""
        frames = re.sub(r"(<\w+>)", rf"{quote}\1{quote}", self.frames)
        if self.rgb is None:
            return frames
        path = self.rgb.format(subset="<subset>", video=self.caption_id)
        paths = {"video": f"{quote}{path}.mp4{quote}", "images": f"{quote}{path}/{quote}"}
        paths["video or images"] = f"{paths['video']} or {paths['images']}"
        return f"{frames} of {paths[self.rgb_kind]}"


_RANGE_NPZ = r"[^/-]*_(?P<start>\d+)(?:\.png)?-[^/-]*_(?P<end>\d+)(?:\.png)?\.npz"
_RANGE = "frames <start>..<end>"

#: Every layout a clip may have: flat ones (ids that are the caption number) and the nested ones the reference reads.
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "monst3r",
        "dynamic/<subset>/<video>_<start>-<end>/",
        r"dynamic/(?P<subset>[^/]+)/(?P<video>[^/]+)_(?P<start>\d+)-(?P<end>\d+)/",
        "monst3r",
        "raw/dynamic/{subset}/{video}",
        "video",
        _RANGE,
    ),
    Layout(
        "monst3r_in_video_folder",
        "dynamic/{dynamic_1,dynamic_2}/<video>/<name>_<start>-<end>/",
        r"dynamic/(?P<subset>dynamic_1|dynamic_2)/(?P<video>[^/]+)/[^/]+_(?P<start>\d+)-(?P<end>\d+)/",
        "monst3r",
        "raw/dynamic/{subset}/{video}",
        "video",
        _RANGE,
    ),
    Layout(
        "dynamic_npz",
        "dynamic/<subset>/<video>.npz",
        r"dynamic/(?P<subset>[^/]+)/(?P<video>[^/]+)\.npz",
        "dynamic_npz",
        None,
        "",
        "the npz's own images",
    ),
    Layout(
        "dynamic_npz_in_video_folder",
        "dynamic/dynamic_3/<video>/<x>_<start>-<y>_<end>.npz",
        r"dynamic/(?P<subset>dynamic_3)/(?P<video>[^/]+)/" + _RANGE_NPZ,
        "dynamic_npz",
        None,
        "",
        "the npz's own images (end - start + 1 of them)",
    ),
    Layout(
        "static_npz",
        "static/<subset>/<video>.npz",
        r"static/(?P<subset>[^/]+)/(?P<video>[^/]+)\.npz",
        "static_npz",
        "raw/static/{subset}/{video}",
        "video or images",
        "the first frames",
    ),
    Layout(
        "static_npz_in_scene_folder",
        "static/static_1/<scene>/<x>_<start>-<y>_<end>.npz",
        r"static/(?P<subset>static_1)/(?P<video>[^/]+)/" + _RANGE_NPZ,
        "static_npz",
        "raw/static/{subset}/{video}/images_4",
        "images",
        "images <start>..<end> (name order)",
        "<scene>",
    ),
    Layout(
        "static_npz_in_video_folder",
        "static/static_2/<group>/<video>/<x>_<start>-<y>_<end>.npz",
        r"static/(?P<subset>static_2)/[^/]+/(?P<video>[^/]+)/" + _RANGE_NPZ,
        "static_npz",
        "raw/static/{subset}/{video}",
        "video",
        _RANGE,
    ),
)


def describe_layouts() -> str:
    """The layouts as text: one block per rule (form, name, format, RGB frames, caption id)."""
    lines = []
    for layout in LAYOUTS:
        lines.append(f"    {layout.form}")
        text = f"{layout.name} ({layout.format}): RGB {layout.rgb_text()}; caption id {layout.caption_id}"
        lines += textwrap.wrap(text, 116, initial_indent=" " * 8, subsequent_indent=" " * 10)
    return "\n".join(lines)


def layouts_markdown() -> str:
    """The layouts as the README's markdown table (``python -m fourdnex.data.sources`` prints it)."""
    rows = ["| entry | layout | format | RGB | caption id |", "|---|---|---|---|---|"]
    for layout in LAYOUTS:
        cells = (f"`{layout.form}`", layout.name, layout.format, layout.rgb_text("`"), f"`{layout.caption_id}`")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


__doc__ = (__doc__ or "") + "\nLayouts (:data:`LAYOUTS`)::\n\n" + describe_layouts() + "\n"


@dataclass(frozen=True)
class ClipSource:
    """One entry the discovery found: a clip and where its files are, or (``problem`` set) an entry that fits no
    layout and will be recorded as a failure."""

    id: str
    kind: str  # "dynamic" | "static"
    subset: str
    name: str  # the entry's own name (folder name or file stem)
    format: ClipFormat  # by the entry's type when it fits no layout
    path: Path
    root: Path  # the data_dir it was found in
    layout: str | None = None  # the name of the layout it fits
    video: str = ""  # the caption id as written in the path
    rgb: str | None = None  # the RGB source relative to root, videos without extension (None: in the npz)
    rgb_kind: str = ""
    start: int = 0  # first RGB frame
    length: int | None = None  # frames of the name's inclusive range; None when the name has none
    problem: str | None = None


@dataclass
class Discovery:
    """What :func:`find_clips` found: clips (entries that fit no layout included, with their problem) in id order,
    and the files that are not clips."""

    clips: list[ClipSource]
    ignored: list[str]


@dataclass
class RawClip:
    """A clip as read, at source resolution (N frames). Its geometry is what the format stores: depth maps
    (``depth``, with ``K``) or world points; :attr:`points` gives world points either way. :attr:`dynamic` is the
    moving objects' mask where the format has one."""

    rgb: np.ndarray  # (N, Hs, Ws, 3) uint8
    cam2world: np.ndarray  # (N, 4, 4) float64, camera-to-world, OpenCV axes
    K: np.ndarray | None  # (N, 3, 3) float64 for the pointmap's pixel grid, or None (to be fitted)
    caption: str
    number: int
    reader: str = "decord"
    depth: np.ndarray | None = None  # (N, Hp, Wp) camera-frame z as stored (float32 mostly), where the format has it
    stored_points: np.ndarray | None = None  # (N, Hp, Wp, 3) world points in their stored float type, where stored
    mask_files: tuple[Path, ...] = ()  # the dynamic mask of each frame (monst3r: dynamic_mask_<t>.png); () if none

    @property
    def geometry_shape(self) -> tuple[int, int, int]:
        """``(N, Hp, Wp)``: the geometry's frames and pixel grid."""
        return (self.depth if self.depth is not None else self.stored_points).shape[:3]

    @functools.cached_property
    def points(self) -> np.ndarray:
        """``(N, Hp, Wp, 3)`` world coordinates: the stored points (their float type: arithmetic with the float64
        cameras promotes them exactly), or the depth unprojected, float64 (on first use: evaluation reads the depth
        alone)."""
        if self.depth is None:
            return self.stored_points
        return unproject_depth(self.depth.astype(np.float64), self.K, self.cam2world)

    @functools.cached_property
    def dynamic(self) -> np.ndarray | None:
        """``(N, Hp, Wp)`` bool: the pixels on moving objects, from :attr:`mask_files` (on first use: the cache does
        not read them); None for a format without masks (the npz formats). ClipError names a mask file that is
        missing, unreadable or not of the geometry's size."""
        if not self.mask_files:
            return None
        return _read_masks(self.mask_files, self.geometry_shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# Discovery


def _entries(data_dir: Path, show_progress: bool) -> tuple[list[tuple[str, Path]], list[str]]:
    """The candidate clip entries ``(relative path, path)`` the reference's walk finds, and the ignored files."""
    from tqdm import tqdm

    entries, ignored = [], []
    for kind in ("dynamic", "static"):
        root = data_dir / kind
        if not root.is_dir():
            continue
        walk = tqdm(os.walk(root), desc=f"finding clips in {kind}/", unit=" folders", disable=not show_progress)
        for folder, subfolders, files in walk:
            subfolders.sort()
            here = Path(folder)
            rel = here.relative_to(data_dir).as_posix()
            npz = [f for f in files if f.endswith(".npz")]
            is_clip_folder = kind == "dynamic" and not subfolders and not npz and rel.count("/") >= 2
            if is_clip_folder:
                entries.append((rel + "/", here))
                continue
            entries += [(f"{rel}/{f}", here / f) for f in npz]
            ignored += [f"{rel}/{f}" for f in sorted(files) if not f.endswith(".npz")]
    return entries, sorted(ignored)


def _source(rel: str, path: Path, data_dir: Path) -> ClipSource:
    """The ClipSource of one entry: the layout it fits, or a problem naming the layouts it could have had."""
    parts = rel.removesuffix("/").split("/")
    kind, subset = parts[0], parts[1] if len(parts) > 2 else ""
    folder = rel.endswith("/")
    clip_id = rel.removesuffix("/").removesuffix(".npz")
    name = clip_id.rsplit("/", 1)[-1]
    fmt = "monst3r" if folder else f"{kind}_npz"
    for layout in LAYOUTS:
        match = re.fullmatch(layout.pattern, rel)
        if match is None:
            continue
        groups = match.groupdict()
        rgb = layout.rgb.format(**groups) if layout.rgb else None
        start, length, problem = 0, None, None
        if groups.get("start") is not None:
            start, end = int(groups["start"]), int(groups["end"])
            length = end - start + 1
            if length < 1:
                problem = f"{rel}: the range {start}-{end} in its name ends before it starts"
        return ClipSource(
            id=clip_id,
            kind=kind,
            subset=groups["subset"],
            name=name,
            format=layout.format,
            path=path,
            root=data_dir,
            layout=layout.name,
            video=groups["video"],
            rgb=rgb,
            rgb_kind=layout.rgb_kind,
            start=start,
            length=length,
            problem=problem,
        )
    expected = "; ".join(f"{lay.form} ({lay.name})" for lay in LAYOUTS if (lay.kind, lay.folder) == (kind, folder))
    problem = f"{rel} fits no clip layout; a {'folder' if folder else '.npz'} here must be one of: {expected}"
    return ClipSource(clip_id, kind, subset, name, fmt, path, data_dir, problem=problem)


def find_clips(data_dir: str | Path, show_progress: bool = False) -> Discovery:
    """Every clip entry under ``data_dir`` (``dynamic/`` and ``static/``) in id order, by the rules of
    :data:`LAYOUTS`; entries that fit no layout come back with their ``problem`` set."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"data_dir {data_dir} is not a folder")
    entries, ignored = _entries(data_dir, show_progress)
    if not entries:
        raise UsageError(f"no clips under {data_dir}/dynamic or {data_dir}/static")
    by_id: dict[str, list[tuple[str, ClipSource]]] = defaultdict(list)
    for rel, path in sorted(entries):
        source = _source(rel, path, data_dir)
        by_id[source.id].append((rel, source))
    clips = []
    for clip_id, found in sorted(by_id.items()):
        source = found[0][1]
        if len(found) > 1:  # one id, one set of cache files: none of them is built
            source = replace(
                source, problem=f"{' and '.join(rel for rel, _ in found)} map to the same clip id {clip_id}"
            )
        clips.append(source)
    return Discovery(clips, ignored)


# ---------------------------------------------------------------------------------------------------------------
# Captions


def read_captions(data_dir: str | Path, subset: str) -> dict[int, str]:
    """``caption/<subset>_with_caption_upload.csv`` as {number: caption}; ClipError if missing or malformed."""
    path = Path(data_dir) / "caption" / f"{subset}_with_caption_upload.csv"
    if not path.is_file():
        raise ClipError(f"caption file {path} is missing")
    captions = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"number", "caption"} <= set(reader.fieldnames):
            raise ClipError(f"{path} needs the columns number,caption, has {reader.fieldnames}")
        for row in reader:
            try:
                captions[int(row["number"])] = row["caption"] or ""
            except ValueError as err:
                raise ClipError(f"{path}: number {row['number']!r} is not an integer") from err
    return captions


class Captions:
    """The caption files of a tree, each read once (from any thread) on first use."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self._subsets: dict[str, dict[int, str] | ClipError] = {}
        self._lock = threading.Lock()

    def caption(self, source: ClipSource) -> tuple[int, str]:
        """``(number, caption)`` of a clip: its caption id as an integer and the caption (whitespace collapsed)."""
        try:
            number = int(source.video)
        except ValueError as err:
            raise ClipError(f"{source.path}: the caption id {source.video!r} is not an integer clip number") from err
        with self._lock:
            if source.subset not in self._subsets:
                try:
                    self._subsets[source.subset] = read_captions(self.data_dir, source.subset)
                except ClipError as err:
                    self._subsets[source.subset] = err
            captions = self._subsets[source.subset]
        if isinstance(captions, ClipError):
            raise captions
        caption = " ".join(captions.get(number, "").split())
        if not caption:
            raise ClipError(f"no caption for number {number} in caption/{source.subset}_with_caption_upload.csv")
        return number, caption


# ---------------------------------------------------------------------------------------------------------------
# Readers


def _read_video(path: Path, indices: list[int]) -> tuple[np.ndarray, str]:
    """Frames ``indices`` of a video at full size, ``(N, H, W, 3)`` uint8 RGB, and the reader that decoded them:
    decord (the reference's reader), or PyAV where decord is not installed (it has no builds for some platforms)."""
    try:
        from decord import VideoReader, cpu
        from decord._ffi.base import DECORDError
    except ImportError:
        return _read_video_pyav(path, indices), "pyav"

    try:
        reader = VideoReader(str(path), ctx=cpu(0))
    except (RuntimeError, DECORDError) as err:
        raise ClipError(f"cannot open video {path}: {str(err).splitlines()[0]}") from err
    if max(indices) >= len(reader):
        raise ClipError(f"video {path} has {len(reader)} frames, the clip needs frames up to {max(indices)}")
    try:
        return reader.get_batch(indices).asnumpy(), "decord"
    except DECORDError:
        # decord 0.6 fails to copy out frames of some sizes (e.g. 48 x 32); PyAV reads them.
        return _read_video_pyav(path, indices), "pyav"


def _read_video_pyav(path: Path, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` of a video through PyAV, ``(N, H, W, 3)`` uint8; failures become ClipErrors."""
    import av

    try:
        return read_video(path, indices)
    except av.FFmpegError as err:
        raise ClipError(f"cannot decode video {path}: {err}") from err
    except ValueError as err:  # read_video's own checks, which name the file
        raise ClipError(str(err)) from err


def _numbered(paths: Iterable[Path]) -> list[Path]:
    """Sort paths by the integers in their names (frame_2 before frame_10)."""
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _read_images(folder: Path, start: int, count: int) -> np.ndarray:
    """Images ``start .. start + count - 1`` of ``folder`` in name order, ``(count, H, W, 3)`` uint8 RGB."""
    from PIL import Image

    files = _numbered(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < start + count:
        raise ClipError(
            f"image folder {folder} has {len(files)} images, the clip needs images {start}..{start + count - 1}"
        )
    frames = []
    for f in files[start : start + count]:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ClipError(f"cannot read image {f}: {err}") from err
    if len({f.shape for f in frames}) != 1:
        raise ClipError(f"images in {folder} differ in size")
    return np.stack(frames)


def _read_rgb(source: ClipSource, count: int) -> tuple[np.ndarray, str]:
    """RGB frames ``start .. start + count - 1`` of a clip's raw video or image folder, and the reader used."""
    base = source.root / source.rgb
    if "video" in source.rgb_kind:
        for ext in VIDEO_EXTENSIONS:
            if base.with_name(base.name + ext).is_file():
                return _read_video(base.with_name(base.name + ext), list(range(source.start, source.start + count)))
    if "images" in source.rgb_kind and base.is_dir():
        return _read_images(base, source.start, count), "images"
    looked = [f"{base}.mp4 (or {', '.join(VIDEO_EXTENSIONS[1:])})"] if "video" in source.rgb_kind else []
    looked += [f"the folder {base}/"] if "images" in source.rgb_kind else []
    raise ClipError(f"no RGB for {source.id}: looked for {' and '.join(looked)}")


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz (no pickle; stored members memory-mapped, see :func:`fourdnex.files.read_npz`);
    ClipError if unreadable or incomplete."""
    try:
        arrays = read_npz(path, set(keys))
    except (OSError, ValueError, EOFError) as err:
        raise ClipError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ClipError(f"{path} lacks {missing}")
    return arrays


def _intrinsics(value: np.ndarray, frames: int, height: int, width: int, path: Path) -> np.ndarray:
    """``intrinsic`` of a dynamic npz (3x3, 1x3x3, Tx3x3 with pixel centres on integers, or a scalar focal) ->
    ``(T, 3, 3)`` in fourdnex's convention (pixel centres at +0.5)."""
    value = np.asarray(value, np.float64)
    if value.size == 1:  # a focal length, the principal point at the image centre
        f = float(value.reshape(()))
        return np.repeat(np.array([[[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]]]), frames, 0)
    if value.shape == (3, 3):
        value = value[None]
    if value.shape == (1, 3, 3):
        value = np.repeat(value, frames, 0)
    if value.shape != (frames, 3, 3):
        raise ClipError(f"{path}: intrinsic must be 3x3, 1x3x3, {frames}x3x3 or a scalar, got {value.shape}")
    return intrinsics_from_integer_centres(value)


def _check_finite(name: str, array: np.ndarray, path: Path) -> None:
    """ClipError naming the first frame of ``array`` (frames first) that holds NaN or inf."""
    bad = np.array([not np.isfinite(frame).all() for frame in array])  # frame by frame: no whole-clip temporary
    if bad.any():
        raise ClipError(f"{path}: {name} holds NaN or inf in frame {int(np.argmax(bad))} ({int(bad.sum())} frames)")


def _check_rays(K: np.ndarray, path: Path) -> None:
    """ClipError naming the first frame whose ``K (N, 3, 3)`` gives no finite pixel rays (a focal length of 0, or a
    focal length or principal point that is NaN or inf): its depth would unproject to no finite point."""
    entries = K[:, [0, 1, 0, 1], [0, 1, 2, 2]]  # fx, fy, cx, cy
    bad = ~(np.isfinite(entries).all(1) & (entries[:, :2] != 0).all(1))
    if bad.any():
        frame, count = int(np.argmax(bad)), int(bad.sum())
        raise ClipError(f"{path}: the intrinsics of frame {frame} give no finite rays ({count} frames)")


def _check_range(source: ClipSource, frames: int, what: str) -> None:
    """ClipError unless the name's range (if any) covers exactly ``frames`` frames."""
    if source.length is not None and source.length != frames:
        end = source.start + source.length - 1
        raise ClipError(
            f"{source.path}: its name's range {source.start}-{end} is {source.length} frames (inclusive) but it "
            f"holds {frames} {what}"
        )


def _read_table(path: Path, columns: int) -> np.ndarray:
    """A whitespace-separated text table with ``columns`` numbers per line, ``(N, columns)`` float64."""
    if not path.is_file():
        raise ClipError(f"{path} is missing")
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ClipError(f"cannot parse {path}: {err}") from err
    if table.shape[1] != columns:
        raise ClipError(f"{path} must have {columns} numbers per line, has {table.shape[1]}")
    return table


def _read_masks(files: tuple[Path, ...], size: tuple[int, int]) -> np.ndarray:
    """The dynamic masks ``files`` (the monst3r format's, README "Clip layouts"; any colour mode is read as its
    grey) of ``size`` ``(Hp, Wp)`` -> ``(N, Hp, Wp)`` bool."""
    from PIL import Image

    masks = np.empty((len(files), *size), bool)
    for t, f in enumerate(files):
        if not f.is_file():
            raise ClipError(f"dynamic mask {f} is missing")
        try:
            with Image.open(f) as im:
                grey = np.asarray(im.convert("L"))
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ClipError(f"cannot read dynamic mask {f}: {err}") from err
        if grey.shape != size:
            raise ClipError(f"dynamic mask {f} is {grey.shape[0]}x{grey.shape[1]}, the depth {size[0]}x{size[1]}")
        masks[t] = grey >= 128  # 255 moving, 0 static
    return masks


def _read_monst3r(source: ClipSource) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Depth ``(N, H, W)``, camera-to-world ``(N, 4, 4)`` and K ``(N, 3, 3)`` (pixel centres at +0.5) of a MonST3R
    folder; N is its range's length, and the depth files must be exactly frame_0000.npy .. frame_{N-1}.npy."""
    path = source.path
    names = {p.name for p in path.glob("frame_*.npy")}
    expected = [f"frame_{t:04d}.npy" for t in range(source.length)]
    if names != set(expected):
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        detail = f" (missing {missing[:3]})" if missing else ""
        detail += f" (beyond the range: {extra[:3]})" if extra else ""
        _check_range(source, len(names), f"depth files frame_XXXX.npy{detail}")
        raise ClipError(f"{path}: depth files are not frame_0000.npy .. frame_{source.length - 1:04d}.npy{detail}")
    n = source.length
    traj = _read_table(path / "pred_traj.txt", 8)
    intr = _read_table(path / "pred_intrinsics.txt", 9)
    if len(traj) != n or len(intr) != n:
        raise ClipError(f"{path}: {n} depth frames but {len(traj)} poses and {len(intr)} intrinsics")
    try:
        depth = np.stack([np.load(path / name, allow_pickle=False) for name in expected])
    except (OSError, ValueError) as err:
        raise ClipError(f"{path}: cannot read depth: {err}") from err
    if depth.ndim != 3:
        raise ClipError(f"{path}: depth frames must be (H, W), got {depth.shape[1:]}")
    _check_finite("depth", depth, path)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = quaternion_to_rotation(traj[:, 4:8])
    c2w[:, :3, 3] = traj[:, 1:4]
    return depth, c2w, intrinsics_from_integer_centres(intr.reshape(n, 3, 3))


def read_clip(source: ClipSource, captions: Captions) -> RawClip:
    """Read one clip in any of the three formats; ClipError names the problem (file, frame, value)."""
    if source.problem:
        raise ClipError(source.problem)
    number, caption = captions.caption(source)
    path = source.path
    points = None
    if source.format == "monst3r":
        depth, c2w, K = _read_monst3r(source)
        rgb, reader = _read_rgb(source, len(depth))
    elif source.format == "dynamic_npz":
        arrays = _load_npz(path, ("images", "depths", "intrinsic", "cam_c2w"))
        rgb, depth = arrays["images"], arrays["depths"]
        if rgb.ndim != 4 or rgb.shape[-1] != 3 or depth.shape != rgb.shape[:3]:
            raise ClipError(f"{path}: images {rgb.shape} and depths {depth.shape} must be (T, H, W, 3) and (T, H, W)")
        n = len(depth)
        _check_range(source, n, "frames")
        c2w = arrays["cam_c2w"].astype(np.float64)
        if c2w.shape != (n, 4, 4):
            raise ClipError(f"{path}: cam_c2w must be ({n}, 4, 4), got {c2w.shape}")
        _check_finite("depth", depth, path)
        K = _intrinsics(arrays["intrinsic"], n, *depth.shape[1:], path)
        rgb, reader = rgb.astype(np.uint8), "npz"
    else:
        arrays = _load_npz(path, ("pts3d", "poses"))
        points, c2w = arrays["pts3d"], arrays["poses"].astype(np.float64)
        n = len(points)
        if points.ndim != 4 or points.shape[-1] != 3 or c2w.shape != (n, 4, 4):
            raise ClipError(f"{path}: pts3d {points.shape} and poses {c2w.shape} must be (T, H, W, 3) and (T, 4, 4)")
        if points.dtype.kind != "f":
            raise ClipError(f"{path}: pts3d must hold floating-point coordinates, not {points.dtype}")
        _check_range(source, n, "frames")
        depth, K = None, None
        rgb, reader = _read_rgb(source, n)
        _check_finite("pointmap", points, path)
    if depth is not None:  # finite depths, cameras and rays give finite points
        _check_rays(K, path)
    _check_finite("cam2world", c2w, path)
    if len(rgb) != len(c2w):
        raise ClipError(f"{path}: {len(rgb)} RGB frames for {len(c2w)} geometry frames")
    masks = tuple(path / f"dynamic_mask_{t}.png" for t in range(len(c2w))) if source.format == "monst3r" else ()
    return RawClip(rgb, c2w, K, caption, number, reader, depth=depth, stored_points=points, mask_files=masks)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.data.sources``: it takes no flags."""
    return argparse.ArgumentParser(
        prog="fourdnex.data.sources",
        description="Print the clip layouts a 4DNeX-10M tree may hold, as the README's markdown table.",
    )


if __name__ == "__main__":
    run(lambda args: print(layouts_markdown()), build_parser())
