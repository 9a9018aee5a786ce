#!/usr/bin/env bash
# Train the small fourdnex demo model end to end, with the project's own tools only: synthetic 4D scenes in the
# 4DNeX-10M layout, a small Wan VAE, a plain image-to-video base model (stage 1), then the 4DNeX adapter (stage 2),
# its variants (LoRA rank, full fine-tuning, the two ablations, the any-frame adapter), each evaluated on held-out
# scenes of the training texture families and of one family no training clip has.
#
#   WORK=runs/demo bash scripts/train_demo.sh                    # every stage, in order
#   WORK=runs/demo bash scripts/train_demo.sh adapters evaluate    # some stages (each resumes where it stopped)
#   WORK=runs/demo bash scripts/train_demo.sh "data vae"           # stages named in one word run at the same time
#
# Stages (each one command or a few, resumable; times measured in BENCHMARKS.md):
#   data      held-out clips (in distribution, and the same scenes in the held-out texture family) and the
#             training clips (25 frames, 96x144; CPU only: by default it runs while the VAE trains)
#   vae       the small Wan VAE on generator clips rendered in memory, with its held-out learning curve
#   encoders  the model folder around that VAE, its tokenizer knowing the training captions' words
#   cache     build_wan_dataset.py over the training clips with those encoders
#   base      stage 1: finetune.py --train_mode full --modalities rgb (plain image-to-video on the RGB clips)
#   adapters  stage 2, at once over the GPUs: the 4DNeX adapter (LoRA r16 + domain embedding), LoRA r64, full
#             fine-tuning of the fused model (given frame 0, or any frames: full-any; grown to 12 blocks or twice
#             as wide first: full-deep, full-wide; reading a token per latent pixel: full-fine; the XYZ half of the
#             loss weighted 3x: full-xyz; and its error's change from frame to frame 3x too: full-xyz-t, or given any
#             frames: full-xyz-t-any; noise levels drawn uniformly: full-uniform), the ablations (no domain
#             embedding; stock RoPE) and the any-frame adapter
#   evaluate  inference.py + evaluate.py for every run's checkpoints (learning curves) on both held-out sets, its
#             last one also as the mean of ENSEMBLE samples (inference.py --ensemble), and the VAE's round trip of
#             the held-out truths (the ceiling of any transformer on this VAE)
# Sizes: override FRAMES, HEIGHT, WIDTH, CLIPS, HELD_OUT, CURVE_CLIPS, VAE_EVAL_CLIPS, VAE_CLIPS, VAE_STEPS, VAE_BATCH, VAE_MINUTES (a cap: the VAE stops there, a rerun
# resumes it), BATCH, BASE_STEPS, ADAPTER_STEPS, CURVE_POINTS, RUNS (the stage-2 runs), TRAIN_FAMILIES, HELD_OUT_FAMILY
# (a smoke run uses tiny values); VAE_FROM, a model folder whose VAE the training starts from (example/demo/model
# continues the shipped one; a new VAE of the demo preset by default); FULL_FROM, a fully fine-tuned transformer
# folder (an earlier run's) that the full fine-tuning runs continue from instead of the base; ENCODERS_FROM, a model
# folder whose tokenizer and text and image encoders every model folder of the run takes (continuing a model needs
# those it learned with: example/demo/model, FULL_FROM=example/demo/model/transformer).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-runs/demo}
CLIPS=${CLIPS:-10000}
HELD_OUT=${HELD_OUT:-100}
CURVE_CLIPS=${CURVE_CLIPS:-32}
EVAL_BATCH=${EVAL_BATCH:-32}  # held-out samples inference.py draws at once
# Samples averaged in the last checkpoints' ensemble scores (0: none); 4 lowered the shipped model's depth error by
# 6-15 % (BENCHMARKS.md, "Ensembles of samples", "The ninth run")
ENSEMBLE=${ENSEMBLE:-4}
VAE_CLIPS=${VAE_CLIPS:-2000}
VAE_STEPS=${VAE_STEPS:-1500}
VAE_BATCH=${VAE_BATCH:-32}
VAE_MINUTES=${VAE_MINUTES:-6}
BATCH=${BATCH:-256}
BASE_STEPS=${BASE_STEPS:-2500}
ADAPTER_STEPS=${ADAPTER_STEPS:-1500}
CURVE_POINTS=${CURVE_POINTS:-4}
# The stage-2 runs (the ablations no-domain-embedding and stock-rope are defined too); on one GPU they share it.
RUNS=${RUNS:-4dnex any-frame lora64 full}
TRAIN_FAMILIES=${TRAIN_FAMILIES:-checkers noise plain gradients}
HELD_OUT_FAMILY=${HELD_OUT_FAMILY:-stripes}
CPUS=${CPUS:-$(nproc)}
GPUS=${GPUS:-$({ nvidia-smi --list-gpus 2>/dev/null || true; } | wc -l)}
PY=${PYTHON:-python}
# 25 frames (7 latent frames) of 96 x 144 per modality: 756 transformer tokens fused (a smoke run sets smaller ones).
FRAMES=${FRAMES:-25}
HEIGHT=${HEIGHT:-96}
WIDTH=${WIDTH:-144}
VAE_EVAL_CLIPS=${VAE_EVAL_CLIPS:-64}
SIZE=(--num_frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH")
# Compiled blocks pay on a GPU (BENCHMARKS.md, "The demo model's stages on one GPU"); on a CPU compiling costs minutes.
COMPILE=()
(( GPUS > 0 )) && COMPILE=(--compile_blocks)
# shellcheck disable=SC2206  # the families are words
FAMILIES=($TRAIN_FAMILIES)
ENCODERS=()
[[ -n ${ENCODERS_FROM:-} ]] && ENCODERS=(--encoders_from "$ENCODERS_FROM")
mkdir -p "$WORK"

log() { echo "[train_demo $(date +%H:%M:%S)] $*" >&2; }

# A demo model folder $1 around the trained VAE, its tokenizer knowing the training captions (or the encoders of
# ENCODERS_FROM); further flags (a --transformer) follow.
model_folder() {
    "$PY" -m fourdnex.model.presets "$1" --preset demo --vae "$WORK/vae/vae" --corpus "$WORK/train/captions.txt" \
        "${ENCODERS[@]}" "${@:2}"
}

# Run "$@" on GPU $1 (or on the CPU where there is none).
on_gpu() {
    local gpu=$1
    shift
    if (( GPUS > 0 )); then CUDA_VISIBLE_DEVICES=$gpu "$@"; else "$@"; fi
}

stage_data() {
    log "data: $HELD_OUT held-out clips in each set, $CLIPS training clips"
    # Clip i of seed s is scene s * 100003 + i: the held-out (2), VAE (3) and training (1) ranges never meet. The
    # held-out family's sets have the same scenes as the in-distribution ones, in another texture family; the curve
    # sets are their first CURVE_CLIPS clips, on which every checkpoint is scored.
    local set count families
    for set in held-out held-out-family curve curve-family; do
        count=$HELD_OUT families=("${FAMILIES[@]}")
        [[ $set == curve* ]] && count=$CURVE_CLIPS
        [[ $set == *family ]] && families=("$HELD_OUT_FAMILY")
        "$PY" -m fourdnex.data.synthetic --out "$WORK/$set" --num_clips "$count" --seed 2 --workers "$CPUS" \
            --texture_families "${families[@]}" "${SIZE[@]}"
    done
    "$PY" -m fourdnex.data.synthetic --out "$WORK/train" --num_clips "$CLIPS" --seed 1 --workers "$CPUS" \
        --texture_families "${FAMILIES[@]}" "${SIZE[@]}"
}

stage_vae() {
    log "vae: $VAE_STEPS steps of $VAE_BATCH clips, from ${VAE_FROM:-a new VAE}"
    local init=${VAE_FROM:-$WORK/init}
    [[ -n ${VAE_FROM:-} ]] || "$PY" -m fourdnex.model.presets "$WORK/init" --preset demo
    on_gpu 0 "$PY" -m fourdnex.train.vae --synthetic_clips "$VAE_CLIPS" --synthetic_seed 3 \
        --texture_families "${FAMILIES[@]}" --eval_synthetic_clips "$VAE_EVAL_CLIPS" --eval_steps $(( VAE_STEPS / 10 > 0 ? VAE_STEPS / 10 : 1 )) \
        --model_path "$init" --out "$WORK/vae" --max_steps "$VAE_STEPS" --batch_size "$VAE_BATCH" \
        --stop_after_minutes "$VAE_MINUTES" --workers $(( CPUS / 2 > 0 ? CPUS / 2 : 1 )) "${SIZE[@]}"
}

stage_encoders() {
    log "encoders: the trained VAE, the training captions' tokenizer"
    model_folder "$WORK/encoders"
}

stage_cache() {
    local shards=$(( CPUS / 2 > 1 ? CPUS / 2 : 1 ))
    log "cache: $shards shards"
    local pids=()
    for (( i = 0; i < shards; i++ )); do
        on_gpu $(( GPUS > 0 ? i % GPUS : 0 )) "$PY" build_wan_dataset.py --data_dir "$WORK/train/data" \
            --out "$WORK/cache" --model_path "$WORK/encoders" --num_frames "$FRAMES" --resolution_h "$HEIGHT" \
            --resolution_w "$WIDTH" --num_tasks "$shards" --task_idx "$i" --batch_size 16 --num_workers 1 > "$WORK/cache-$i.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    "$PY" build_wan_dataset.py --data_dir "$WORK/train/data" --out "$WORK/cache" --model_path "$WORK/encoders" \
        --num_frames "$FRAMES" --resolution_h "$HEIGHT" --resolution_w "$WIDTH" --merge
}

# finetune.py on the demo cache; $1: GPU, $2: output folder, $3: steps, then extra flags. A checkpoint at each of the
# CURVE_POINTS points of the learning curve, all kept.
finetune() {
    local gpu=$1 out=$2 steps=$3
    shift 3
    on_gpu "$gpu" "$PY" finetune.py --cache_dir "$WORK/cache" --output_dir "$out" "${SIZE[@]}" --max_steps "$steps" \
        --train_batch_size "$BATCH" --no_gradient_checkpointing --timestep_sampling shifted --cache_in_memory \
        "${COMPILE[@]}" --lr_warmup_steps 200 --min_lr_ratio 0.1 --logging_steps 10 \
        --checkpointing_steps $(( steps / CURVE_POINTS )) --checkpoints_total_limit "$CURVE_POINTS" \
        --resume_from_checkpoint latest "$@"
}

stage_base() {
    log "base: $BASE_STEPS steps of full training on the RGB clips"
    finetune 0 "$WORK/base" "$BASE_STEPS" --model_path "$WORK/encoders" --train_mode full --modalities rgb \
        --type i2vwbw --learning_rate 1e-3
    model_folder "$WORK/model" --transformer "$WORK/base/transformer"
}

# The flags of each stage-2 run.
declare -A RUN_FLAGS=(
    [4dnex]="--type i2vwbw-demb-samerope --lora_rank 16 --lora_alpha 16 --learning_rate 2e-3"
    [lora64]="--type i2vwbw-demb-samerope --lora_rank 64 --lora_alpha 64 --learning_rate 2e-3"
    [full]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4"
    [full-any]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4 --condition_tasks any"
    [no-domain-embedding]="--type i2vwbw-samerope --lora_rank 16 --lora_alpha 16 --learning_rate 2e-3"
    [stock-rope]="--type i2vwbw-demb --lora_rank 16 --lora_alpha 16 --learning_rate 2e-3"
    [any-frame]="--type i2vwbw-demb-samerope --lora_rank 16 --lora_alpha 16 --learning_rate 2e-3 --condition_tasks any"
    [full-deep]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4"
    [full-wide]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4"
    [full-fine]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4"
    [full-xyz]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4 --xyz_loss_weight 3"
    [full-xyz-t]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4 --xyz_loss_weight 3 --xyz_temporal_loss_weight 3"
    [full-xyz-t-any]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4 --xyz_loss_weight 3 --xyz_temporal_loss_weight 3 --condition_tasks any"
    [full-uniform]="--type i2vwbw-demb-samerope --train_mode full --learning_rate 5e-4 --timestep_sampling uniform"
)
# Runs whose transformer is the full fine-tuning's starting one grown (python -m fourdnex.model.grow): to 12 blocks
# (the most that the demo folder's 32 MB holds in half precision: 11.8M parameters), or twice the heads and
# feed-forward width, each computing what that transformer computes; or reading a token per latent pixel instead of
# per 2 x 2 patch (4x the tokens: 3,024 a fused sample), starting near what it computes (BENCHMARKS.md, "The tenth
# run").
declare -A RUN_GROWTH=(
    [full-deep]="--blocks 12"
    [full-wide]="--width 2"
    [full-fine]="--patch 1"
)

# Transformers whose 256-sample step is drawn in this many micro-batches (gradient accumulation), by their spatial
# patch size: the one reading a token per latent pixel (patch 1: full-fine, or a run continuing it with FULL_FROM)
# trained at 128 samples on an H100 without gradient checkpointing, and its benchmark ran out of the H100's 80 GB at
# 256 (BENCHMARKS.md, "The tenth run").
declare -A PATCH_MICRO_BATCHES=(
    [1]=2
)

# The spatial patch size of the transformer in model folder $1.
patch_size() {
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["patch_size"][1])' "$1/transformer/config.json"
}

