"""The training cache: its layout (specified once, here), its writers (used by the build) and its reader (training).

:data:`FILES` lists every file of a cache with its content: the tensors of each safetensors file (shape, dtype,
meaning), the safetensors metadata, and the keys of each JSON object; :data:`MANIFEST_KEYS`, :data:`STATS_KEYS`,
:data:`FAILURE_KEYS` and :data:`BUILD_CONFIG_KEYS` are those key lists. The writers below use these names and a test
holds them to it; :func:`describe` renders the layout (appended to this docstring) and :func:`markdown_table` the
README's table (``python -m fourdnex.data.cache --markdown``).

Shapes: F = ``num_frames``, H x W = the resolution per modality, T = (F - 1) / 4 + 1 latent frames,
Tc = (cond_num_frames - 1) / 4 + 1; the sizes in brackets are those of the real Wan2.1-I2V-14B encoders at
81 x 480 x 720. ``<id>`` is a clip's id (:mod:`fourdnex.data.sources`), so per-clip files sit in sub-folders.

Training reads ``stats.json`` (XYZ latent statistics, sizes, frame counts, the centring), the manifest's ``files``,
the latents and the two embeddings. A training sample keeps the first ``num_latent_frames`` latent frames. The Wan
VAE is causal in time, so the first frames of a longer encoding equal the encoding of the shorter clip, and the
cached condition is cut the same way. Every other condition (other given frames, the RGB video alone, a cached
condition shorter than the training length) is encoded by the trainer from the cached first frame or the cached
video's given frames, a batch at a time.

Every file is written atomically; a clip's record is written last and marks it done. The lists, manifest and
statistics are written once every clip of the run's ``--limit`` has a record or a failure (by the last shard to
finish, or by ``build_wan_dataset.py --merge``).
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from fourdnex.config import Modalities, latent_frames, video_frames
from fourdnex.errors import FourDNeXError, UsageError
from fourdnex.files import read_video, write_json, write_png, write_safetensors, write_video
from fourdnex.model.fusion import condition_frames, condition_mask, fuse_width, normalize_xyz, video_pixels

if TYPE_CHECKING:
    from fourdnex.data.prepare import PreparedClip
    from fourdnex.data.sources import ClipSource

# ---------------------------------------------------------------------------------------------------------------
# The layout


@dataclass(frozen=True)
class Field:
    """One named item of a cache file: a key of a JSON object, a tensor of a safetensors file, or a metadata entry.
    ``shape`` and ``dtype`` are set for tensors (dtype ``text encoder``: build_config.json's text_encoder_dtype)."""

    name: str
    meaning: str
    shape: str = ""
    dtype: str = ""


@dataclass(frozen=True)
class CacheFile:
    """One file of the cache: its path (relative to the cache; ``<id>`` and ``<sha256>`` filled in per clip) and
    what it holds. ``key`` names the per-clip files in a record's ``files``."""

    path: str
    content: str
    key: str | None = None
    tensors: tuple[Field, ...] = ()
    metadata: tuple[Field, ...] = ()
    keys: tuple[Field, ...] = ()


BUILD_CONFIG_KEYS: tuple[Field, ...] = (
    Field("model_path", "the Wan2.1-I2V folder the encoders came from"),
    Field("resolution_h", "H, pixels per modality"),
    Field("resolution_w", "W, pixels per modality"),
    Field("num_frames", "F, frames per clip"),
    Field("cond_num_frames", "frames the cached condition covers"),
    Field("text_encoder_dtype", "the UMT5 encoder's dtype (--dtype)"),
    Field("encoder_dtype", "the VAE's and CLIP's dtype (--encoder_dtype; float32, inference's, by default)"),
    Field("center", "the pointmap centring: clip (one centre per clip) or per_frame (the reference's)"),
    Field("clipping", "the pointmap clipping boxes (2nd-98th percentile per axis): clip or per_frame"),
)
FAILURE_KEYS: tuple[Field, ...] = (
    Field("id", "the clip id (for an entry that fits no layout: its path without .npz)"),
    Field("format", "monst3r, dynamic_npz or static_npz"),
    Field("layout", "the layout the entry fits (fourdnex.data.sources.LAYOUTS), null if none"),
    Field("reason", "what is wrong, naming the file"),
)
MANIFEST_KEYS: tuple[Field, ...] = (
    Field("id", "the clip id"),
    Field("kind", "dynamic or static"),
    Field("subset", "e.g. dynamic_1"),
    Field("layout", "the layout the clip was found in"),
    Field("format", "monst3r, dynamic_npz or static_npz"),
    Field("number", "the caption id"),
    Field("caption", "the caption, as in prompts.txt"),
    Field("prompt", "the text UMT5 encoded: caption + ' POINTMAP_STYLE.'"),
    Field("prompt_sha256", "sha256 of the prompt's UTF-8 text: the name of its embedding file"),
    Field("rgb_source", "the raw video or image folder (relative to --data_dir), null when the npz holds the images"),
    Field("rgb_start", "the first RGB frame of the clip in it"),
    Field("source_frames", "frames the clip has before padding"),
    Field("num_frames", "F"),
    Field("cond_num_frames", "frames of the cached condition"),
    Field("height", "H"),
    Field("width", "W"),
    Field("reader", "what decoded the RGB: decord, pyav, images or npz"),
    Field("intrinsics_source", "given (from the clip) or fitted (to its points)"),
    Field("files", "the clip's files (keys as in this table), relative to the cache"),
    Field("latent_shape", "shape of the rgb latent"),
    Field("normalization", "center (F x 3), scale, cam2world0 (4 x 4), K0 (3 x 3)"),
    Field("xyz_latent_sums", "count, sum, sumsq and per-channel sums of the xyz latent (for stats.json)"),
)
STATS_KEYS: tuple[Field, ...] = (
    Field("xyz_latent_mean", "mean over every element of every cached xyz latent (null without clips)"),
    Field("xyz_latent_std", "their population standard deviation"),
    Field("xyz_latent_channel_mean", "per channel (16)"),
    Field("xyz_latent_channel_std", "per channel (16)"),
    Field("count", "elements counted"),
    Field("num_clips", "clips in the manifest"),
    Field("note", "what the statistics are over"),
    *BUILD_CONFIG_KEYS,
)

BUILD_CONFIG_FILE = "build_config.json"
STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.jsonl"
PROMPTS_FILE = "prompts.txt"
VIDEOS_FILE = "videos.txt"
FAILURES_FILE = "failures.jsonl"
RECORD_FILE = "records/<id>.json"
#: The tensors of a clip's latents file, as the build writes them.
LATENT_KEYS = ("rgb", "xyz", "cond", "cond_rgb")
FAILURE_FILE = "failures/<id>.json"
#: Every file of a cache. Per-clip files first, in the order a record lists them.
FILES: tuple[CacheFile, ...] = (
    CacheFile("videos/<id>.mp4", "the cropped RGB video, F x H x W, 24 fps", key="video"),
    CacheFile("first_frames/<id>.png", "its first frame, H x W RGB", key="first_frame"),
    CacheFile(
        "pointmaps/<id>.safetensors",
        "the normalized pointmap and what undoes it: metric = pointmap * scale + center[f] (first camera's frame, "
        "OpenCV axes) for every point inside its clipping box; world = cam2world0 @ metric",
        key="pointmap",
        tensors=(
            Field("pointmap", "normalized, in [-1, 1], pixel-aligned with the video", "(F, H, W, 3)", "float16"),
            Field("center", "the centre per frame (equal rows with --center clip)", "(F, 3)", "float64"),
            Field("scale", "source units (metres if the source is metric) per normalized unit", "()", "float64"),
            Field("half_range", "the clipping box is center +- half_range (metric)", "(F, 3)", "float64"),
            Field("cam2world0", "the first camera, camera-to-world, in the source's world", "(4, 4)", "float64"),
            Field("cam2world", "every frame's camera, camera-to-world, in the source's world", "(F, 4, 4)", "float64"),
            Field("intrinsics", "K of the cropped H x W frames (pixel centres at +0.5)", "(F, 3, 3)", "float64"),
            Field("frame_indices", "the source frame of each frame (ping-pong padding)", "(F,)", "int64"),
        ),
        metadata=(
            Field("frame", "first camera, OpenCV axes"),
            Field("intrinsics_source", "given or fitted"),
            Field("center", "clip or per_frame"),
            Field("clipping", "clip or per_frame"),
        ),
    ),
    CacheFile("pointmap_previews/<id>.mp4", "the normalized pointmap as colours (xyz + 1) / 2", key="pointmap_preview"),
    CacheFile(
        "latents/<id>.safetensors",
        "Wan VAE posterior modes after the VAE's own (z - latents_mean) / latents_std",
        key="latents",
        tensors=(
            Field("rgb", "the video", "(16, T, H/8, W/8) [16, 21, 60, 90]", "float32"),
            Field(
                "xyz",
                "the pointmap video; NOT yet XYZ-normalized (apply (z - mean) / std from stats.json)",
                "(16, T, H/8, W/8)",
                "float32",
            ),
            Field(
                "cond",
                "the condition: fusion.condition_video(first frame, cond_num_frames, 'rgbxyz') ([RGB | sloped plane], "
                "then zero frames)",
                "(16, Tc, H/8, 2 W/8) [16, 13, 60, 180]",
                "float32",
            ),
            Field(
                "cond_rgb",
                "the condition of plain image-to-video (finetune.py --modalities rgb): fusion.condition_video(first "
                "frame, cond_num_frames, 'rgb') (RGB, then zero frames); absent from caches built before it",
                "(16, Tc, H/8, W/8) [16, 13, 60, 90]",
                "float32",
            ),
        ),
        metadata=(
            Field("num_frames", "F"),
            Field("cond_num_frames", "frames of the condition"),
            Field("cond_layout", "rgbxyz"),
            Field("normalization", "which normalizations the latents carry"),
        ),
    ),
    CacheFile(
        "clip/<id>.safetensors",
        "the CLIP image embedding of the first frame",
        key="clip",
        tensors=(Field("clip_embeds", "CLIP's penultimate hidden layer", "(257, 1280)", "float32"),),
    ),
    CacheFile(
        "prompt/<sha256>.safetensors",
        "the UMT5 embedding of caption + ' POINTMAP_STYLE.', named by the sha256 of that text (UTF-8)",
        key="prompt",
        tensors=(Field("prompt_embeds", "zero after the prompt's tokens", "(512, 4096)", "text encoder"),),
        metadata=(Field("prompt", "the prompt text"),),
    ),
    CacheFile(
        "records/<id>.json", "the clip's manifest line; written last, so it marks the clip done", keys=MANIFEST_KEYS
    ),
    CacheFile(FAILURE_FILE, "why a clip or an entry that fits no layout could not be used", keys=FAILURE_KEYS),
    CacheFile(
        "build_config.json",
        "the settings the cache was built with; a run with other ones is refused",
        keys=BUILD_CONFIG_KEYS,
    ),
    CacheFile(MANIFEST_FILE, "the records, one JSON object per line, in clip id order", keys=MANIFEST_KEYS),
    CacheFile(PROMPTS_FILE, "one caption per manifest line (without ' POINTMAP_STYLE.', as the reference writes it)"),
    CacheFile(VIDEOS_FILE, "one video path (relative to the cache) per manifest line"),
    CacheFile(FAILURES_FILE, "every failure record, one per line, in id order", keys=FAILURE_KEYS),
    CacheFile(STATS_FILE, "statistics of the xyz latents, and the build config", keys=STATS_KEYS),
)
#: The per-clip files by their key in a record's ``files``.
CLIP_FILES: dict[str, CacheFile] = {f.key: f for f in FILES if f.key}


def describe() -> str:
    """The cache layout as text: every file with its content, tensors, metadata and keys."""
    lines = []
    for f in FILES:
        lines += textwrap.wrap(f.content, 116, initial_indent=f"    {f.path:<32} ", subsequent_indent=" " * 37)
        for t in f.tensors:
            text = f"{t.name} {t.shape} {t.dtype}: {t.meaning}"
            lines += textwrap.wrap(text, 114, initial_indent=" " * 39, subsequent_indent=" " * 41)
        if f.metadata:
            lines += textwrap.wrap("metadata: " + ", ".join(m.name for m in f.metadata), 114, initial_indent=" " * 39)
        for k in f.keys:
            lines += textwrap.wrap(f"{k.name}: {k.meaning}", 114, initial_indent=" " * 39, subsequent_indent=" " * 41)
    return "\n".join(lines)


def markdown_table() -> str:
    """The cache layout as the README's markdown table: one row per file."""
    rows = ["| file | content |", "|---|---|"]
    for f in FILES:
        parts = [f.content]
        parts += [f"`{t.name}` {t.shape} {t.dtype}: {t.meaning}" for t in f.tensors]
        if f.metadata:
            parts.append("metadata " + ", ".join(f"`{m.name}`" for m in f.metadata))
        if f.keys:
            parts.append("keys " + ", ".join(f"`{k.name}`" for k in f.keys))
        rows.append(f"| `{f.path}` | " + "; ".join(parts).replace("|", "\\|") + " |")
    return "\n".join(rows)


__doc__ = (__doc__ or "") + "\nLayout (:data:`FILES`)::\n\n" + describe() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Writers (the build)


def prompt_hash(prompt: str) -> str:
    """The sha256 (hex) of a prompt's UTF-8 text: the name of its embedding file."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def clip_files(clip_id: str, prompt: str) -> dict[str, str]:
    """Every cached file of a clip by its key, relative to the cache root."""
    return {
        key: f.path.replace("<id>", clip_id).replace("<sha256>", prompt_hash(prompt)) for key, f in CLIP_FILES.items()
    }


def record_path(out: Path, clip_id: str) -> Path:
    """Where a clip's record goes."""
    return out / RECORD_FILE.replace("<id>", clip_id)


def failure_path(out: Path, clip_id: str) -> Path:
    """Where a clip's failure record goes."""
    return out / FAILURE_FILE.replace("<id>", clip_id)


def write_clip_media(out: Path, clip: PreparedClip, files: dict[str, str]) -> None:
    """The video, first frame, pointmap (with its normalization) and pointmap preview of a prepared clip."""
    for key in ("video", "first_frame", "pointmap", "pointmap_preview"):
        (out / files[key]).parent.mkdir(parents=True, exist_ok=True)
    write_video(out / files["video"], clip.rgb)
    write_png(out / files["first_frame"], clip.rgb[0])
    preview = ((clip.pointmap + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    write_video(out / files["pointmap_preview"], preview)
    write_safetensors(
        out / files["pointmap"],
        {
            "pointmap": torch.from_numpy(clip.pointmap).half(),
            "center": torch.from_numpy(clip.center),
            "scale": torch.tensor(clip.scale, dtype=torch.float64),
            "half_range": torch.from_numpy(clip.half_range),
            "cam2world0": torch.from_numpy(clip.cam2world[0]),
            "cam2world": torch.from_numpy(clip.cam2world),
            "intrinsics": torch.from_numpy(clip.intrinsics),
            "frame_indices": torch.from_numpy(clip.frame_indices),
        },
        {
            "frame": "first camera, OpenCV axes",
            "intrinsics_source": clip.intrinsics_source,
            "center": clip.center_mode,
            "clipping": clip.center_mode,
        },
    )


def write_latents(out: Path, files: dict[str, str], latents: dict[str, torch.Tensor], config: dict) -> None:
    """A clip's ``rgb``, ``xyz`` ``(16, T, h, w)``, ``cond`` ``(16, Tc, h, 2w)`` and ``cond_rgb`` ``(16, Tc, h, w)``
    latents, as float32."""
    write_safetensors(
        out / files["latents"],
        {key: latents[key].float() for key in LATENT_KEYS},
        {
            "num_frames": str(config["num_frames"]),
            "cond_num_frames": str(config["cond_num_frames"]),
            "cond_layout": "rgbxyz",
            "normalization": "VAE latents_mean/latents_std; xyz not XYZ-normalized",
        },
    )


def write_clip_embeds(out: Path, files: dict[str, str], embeds: torch.Tensor) -> None:
    """A clip's CLIP image embedding ``(257, D)``."""
    write_safetensors(out / files["clip"], {"clip_embeds": embeds})


def write_prompt_embeds(out: Path, files: dict[str, str], prompt: str, embeds: torch.Tensor) -> None:
    """The UMT5 embedding ``(512, D)`` of ``prompt`` (caption + suffix), under the name of its hash."""
    write_safetensors(out / files["prompt"], {"prompt_embeds": embeds}, {"prompt": prompt})


def xyz_sums(xyz: torch.Tensor) -> dict:
    """Sums for the dataset statistics of one xyz latent ``(16, T, h, w)``, in float64."""
    z = xyz.double()
    return {
        "count": int(z.numel()),
        "sum": float(z.sum()),
        "sumsq": float((z * z).sum()),
        "channel_count": int(z[0].numel()),
        "channel_sum": z.sum(dim=(1, 2, 3)).tolist(),
        "channel_sumsq": (z * z).sum(dim=(1, 2, 3)).tolist(),
    }


def clip_record(clip: PreparedClip, files: dict[str, str], latents: dict[str, torch.Tensor], config: dict) -> dict:
    """The manifest line of a finished clip (keys: :data:`MANIFEST_KEYS`)."""
    source = clip.source
    return {
        "id": source.id,
        "kind": source.kind,
        "subset": source.subset,
        "layout": source.layout,
        "format": source.format,
        "number": clip.number,
        "caption": clip.caption,
        "prompt": clip.prompt,
        "prompt_sha256": prompt_hash(clip.prompt),
        "rgb_source": source.rgb,
        "rgb_start": source.start,
        "source_frames": clip.source_frames,
        "num_frames": config["num_frames"],
        "cond_num_frames": config["cond_num_frames"],
        "height": config["resolution_h"],
        "width": config["resolution_w"],
        "reader": clip.reader,
        "intrinsics_source": clip.intrinsics_source,
        "files": files,
        "latent_shape": list(latents["rgb"].shape),
        "normalization": {
            "center": clip.center.tolist(),
            "scale": clip.scale,
            "cam2world0": clip.cam2world[0].tolist(),
            "K0": clip.intrinsics[0].tolist(),
        },
        "xyz_latent_sums": xyz_sums(latents["xyz"]),
    }


def write_record(out: Path, record: dict) -> None:
    """Mark a clip done: its record, written after every file it names; a failure recorded before is removed."""
    path = record_path(out, record["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    failure_path(out, record["id"]).unlink(missing_ok=True)


def write_failure(out: Path, source: ClipSource, reason: str) -> None:
    """Record why a clip (or an entry that fits no layout) could not be used (keys: :data:`FAILURE_KEYS`)."""
    path = failure_path(out, source.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"id": source.id, "format": source.format, "layout": source.layout, "reason": reason})


def has_failed(out: Path, clip_id: str) -> bool:
    """Whether a clip has a failure record."""
    return failure_path(out, clip_id).is_file()


def is_done(out: Path, clip_id: str) -> bool:
    """Whether a clip's record and every file it names exist (files are written atomically, the record last)."""
    path = record_path(out, clip_id)
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    return all((out / p).is_file() for p in record["files"].values())


def check_build_config(out: Path, config: dict) -> None:
    """Write build_config.json, or refuse a cache that was built with other settings."""
    path = out / BUILD_CONFIG_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != config:
            diff = {k: (old.get(k), config.get(k)) for k in {*old, *config} if old.get(k) != config.get(k)}
            raise UsageError(f"{out} was built with other settings (cached, requested): {diff}; use another --out")
    else:
        write_json(path, config)


def read_build_config(out: str | Path) -> dict:
    """build_config.json of a cache; UsageError if nothing was built there."""
    path = Path(out) / BUILD_CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{out} holds no {BUILD_CONFIG_FILE}: nothing was built there")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Reader (training)


class CacheError(FourDNeXError, ValueError):
    """A cache that cannot be trained on; the message names the file and what is wrong with it."""


@dataclass
class CacheStats:
    """What ``stats.json`` says about the whole cache."""

    xyz_latent_mean: float
    xyz_latent_std: float
    height: int  # per modality, pixels
    width: int
    num_frames: int  # video frames of the cached RGB / XYZ latents
    cond_num_frames: int  # video frames the cached condition covers
    model_path: str | None = None
    #: the pointmap centring, "clip" or "per_frame" (caches that do not record it were centred per frame)
    center: str = "per_frame"


@dataclass
class CachedSample:
    """One training sample (``T`` latent frames of a ``h x w'`` latent grid: ``w' = 2w`` fused, ``w`` for RGB alone).

    The condition latent is either read from the cache (``cond``) or still to be encoded from ``cond_video``, which
    the trainer encodes for a whole batch at once (:class:`fourdnex.train.data.VaeConditionEncoder`): exactly one
    of them is set.
    """

    x0: torch.Tensor  # (16, T, h, w') clean latent: RGB | XYZ-normalized XYZ, or RGB alone
    mask: torch.Tensor  # (4, T, h, w') the condition mask of the given frames
    cond: torch.Tensor | None  # (16, T, h, w') the condition latent, when the cache holds it
    cond_video: torch.Tensor | None  # (3, F, H, W') the condition video to encode otherwise, in [-1, 1]
    prompt_embeds: torch.Tensor  # (L, text_dim)
    image_embeds: torch.Tensor  # (257, image_dim)
    clip_id: str


def _load(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read the named tensors of one safetensors file; a missing or unreadable file or key is a CacheError."""
    if not path.is_file():
        raise CacheError(f"{path}: missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CacheError(f"{path}: unreadable ({err})") from err
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise CacheError(f"{path}: has no tensor {missing[0]!r} (holds {sorted(tensors)})")
    return {key: tensors[key] for key in keys}


def read_stats(cache_dir: str | Path) -> CacheStats:
    """Read ``stats.json`` of a cache; raise CacheError naming the file if it is missing or incomplete."""
    path = Path(cache_dir) / STATS_FILE
    if not Path(cache_dir).is_dir():
        raise CacheError(f"cache folder {cache_dir} does not exist (build it with build_wan_dataset.py)")
    if not path.is_file():
        raise CacheError(f"{path}: missing (the XYZ latent statistics and sizes of the cache)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("xyz_latent_mean") is None:
            raise CacheError(f"{path}: holds no XYZ latent statistics (a cache without clips?)")
        return CacheStats(
            xyz_latent_mean=float(raw["xyz_latent_mean"]),
            xyz_latent_std=float(raw["xyz_latent_std"]),
            height=int(raw["resolution_h"]),
            width=int(raw["resolution_w"]),
            num_frames=int(raw["num_frames"]),
            cond_num_frames=int(raw.get("cond_num_frames") or raw["num_frames"]),
            model_path=raw.get("model_path"),
            center=raw.get("center", "per_frame"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CacheError):
            raise
        raise CacheError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def read_cached_frames(path: Path, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` of a cached video ``(n, H, W, 3)`` uint8; CacheError naming the file where they cannot be
    read (a function of its own, so that worker processes can run it)."""
    import av

    try:
        return read_video(path, indices)
    except (av.FFmpegError, ValueError, FileNotFoundError) as err:
        raise CacheError(f"{path}: cannot read frames {indices} of the condition ({err})") from err


class LatentCache:
    """The clips of a cache as training samples of ``num_latent_frames`` latent frames: fused
    (``modalities="rgbxyz"``) or the RGB half alone (``"rgb"``, plain image-to-video).

    Construction checks the cache against the training settings (sizes, frame count) and reads the manifest;
    :meth:`sample` reads one clip and raises CacheError with the file's path if anything about it is wrong.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        num_latent_frames: int,
        height: int,
        width: int,
        modalities: Modalities = "rgbxyz",
    ) -> None:
        self.root = Path(cache_dir)
        self.stats = read_stats(self.root)
        if (self.stats.height, self.stats.width) != (height, width):
            raise CacheError(
                f"{self.root / STATS_FILE}: the cache was built at {self.stats.height}x{self.stats.width} per modality,"
                f" training asks for {height}x{width}"
            )
        cached_latent_frames = latent_frames(self.stats.num_frames)
        if num_latent_frames > cached_latent_frames:
            raise CacheError(
                f"{self.root / STATS_FILE}: the cache holds {self.stats.num_frames} frames ({cached_latent_frames}"
                f" latent), training asks for {(num_latent_frames - 1) * 4 + 1}"
            )
        if self.stats.xyz_latent_std <= 0:
            raise CacheError(
                f"{self.root / STATS_FILE}: xyz_latent_std must be positive, got {self.stats.xyz_latent_std}"
            )
        self.num_latent_frames = num_latent_frames
        self.modalities = modalities
        self.latent_shape = (num_latent_frames, height // 8, width // 8)  # per modality
        self.items = self._read_manifest()
        #: the cached condition of the modalities (``cond``: [first frame | plane], ``cond_rgb``: the first frame, then
        #: zeros) serves image samples if the cache holds it and it covers the training length; every other
        #: condition is encoded from the clip's frames
        self.condition_key = "cond" if modalities == "rgbxyz" else "cond_rgb"
        self.cached_condition = latent_frames(self.stats.cond_num_frames) >= num_latent_frames and (
            modalities == "rgbxyz" or self._holds(self.items[0]["files"]["latents"], self.condition_key)
        )

    def _holds(self, relative: str, key: str) -> bool:
        """Whether the safetensors file at ``relative`` holds a tensor named ``key``."""
        path = self.root / relative
        try:
            with safe_open(path, "pt") as f:
                names = f.keys()
        except (SafetensorError, OSError) as err:
            raise CacheError(f"{path}: unreadable ({err})") from err
        return key in names

    def _read_manifest(self) -> list[dict]:
        """The manifest's clips (id and the files training reads); a bad line is named."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            raise CacheError(f"{path}: missing (the list of cached clips)")
        items = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                missing = [k for k in ("latents", "clip", "prompt", "first_frame", "video") if k not in item["files"]]
            except json.JSONDecodeError as err:
                raise CacheError(f"{path}:{line_no}: not JSON ({err})") from err
            except (KeyError, TypeError):
                raise CacheError(f"{path}:{line_no}: no 'files' object") from None
            if missing:
                raise CacheError(f"{path}:{line_no}: no {missing[0]!r} in 'files'")
            keep = ("latents", "clip", "prompt", "first_frame", "video")  # a large manifest: hold only what is read
            items.append({"id": item.get("id", line_no), "files": {k: item["files"][k] for k in keep}})
        if not items:
            raise CacheError(f"{path}: lists no clips")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int, given: torch.Tensor | None = None) -> CachedSample:
        """Read clip ``index`` as a :class:`CachedSample` (float32) conditioned on the pixel frames ``given``
        ``(F,)`` bool (default: frame 0 alone, image-to-4D)."""
        item = self.items[index]
        files = item["files"]
        latents_path = self.root / files["latents"]
        frames, h, w = self.latent_shape
        if given is None:
            given = torch.zeros(video_frames(frames), dtype=torch.bool)
            given[0] = True
        image_task = bool(given[0]) and not given[1:].any()
        from_cache = self.cached_condition and image_task
        cond_key = self.condition_key
        latents = _load(latents_path, ("rgb", "xyz", cond_key) if from_cache else ("rgb", "xyz"))
        expected = {"rgb": (16, h, w), "xyz": (16, h, w), "cond": (16, h, 2 * w), "cond_rgb": (16, h, w)}
        for key, tensor in latents.items():
            channels, hh, ww = expected[key]
            shape = tuple(tensor.shape)
            if len(shape) != 4 or shape[0] != channels or shape[2:] != (hh, ww) or shape[1] < frames:
                raise CacheError(
                    f"{latents_path}: {key} has shape {shape}, expected ({channels}, >={frames}, {hh}, {ww})"
                )
        rgb = latents["rgb"][:, :frames].float()
        if self.modalities == "rgbxyz":
            stats = self.stats
            xyz = normalize_xyz(latents["xyz"][:, :frames].float(), stats.xyz_latent_mean, stats.xyz_latent_std)
            x0 = fuse_width(rgb, xyz)  # (16, T, h, 2w)
        else:
            x0 = rgb  # (16, T, h, w)
        mask = condition_mask(given[None], h, x0.shape[-1], self.modalities)[0]  # (4, T, h, w')
        cond = latents[cond_key][:, :frames].float() if from_cache else None
        cond_video = None if from_cache else self._condition_video(index, given)
        prompt = _load(self.root / files["prompt"], ("prompt_embeds",))["prompt_embeds"].float()
        image = _load(self.root / files["clip"], ("clip_embeds",))["clip_embeds"].float()
        for name, tensor, path in (("prompt_embeds", prompt, files["prompt"]), ("clip_embeds", image, files["clip"])):
            if tensor.ndim != 2:
                raise CacheError(f"{self.root / path}: {name} has shape {tuple(tensor.shape)}, expected (tokens, dim)")
        if not (torch.isfinite(x0).all() and (cond is None or torch.isfinite(cond).all())):
            raise CacheError(f"{latents_path}: holds NaN or infinite values")
        return CachedSample(x0, mask, cond, cond_video, prompt, image, str(item["id"]))

    def first_frame(self, index: int) -> np.ndarray:
        """The cached first frame of clip ``index`` (a lossless PNG), ``(1, H, W, 3)`` uint8."""
        from PIL import Image

        path = self.root / self.items[index]["files"]["first_frame"]
        if not path.is_file():
            raise CacheError(f"{path}: missing (needed to encode the condition)")
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))[None]

    def video_path(self, index: int) -> Path:
        """Clip ``index``'s cached video."""
        return self.root / self.items[index]["files"]["video"]

    def frames(self, index: int, indices: list[int] | None = None) -> np.ndarray:
        """Frames ``indices`` (default: the first ``video_frames(num_latent_frames)``) of clip ``index``'s cached
        video, ``(n, H, W, 3)`` uint8."""
        indices = list(range(video_frames(self.num_latent_frames))) if indices is None else indices
        return read_cached_frames(self.video_path(index), indices)

    def _condition_video(self, index: int, given: torch.Tensor) -> torch.Tensor:
        """The condition video ``(3, F, H, W')`` of the given frames: the cached first frame (a lossless PNG) when it
        is the only one, else the given frames of the cached video."""
        indices = given.nonzero()[:, 0].tolist()
        pixels = self.first_frame(index) if indices == [0] else self.frames(index, indices)
        video = torch.zeros(3, len(given), *pixels.shape[1:3])
        video[:, given] = video_pixels(torch.from_numpy(pixels))
        return condition_frames(video[None], given[None], self.modalities)[0]


def main(args) -> None:
    """Print the layout (or the README's table)."""
    print(markdown_table() if args.markdown else describe())


def build_parser():
    """The command line of ``python -m fourdnex.data.cache``."""
    import argparse

    parser = argparse.ArgumentParser(prog="fourdnex.data.cache", description="Print the training cache's layout.")
    parser.add_argument("--markdown", action="store_true", help="as the README's table")
    return parser


if __name__ == "__main__":
    from fourdnex.cli import run

    run(main, build_parser())
