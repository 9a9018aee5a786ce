"""Fine-tune Wan2.1-I2V into 4DNeX: LoRA + domain embedding on cached RGB|XYZ latents, with DeepSpeed ZeRO.

One process (CPU or one GPU) runs as is; several GPUs or nodes through accelerate (see scripts/finetune.sh):

    python finetune.py --cache_dir data/cache --output_dir runs/4dnex
    accelerate launch --config_file configs/accelerate_zero2.yaml --num_processes 8 finetune.py \\
        --cache_dir data/cache --output_dir runs/4dnex --resume_from_checkpoint latest

Every checkpoint (``OUTPUT_DIR/checkpoints/checkpoint-NNNNNN``) holds the DeepSpeed state to resume from and
``adapter/fourdnex_adapter.safetensors``, which ``inference.py --lora_path`` loads; the final adapter is written to
``OUTPUT_DIR/adapter``. ``python -m fourdnex.train.checkpoints CHECKPOINT`` re-exports an adapter from the ZeRO state.
On GPUs, ``--compile_blocks`` and the default ``--activation_memory auto`` (what the free host RAM allows) are the
fast settings (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import logging

from fourdnex.cli import aliased, run
from fourdnex.config import DEFAULT_LORA_TARGETS, MODEL_TYPES
from fourdnex.runtime import DTYPE_ALIASES, dtype_choices
from fourdnex.train.config import (
    ACTIVATION_MEMORY_CHOICES,
    CONDITION_TASKS,
    LR_SCHEDULES,
    TIMESTEP_SAMPLINGS,
    TRAIN_LAYOUTS,
    TRAIN_MODES,
    TRAIN_PRECISIONS,
    TrainConfig,
)
from fourdnex.train.loop import train


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe (every flag is a TrainConfig field of the same name)."""
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    cfg.lora_targets = tuple(cfg.lora_targets)
    return cfg


