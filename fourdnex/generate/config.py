"""Every setting of a generation run, in typed dataclasses whose defaults are the only defaults (inference.py's and
app.py's flags read them): the run (:class:`RunConfig`: inputs, model, adapter, device), what is sampled
(:class:`SampleConfig`, the 4DNeX paper's settings) and how fast or in how little memory (:class:`AccelerationConfig`).

Light to import (no torch), so that the scripts' parsers answer ``--help`` at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fourdnex.config import DEFAULT_MODEL_PATH, check_video_shape
from fourdnex.errors import UsageError

#: The pixel area one modality is generated at (480 x 720) where the weights record no training size; other aspect
#: ratios keep this area.
DEFAULT_AREA = 480 * 720
#: The frame count sampled where neither ``--num_frames`` nor the weights say one (the paper's).
DEFAULT_FRAMES = 49
#: ``--modalities`` choices of sampling: RGB | XYZ side by side (4DNeX), or the whole frame XYZ.
SAMPLE_MODALITIES = ("rgbxyz", "xyz")


def size_for_aspect(image_height: int, image_width: int, area: int = DEFAULT_AREA) -> tuple[int, int]:
    """Per-modality (height, width) of the reference's rule: keep ``area`` and the image's aspect, multiples of 16."""
    height = round(math.sqrt(area * image_height / image_width)) // 16 * 16
    width = round(math.sqrt(area * image_width / image_height)) // 16 * 16
    return height, width


@dataclass
class SampleConfig:
    """Sampling settings; the defaults are the reference's."""

    # None: what the weights were trained at where they record it (a fourdnex adapter or fully fine-tuned
    # transformer; settled_size), else DEFAULT_FRAMES frames of the image's aspect ratio at DEFAULT_AREA
    num_frames: int | None = None
    height: int | None = None  # per modality
    width: int | None = None
    steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    seed: int = 42
    ensemble: int = 1  # samples per line (seeds seed, seed + 1, ...): the XYZ video is their mean, the RGB the first's

    def validate(self) -> None:
        """Raise UsageError naming the first setting a Wan model cannot sample."""
        check_video_shape(self.num_frames, self.height, self.width)
        if self.steps < 1:
            raise UsageError(f"steps must be at least 1, got {self.steps}")
        if self.ensemble < 1:
            raise UsageError(f"ensemble must be at least 1, got {self.ensemble}")


def settled_size(sample: SampleConfig, trained: tuple[int, int, int] | None) -> tuple[SampleConfig, int]:
    """``sample`` with its frame count settled, and the pixel area at which each image's aspect ratio sizes the
    sample where ``sample`` gives no height and width: the training size ``trained`` (frames, height, width) that the
    weights record, else the paper's (:data:`DEFAULT_FRAMES`, :data:`DEFAULT_AREA`)."""
    frames, area = (DEFAULT_FRAMES, DEFAULT_AREA) if trained is None else (trained[0], trained[1] * trained[2])
    return dataclasses.replace(sample, num_frames=frames if sample.num_frames is None else sample.num_frames), area


#: ``--memory`` choices, from the fastest (everything resident on the GPU) to the most frugal.
MEMORY_MODES = ("none", "model", "group", "sequential")
#: ``--cache`` choices: approximate speedups that skip transformer work ("fbc": diffusers' First Block Cache).
CACHE_MODES = ("none", "fbc")
#: ``--cp`` choices: diffusers' context parallelism over the processes of a torchrun launch.
CP_MODES = ("none", "ulysses", "ring")


@dataclass
class AccelerationConfig:
    """How to run the pipeline fast or in little memory; ``"auto"`` fields are resolved for the device at hand
    (:func:`fourdnex.generate.acceleration.resolve`).

    Every field but ``fp8``, ``cache`` and VAE tiling leaves the output unchanged (up to floating-point order).
    """

    attention_backend: str = "auto"  # a diffusers AttentionBackendName value or flash_4; auto: flash_4 on Hopper
    # where flash-attn-4 is installed, else the fastest measured one (fourdnex.generate.acceleration.resolve)
    compile: bool | None = None  # regional torch.compile of the transformer blocks; None: on for a resident GPU model
    memory: str = "auto"  # one of MEMORY_MODES or "auto" (from the GPU's free memory)
    fp8: bool = False  # store the transformer's weights in float8_e4m3fn, compute in the pipeline dtype
    vae_tiling: bool | None = None  # None: tile only when memory is offloaded group-wise or sequentially
    cache: str = "none"  # one of CACHE_MODES
    cache_threshold: float = 0.05  # First Block Cache: relative change of the first block's residual to skip below
    cp: str = "none"  # one of CP_MODES

    def validate(self) -> None:
        """Raise UsageError naming the first unknown choice or bad value."""
        for name, choices in (("memory", (*MEMORY_MODES, "auto")), ("cache", CACHE_MODES), ("cp", CP_MODES)):
            if getattr(self, name) not in choices:
                raise UsageError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.cache_threshold <= 0:
            raise UsageError(f"cache_threshold must be positive, got {self.cache_threshold}")


@dataclass
class RunConfig:
    """Everything one inference run needs; ``inference.py``'s flags, one field each."""

    prompt: str  # a .txt file with one caption per line, or one caption
    image: str | None = None  # a .txt file with one image path per line (comma-separated with frames), or one path
    video: str | None = None  # a .txt file with one video path per line, or one path: its frames are the condition
    frames: tuple[int, ...] | None = None  # the given frames; None: frame 0 of images, every frame of videos
    out: str = "./results"
    idx: int = -1  # only this line; -1: every line
    model_path: str = DEFAULT_MODEL_PATH
    sft_path: str | None = None  # a fully fine-tuned transformer folder replacing the base one
    lora_path: str | None = None
    lora_rank: int | None = None  # expected rank; None: the file's
    lora_scale: float | None = None  # None: the adapter's own
    model_type: str | None = None  # a MODEL_TYPES key; None: the adapter's, else the default
    zero_domain_embedding: bool = False  # accept a released adapter folder without its domain embedding file
    modalities: str = "rgbxyz"  # one of SAMPLE_MODALITIES
    device: str = "auto"  # a fourdnex.runtime.device_of name
    dtype: str = "auto"  # of the transformer and text encoder: a fourdnex.runtime.DTYPES name, or auto
    skip_existing: bool = False
    batch_size: int = 1  # lines sampled together (consecutive lines of one size and given frames)
    sample: SampleConfig = field(default_factory=SampleConfig)
    speed: AccelerationConfig = field(default_factory=AccelerationConfig)
