#!/usr/bin/env bash
# Train the small fourdnex demo model end to end, with the project's own tools only: synthetic 4D scenes in the
# 4DNeX-10M layout, a small Wan VAE, a plain image-to-video base model (stage 1), then the 4DNeX adapter (stage 2),
# its ablations and the any-frame adapter, all evaluated on held-out scenes.
#
#   WORK=runs/demo bash scripts/train_demo.sh                    # every stage, in order
#   WORK=runs/demo bash scripts/train_demo.sh adapters evaluate    # some stages (each resumes where it stopped)
#   WORK=runs/demo bash scripts/train_demo.sh "vae clips"          # stages named in one word run at the same time
#
# Stages (each one command or a few, resumable; times measured in BENCHMARKS.md):
#   data      100 held-out clips and the VAE's 2,000 clips (25 frames, 96x144; three seed ranges that never meet)
#   vae       the small Wan VAE on those clips (RGB and XYZ videos), then the model folder around it
#   clips     the transformer's 10,000 training clips (CPU only: by default it runs while the VAE trains)
#   cache     build_wan_dataset.py over the training clips with that model's encoders
#   base      stage 1: finetune.py --train_mode full --layout rgb (plain image-to-video on the RGB clips)
#   adapters  stage 2, all at once over the GPUs: LoRA + domain embedding (4DNeX), the two ablations (no domain
#             embedding; stock RoPE) and the any-frame adapter (--condition_tasks any)
#   evaluate  inference.py + evaluate.py on the held-out clips, for every adapter
# Sizes: override CLIPS, HELD_OUT, VAE_CLIPS, VAE_STEPS, VAE_BATCH, BASE_STEPS, ADAPTER_STEPS, ANY_FRAME_STEPS,
# BATCH (a smoke run uses tiny values).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-runs/demo}
CLIPS=${CLIPS:-10000}
HELD_OUT=${HELD_OUT:-100}
VAE_CLIPS=${VAE_CLIPS:-2000}
VAE_STEPS=${VAE_STEPS:-1500}
VAE_BATCH=${VAE_BATCH:-8}
BASE_STEPS=${BASE_STEPS:-2000}
ADAPTER_STEPS=${ADAPTER_STEPS:-1500}
# The any-frame adapter VAE-encodes most of its conditions every step (1.9 steps/s against 7.6 on two H200s): fewer
# steps, so that it ends with the others.
ANY_FRAME_STEPS=${ANY_FRAME_STEPS:-500}
BATCH=${BATCH:-32}
CPUS=${CPUS:-$(nproc)}
GPUS=${GPUS:-$({ nvidia-smi --list-gpus 2>/dev/null || true; } | wc -l)}
PY=${PYTHON:-python}
# 25 frames (7 latent frames) of 96 x 144 per modality: 756 transformer tokens fused.
SIZE=(--num_frames 25 --height 96 --width 144)
mkdir -p "$WORK"

log() { echo "[train_demo $(date +%H:%M:%S)] $*" >&2; }

# Run "$@" on GPU $1 (or on the CPU where there is none).
on_gpu() {
    local gpu=$1
    shift
    if (( GPUS > 0 )); then CUDA_VISIBLE_DEVICES=$gpu "$@"; else "$@"; fi
}

stage_data() {
    log "data: $HELD_OUT held-out clips, $VAE_CLIPS clips for the VAE"
    # Clip i of seed s is scene s * 100003 + i: the held-out (2), VAE (3) and training (1) ranges never meet.
    "$PY" -m fourdnex.data.synthetic --out "$WORK/held-out" --num_clips "$HELD_OUT" --seed 2 --workers "$CPUS" \
        --num_frames 25 --height 96 --width 144
    "$PY" -m fourdnex.data.synthetic --out "$WORK/vae-clips" --num_clips "$VAE_CLIPS" --seed 3 --workers "$CPUS" \
        --num_frames 25 --height 96 --width 144
}

stage_clips() {
    log "clips: $CLIPS training clips"
    "$PY" -m fourdnex.data.synthetic --out "$WORK/train" --num_clips "$CLIPS" --seed 1 --workers "$CPUS" \
        --num_frames 25 --height 96 --width 144
}

stage_vae() {
    log "vae: $VAE_STEPS steps of $VAE_BATCH clips"
    "$PY" -m fourdnex.model.presets "$WORK/init" --preset demo
    on_gpu 0 "$PY" -m fourdnex.train.vae --data_dir "$WORK/vae-clips/data" --eval_data_dir "$WORK/held-out/data" \
        --model_path "$WORK/init" --out "$WORK/vae" --max_steps "$VAE_STEPS" --batch_size "$VAE_BATCH" \
        --workers "$CPUS" "${SIZE[@]}"
    "$PY" -m fourdnex.model.presets "$WORK/encoders" --preset demo --vae "$WORK/vae/vae"
}

