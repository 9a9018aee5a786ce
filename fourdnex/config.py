"""Every default and named preset of fourdnex, in one place.

The preset keys are the command-line choices (``--type``, ``--mode``); the dataclass defaults reproduce the
4DNeX paper's inference settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fourdnex.errors import UsageError

#: Appended to every caption, at training and at inference.
PROMPT_SUFFIX = " POINTMAP_STYLE."
#: Default XYZ latent statistics (after the VAE's own normalization), used when an adapter carries none.
XYZ_LATENT_MEAN = -0.13
XYZ_LATENT_STD = 1.70
#: The pixel area one modality is generated at (480 x 720); other aspect ratios keep this area.
DEFAULT_AREA = 480 * 720
#: Where inference looks for the base model unless told otherwise.
DEFAULT_MODEL_PATH = "./pretrained/Wan2.1-I2V-14B-480P-Diffusers"
BASE_MODEL_ID = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
#: Where the released LoRA targets live inside every transformer block.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The attention backend fourdnex registers with diffusers: FlashAttention-4 (fourdnex.model.attention), optional.
FLASH_4_BACKEND = "flash_4"
#: The attention backends whose self-attention kernel training can keep and replay (PyTorch SDPA kernels, and
#: FlashAttention-4, whose forward returns the log-sum-exp its backward takes).
REPLAYABLE_ATTENTION_BACKENDS = ("native", "_native_flash", "_native_cudnn", FLASH_4_BACKEND)

Layout = Literal["rgb", "xyz", "rgbxyz"]

#: The Wan VAE folds 4 video frames into one latent frame (after the first) and 8x8 pixels into one latent pixel; the
#: transformer's patches are 2x2 latent pixels, so a side must be a multiple of 16 pixels.
TEMPORAL_FACTOR = 4
SIZE_MULTIPLE = 16


def latent_frames(num_frames: int) -> int:
    """Latent frames of a ``num_frames`` video: ``(F - 1) / 4 + 1``."""
    return (num_frames - 1) // TEMPORAL_FACTOR + 1


def video_frames(num_latent_frames: int) -> int:
    """Video frames of ``T`` latent frames: ``4 (T - 1) + 1``."""
    return TEMPORAL_FACTOR * (num_latent_frames - 1) + 1


def check_video_shape(num_frames: int | None = None, height: int | None = None, width: int | None = None, **named):
    """Raise UsageError naming the first value a Wan model cannot take: frame counts must be 4k+1, sides positive
    multiples of 16. ``named`` checks more values under their own names: a ``*frames`` name as a frame count,
    anything else as a side (``check_video_shape(resolution_h=480, cond_num_frames=49)``); None skips a value."""
    values = {"num_frames": num_frames, "height": height, "width": width, **named}
    for name, value in values.items():
        if value is None:
            continue
        if name.endswith("frames"):
            if value < 1 or (value - 1) % TEMPORAL_FACTOR:
                raise UsageError(f"{name} must be 4k+1 (e.g. 49 or 81), got {value}")
        elif value <= 0 or value % SIZE_MULTIPLE:
            raise UsageError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")


@dataclass(frozen=True)
class ModelType:
    """Which of the 4DNeX adaptations the transformer uses."""

    domain_embedding: bool
    shared_rope: bool


#: ``--type`` choices: width-wise fusion always; domain embedding and shared RoPE as named.
MODEL_TYPES: dict[str, ModelType] = {
    "i2vwbw-demb-samerope": ModelType(domain_embedding=True, shared_rope=True),
    "i2vwbw-demb": ModelType(domain_embedding=True, shared_rope=False),
    "i2vwbw-samerope": ModelType(domain_embedding=False, shared_rope=True),
    "i2vwbw": ModelType(domain_embedding=False, shared_rope=False),
}
DEFAULT_MODEL_TYPE = "i2vwbw-demb-samerope"

#: ``--mode`` choices: the layout of the generated frame.
MODES: dict[str, Layout] = {"xyzrgb": "rgbxyz", "xyz": "xyz"}


@dataclass
class SampleConfig:
    """Sampling settings; the defaults are the reference's."""

    num_frames: int = 49
    height: int | None = None  # per modality; None: from the image's aspect ratio at DEFAULT_AREA
    width: int | None = None
    steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    seed: int = 42

    def validate(self) -> None:
        """Raise UsageError naming the first setting a Wan model cannot sample."""
        check_video_shape(self.num_frames, self.height, self.width)
        if self.steps < 1:
            raise UsageError(f"steps must be at least 1, got {self.steps}")


