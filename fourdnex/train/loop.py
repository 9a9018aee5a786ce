"""4DNeX fine-tuning: LoRA + domain embedding on the fused RGB|XYZ latent, with accelerate and DeepSpeed ZeRO.

The pieces, from the inside out:

* :func:`sample_sigmas` draws the flow-matching noise level ``s`` (uniform, shifted like inference, logit-normal);
* :func:`flow_matching_loss` is the loss on one batch: ``x_t = (1 - s) x0 + s noise``, the transformer sees
  ``cat([x_t, soft mask, condition latent])`` (16 + 4 + 16 channels, exactly as at inference) and the timestep
  ``1000 s``, and is trained to predict ``noise - x0``;
* :class:`Trainer` owns the DeepSpeed engine: one optimizer step over a list of micro-batches, checkpoints that
  resume bit for bit, and the inference-ready adapter (gathered under ZeRO-3);
* :func:`train` is the loop ``finetune.py`` runs.

Randomness is a pure function of (seed, global sample position): which clip, its noise and its ``s`` depend only on
where a sample sits in the run's sample stream, so a resumed run, or the same global batch split over another
number of processes, sees exactly the same samples.

The loss covers the whole fused latent by default, as the reference and Wan's own I2V training do: the first RGB
latent frame is given as the condition, but the pipeline still denoises and decodes it, so the model must reproduce
it; ``rgb_first_frame_loss=False`` leaves it out. The XYZ half of the first frame is only hinted (sloped plane) and
always stays in the loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from fourdnex.config import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_MODEL_PATH,
    DEFAULT_MODEL_TYPE,
    MODEL_TYPES,
    REPLAYABLE_ATTENTION_BACKENDS,
    check_video_shape,
    latent_frames,
)
from fourdnex.data.cache import LatentCache, Sample, VaeConditionEncoder
from fourdnex.errors import FourDNeXError
from fourdnex.files import write_json
from fourdnex.model.fusion import split_width
from fourdnex.train.checkpoints import (
    CHECKPOINT_PREFIX,
    DEEPSPEED_TAG,
    DOMAIN_PARAMETER,
    LORA_ADAPTER_NAME,
    TRAINER_STATE_FILE,
    list_checkpoints,
    resolve_checkpoint,
)

if TYPE_CHECKING:  # the model and adapter modules import diffusers and peft: loaded when used
    from fourdnex.model.adapters import AdapterMeta

logger = logging.getLogger("fourdnex.train.loop")

TimestepSampling = Literal["uniform", "shifted", "logit_normal"]
LrSchedule = Literal["cosine", "linear", "constant"]
#: The DeepSpeed json used unless --deepspeed_config or an accelerate config names another.
DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "deepspeed_zero2.json"
ADAPTER_DIR = "adapter"


class TrainingError(FourDNeXError, ValueError):
    """A setting, file or checkpoint the run cannot use; the message names it."""


#: The TrainConfig fields that make gradient checkpointing run through fourdnex.train.activation_memory.
BLOCK_CHECKPOINTING_FIELDS = (
    "save_attention_blocks",
    "save_ffn_blocks",
    "offload_checkpoints",
    "offload_attention",
    "offload_ffn",
)


@dataclass
class TrainConfig:
    """Every fine-tuning setting.

    The defaults reproduce the 4DNeX paper and reference where they say (LoRA rank 64 / alpha 32 on the four attention
    projections, lr 2e-5, 49 frames at 480x720, batch 1 per GPU, bf16, uniform noise levels, checkpoints every 500
    steps, 2 kept); the AdamW betas, weight decay, warmup length and cosine decay are this trainer's choices.
    """

    cache_dir: str = ""
    output_dir: str = "runs/4dnex"
    model_path: str | None = None  # None: the model the cache was built with (stats.json), else DEFAULT_MODEL_PATH
    model_type: str = DEFAULT_MODEL_TYPE
    height: int = 480  # per modality
    width: int = 720
    num_frames: int = 49  # video frames; 49 -> 13 latent frames
    # LoRA on the attention projections of both attentions of every block, plus the domain embedding.
    lora_rank: int = 64
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # AdamW with linear warmup, then cosine or linear decay to min_lr_ratio * learning_rate at max_steps.
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
    mixed_precision: Literal["bf16", "no"] = "bf16"
    gradient_checkpointing: bool = True
    # What gradient checkpointing keeps (fourdnex.train.activation_memory): the self-attention output and the
    # feed-forward pre-activation of the first N blocks (not recomputed in the backward), and the block inputs /
    # those kept tensors parked in host memory.
    save_attention_blocks: int = 0
    save_ffn_blocks: int = 0
    offload_checkpoints: bool = False
    offload_attention: bool = False
    offload_ffn: bool = False
    attention_backend: str | None = None  # a diffusers attention backend, e.g. "_native_cudnn"; None: its default
    compile_blocks: bool = False  # torch.compile each transformer block (regional compilation)
    # Flow-matching noise levels and loss.
    timestep_sampling: TimestepSampling = "uniform"
    shift: float = 3.0  # for "shifted": the inference scheduler's flow_shift
    logit_mean: float = 0.0  # for "logit_normal"
    logit_std: float = 1.0
    rgb_loss_weight: float = 1.0
    xyz_loss_weight: float = 1.0
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

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot be trained with."""
        check_video_shape(self.num_frames, self.height, self.width)
        if self.model_type not in MODEL_TYPES:
            raise TrainingError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {self.model_type!r}")
        for name in (
            "lora_rank",
            "max_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
        ):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoints_total_limit < 1:
            raise TrainingError(f"checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}")
        if self.timestep_sampling not in ("uniform", "shifted", "logit_normal"):
            raise TrainingError(
                f"timestep_sampling must be uniform, shifted or logit_normal, got {self.timestep_sampling!r}"
            )
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise TrainingError(f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        if self.shift <= 0 or self.logit_std <= 0:
            raise TrainingError(f"shift and logit_std must be positive, got {self.shift} and {self.logit_std}")
        if min(self.rgb_loss_weight, self.xyz_loss_weight) < 0 or self.rgb_loss_weight + self.xyz_loss_weight <= 0:
            raise TrainingError(
                f"loss weights must be >= 0 and not both 0, got rgb {self.rgb_loss_weight}, xyz {self.xyz_loss_weight}"
            )
        if not self.rgb_first_frame_loss and self.num_latent_frames < 2:
            raise TrainingError("rgb_first_frame_loss=False needs at least 2 latent frames (num_frames >= 5)")
        if self.validation_steps and not (self.validation_image and self.validation_prompt):
            raise TrainingError("validation_steps needs validation_image and validation_prompt")
        if self.mixed_precision not in ("bf16", "no"):
            raise TrainingError(f"mixed_precision must be bf16 or no, got {self.mixed_precision!r}")
        self.validate_checkpointing()

    @property
    def block_checkpointing(self) -> bool:
        """True when gradient checkpointing keeps activations or parks tensors (fourdnex.train.activation_memory)."""
        return any(getattr(self, name) for name in BLOCK_CHECKPOINTING_FIELDS)

    def plain_checkpointing(self) -> TrainConfig:
        """This config with none of the :data:`BLOCK_CHECKPOINTING_FIELDS` set: plain gradient checkpointing."""
        return replace(self, **{name: type(getattr(self, name))() for name in BLOCK_CHECKPOINTING_FIELDS})

    def validate_checkpointing(self) -> None:
        """Raise TrainingError naming a gradient-checkpointing setting that cannot be used (checked before building)."""
        for name in ("save_attention_blocks", "save_ffn_blocks"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must be >= 0, got {getattr(self, name)}")
        uses = [name for name in BLOCK_CHECKPOINTING_FIELDS if getattr(self, name)]
        if uses and not self.gradient_checkpointing:
            raise TrainingError(f"{', '.join(uses)} need gradient checkpointing (drop --no_gradient_checkpointing)")
        if self.offload_attention and not self.save_attention_blocks:
            raise TrainingError("offload_attention parks kept attention outputs: it needs save_attention_blocks > 0")
        if self.offload_ffn and not self.save_ffn_blocks:
            raise TrainingError("offload_ffn parks kept feed-forward activations: it needs save_ffn_blocks > 0")
        if self.save_ffn_blocks and any("ffn" in target for target in self.lora_targets):
            raise TrainingError("save_ffn_blocks replays a frozen feed-forward: drop the ffn LoRA targets or the flag")
        if self.save_attention_blocks and (self.attention_backend or "native") not in REPLAYABLE_ATTENTION_BACKENDS:
            backends = ", ".join(REPLAYABLE_ATTENTION_BACKENDS)
            raise TrainingError(
                f"save_attention_blocks needs attention_backend {backends}; got {self.attention_backend!r}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Noise levels, learning rate, loss: pure functions.


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift inference uses: ``s' = shift s / (1 + (shift - 1) s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    n: int,
    method: TimestepSampling,
    generator: torch.Generator | None = None,
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Draw ``n`` noise levels ``s`` in (0, 1), float32 ``(n,)``.

    ``uniform``: ``s ~ U(0, 1)`` (the reference); ``shifted``: a uniform draw through :func:`shift_sigmas`, which
    spends training where the shift-3 inference schedule spends its steps (CDF ``s / (shift - (shift - 1) s)``);
    ``logit_normal``: ``sigmoid(N(logit_mean, logit_std))``.
    """
    if method == "uniform":
        return torch.rand(n, generator=generator)
    if method == "shifted":
        return shift_sigmas(torch.rand(n, generator=generator), shift)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    raise ValueError(f"unknown timestep sampling {method!r}")


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: LrSchedule, min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup, then the named decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


@dataclass
class LossWeights:
    """How the flow-matching error is averaged over the fused latent."""

    rgb: float = 1.0
    xyz: float = 1.0
    rgb_first_frame: bool = True  # include the first RGB latent frame (the known condition)


def flow_matching_loss(
    pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted MSE between the predicted velocity and ``noise - x0`` on a fused latent ``(B, 16, T, h, 2w)``.

    Each half is averaged on its own (the RGB half without its first latent frame if ``rgb_first_frame`` is False);
    the loss is ``(w_rgb * mse_rgb + w_xyz * mse_xyz) / (w_rgb + w_xyz)``, which with equal weights and the whole
    latent is the plain MSE. Returns the loss and the unweighted per-half MSEs ``{"rgb", "xyz"}`` (detached).
    """
    error = (pred.float() - (noise.float() - x0.float())).square()
    rgb, xyz = split_width(error)
    if not weights.rgb_first_frame:
        rgb = rgb[:, :, 1:]
    mse_rgb, mse_xyz = rgb.mean(), xyz.mean()
    loss = (weights.rgb * mse_rgb + weights.xyz * mse_xyz) / (weights.rgb + weights.xyz)
    return loss, {"rgb": mse_rgb.detach(), "xyz": mse_xyz.detach()}


@dataclass
class Batch:
    """One micro-batch as the loss needs it (``B`` samples of a fused ``T x h x 2w`` latent)."""

    x0: torch.Tensor  # (B, 16, T, h, 2w)
    condition: torch.Tensor  # (B, 20, T, h, 2w): soft mask + condition latent
    prompt_embeds: torch.Tensor  # (B, L, text_dim)
    image_embeds: torch.Tensor  # (B, 257, image_dim)
    noise: torch.Tensor  # (B, 16, T, h, 2w)
    sigmas: torch.Tensor  # (B,) in (0, 1)

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def transformer_inputs(batch: Batch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The keyword arguments of one transformer call, built as the inference loop builds them."""
    s = batch.sigmas.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * batch.x0 + s * batch.noise  # (B, 16, T, h, 2w)
    return {
        "hidden_states": torch.cat([x_t, batch.condition], dim=1).to(dtype),  # (B, 36, T, h, 2w)
        "timestep": batch.sigmas * 1000,  # (B,)
        "encoder_hidden_states": batch.prompt_embeds.to(dtype),
        "encoder_hidden_states_image": batch.image_embeds.to(dtype),
    }


def batch_loss(model: nn.Module, batch: Batch, weights: LossWeights, dtype: torch.dtype):
    """Run the transformer on a batch and return :func:`flow_matching_loss` of its prediction."""
    pred = model(**transformer_inputs(batch, dtype), return_dict=False)[0]  # (B, 16, T, h, 2w)
    return flow_matching_loss(pred, batch.x0, batch.noise, weights)


# --------------------------------------------------------------------------------------------------------------------
# The sample stream: which clip, noise and noise level each global sample position gets.


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at global position ``position`` of a run seeded with ``seed``."""
    return torch.Generator().manual_seed((seed << 40) + position)


def clip_index(seed: int, position: int, num_clips: int) -> int:
    """Which clip the sample at ``position`` reads: a fresh permutation of the clips every epoch."""
    epoch, offset = divmod(position, num_clips)
    order = torch.randperm(num_clips, generator=torch.Generator().manual_seed(seed + epoch))
    return int(order[offset])


def make_batch(cache: LatentCache, cfg: TrainConfig, positions: list[int]) -> Batch:
    """Read and noise the samples at the given global stream positions."""
    samples: list[Sample] = []
    noises, sigmas = [], []
    for position in positions:
        sample = cache.sample(clip_index(cfg.seed, position, len(cache)))
        generator = sample_generator(cfg.seed, position)
        sigmas.append(sample_sigmas(1, cfg.timestep_sampling, generator, cfg.shift, cfg.logit_mean, cfg.logit_std))
        noises.append(torch.randn(sample.x0.shape, generator=generator))
        samples.append(sample)
    return Batch(
        x0=torch.stack([s.x0 for s in samples]),
        condition=torch.stack([s.condition for s in samples]),
        prompt_embeds=torch.stack([s.prompt_embeds for s in samples]),
        image_embeds=torch.stack([s.image_embeds for s in samples]),
        noise=torch.stack(noises),
        sigmas=torch.cat(sigmas),
    )


def stream_positions(cfg: TrainConfig, step: int, micro: int, rank: int, world: int) -> list[int]:
    """Global positions of the samples that process ``rank`` uses in micro-step ``micro`` of optimizer step ``step``.

    A global batch of ``train_batch_size * world * gradient_accumulation_steps`` samples covers consecutive
    positions; one process with a larger batch and several with smaller ones cover the same positions.
    """
    per_step = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    first = step * per_step + (micro * world + rank) * cfg.train_batch_size
    return list(range(first, first + cfg.train_batch_size))


# --------------------------------------------------------------------------------------------------------------------
# The model.


def check_lora_targets(transformer: nn.Module, targets: tuple[str, ...]) -> None:
    """Raise ValueError naming a target that matches no linear layer of the transformer blocks."""
    names = [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise TrainingError(
                f"LoRA target {target!r} matches no linear layer of the transformer (e.g. to_q, ffn.net.2)"
            )


def build_transformer(cfg: TrainConfig, model_path: str | None = None, transformer: nn.Module | None = None):
    """The 4DNeX transformer ready for training: base frozen, LoRA + domain embedding trainable.

    Loads ``model_path``'s transformer in the training dtype unless a built ``transformer`` is given (the bench).
    """
    from peft import LoraConfig

    from fourdnex.model.loading import load_transformer

    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    if transformer is None:
        transformer = load_transformer(model_path, dtype)
    transformer.set_model_type(MODEL_TYPES[cfg.model_type])
    transformer.set_layout("rgbxyz")
    transformer.requires_grad_(False)
    check_lora_targets(transformer, cfg.lora_targets)
    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets), init_lora_weights=True
    )
    transformer.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)
    transformer.domain_embedding.requires_grad_(MODEL_TYPES[cfg.model_type].domain_embedding)
    if cfg.attention_backend:
        try:
            transformer.set_attention_backend(cfg.attention_backend)
        except (ValueError, RuntimeError) as err:
            raise TrainingError(f"attention backend {cfg.attention_backend!r}: {err}") from err
    cfg.validate_checkpointing()
    if cfg.block_checkpointing:
        from fourdnex.train.activation_memory import enable_block_checkpointing

        enable_block_checkpointing(
            transformer,
            keep_attention=cfg.save_attention_blocks,
            park_inputs=cfg.offload_checkpoints,
            park_attention=cfg.offload_attention,
            keep_ffn=cfg.save_ffn_blocks,
            park_ffn=cfg.offload_ffn,
        )
    elif cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # torch.utils.checkpoint, non-reentrant
    if cfg.compile_blocks:
        transformer.compile_repeated_blocks()
    transformer.train()
    return transformer


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimizer updates (LoRA A/B and the domain embedding), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------------------------
# Accelerate + DeepSpeed.


def ensure_distributed_env() -> None:
    """Let a plain ``python finetune.py`` run as a one-process job: set RANK/WORLD_SIZE/... unless a launcher did."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config: the json file with the trainer's batch, accumulation, clipping and precision filled in.

    The json must leave optimizer and scheduler to the trainer, so that the AdamW and learning-rate schedule built
    here are the ones applied; a json that names either is refused.
    """
    path = Path(cfg.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or DEFAULT_DEEPSPEED_CONFIG)
    if not path.is_file():
        raise TrainingError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrainingError(f"DeepSpeed config {path}: not JSON ({err})") from err
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise TrainingError(f"DeepSpeed config {path}: remove {key!r}; the trainer builds the {key} (see --help)")
    if "zero_optimization" not in config:
        raise TrainingError(f"DeepSpeed config {path}: no zero_optimization section")
    stage = config["zero_optimization"].get("stage", 0)
    if stage == 3 and cfg.block_checkpointing:
        raise TrainingError(
            f"DeepSpeed config {path} is ZeRO-3, which partitions the LoRA weights that --save_*_blocks and "
            "--offload_* differentiate block by block: use a ZeRO-2 config or drop those flags"
        )
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    config["gradient_clipping"] = cfg.max_grad_norm
    config["bf16"] = {"enabled": cfg.mixed_precision == "bf16"}
    config["fp16"] = {"enabled": False}
    config["zero_allow_untested_optimizer"] = True
    return config


def make_accelerator(cfg: TrainConfig, log_dir: Path | None = None):
    """An Accelerator running DeepSpeed with :func:`deepspeed_config` (gloo on a CPU-only machine)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    ensure_distributed_env()
    ds_config = deepspeed_config(cfg)
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard" if log_dir else None,
        project_dir=str(log_dir) if log_dir else None,
        kwargs_handlers=handlers,
    )


# --------------------------------------------------------------------------------------------------------------------
# The trainer.


@dataclass
class StepMetrics:
    """What one optimizer step reports (losses averaged over the global batch)."""

    loss: float
    loss_rgb: float
    loss_xyz: float
    lr: float
    grad_norm: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # forward / backward / optimizer, with sync_timings


class Trainer:
    """The DeepSpeed engine around a prepared transformer, its AdamW and its learning-rate schedule."""

    def __init__(self, cfg: TrainConfig, transformer: nn.Module, accelerator, meta: AdapterMeta) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.meta = meta
        self.dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        self.weights = LossWeights(cfg.rgb_loss_weight, cfg.xyz_loss_weight, cfg.rgb_first_frame_loss)
        params = list(trainable_parameters(transformer).values())
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        # The schedule is a function of the step, stepped here once per optimizer step; it is not handed to
        # accelerate (whose wrapper would step it once per process) nor to DeepSpeed.
        self.lr_factor = partial(
            lr_factor,
            warmup_steps=cfg.lr_warmup_steps,
            max_steps=cfg.max_steps,
            schedule=cfg.lr_schedule,
            min_ratio=cfg.min_lr_ratio,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        self.optimizer = optimizer
        self.engine, _ = accelerator.prepare(transformer, optimizer)
        self.zero_stage = self.engine.zero_optimization_stage()
        self.step = 0
        self.validation_components: dict | None = None  # loaded at the first validation

    @property
    def module(self) -> nn.Module:
        """The transformer inside the DeepSpeed engine."""
        return self.engine.module

    def train_step(self, micro_batches: list[Batch], sync_timings: bool = False) -> StepMetrics:
        """One optimizer step: forward and backward on each micro-batch, then clip, AdamW, schedule."""
        device = self.accelerator.device
        timings = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

        def now() -> float:
            if sync_timings and device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        lr = self.optimizer.param_groups[0]["lr"]
        totals = torch.zeros(3, device=device)
        start = now()
        for i, batch in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            tic = now()
            loss, parts = batch_loss(self.engine, batch.to(device), self.weights, self.dtype)
            tac = now()
            self.engine.backward(loss)
            toc = now()
            self.engine.step()  # the optimizer steps on the accumulation boundary only
            timings["forward"] += tac - tic
            timings["backward"] += toc - tac
            timings["optimizer"] += now() - toc
            totals += torch.stack([loss.detach(), parts["rgb"], parts["xyz"]]) / len(micro_batches)
        self.scheduler.step()
        self.step += 1
        totals = self.accelerator.reduce(totals, reduction="mean")
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        seconds = now() - start
        loss, rgb, xyz = totals.tolist()
        return StepMetrics(loss, rgb, xyz, lr, grad_norm, seconds, timings if sync_timings else {})

    def adapter_tensors(self) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """The trained LoRA tensors and domain embedding in fp32 on the CPU (main process; None elsewhere).

        They are read from the optimizer's fp32 master weights, which DeepSpeed assembles from their partitions
        under any ZeRO stage (under ZeRO-3 the parameters themselves are partitioned): every process must call.
        """
        from deepspeed.utils import safe_get_full_fp32_param
        from peft.utils import get_peft_model_state_dict

        state = {}
        for name, param in trainable_parameters(self.module).items():
            value = safe_get_full_fp32_param(param)
            if value is None:  # no low-precision copy: the parameter is its own master weight
                value = param.detach()
            state[name] = value.float().cpu()
        if not self.accelerator.is_main_process:
            return None
        domain = state.pop(DOMAIN_PARAMETER, None)
        if domain is None:  # model types without a domain embedding keep it at zero
            param = self.module.domain_embedding
            domain = torch.zeros(tuple(getattr(param, "ds_shape", param.shape)))  # ZeRO-3 keeps the full shape there
        lora = get_peft_model_state_dict(self.module, state_dict=state, adapter_name=LORA_ADAPTER_NAME)
        return lora, domain

    def save_adapter(self, path: str | Path, step: int) -> Path | None:
        """Write the inference-ready adapter (fourdnex format) to ``path``; every process must call."""
        from fourdnex.model.adapters import AdapterMeta, save_adapter

        tensors = self.adapter_tensors()
        if tensors is None:
            return None
        meta = AdapterMeta(**{**asdict(self.meta), "extra": {**self.meta.extra, "step": step}})
        return save_adapter(path, tensors[0], tensors[1], meta)

    def save_checkpoint(self, step: int) -> Path:
        """Write checkpoint ``step`` (DeepSpeed state, trainer state, adapter) atomically; keep the newest K."""
        root = Path(self.cfg.output_dir) / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
        partial_dir = root / f".{final.name}.partial"
        if self.accelerator.is_main_process:
            shutil.rmtree(partial_dir, ignore_errors=True)
            partial_dir.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.engine.save_checkpoint(str(partial_dir), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        self.save_adapter(partial_dir / ADAPTER_DIR, step)
        if self.accelerator.is_main_process:
            state = {
                "step": step,
                "lr": self.optimizer.param_groups[0]["lr"],
                "config": _jsonable(asdict(self.cfg)),
                "adapter_meta": asdict(self.meta),
                "world_size": self.accelerator.num_processes,
            }
            write_json(partial_dir / TRAINER_STATE_FILE, state)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial_dir, final)
            for old in list_checkpoints(self.cfg.output_dir)[: -self.cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> int:
        """Restore weights, optimizer state and step from a checkpoint; returns the step to continue from.

        The learning rate is the schedule of this run's settings at that step (so a resumed run may extend
        ``max_steps``); with unchanged settings the run continues exactly as if never stopped.
        """
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise TrainingError(f"{path}: no DeepSpeed state under tag {DEEPSPEED_TAG!r}")
        self.step = int(state["step"])
        self.scheduler.last_epoch = self.step
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.lr_factor(self.step)
        return self.step


def _jsonable(value):
    """Tuples to lists, everything else as is (for json)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------------------
# The loop.


def adapter_meta(cfg: TrainConfig, cache: LatentCache, model_path: str) -> AdapterMeta:
    """The metadata every adapter of this run carries."""
    from fourdnex.model.adapters import AdapterMeta

    return AdapterMeta(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        model_type=cfg.model_type,
        xyz_latent_mean=cache.stats.xyz_latent_mean,
        xyz_latent_std=cache.stats.xyz_latent_std,
        base_model=model_path,
        extra={
            "height": cfg.height,
            "width": cfg.width,
            "num_frames": cfg.num_frames,
            "timestep_sampling": cfg.timestep_sampling,
        },
    )


def train(cfg: TrainConfig) -> Path | None:
    """Fine-tune on ``cfg.cache_dir``; returns the final adapter file on the main process, None on the others."""
    from tqdm.auto import tqdm

    cfg.validate()
    cache = LatentCache(cfg.cache_dir, cfg.num_latent_frames, cfg.height, cfg.width)
    model_path = cfg.model_path or cache.stats.model_path or DEFAULT_MODEL_PATH
    if not (Path(model_path) / "transformer" / "config.json").is_file():
        raise TrainingError(f"model folder {model_path} has no transformer/config.json (pass --model_path)")
    if cfg.validation_steps and not Path(cfg.validation_image).is_file():
        raise TrainingError(f"validation image {cfg.validation_image} does not exist")
    deepspeed_config(cfg)  # refuse a bad DeepSpeed json before loading anything
    output_dir = Path(cfg.output_dir)
    resume = None
    if cfg.resume_from_checkpoint:
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir)
    torch.manual_seed(cfg.seed)
    transformer = build_transformer(cfg, model_path)
    accelerator = make_accelerator(cfg, output_dir / "logs")
    if cache.encodes_condition:
        from fourdnex.model.loading import load_vae

        logger.warning(
            "the cache's condition covers %d frames, training uses %d: encoding it from the first frame every step",
            cache.stats.cond_num_frames,
            cfg.num_frames,
        )
        cache.condition_encoder = VaeConditionEncoder(load_vae(model_path), accelerator.device)
    trainer = Trainer(cfg, transformer, accelerator, adapter_meta(cfg, cache, model_path))
    if resume is not None:
        trainer.load_checkpoint(resume)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "training %d trainable parameters on %d clips, %d processes, from step %d",
            sum(p.numel() for p in trainable_parameters(trainer.module).values()),
            len(cache),
            accelerator.num_processes,
            trainer.step,
        )
    accelerator.init_trackers("finetune", config=_tracker_config(cfg))
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc="finetune", disable=not accelerator.is_main_process)

    def read(step: int) -> list[Batch]:
        return [
            make_batch(cache, cfg, stream_positions(cfg, step, micro, rank, world))
            for micro in range(cfg.gradient_accumulation_steps)
        ]

    reader = ThreadPoolExecutor(max_workers=1)  # reads step n + 1 while step n trains
    upcoming = reader.submit(read, trainer.step)
    while trainer.step < cfg.max_steps:
        micro_batches = upcoming.result()
        if trainer.step + 1 < cfg.max_steps:
            upcoming = reader.submit(read, trainer.step + 1)
        metrics = trainer.train_step(micro_batches)
        bar.update()
        bar.set_postfix(loss=f"{metrics.loss:.4f}", lr=f"{metrics.lr:.2e}")
        if trainer.step % cfg.logging_steps == 0 or trainer.step == cfg.max_steps:
            accelerator.log(
                {
                    "loss/total": metrics.loss,
                    "loss/rgb": metrics.loss_rgb,
                    "loss/xyz": metrics.loss_xyz,
                    "lr": metrics.lr,
                    "grad_norm": metrics.grad_norm,
                    "samples_per_second": global_batch / metrics.seconds,
                },
                step=trainer.step,
            )
        if trainer.step % cfg.checkpointing_steps == 0 or trainer.step == cfg.max_steps:
            trainer.save_checkpoint(trainer.step)
        if cfg.validation_steps and trainer.step % cfg.validation_steps == 0:
            run_validation(trainer, model_path, cache, output_dir / "validation" / f"step-{trainer.step:06d}")
    bar.close()
    reader.shutdown()
    final = trainer.save_adapter(output_dir / ADAPTER_DIR, trainer.step)
    accelerator.end_training()
    return final


