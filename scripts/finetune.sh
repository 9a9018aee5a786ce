#!/usr/bin/env bash
# Fine-tune 4DNeX (LoRA + domain embedding) on a latent cache with accelerate + DeepSpeed.
#
# One node, all its GPUs:
#   CACHE_DIR=data/cache bash scripts/finetune.sh
# Two nodes of 8 GPUs (run on each node, MACHINE_RANK=0 on the first; its address in MAIN_PROCESS_IP):
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 CACHE_DIR=data/cache bash scripts/finetune.sh
# Anything after the script name is passed to finetune.py (e.g. --resume_from_checkpoint latest --max_steps 1000).
set -euo pipefail
cd "$(dirname "$0")/.."

# --- where: the cache from build_wan_dataset.py, the run folder, the base model (default: the cache's) ---------------
CACHE_DIR=${CACHE_DIR:-data/cache}
OUTPUT_DIR=${OUTPUT_DIR:-runs/4dnex}
MODEL_ARGS=()
if [[ -n "${MODEL_PATH:-}" ]]; then MODEL_ARGS=(--model_path "$MODEL_PATH"); fi

# --- cluster: GPUs per node, nodes, this node's rank, the first node's address ----------------------------------------
GPUS_FOUND=$({ nvidia-smi --list-gpus 2>/dev/null || true; } | wc -l)
NUM_GPUS=${NUM_GPUS:-$GPUS_FOUND}
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

# --- memory: ZeRO-2 (default), ZeRO-3 (partitions the frozen 14B weights too), ZeRO-3 with CPU offload ----------------
ZERO=${ZERO:-2}  # 2 | 3 | 3_offload
ACCELERATE_CONFIG=configs/accelerate_zero${ZERO}.yaml
if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
    echo "finetune.sh: ZERO must be 2, 3 or 3_offload (no $ACCELERATE_CONFIG)" >&2
    exit 2
fi

launch=(
    accelerate launch
    --config_file "$ACCELERATE_CONFIG"
    --num_machines "$NUM_MACHINES"
    --machine_rank "$MACHINE_RANK"
    --num_processes $(( NUM_GPUS * NUM_MACHINES ))  # all processes of all nodes
    --main_process_ip "$MAIN_PROCESS_IP"
    --main_process_port "$MAIN_PROCESS_PORT"
)

train=(
    finetune.py
    # data and model: 49 frames at 480x720 per modality (the cache must hold at least that)
    --cache_dir "$CACHE_DIR" --output_dir "$OUTPUT_DIR" "${MODEL_ARGS[@]}"
    --height 480 --width 720 --num_frames 49
    # adapter: LoRA rank 64, alpha 32 on the four attention projections of both attentions
    --lora_rank 64 --lora_alpha 32 --lora_targets to_q to_k to_v to_out.0
    # optimization: per-GPU batch 1, AdamW 2e-5 with 100 warmup steps then cosine decay, clip at 1.0
    --train_batch_size 1 --gradient_accumulation_steps 1
    --learning_rate 2e-5 --lr_warmup_steps 100 --lr_schedule cosine --max_steps 5000 --max_grad_norm 1.0
    --mixed_precision bfloat16
    # loss: uniform noise levels as the reference (--timestep_sampling shifted --shift 3 matches inference)
    --timestep_sampling uniform --rgb_loss_weight 1.0 --xyz_loss_weight 1.0
    # checkpoints every 500 steps, the last 2 kept; each holds an inference-ready adapter
    --checkpointing_steps 500 --checkpoints_total_limit 2 --resume_from_checkpoint latest
    # what gradient checkpointing keeps: as much as the free host RAM per GPU allows (see "speed" below)
    --activation_memory auto
)

# --- speed, ZeRO-2 on GPUs: compiled blocks. What gradient checkpointing keeps is finetune.py's
# --activation_memory auto (fourdnex/train/memory_policy.py, where its thresholds are): each block's self-attention
# output and feed-forward pre-activation kept instead of recomputed, parked with the block inputs in page-locked host
# memory, as much as the free host RAM per GPU allows; ZeRO-3, and a machine without GPUs, recompute. Step times and
# memory: BENCHMARKS.md, "Training".
SPEED=()
if [[ "$ZERO" == 2 ]] && (( GPUS_FOUND > 0 )); then
    SPEED=(--compile_blocks)
fi

exec "${launch[@]}" "${train[@]}" "${SPEED[@]}" "$@"