def size_for_aspect(image_height: int, image_width: int, area: int = DEFAULT_AREA) -> tuple[int, int]:
    """Per-modality (height, width) of the reference's rule: keep ``area`` and the image's aspect, multiples of 16."""
    height = round(math.sqrt(area * image_height / image_width)) // 16 * 16
    width = round(math.sqrt(area * image_width / image_height)) // 16 * 16
    return height, width


@dataclass
class RegistrationConfig:
    """Settings of the camera/depth fit to a pointmap video (fourdnex.geometry.registration).

    pm_registration.py's flags.
    """

    shared_intrinsics: bool = True  # one K for the clip; False: one K per frame
    iterations: int = 10  # Levenberg-Marquardt steps of the joint refinement (it stops earlier once converged)
    samples: int = 4096  # pixels per frame the fit uses (a jittered grid); every pixel gets a depth and a residual
    init_samples: int = 2048  # of those, pixels per frame for the closed-form initialization (at most all)
    huber: float = 2.0  # robust loss threshold, in robust standard deviations of the residual
    planar_threshold: float = 0.02  # frames whose points are this flat (spread across / along) skip the DLT
    default_focal: float = 1.2  # focal length in widths where nothing fixes it (every frame planar): the reference's
    seed: int = 0

    def validate(self) -> None:
        """Raise UsageError naming the first setting the fit cannot use."""
        if self.iterations < 0:
            raise UsageError(f"iterations must be >= 0, got {self.iterations}")
        if min(self.samples, self.init_samples) < 12:
            raise UsageError(f"samples and init_samples must be >= 12, got {self.samples} and {self.init_samples}")
        if self.huber <= 0:
            raise UsageError(f"huber must be positive, got {self.huber}")


#: ``--memory`` choices, from the fastest (everything resident on the GPU) to the most frugal.
MEMORY_MODES = ("none", "model", "group", "sequential")
#: ``--cache`` choices: approximate speedups that skip transformer work ("fbc": diffusers' First Block Cache).
CACHE_MODES = ("none", "fbc")
#: ``--cp`` choices: diffusers' context parallelism over the processes of a torchrun launch.
CP_MODES = ("none", "ulysses", "ring")


@dataclass
class AccelerationConfig:
    """How to run the pipeline fast or in little memory; ``"auto"`` fields are resolved for the device at hand.

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


@dataclass(frozen=True)
class CameraPath:
    """A novel-view camera path relative to a registration's cameras (fourdnex.geometry.paths); render.py's
    ``--path`` and its flags. Each move grows linearly from nothing at the first frame to its full size at the last.
    """

    kind: str  # one of CAMERA_PATHS
    angle: float = 0.0  # degrees about the scene centre: orbit's turn (positive: to the right); spiral's radius
    turns: float = 0.0  # spiral: turns around the input view over the clip, counter-clockwise on screen
    distance: float = 0.0  # dolly: travel along the first camera's axis in scene depths (positive: forward)


#: ``--path`` choices and their defaults: moves with clear parallax that leave most of the view covered by points (on
#: bench/bench_render.py's scene 75 % of the pixels for the orbit, 89 % for the spiral, 93 % for the dolly, averaged
#: over 49 frames); the dolly ends halfway to the scene centre.
CAMERA_PATHS: dict[str, CameraPath] = {
    "orbit": CameraPath("orbit", angle=30.0),
    "spiral": CameraPath("spiral", angle=10.0, turns=2.0),
    "dolly": CameraPath("dolly", distance=0.5),
    "fixed": CameraPath("fixed"),
}
#: The CameraPath fields each kind of path uses (the rest must stay unset).
PATH_PARAMETERS: dict[str, tuple[str, ...]] = {
    "orbit": ("angle",),
    "spiral": ("angle", "turns"),
    "dolly": ("distance",),
    "fixed": (),
}