def _tracker_config(cfg: TrainConfig) -> dict:
    """The config as TensorBoard's hparams accept it (scalars and strings only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(cfg).items()}


def run_validation(trainer: Trainer, model_path: str, cache: LatentCache, out_dir: Path) -> None:
    """Sample one result with the current weights into ``out_dir``, written as inference.py writes its results
    (:func:`fourdnex.geometry.results.write_sample`: ``00000.npz``/``.json`` and the RGB, XYZ and side-by-side videos).

    Every process runs the sampler (under ZeRO-3 each holds a part of the weights); the main process writes.
    """
    import PIL.Image

    from fourdnex.generate.pipeline import FourDNeXPipeline
    from fourdnex.geometry.results import write_sample
    from fourdnex.model.loading import load_components

    cfg = trainer.cfg
    if trainer.validation_components is None:
        components = load_components(model_path, trainer.dtype, transformer=False)
        trainer.validation_components = {k: v for k, v in components.items() if k != "transformer"}
    components = trainer.validation_components
    pipe = FourDNeXPipeline(transformer=trainer.module, **components)
    device = trainer.accelerator.device
    for name in ("text_encoder", "image_encoder", "vae"):
        getattr(pipe, name).to(device)
    image = PIL.Image.open(cfg.validation_image).convert("RGB")
    was_training = trainer.module.training
    trainer.module.eval()
    with torch.no_grad():
        output = pipe(
            image,
            cfg.validation_prompt,
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            num_inference_steps=cfg.validation_inference_steps,
            generator=torch.Generator(device="cpu").manual_seed(cfg.seed),
            xyz_mean=cache.stats.xyz_latent_mean,
            xyz_std=cache.stats.xyz_latent_std,
        )
    trainer.module.train(was_training)
    for name in ("text_encoder", "image_encoder", "vae"):
        getattr(pipe, name).to("cpu")
    if trainer.accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"prompt": cfg.validation_prompt, "image": cfg.validation_image, "seed": cfg.seed, "step": trainer.step}
        meta["timings"] = output.timings
        write_sample(out_dir, 0, output.rgb[0].numpy(), output.xyz[0].numpy(), meta)
    trainer.accelerator.wait_for_everyone()