stage_adapters() {
    log "adapters: $RUNS, $ADAPTER_STEPS steps each, at once on $(( GPUS > 0 ? GPUS : 1 )) devices"
    local slots=$(( GPUS > 0 ? GPUS : 1 )) pids=() i=0 full_model=$WORK/model
    if [[ -n ${FULL_FROM:-} ]]; then  # the full fine-tuning runs continue an earlier run's transformer
        full_model=$WORK/model-full
        model_folder "$full_model" --transformer "$FULL_FROM"
    fi
    for name in $RUNS; do  # the small model leaves a GPU idle between its kernels: several runs share one well
        local model=$WORK/model
        [[ ${RUN_FLAGS[$name]} == *"--train_mode full"* ]] && model=$full_model
        if [[ -n ${RUN_GROWTH[$name]:-} ]]; then
            model=$WORK/model-$name
            # shellcheck disable=SC2086  # the growth flags are words
            "$PY" -m fourdnex.model.grow "${FULL_FROM:-$WORK/base/transformer}" "$WORK/grown-$name" ${RUN_GROWTH[$name]}
            model_folder "$model" --transformer "$WORK/grown-$name"
        fi
        local split=${PATCH_MICRO_BATCHES[$(patch_size "$model")]:-1}
        # shellcheck disable=SC2086  # the flags are words
        finetune $(( i % slots )) "$WORK/$name" "$ADAPTER_STEPS" --model_path "$model" ${RUN_FLAGS[$name]} \
            --train_batch_size $(( BATCH / split )) --gradient_accumulation_steps "$split" > "$WORK/$name.log" 2>&1 &
        pids+=($!)
        i=$(( i + 1 ))
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

# The weights a run wrote at a point of its learning curve: the adapter, or with --train_mode full a model folder.
# $1: run, $2: checkpoint folder; prints inference.py's model flags.
weights() {
    local run=$1 checkpoint=$2
    if [[ -d $checkpoint/transformer ]]; then
        echo "--model_path $WORK/model --sft_path $checkpoint/transformer"
    else
        echo "--model_path $WORK/model --lora_path $checkpoint/adapter"
    fi
}

# inference.py + evaluate.py for one run's weights; $1: run, $2: checkpoint, $3: held-out set, $4: condition mode
# (image, video, first_last; ensemble: the image, ENSEMBLE samples averaged), $5: GPU, $6: CPUs for evaluate.py.
evaluate_one() {
    local run=$1 checkpoint=$2 set=$3 mode=$4 gpu=$5 cpus=$6 inputs=$WORK/$3/inputs
    local out=$WORK/results/$run/$(basename "$checkpoint")/$set-$mode
    local condition=(--image "$inputs/images.txt")
    [[ $mode == ensemble ]] && condition+=(--ensemble "$ENSEMBLE")
    [[ $mode == video ]] && condition=(--video "$inputs/videos.txt")
    [[ $mode == first_last ]] && condition=(--video "$inputs/videos.txt" --frames "0,$(( FRAMES - 1 ))")
    if [[ $run == vae ]]; then  # the truth through the VAE: what a transformer with the truth's latents would score
        on_gpu "$gpu" "$PY" -m fourdnex.evaluation.roundtrip --model_path "$WORK/model" --gt "$WORK/$set/data" \
            --out "$out" "${SIZE[@]}"
    else
        # shellcheck disable=SC2046  # the model flags are words
        on_gpu "$gpu" "$PY" inference.py --prompt "$inputs/prompts.txt" "${condition[@]}" --out "$out" \
            $(weights "$run" "$checkpoint") "${SIZE[@]}" --steps 30 --guidance_scale 1 --compile off --skip_existing \
            --batch_size "$EVAL_BATCH"
    fi
    taskset -c "$cpus" "$PY" evaluate.py --results "$out" --gt "$WORK/$set/data" --mapping "$inputs/mapping.json" \
        --out "$WORK/reports/$run/$(basename "$checkpoint")/$set-$mode"
}

stage_evaluate() {
    log "evaluate: every run's checkpoints on the curve sets, its last one on the held-out sets"
    local jobs=() last set
    for set in held-out held-out-family curve curve-family; do
        "$PY" -m fourdnex.evaluation.inputs --gt "$WORK/$set/data" --out "$WORK/$set/inputs" "${SIZE[@]}"
        jobs+=("vae round-trip $set image")  # the ceiling of each set (the curves draw it too)
    done
    for name in $RUNS; do
        last=$(ls -d "$WORK/$name"/checkpoints/checkpoint-* | tail -1)
        for checkpoint in "$WORK/$name"/checkpoints/checkpoint-*; do
            jobs+=("$name $checkpoint curve image" "$name $checkpoint curve-family image")
        done
        jobs+=("$name $last held-out image" "$name $last held-out-family image")
        (( ENSEMBLE > 1 )) && jobs+=("$name $last held-out ensemble" "$name $last held-out-family ensemble")
        if [[ ${RUN_FLAGS[$name]} == *"--condition_tasks any"* ]]; then
            jobs+=("$name $last held-out video" "$name $last held-out first_last")
        fi
    done
    # A few at once, each evaluate.py on its share of the CPUs this script may use (its worker processes follow).
    local cpus at_once=6 pids=()
    read -ra cpus <<< "$("$PY" -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
    local share=$(( ${#cpus[@]} / at_once > 1 ? ${#cpus[@]} / at_once : 1 ))
    for i in "${!jobs[@]}"; do
        local slot=$(( i % at_once )) list
        list=$(IFS=,; echo "${cpus[*]:$(( slot * share % ${#cpus[@]} )):share}")
        # shellcheck disable=SC2086  # run, checkpoint, set and mode are words
        evaluate_one ${jobs[$i]} $(( GPUS > 0 ? i % GPUS : 0 )) "$list" > "$WORK/evaluate-$i.log" 2>&1 &
        pids+=($!)
        if (( ${#pids[@]} == at_once )); then
            for pid in "${pids[@]}"; do wait "$pid"; done
            pids=()
        fi
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    "$PY" -m fourdnex.evaluation.curves --work "$WORK" --out "$WORK/curves"
}

stages=("$@")
(( ${#stages[@]} )) || stages=("data vae" encoders cache base adapters evaluate)
for group in "${stages[@]}"; do
    start=$SECONDS
    pids=()
    for stage in $group; do
        "stage_$stage" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    log "$group done in $(( SECONDS - start )) s"
done
