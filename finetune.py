"""Fine-tune Wan2.1-I2V into 4DNeX: LoRA + domain embedding on cached RGB|XYZ latents, with DeepSpeed ZeRO.

One process (CPU or one GPU) runs as is; several GPUs or nodes through accelerate (see scripts/finetune.sh):

    python finetune.py --cache_dir data/cache --output_dir runs/4dnex
    python finetune.py --synthetic_clips 8000 --model_path MODEL --output_dir runs/demo  # generator clips, no cache
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

from fourdnex.cli import dtype_flag, field_flag, run, settings
from fourdnex.config import MODALITY_ALIASES, MODEL_TYPES
from fourdnex.data.raycast import TEXTURE_FAMILIES
from fourdnex.train.config import (
    ACTIVATION_MEMORY_CHOICES,
    CONDITION_TASKS,
    LR_SCHEDULES,
    STATS_CLIPS,
    TIMESTEP_SAMPLINGS,
    TRAIN_MODALITIES,
    TRAIN_MODES,
    TRAIN_PRECISIONS,
    TrainConfig,
)
from fourdnex.train.loop import train


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe (every flag is a TrainConfig field)."""
    return settings(
        TrainConfig, args, lora_targets=tuple(args.lora_targets), texture_families=tuple(args.texture_families)
    )