def main(args: argparse.Namespace) -> None:
    """Train with the parsed flags; a user error ends the run with one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    adapter = train(cfg)
    if adapter is not None:
        print(f"adapter: {adapter}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default comes from TrainConfig."""
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("data and model")
    g.add_argument("--cache_dir", required=True, help="latent cache written by build_wan_dataset.py")
    g.add_argument("--output_dir", default=d.output_dir, help="checkpoints, logs and the final adapter")
    g.add_argument("--model_path", default=None, help="Wan2.1-I2V diffusers folder (default: the cache's)")
    g.add_argument("--type", dest="model_type", default=d.model_type, choices=sorted(MODEL_TYPES))
    g.add_argument(
        "--train_mode",
        default=d.train_mode,
        choices=TRAIN_MODES,
        help="lora: LoRA + domain embedding on the frozen base, written as an adapter (default, 4DNeX); full: every "
        "transformer weight, written as a transformer folder for inference.py --sft_path (a base model)",
    )
    g.add_argument(
        "--layout",
        default=d.layout,
        choices=TRAIN_LAYOUTS,
        help="rgbxyz: RGB | XYZ side by side (default); rgb: the RGB video alone (plain image-to-video)",
    )
    g.add_argument(
        "--condition_tasks",
        default=d.condition_tasks,
        choices=sorted(CONDITION_TASKS),
        help="the given frames of each sample: image (frame 0, default, the paper) or any (image "  # %% for argparse
        f"{CONDITION_TASKS['any']['image']:.0%}%, first+last {CONDITION_TASKS['any']['first_last']:.0%}%, keyframes "
        f"{CONDITION_TASKS['any']['keyframes']:.0%}%, every frame {CONDITION_TASKS['any']['video']:.0%}%)",
    )
    g.add_argument(
        "--cache_in_memory",
        action="store_true",
        help="read every latent and embedding the run uses once, into stacked tensors on the training GPU (host "
        "memory where they would take more than half of its free memory; the videos too with --condition_tasks any): "
        "a step's batch is a few gathers, no file reads (about 0.5 MB per clip at 25x96x144, BENCHMARKS.md)",
    )
    g.add_argument("--height", type=int, default=d.height, help="per modality; must match the cache")
    g.add_argument("--width", type=int, default=d.width, help="per modality; must match the cache")
    g.add_argument("--num_frames", type=int, default=d.num_frames, help="first frames of each clip (4k+1)")
    g = parser.add_argument_group("adapter")
    g.add_argument("--lora_rank", type=int, default=d.lora_rank)
    g.add_argument("--lora_alpha", type=float, default=d.lora_alpha)
    g.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_LORA_TARGETS), help="linear layer names")
    g = parser.add_argument_group("optimization")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--lr_schedule", default=d.lr_schedule, choices=LR_SCHEDULES)
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--min_lr_ratio", type=float, default=d.min_lr_ratio, help="final lr / learning_rate")
    g.add_argument("--max_steps", type=int, default=d.max_steps, help="optimizer steps")
    g.add_argument("--train_batch_size", type=int, default=d.train_batch_size, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm)
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument(
        "--mixed_precision",
        default=d.mixed_precision,
        type=aliased({alias: name for alias, name in DTYPE_ALIASES.items() if name in TRAIN_PRECISIONS}),
        choices=dtype_choices(*TRAIN_PRECISIONS),
        help="the dtype the transformer computes in (default %(default)s; bf16, and no for float32, are accelerate's "
        "spellings)",
    )
    g.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    g.add_argument(
        "--activation_memory",
        default=d.activation_memory,
        choices=ACTIVATION_MEMORY_CHOICES,
        help="what gradient checkpointing keeps of each block instead of recomputing it in the backward: recompute "
        "(its input only: diffusers' gradient checkpointing), attention (also its self-attention output), "
        "attention+ffn (also its feed-forward pre-activation; not with LoRA on the feed-forward). attention and "
        "attention+ffn need ZeRO-2; on CUDA they park what they keep and the block inputs in page-locked host "
        "memory, 30 GB / 68 GB per process at 49x480x720. auto: recompute without CUDA or under ZeRO-3, else the "
        "most the free host RAM per process allows (thresholds in fourdnex/train/memory_policy.py, scaled with the "
        "tokens per step)",
    )
    g.add_argument(
        "--attention_backend",
        default=None,
        help="diffusers attention backend, e.g. _native_cudnn, or flash_4 (FlashAttention-4, an optional package for "
        "Hopper and Blackwell GPUs; see the README); default: native SDPA",
    )
    g.add_argument("--compile_blocks", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deepspeed_config", default=None, help="DeepSpeed json (default: configs/deepspeed_zero2.json)")
    g = parser.add_argument_group("loss")
    g.add_argument("--timestep_sampling", default=d.timestep_sampling, choices=TIMESTEP_SAMPLINGS)
    g.add_argument("--shift", type=float, default=d.shift, help="for shifted sampling (inference flow_shift)")
    g.add_argument("--rgb_loss_weight", type=float, default=d.rgb_loss_weight)
    g.add_argument("--xyz_loss_weight", type=float, default=d.xyz_loss_weight)
    g.add_argument(
        "--no_rgb_first_frame_loss",
        dest="rgb_first_frame_loss",
        action="store_false",
        help="leave the first RGB latent frame (the given condition) out of the loss",
    )
    g = parser.add_argument_group("checkpoints, logging, validation")
    g.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps)
    g.add_argument("--checkpoints_total_limit", type=int, default=d.checkpoints_total_limit)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--logging_steps", type=int, default=d.logging_steps)
    g.add_argument("--validation_steps", type=int, default=d.validation_steps, help="0: no validation sampling")
    g.add_argument("--validation_image", default=None)
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--validation_inference_steps", type=int, default=d.validation_inference_steps)
    return parser


if __name__ == "__main__":
    run(main, build_parser())
