"""Every fine-tuning setting in one typed dataclass, and the checks that run before anything is loaded.

The defaults reproduce the 4DNeX paper and reference where they say; ``finetune.py``'s flags are these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from fourdnex.config import (
    DEFAULT_MODEL_TYPE,
    FLASH_4_BACKEND,
    MODEL_TYPES,
    SIZE_MULTIPLE,
    check_video_shape,
    latent_frames,
)
from fourdnex.data.raycast import TEXTURE_FAMILIES
from fourdnex.errors import FourDNeXError

#: Where the released LoRA targets live inside every transformer block.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The attention backends whose self-attention kernel training can keep and replay (PyTorch SDPA kernels, and
#: FlashAttention-4, whose forward returns the log-sum-exp its backward takes).
REPLAYABLE_ATTENTION_BACKENDS = ("native", "_native_flash", "_native_cudnn", FLASH_4_BACKEND)
#: The attention backend training picks for the machine: FlashAttention-4 on a Hopper GPU where it is installed (one
#: real-size step 1.11x cuDNN's at the same memory, BENCHMARKS.md), else diffusers' default, native SDPA; every
#: outcome is replayable.
AUTO_ATTENTION_BACKEND = "auto"
#: Steps between two reads of a trainer's logged numbers from the device (finetune.py's and the VAE's: each read
#: waits for the queued steps to finish).
METRICS_READ_STEPS = 50

TimestepSampling = Literal["uniform", "shifted"]
LrSchedule = Literal["cosine", "constant"]
#: What gradient checkpointing keeps of each block (fourdnex.train.memory_policy): ``recompute`` keeps the block
#: inputs only (diffusers' own checkpointing); ``attention`` also every block's self-attention output;
#: ``attention+ffn`` also every block's feed-forward pre-activation; ``auto`` picks one for the machine.
ActivationMemory = Literal["auto", "recompute", "attention", "attention+ffn"]
#: ``lora``: LoRA + domain embedding on a frozen base (4DNeX); ``full``: every transformer weight (a base model).
TrainMode = Literal["lora", "full"]
#: What a sample's latent holds (``fourdnex.config.Modalities``): RGB | XYZ side by side (4DNeX), or the RGB video
#: alone (plain image-to-video).
TrainModalities = Literal["rgbxyz", "rgb"]
#: The dtypes training computes in (``--mixed_precision``, which also takes accelerate's spellings bf16 and no).
TrainPrecision = Literal["bfloat16", "float32"]
#: ``--condition_tasks`` presets: the share of samples conditioned on each kind of given RGB frames. ``image``: the
#: first frame (the paper); ``any``: also the first and the last frame, a few random keyframes (frame 0 and 2-4
#: others), or every frame (4D reconstruction of a video).
CONDITION_TASKS: dict[str, dict[str, float]] = {
    "image": {"image": 1.0},
    "any": {"image": 0.4, "first_last": 0.2, "keyframes": 0.2, "video": 0.2},
}
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)
TRAIN_MODALITIES: tuple[str, ...] = get_args(TrainModalities)
TRAIN_PRECISIONS: tuple[str, ...] = get_args(TrainPrecision)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
ACTIVATION_MEMORY_CHOICES: tuple[str, ...] = get_args(ActivationMemory)


#: The synthetic clips whose XYZ latents' statistics normalize every clip of a run that trains while its clips are
#: made (``synthetic_clips_per_step``), held before its first step: 256 clips' mean and standard deviation are within
#: 0.5 % and 0.8 % of the population's (one standard error, as shares of the standard deviation; the demo model's VAE
#: at 25 x 192 x 288, BENCHMARKS.md "Training while the clips render"), and they render in about 25 s on a GPU
#: machine's CPUs.
STATS_CLIPS = 256


class TrainingError(FourDNeXError, ValueError):
    """A setting, file or checkpoint the run cannot use; the message names it."""


@dataclass
class TrainConfig:
    """Every fine-tuning setting.

    The defaults reproduce the 4DNeX paper and reference where they say (LoRA rank 64 / alpha 32 on the four attention
    projections, lr 2e-5, 49 frames at 480x720, batch 1 per GPU, bfloat16, uniform noise levels, checkpoints every 500
    steps, 2 kept); the AdamW betas, weight decay, warmup length and cosine decay are this trainer's choices.
    """

    cache_dir: str = ""
    # Or, instead of a cache: the first synthetic_clips clips of the synthetic generator's tree of synthetic_seed
    # (python -m fourdnex.data.synthetic), textured with texture_families, encoded in memory (fourdnex.train.rendered)
    synthetic_clips: int = 0
    synthetic_seed: int = 1
    # 0: every synthetic clip is held before the first step; R > 0: training starts once the first STATS_CLIPS are
    # and R more join the clips drawn from each step while the rest are made (fourdnex.train.rendered)
    synthetic_clips_per_step: float = 0.0
    texture_families: tuple[str, ...] = TEXTURE_FAMILIES
    output_dir: str = "runs/4dnex"
    model_path: str | None = None  # None: the model the cache was built with (stats.json), else DEFAULT_MODEL_PATH
    model_type: str = DEFAULT_MODEL_TYPE
    train_mode: TrainMode = "lora"
    modalities: TrainModalities = "rgbxyz"
    condition_tasks: str = "image"  # a CONDITION_TASKS key
    cache_in_memory: bool = False  # read the whole cache into host memory before the first step
    height: int = 480  # per modality
    width: int = 720
    num_frames: int = 49  # video frames; 49 -> 13 latent frames
    # LoRA on the attention projections of both attentions of every block, plus the domain embedding.
    lora_rank: int = 64
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # AdamW with linear warmup, then cosine decay to min_lr_ratio * learning_rate at max_steps (or constant).
    learning_rate: float = 2e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    lr_schedule: LrSchedule = "cosine"
    lr_warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    max_steps: int = 5000
    train_batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: TrainPrecision = "bfloat16"  # a fourdnex.runtime.DTYPES name
    gradient_checkpointing: bool = True
    activation_memory: ActivationMemory = "auto"  # what gradient checkpointing keeps (see ActivationMemory)
    # A diffusers attention backend (e.g. "_native_cudnn"), flash_4, or auto (AUTO_ATTENTION_BACKEND); None: native
    attention_backend: str | None = AUTO_ATTENTION_BACKEND
    compile_blocks: bool = False  # torch.compile each transformer block (regional compilation)
    # Flow-matching noise levels and loss.
    timestep_sampling: TimestepSampling = "uniform"
    shift: float = 3.0  # for "shifted": the inference scheduler's flow_shift
    rgb_loss_weight: float = 1.0
    xyz_loss_weight: float = 1.0
    # The XYZ half's frame-to-frame error (fourdnex.train.loss.flow_matching_loss), added with this weight; 0: off
    xyz_temporal_loss_weight: float = 0.0
    rgb_first_frame_loss: bool = True
    # Checkpoints, logs, validation.
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    logging_steps: int = 1
    validation_steps: int = 0  # 0: never
    validation_image: str | None = None
    validation_prompt: str | None = None
    validation_inference_steps: int = 30
    seed: int = 42
    deepspeed_config: str | None = None

    @property
    def num_latent_frames(self) -> int:
        """Latent frames of ``num_frames`` video frames."""
        return latent_frames(self.num_frames)

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the activations (bfloat16: 2, float32: 4)."""
        return 2 if self.mixed_precision == "bfloat16" else 4

    @property
    def tokens_per_sample(self) -> int:
        """Transformer tokens of one fused sample: latent frames x (height / 16) x (2 width / 16), 35,100 at 49x480x720
        (8x8 pixels per latent pixel, 2x2 latent pixels per patch, RGB and XYZ side by side)."""
        halves = 2 if self.modalities == "rgbxyz" else 1
        return self.num_latent_frames * (self.height // SIZE_MULTIPLE) * (halves * self.width // SIZE_MULTIPLE)

    @property
    def ffn_lora_targets(self) -> list[str]:
        """The LoRA targets inside the feed-forward (which then cannot be replayed from a kept pre-activation)."""
        return [target for target in self.lora_targets if "ffn" in target] if self.train_mode == "lora" else []

    @property
    def replays_attention(self) -> bool:
        """Whether the kept self-attention can be replayed on this run's attention backend (auto picks one that can)."""
        backend = self.attention_backend or "native"
        return backend == AUTO_ATTENTION_BACKEND or backend in REPLAYABLE_ATTENTION_BACKENDS

    @property
    def trains_feed_forward(self) -> bool:
        """Whether the feed-forward's weights are trained (full training, or LoRA on it)."""
        return self.train_mode == "full" or bool(self.ffn_lora_targets)

    def validate(self) -> None:
        """Raise TrainingError naming the first setting that cannot be trained with."""
        check_video_shape(self.num_frames, self.height, self.width)
        if self.model_type not in MODEL_TYPES:
            raise TrainingError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {self.model_type!r}")
        for name in (
            "lora_rank",
            "max_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
            "checkpoints_total_limit",
        ):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, choices in (
            ("timestep_sampling", TIMESTEP_SAMPLINGS),
            ("lr_schedule", LR_SCHEDULES),
            ("mixed_precision", TRAIN_PRECISIONS),
            ("activation_memory", ACTIVATION_MEMORY_CHOICES),
            ("train_mode", TRAIN_MODES),
            ("modalities", TRAIN_MODALITIES),
            ("condition_tasks", tuple(CONDITION_TASKS)),
        ):
            if getattr(self, name) not in choices:
                raise TrainingError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.shift <= 0:
            raise TrainingError(f"shift must be positive, got {self.shift}")
        if min(self.rgb_loss_weight, self.xyz_loss_weight) < 0 or self.rgb_loss_weight + self.xyz_loss_weight <= 0:
            raise TrainingError(
                f"loss weights must be >= 0 and not both 0, got rgb {self.rgb_loss_weight}, xyz {self.xyz_loss_weight}"
            )
        if self.xyz_temporal_loss_weight < 0:
            raise TrainingError(f"xyz_temporal_loss_weight must be >= 0, got {self.xyz_temporal_loss_weight}")
        if not self.rgb_first_frame_loss and self.num_latent_frames < 2:
            raise TrainingError("rgb_first_frame_loss=False needs at least 2 latent frames (num_frames >= 5)")
        if self.validation_steps and not (self.validation_image and self.validation_prompt):
            raise TrainingError("validation_steps needs validation_image and validation_prompt")
        if self.validation_steps and self.modalities != "rgbxyz":
            raise TrainingError("validation samples are RGB and XYZ results: validation_steps needs modalities rgbxyz")
        self.validate_activation_memory()

    def validate_data(self) -> None:
        """Raise TrainingError unless the training clips are named once: a cache, or synthetic clips."""
        if bool(self.cache_dir) == bool(self.synthetic_clips):
            raise TrainingError("give the training clips as --cache_dir or as --synthetic_clips N, one of the two")
        if self.synthetic_clips < 0:
            raise TrainingError(f"synthetic_clips must be at least 1, got {self.synthetic_clips}")
        if self.synthetic_clips_per_step < 0 or not math.isfinite(self.synthetic_clips_per_step):
            raise TrainingError(f"synthetic_clips_per_step must be 0 or more, got {self.synthetic_clips_per_step}")
        if self.synthetic_clips_per_step and not self.synthetic_clips:
            raise TrainingError(
                "--synthetic_clips_per_step needs --synthetic_clips (a cache's clips are all there from the first step)"
            )
        unknown = sorted(set(self.texture_families) - set(TEXTURE_FAMILIES))
        if unknown or not self.texture_families:
            families = ", ".join(TEXTURE_FAMILIES)
            raise TrainingError(f"texture_families must be some of {families}, got {unknown or '[]'}")

    def validate_activation_memory(self) -> None:
        """Raise TrainingError if an explicit ``activation_memory`` cannot run with the other settings (one line).

        ``auto`` never fails: it picks what can run. The DeepSpeed stage is checked where it is read
        (:func:`fourdnex.train.memory_policy.choose_activation_memory`).
        """
        setting = self.activation_memory
        if not self.gradient_checkpointing:
            if setting != "auto":
                raise TrainingError(
                    f"--activation_memory {setting} says what gradient checkpointing keeps: drop it or "
                    "--no_gradient_checkpointing"
                )
            return
        if setting in ("attention", "attention+ffn") and not self.replays_attention:
            raise TrainingError(
                f"--activation_memory {setting} replays the self-attention kernel: it needs attention_backend "
                f"{', '.join(REPLAYABLE_ATTENTION_BACKENDS)}; got {self.attention_backend!r}"
            )
        if setting == "attention+ffn" and self.trains_feed_forward:
            trained = "--train_mode full" if self.train_mode == "full" else " ".join(self.ffn_lora_targets)
            raise TrainingError(
                f"--activation_memory attention+ffn replays a frozen feed-forward, which {trained} trains: use "
                "--activation_memory attention"
            )
