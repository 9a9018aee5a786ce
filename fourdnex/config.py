"""What several subsystems share: the caption suffix, the XYZ latent statistics, where the base model is looked
for, the attention backend fourdnex adds, what a latent holds, the Wan model's video shapes, and the model types.

Each subsystem's own settings live beside it, as one dataclass whose defaults are the only defaults: generation's in
``fourdnex.generate.config``, fine-tuning's in ``fourdnex.train.config``, the cache build's in
``fourdnex.data.build``, registration's in ``fourdnex.geometry.registration``, the novel-view camera paths in
``fourdnex.geometry.paths``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fourdnex.errors import UsageError

#: Appended to every caption, at training and at inference.
PROMPT_SUFFIX = " POINTMAP_STYLE."
#: Default XYZ latent statistics (after the VAE's own normalization), used when an adapter carries none.
XYZ_LATENT_MEAN = -0.13
XYZ_LATENT_STD = 1.70
#: Where inference looks for the base model unless told otherwise.
DEFAULT_MODEL_PATH = "./pretrained/Wan2.1-I2V-14B-480P-Diffusers"
#: The attention backend fourdnex registers with diffusers: FlashAttention-4 (fourdnex.model.attention), optional.
FLASH_4_BACKEND = "flash_4"

#: What a latent holds along its width (``--modalities``): the RGB and XYZ videos side by side, RGB left (4DNeX's
#: width-wise fusion), the RGB video alone (plain image-to-video), or the XYZ video alone.
Modalities = Literal["rgbxyz", "rgb", "xyz"]
#: Other spellings command lines accept: the reference's ``xyzrgb`` (``inference.py --mode xyzrgb``).
MODALITY_ALIASES = {"xyzrgb": "rgbxyz"}

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