stage_cache() {
    local shards=$(( CPUS / 2 > 1 ? CPUS / 2 : 1 ))
    log "cache: $shards shards"
    local pids=()
    for (( i = 0; i < shards; i++ )); do
        on_gpu $(( GPUS > 0 ? i % GPUS : 0 )) "$PY" build_wan_dataset.py --data_dir "$WORK/train/data" \
            --out "$WORK/cache" --model_path "$WORK/encoders" --num_frames 25 --resolution_h 96 --resolution_w 144 \
            --num_tasks "$shards" --task_idx "$i" --batch_size 16 --num_workers 1 > "$WORK/cache-$i.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    "$PY" build_wan_dataset.py --data_dir "$WORK/train/data" --out "$WORK/cache" --model_path "$WORK/encoders" \
        --num_frames 25 --resolution_h 96 --resolution_w 144 --merge
}

# finetune.py on the demo cache; $1: GPU, $2: output folder, then extra flags.
finetune() {
    local gpu=$1 out=$2
    shift 2
    on_gpu "$gpu" "$PY" finetune.py --cache_dir "$WORK/cache" --output_dir "$out" "${SIZE[@]}" \
        --train_batch_size "$BATCH" --no_gradient_checkpointing --timestep_sampling shifted --cache_in_memory \
        --lr_warmup_steps 200 --checkpointing_steps 500 --resume_from_checkpoint latest "$@"
}

stage_base() {
    log "base: $BASE_STEPS steps of full training on the RGB clips"
    finetune 0 "$WORK/base" --model_path "$WORK/encoders" --train_mode full --layout rgb --type i2vwbw \
        --learning_rate 5e-4 --max_steps "$BASE_STEPS"
    "$PY" -m fourdnex.model.presets "$WORK/model" --preset demo --vae "$WORK/vae/vae" \
        --transformer "$WORK/base/transformer"
}

stage_adapters() {
    log "adapters: $ADAPTER_STEPS steps each ($ANY_FRAME_STEPS any-frame), at once on $(( GPUS > 0 ? GPUS : 1 )) devices"
    local names=(4dnex no-domain-embedding stock-rope any-frame)
    local flags=("--type i2vwbw-demb-samerope" "--type i2vwbw-samerope" "--type i2vwbw-demb"
                 "--type i2vwbw-demb-samerope --condition_tasks any")
    local steps=("$ADAPTER_STEPS" "$ADAPTER_STEPS" "$ADAPTER_STEPS" "$ANY_FRAME_STEPS")
    local slots=$(( GPUS > 0 ? GPUS : 1 )) pids=()
    for i in "${!names[@]}"; do  # the small model leaves a GPU mostly idle: several runs share one well
        # shellcheck disable=SC2086  # the flags are words
        finetune $(( i % slots )) "$WORK/${names[$i]}" --model_path "$WORK/model" --lora_rank 16 --lora_alpha 16 \
            --learning_rate 1e-3 --max_steps "${steps[$i]}" ${flags[$i]} > "$WORK/${names[$i]}.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

# inference.py for adapter $1 in condition mode $2 (image, video, first_last), on GPU $3.
generate_one() {
    local name=$1 mode=$2 gpu=$3 inputs=$WORK/held-out/inputs
    local condition=(--image "$inputs/images.txt")
    [[ $mode == video ]] && condition=(--video "$inputs/videos.txt")
    [[ $mode == first_last ]] && condition=(--video "$inputs/videos.txt" --frames 0,24)
    on_gpu "$gpu" "$PY" inference.py --prompt "$inputs/prompts.txt" "${condition[@]}" --out "$WORK/results/$name-$mode" \
        --model_path "$WORK/model" --lora_path "$WORK/$name/adapter" "${SIZE[@]}" --steps 30 --guidance_scale 1 \
        --compile off --skip_existing
}

stage_evaluate() {
    log "evaluate: every adapter on the held-out clips"
    "$PY" -m fourdnex.evaluation.inputs --gt "$WORK/held-out/data" --out "$WORK/held-out/inputs" "${SIZE[@]}"
    local runs=("4dnex image" "no-domain-embedding image" "stock-rope image" "any-frame image" "any-frame video"
                "any-frame first_last")
    local pids=()
    for i in "${!runs[@]}"; do  # all at once: the small model shares a GPU well
        # shellcheck disable=SC2086  # name and mode
        generate_one ${runs[$i]} $(( GPUS > 0 ? i % GPUS : 0 )) > "$WORK/generate-$i.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    # All at once, each on its share of the CPUs this script may use (its worker processes follow them): each run's
    # start and report overlap the others' work (on 16 CPUs the six took 54 s at once, one took 11-15 s alone).
    local cpus
    read -ra cpus <<< "$("$PY" -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
    local share=$(( ${#cpus[@]} / ${#runs[@]} > 1 ? ${#cpus[@]} / ${#runs[@]} : 1 ))
    pids=()
    for i in "${!runs[@]}"; do
        local name=${runs[$i]% *} mode=${runs[$i]#* } first=$(( i * share % ${#cpus[@]} )) list
        list=$(IFS=,; echo "${cpus[*]:first:share}")
        taskset -c "$list" "$PY" evaluate.py --results "$WORK/results/$name-$mode" \
            --gt "$WORK/held-out/data" --mapping "$WORK/held-out/inputs/mapping.json" \
            --out "$WORK/reports/$name-$mode" > "$WORK/evaluate-$i.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

stages=("$@")
(( ${#stages[@]} )) || stages=(data "vae clips" cache base adapters evaluate)
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