def main(args: argparse.Namespace) -> None:
    """Train with the parsed flags; a user error ends the run with one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    adapter = train(cfg)
    if adapter is not None:
        print(f"adapter: {adapter}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default is a TrainConfig field's."""
    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("data and model")
    field_flag(g, TrainConfig, "cache_dir", help="latent cache written by build_wan_dataset.py (or --synthetic_clips)")
    field_flag(
        g,
        TrainConfig,
        "synthetic_clips",
        type=int,
        help="train on the first N clips of the synthetic generator's tree instead (python -m fourdnex.data.synthetic"
        " --seed --synthetic_seed), each rendered, prepared and encoded as the cache build would, in memory: no tree,"
        " no cache, the samples held on the training device as with --cache_in_memory (needs --model_path's"
        " encoders)",
    )
    field_flag(g, TrainConfig, "synthetic_seed", type=int, help="clip i is the scene synthetic_seed * 100003 + i")
    field_flag(
        g,
        TrainConfig,
        "synthetic_clips_per_step",
        type=float,
        metavar="R",
        help=f"train while the synthetic clips are made: start once the first {STATS_CLIPS} (or all, if fewer) are "
        "held, normalize every clip's XYZ latents with their statistics, and let R more join the clips drawn from "
        "at each step; a step waits for its clips where they are not made yet (0: hold every clip before the first "
        "step, exactly the samples of their cache)",
    )
    field_flag(
        g, TrainConfig, "texture_families", nargs="+", choices=TEXTURE_FAMILIES,
        help="the texture families of the synthetic clips",
    )  # fmt: skip
    field_flag(g, TrainConfig, "output_dir", help="checkpoints, logs and the final adapter")
    field_flag(g, TrainConfig, "model_path", help="Wan2.1-I2V diffusers folder (default: the cache's)")
    field_flag(g, TrainConfig, "model_type", "--type", choices=sorted(MODEL_TYPES))
    field_flag(
        g,
        TrainConfig,
        "train_mode",
        choices=TRAIN_MODES,
        help="lora: LoRA + domain embedding on the frozen base, written as an adapter (default, 4DNeX); full: every "
        "transformer weight, written as a transformer folder for inference.py --sft_path (a base model)",
    )
    field_flag(
        g,
        TrainConfig,
        "modalities",
        "--modalities",
        "--layout",
        aliases=MODALITY_ALIASES,
        choices=(*TRAIN_MODALITIES, *MODALITY_ALIASES),
        help="what a sample's latent holds: rgbxyz, RGB | XYZ side by side (default; xyzrgb is the reference's "
        "spelling), or rgb, the RGB video alone (plain image-to-video). --layout is its former name, still accepted",
    )
    field_flag(
        g,
        TrainConfig,
        "condition_tasks",
        choices=sorted(CONDITION_TASKS),
        help="the given frames of each sample: image (frame 0, default, the paper) or any (image "  # %% for argparse
        f"{CONDITION_TASKS['any']['image']:.0%}%, first+last {CONDITION_TASKS['any']['first_last']:.0%}%, keyframes "
        f"{CONDITION_TASKS['any']['keyframes']:.0%}%, every frame {CONDITION_TASKS['any']['video']:.0%}%)",
    )
    field_flag(
        g,
        TrainConfig,
        "cache_in_memory",
        action="store_true",
        help="read every latent and embedding the run uses once, into stacked tensors on the training GPU (host "
        "memory where they would take more than half of its free memory; the videos too with --condition_tasks any): "
        "a step's batch is a few gathers, no file reads (about 0.5 MB per clip at 25x96x144, BENCHMARKS.md)",
    )
    field_flag(g, TrainConfig, "height", type=int, help="per modality; must match the cache")
    field_flag(g, TrainConfig, "width", type=int, help="per modality; must match the cache")
    field_flag(g, TrainConfig, "num_frames", type=int, help="first frames of each clip (4k+1)")
    g = parser.add_argument_group("adapter")
    field_flag(g, TrainConfig, "lora_rank", type=int)
    field_flag(g, TrainConfig, "lora_alpha", type=float)
    field_flag(g, TrainConfig, "lora_targets", nargs="+", help="linear layer names")
    g = parser.add_argument_group("optimization")
    field_flag(g, TrainConfig, "learning_rate", type=float)
    field_flag(g, TrainConfig, "lr_schedule", choices=LR_SCHEDULES)
    field_flag(g, TrainConfig, "lr_warmup_steps", type=int)
    field_flag(g, TrainConfig, "min_lr_ratio", type=float, help="final lr / learning_rate")
    field_flag(g, TrainConfig, "max_steps", type=int, help="optimizer steps")
    field_flag(g, TrainConfig, "train_batch_size", type=int, help="per process")
    field_flag(g, TrainConfig, "gradient_accumulation_steps", type=int)
    field_flag(g, TrainConfig, "max_grad_norm", type=float)
    field_flag(g, TrainConfig, "adam_beta1", type=float)
    field_flag(g, TrainConfig, "adam_beta2", type=float)
    field_flag(g, TrainConfig, "adam_epsilon", type=float)
    field_flag(g, TrainConfig, "weight_decay", type=float)
    dtype_flag(
        g,
        TrainConfig,
        "mixed_precision",
        TRAIN_PRECISIONS,
        help="the dtype the transformer computes in (default %(default)s; bf16, and no for float32, are accelerate's "
        "spellings)",
    )
    field_flag(g, TrainConfig, "gradient_checkpointing", "--no_gradient_checkpointing", action="store_false")
    field_flag(
        g,
        TrainConfig,
        "activation_memory",
        choices=ACTIVATION_MEMORY_CHOICES,
        help="what gradient checkpointing keeps of each block instead of recomputing it in the backward: recompute "
        "(its input only: diffusers' gradient checkpointing), attention (also its self-attention output), "
        "attention+ffn (also its feed-forward pre-activation; not with LoRA on the feed-forward). attention and "
        "attention+ffn need ZeRO-2; on CUDA they park what they keep and the block inputs in page-locked host "
        "memory, 30 GB / 68 GB per process at 49x480x720. auto: recompute without CUDA or under ZeRO-3, else the "
        "most the free host RAM per process allows (thresholds in fourdnex/train/memory_policy.py, scaled with the "
        "tokens per step)",
    )
    field_flag(
        g,
        TrainConfig,
        "attention_backend",
        help="diffusers attention backend, e.g. _native_cudnn, or flash_4 (FlashAttention-4, an optional package for "
        "Hopper and Blackwell GPUs; see the README); auto (default): flash_4 on a Hopper GPU where it is installed, "
        "else native SDPA",
    )
    field_flag(g, TrainConfig, "compile_blocks", action="store_true", help="torch.compile each transformer block")
    field_flag(g, TrainConfig, "seed", type=int)
    field_flag(g, TrainConfig, "deepspeed_config", help="DeepSpeed json (default: configs/deepspeed_zero2.json)")
    g = parser.add_argument_group("loss")
    field_flag(g, TrainConfig, "timestep_sampling", choices=TIMESTEP_SAMPLINGS)
    field_flag(g, TrainConfig, "shift", type=float, help="for shifted sampling (inference flow_shift)")
    field_flag(g, TrainConfig, "rgb_loss_weight", type=float)
    field_flag(g, TrainConfig, "xyz_loss_weight", type=float)
    field_flag(
        g,
        TrainConfig,
        "xyz_temporal_loss_weight",
        type=float,
        help="weight of the change of the XYZ half's error from one latent frame to the next, added to the loss (the"
        " frames' relative geometry, where the cameras come from; default %(default)s: off)",
    )
    field_flag(
        g,
        TrainConfig,
        "rgb_first_frame_loss",
        "--no_rgb_first_frame_loss",
        action="store_false",
        help="leave the first RGB latent frame (the given condition) out of the loss",
    )
    g = parser.add_argument_group("checkpoints, logging, validation")
    field_flag(g, TrainConfig, "checkpointing_steps", type=int)
    field_flag(g, TrainConfig, "checkpoints_total_limit", type=int)
    field_flag(g, TrainConfig, "resume_from_checkpoint", help="'latest' or a checkpoint folder")
    field_flag(g, TrainConfig, "logging_steps", type=int)
    field_flag(g, TrainConfig, "validation_steps", type=int, help="0: no validation sampling")
    field_flag(g, TrainConfig, "validation_image")
    field_flag(g, TrainConfig, "validation_prompt")
    field_flag(g, TrainConfig, "validation_inference_steps", type=int)
    return parser


if __name__ == "__main__":
    run(main, build_parser())
