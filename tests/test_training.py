"""Fine-tuning runs: finetune.py under DeepSpeed ZeRO-2 (and ZeRO-3) on CPU (gloo) with the tiny model: the loss goes
down, logs, checkpoints, resume, validation, adapters and full training through inference, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_cache import TINY_MODEL
from training_support import (
    ROOT,
    SIZE,
    TINY,
    eval_loss,
    finetune,
    finetune_env,
    finetune_two_processes,
    fixed_batches,
    load_script,
    overfit_args,
    scalars,
)

from fourdnex.cli import run
from fourdnex.config import MODEL_TYPES
from fourdnex.data.cache import CacheError, LatentCache
from fourdnex.geometry.results import load_result
from fourdnex.model.adapters import apply_adapter, load_adapter
from fourdnex.train.checkpoints import export_adapter, list_checkpoints
from fourdnex.train.config import TrainConfig, TrainingError
from fourdnex.train.engine import deepspeed_config, lr_factor, trainable_parameters
from fourdnex.train.loop import build_transformer
from fourdnex.train.loss import transformer_inputs


def test_overfit_loss_goes_down(overfit_run, cache_dir):
    batches = fixed_batches(cache_dir)
    base, trained = eval_loss(batches, None), eval_loss(batches, overfit_run / "adapter")
    print(f"flow-matching loss on held-fixed noise: base {base:.4f} -> trained {trained:.4f}")
    assert trained < 0.85 * base
    logged = [v for _, v in scalars(overfit_run, "loss/total")]
    assert len(logged) == 30 and sum(logged[-10:]) < sum(logged[:10])


def test_logs_and_schedule(overfit_run):
    for tag in ("loss/rgb", "loss/xyz", "grad_norm", "samples_per_second"):
        values = scalars(overfit_run, tag)
        assert len(values) == 30 and all(math.isfinite(v) for _, v in values), tag
    total = dict(scalars(overfit_run, "loss/total"))
    parts = dict(scalars(overfit_run, "loss/rgb")), dict(scalars(overfit_run, "loss/xyz"))
    assert all(abs(total[s] - (parts[0][s] + parts[1][s]) / 2) < 1e-5 for s in total)  # equal weights, halves
    assert not scalars(overfit_run, "loss/xyz_t")  # no frame-to-frame term in this run's loss: not logged
    assert all(abs(v - 3e-3) < 1e-9 for _, v in scalars(overfit_run, "lr"))


def test_checkpoints_pruned_and_exported(overfit_run, cache_dir):
    kept = list_checkpoints(overfit_run)
    assert [p.name for p in kept] == ["checkpoint-000020", "checkpoint-000030"]
    assert not list((overfit_run / "checkpoints").glob(".*partial*"))
    saved = load_adapter(kept[-1] / "adapter")
    final = load_adapter(overfit_run / "adapter")
    exported = load_adapter(export_adapter(kept[-1], overfit_run / "exported"))  # DeepSpeed's zero_to_fp32
    for adapter in (final, exported):
        assert adapter.lora.keys() == saved.lora.keys() and len(saved.lora) == 2 * 2 * 2 * 4  # blocks*attn*targets*AB
        assert all(torch.equal(adapter.lora[k], saved.lora[k]) for k in saved.lora)
        assert torch.equal(adapter.domain_embedding, saved.domain_embedding)
    assert saved.domain_embedding.abs().max() > 0  # the domain embedding was trained
    meta = saved.meta
    cache_stats = json.loads((cache_dir / "stats.json").read_text())
    assert (meta.rank, meta.alpha) == (8, 8.0)
    assert (meta.xyz_latent_mean, meta.xyz_latent_std) == (
        cache_stats["xyz_latent_mean"],
        cache_stats["xyz_latent_std"],
    )
    assert meta.target_modules == ["to_q", "to_k", "to_v", "to_out.0"] and meta.extra["step"] == 30
    assert meta.extra["center"] == cache_stats["center"] == "clip"  # how the training pointmaps were centred


def test_validation_sample_written(overfit_run):
    result = load_result(overfit_run / "validation" / "step-000030" / "00000.npz")
    assert result.rgb.shape == result.xyz.shape == (9, 32, 32, 3)
    assert result.meta["step"] == 30 and result.meta["prompt"] == "a red ball"


def test_adapter_loads_in_inference_and_changes_output(overfit_run, tmp_path):
    cli = load_script("inference.py")
    common = ["--prompt", "a red ball", "--image", str(ROOT / "example" / "scene.png"), "--model_path", str(TINY_MODEL)]
    common += ["--height", "32", "--width", "32", "--num_frames", "9", "--steps", "2", "--device", "cpu"]
    cli.main(cli.build_parser().parse_args([*common, "--out", str(tmp_path / "base")]))
    cli.main(
        cli.build_parser().parse_args(
            [*common, "--out", str(tmp_path / "tuned"), "--lora_path", str(overfit_run / "adapter")]
        )
    )
    base, tuned = (load_result(tmp_path / name / "00000.npz") for name in ("base", "tuned"))
    assert tuned.meta["adapter_format"] == "fourdnex" and tuned.meta["lora_scale"] == 1.0
    assert tuned.meta["xyz_latent_mean"] == load_adapter(overfit_run / "adapter").meta.xyz_latent_mean
    assert np.abs(tuned.xyz - base.xyz).max() > 1e-2 and np.abs(tuned.rgb.astype(int) - base.rgb).max() > 0


def test_resume_is_bit_identical(overfit_run, cache_dir, tmp_path):
    """Killed after its first checkpoint and resumed, a run ends exactly where the uninterrupted one did."""
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "finetune.py"), *overfit_args(cache_dir, interrupted)],
        env=finetune_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not (interrupted / "checkpoints" / "checkpoint-000010").exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert [p.name for p in list_checkpoints(interrupted)] == ["checkpoint-000010"]
    finetune(*overfit_args(cache_dir, interrupted), "--resume_from_checkpoint", "latest")
    whole, resumed = load_adapter(overfit_run / "adapter"), load_adapter(interrupted / "adapter")
    assert all(torch.equal(whole.lora[k], resumed.lora[k]) for k in whole.lora)
    assert torch.equal(whole.domain_embedding, resumed.domain_embedding)
    assert scalars(interrupted, "loss/total")[-1] == scalars(overfit_run, "loss/total")[-1]


def test_zero3_two_processes_schedule_and_gathered_adapter(cache_dir, tmp_path):
    """Two gloo processes under ZeRO-3 with every parameter partitioned: the adapter is gathered whole (equal to
    DeepSpeed's zero_to_fp32 merge), and the learning rate logged is the trainer's schedule."""
    config = json.loads((ROOT / "configs" / "deepspeed_zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    finetune_two_processes(
        "--cache_dir", str(cache_dir), "--output_dir", str(out), *TINY, "--max_steps", "3", "--lr_warmup_steps", "2",
        "--learning_rate", "1e-3", "--lr_schedule", "cosine", "--deepspeed_config", str(tmp_path / "zero3.json"),
    )  # fmt: skip
    saved = load_adapter(out / "adapter")
    merged = load_adapter(export_adapter(out / "checkpoints" / "checkpoint-000003", tmp_path / "merged"))
    assert len(saved.lora) == 32 and saved.lora["blocks.1.attn2.to_out.0.lora_B.weight"].shape == (24, 8)
    assert all(torch.equal(saved.lora[k], merged.lora[k]) for k in merged.lora)
    assert saved.domain_embedding.shape == (2, 24) and torch.equal(saved.domain_embedding, merged.domain_embedding)
    logged = [v for _, v in scalars(out, "lr")]
    expected = [1e-3 * lr_factor(s, warmup_steps=2, max_steps=3, schedule="cosine") for s in range(3)]
    assert logged == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_cache", "does not exist"),
        ("other_resolution", "built at 32x32 per modality, training asks for 48x48"),
        ("missing_stats", "stats.json: missing"),
        ("model_without_transformer", "is incomplete: model_index.json is missing; pass --model_path"),
        ("unknown_target", "LoRA target 'to_qq' matches no linear layer"),
        ("bad_frames", "num_frames must be 4k+1"),
        ("kept_without_checkpointing", "--activation_memory attention says what gradient checkpointing keeps"),
        (
            "kept_attention_backend",
            "--activation_memory attention replays the self-attention kernel: it needs attention_backend native, "
            "_native_flash, _native_cudnn, flash_4; got 'flex'",
        ),
        ("kept_under_zero3", "the DeepSpeed config is ZeRO-3, which partitions the LoRA weights"),
        ("kept_ffn_under_zero3", "--activation_memory attention+ffn needs ZeRO-2"),
        (
            "kept_ffn_with_ffn_lora",
            "--activation_memory attention+ffn replays a frozen feed-forward, which ffn.net.0.proj trains",
        ),
    ],
)
def test_bad_input_one_line(setup, message, cache_dir, tmp_path):
    """Each user error ends the run before any training with one line naming the problem."""
    cli = load_script("finetune.py")
    args = ["--cache_dir", str(cache_dir), "--output_dir", str(tmp_path / "run"), *TINY, "--max_steps", "4"]
    if setup == "missing_cache":
        args[1] = str(tmp_path / "nowhere")
    zero3 = ROOT / "configs" / "deepspeed_zero3.json"
    if setup == "missing_stats":
        shutil.copytree(cache_dir, tmp_path / "cache")
        (tmp_path / "cache" / "stats.json").unlink()
        args[1] = str(tmp_path / "cache")
    extra = {
        "other_resolution": ["--height", "48", "--width", "48"],
        "unknown_target": ["--lora_targets", "to_q", "to_qq"],
        "bad_frames": ["--num_frames", "10"],
        "model_without_transformer": ["--model_path", str(tmp_path)],
        "kept_without_checkpointing": ["--activation_memory", "attention", "--no_gradient_checkpointing"],
        "kept_ffn_with_ffn_lora": ["--activation_memory", "attention+ffn", "--lora_targets", "to_q", "ffn.net.0.proj"],
        "kept_attention_backend": ["--activation_memory", "attention", "--attention_backend", "flex"],
        "kept_under_zero3": ["--activation_memory", "attention", "--deepspeed_config", str(zero3)],
        "kept_ffn_under_zero3": ["--activation_memory", "attention+ffn", "--deepspeed_config", str(zero3)],
    }
    with pytest.raises(SystemExit) as exit_info:
        run(cli.main, cli.build_parser(), args + extra.get(setup, []))
    text = str(exit_info.value.code)
    assert text.startswith("finetune.py: ") and message in text and "\n" not in text, text


def test_flags_reach_the_config():
    cli = load_script("finetune.py")
    parse = cli.build_parser().parse_args
    default = cli.config_from_args(parse(["--cache_dir", "c"]))
    assert default == TrainConfig(cache_dir="c")  # the CLI's defaults are TrainConfig's, i.e. the paper's
    flags = ["--cache_dir", "c", "--no_rgb_first_frame_loss", "--xyz_loss_weight", "2", "--timestep_sampling"]
    flags += ["shifted", "--lora_targets", "to_q", "ffn.net.2", "--type", "i2vwbw", "--no_gradient_checkpointing"]
    cfg = cli.config_from_args(parse(flags))
    assert (cfg.rgb_first_frame_loss, cfg.xyz_loss_weight, cfg.timestep_sampling) == (False, 2.0, "shifted")
    assert (cfg.lora_targets, cfg.model_type, cfg.gradient_checkpointing) == (("to_q", "ffn.net.2"), "i2vwbw", False)
    assert default.activation_memory == "auto"
    memory = cli.config_from_args(parse(["--cache_dir", "c", "--activation_memory", "attention"]))
    assert memory.activation_memory == "attention"
    ffn = cli.config_from_args(parse(["--cache_dir", "c", "--activation_memory", "attention+ffn"]))
    assert ffn.activation_memory == "attention+ffn"
    assert dataclasses.replace(memory, activation_memory="auto") == TrainConfig(cache_dir="c")


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    """A user error exits with a message (a string exit code: status 1, printed as one line, no traceback)."""
    cli = load_script("finetune.py")
    with pytest.raises(SystemExit) as exit_info:
        run(cli.main, cli.build_parser(), ["--cache_dir", str(tmp_path / "nowhere")])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("finetune.py: cache folder") and "\n" not in message


def test_corrupt_clip_names_its_file(cache_dir, tmp_path):
    broken = tmp_path / "cache"
    shutil.copytree(cache_dir, broken)
    cache = LatentCache(broken, 3, 32, 32)
    latents = broken / cache.items[1]["files"]["latents"]
    latents.write_bytes(b"not a safetensors file")
    cache.sample(0)
    with pytest.raises(CacheError, match=f"{re.escape(str(latents))}: unreadable"):
        cache.sample(1)
    clip = broken / cache.items[0]["files"]["clip"]
    clip.unlink()
    with pytest.raises(CacheError, match=f"{re.escape(str(clip))}: missing"):
        cache.sample(0)


def test_deepspeed_config_owns_no_optimizer(tmp_path):
    cfg = TrainConfig(train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5)
    config = deepspeed_config(cfg)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}')
    with pytest.raises(TrainingError, match="remove 'scheduler'"):
        deepspeed_config(TrainConfig(deepspeed_config=str(bad)))


def test_real_size_bench_model_on_meta():
    """The bench's Wan2.1-I2V-14B config: 16.39B parameters, the paper's 209.7M trainable, and a fused forward at the
    4DNeX shape (35,100 tokens) with the right output shape, all on the meta device (no memory, no compute)."""
    from bench.bench_train_step import REAL, REAL_SHAPE, build_model, random_batch

    model = build_model(REAL, torch.device("meta"))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 16.39
    model = build_transformer(TrainConfig(gradient_checkpointing=False), transformer=model)
    trainable = trainable_parameters(model)
    assert sum(p.numel() for p in trainable.values()) == 64 * 2 * 5120 * 8 * 40 + 2 * 5120  # LoRA + domain
    inputs = transformer_inputs(random_batch(0, REAL_SHAPE, 4096, 1280).to(torch.device("meta")), torch.bfloat16)
    assert model(**inputs, return_dict=False)[0].shape == (1, 16, 13, 60, 180)


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``bash scripts/finetune.sh`` run: this Python's scripts (accelerate) first on PATH."""
    env = finetune_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return {**env, "OUTPUT_DIR": str(tmp_path / "run"), "MODEL_PATH": str(TINY_MODEL), **extra}


def test_finetune_script_trains_on_cpu(cache_dir, tmp_path):
    """scripts/finetune.sh as a user runs it, on a machine without GPUs: accelerate launches finetune.py under
    DeepSpeed ZeRO-2 on the CPU; the flags after the script's name override its 49x480x720 defaults."""
    args = [*TINY, "--max_steps", "2", "--checkpointing_steps", "1"]
    env = script_env(tmp_path, CACHE_DIR=str(cache_dir))
    result = subprocess.run(["bash", str(ROOT / "scripts" / "finetune.sh"), *args], env=env, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    run = tmp_path / "run"
    assert [step for step, _ in scalars(run, "loss/total")] == [1, 2]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000001", "checkpoint-000002"]
    assert load_adapter(run / "adapter").lora  # the inference-ready adapter, LoRA tensors in it


@pytest.mark.parametrize(("zero", "expected"), [("2", "--compile_blocks"), ("3", "")])
def test_finetune_script_speed_flags(tmp_path, zero, expected):
    """On a node with GPUs (2 here, a stand-in nvidia-smi) the script compiles the blocks under ZeRO-2 and leaves what
    gradient checkpointing keeps to finetune.py's --activation_memory auto (tested below), whatever the host RAM;
    a stand-in accelerate records the command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100'\necho 'GPU 1: H100'\n")
    (bin_dir / "accelerate").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "argv"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = script_env(tmp_path, ZERO=zero, CACHE_DIR="cache")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "finetune.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[argv.index("--activation_memory") + 1] == "auto"
    tail = argv[argv.index("--activation_memory") + 2 :]
    assert " ".join(tail) == expected


def test_full_training_of_a_plain_image_to_video_base(cache_dir, tmp_path):
    """--train_mode full --modalities rgb: every weight trained on the RGB latents alone; the run writes a diffusers
    transformer folder (what inference.py --sft_path loads) equal to DeepSpeed's own fp32 merge of the state."""
    from fourdnex.model.loading import load_transformer
    from fourdnex.train.checkpoints import fp32_trainable_state

    out = tmp_path / "base"
    finetune("--cache_dir", str(cache_dir), "--output_dir", str(out), *SIZE, "--train_mode", "full",
             "--modalities", "rgb", "--type", "i2vwbw", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
             "--max_steps", "3", "--checkpointing_steps", "3")  # fmt: skip
    trained = load_transformer(out / "transformer", torch.float32, subfolder=None)
    base = load_transformer(TINY_MODEL, torch.float32)
    merged = fp32_trainable_state(list_checkpoints(out)[-1])
    saved = trained.state_dict()
    assert set(merged) == {n for n, p in base.named_parameters()} - {"patch_embedding.domain_embedding"}
    for name, value in merged.items():
        assert torch.equal(saved[name], value), name
    assert all(not torch.equal(saved[n], v) for n, v in base.state_dict().items() if n.endswith("to_q.weight"))
    assert not saved["patch_embedding.domain_embedding"].any()  # i2vwbw: no domain embedding, kept at zero
    assert not (out / "adapter").exists()
    with pytest.raises(SystemExit, match="attention\\+ffn replays a frozen feed-forward, which --train_mode full"):
        run(
            load_script("finetune.py").main,
            load_script("finetune.py").build_parser(),
            ["--cache_dir", str(cache_dir), "--train_mode", "full", "--activation_memory", "attention+ffn", *SIZE],
        )


def test_a_fully_trained_fused_model_samples_with_what_it_was_trained_as(cache_dir, tmp_path):
    """--train_mode full on the fused latent: the transformer's weights say what it was trained as, so sampling it
    with --sft_path takes its model type and the cache's XYZ latent statistics (not the defaults), and a --type
    that contradicts them stops with one line. Its loss weighs the XYZ half 3x and the XYZ error's change from frame
    to frame 2x, and that term is logged beside the halves, the total their weighted sum."""
    from fourdnex.data.cache import read_stats
    from fourdnex.model.adapters import read_transformer_meta

    out = tmp_path / "full"
    finetune("--cache_dir", str(cache_dir), "--output_dir", str(out), *SIZE, "--train_mode", "full",
             "--type", "i2vwbw-demb", "--max_steps", "2", "--checkpointing_steps", "2",
             "--xyz_loss_weight", "3", "--xyz_temporal_loss_weight", "2")  # fmt: skip
    logged = {tag: dict(scalars(out, f"loss/{tag}")) for tag in ("total", "rgb", "xyz", "xyz_t")}
    assert sorted(logged["xyz_t"]) == [1, 2] and all(v > 0 for v in logged["xyz_t"].values())
    for step, total in logged["total"].items():  # (w_rgb * rgb + w_xyz * xyz + w_t * xyz_t) / (w_rgb + w_xyz)
        parts = logged["rgb"][step] + 3 * logged["xyz"][step] + 2 * logged["xyz_t"][step]
        assert total == pytest.approx(parts / 4, rel=1e-5)
    stats = read_stats(cache_dir)
    meta = read_transformer_meta(out / "transformer")
    assert (meta.model_type, meta.xyz_latent_mean, meta.xyz_latent_std, meta.extra["step"]) == (
        "i2vwbw-demb",
        stats.xyz_latent_mean,
        stats.xyz_latent_std,
        2,
    )
    assert read_transformer_meta(list_checkpoints(out)[-1] / "transformer") == meta
    sample = [sys.executable, str(ROOT / "inference.py"), "--prompt", "a red ball", "--image",
              str(ROOT / "example" / "scene.png"), "--model_path", str(TINY_MODEL), "--sft_path",
              str(out / "transformer"), *SIZE, "--steps", "2", "--device", "cpu"]  # fmt: skip
    subprocess.run([*sample, "--out", str(tmp_path / "results")], check=True, capture_output=True, cwd=ROOT)
    written = json.loads((tmp_path / "results" / "00000.json").read_text())
    assert (written["type"], written["xyz_latent_mean"], written["xyz_latent_std"]) == (
        "i2vwbw-demb",
        stats.xyz_latent_mean,
        stats.xyz_latent_std,
    )
    refused = subprocess.run([*sample, "--out", str(tmp_path / "other"), "--type", "i2vwbw"], capture_output=True,
                             text=True, cwd=ROOT)  # fmt: skip
    assert refused.returncode != 0 and "contradicts the transformer" in refused.stderr.strip().splitlines()[-1]


def test_a_model_folder_around_a_fully_trained_transformer_samples_as_it_without_flags(cache_dir, tmp_path):
    """A model folder built around a fully trained fused transformer (fourdnex.model.presets --transformer) keeps
    what the weights were trained as, so inference.py given that folder alone samples exactly as with --sft_path
    naming its transformer: the same model type, XYZ statistics and outputs."""
    from fourdnex.data.cache import read_stats
    from fourdnex.model.adapters import read_transformer_meta
    from fourdnex.model.presets import save_model

    out = tmp_path / "full"
    finetune("--cache_dir", str(cache_dir), "--output_dir", str(out), *SIZE, "--train_mode", "full",
             "--type", "i2vwbw-demb", "--max_steps", "2", "--checkpointing_steps", "2")  # fmt: skip
    model = save_model(tmp_path / "model", "tiny", trained={"transformer": out / "transformer"})
    assert read_transformer_meta(model / "transformer") == read_transformer_meta(out / "transformer")
    sample = [sys.executable, str(ROOT / "inference.py"), "--prompt", "a red ball", "--image",
              str(ROOT / "example" / "scene.png"), "--model_path", str(model), *SIZE, "--steps", "2", "--device",
              "cpu"]  # fmt: skip
    at_own = subprocess.run([*sample, "--out", str(tmp_path / "alone")], check=True, capture_output=True, text=True,
                            cwd=ROOT).stdout  # fmt: skip
    named = [*sample, "--out", str(tmp_path / "named"), "--sft_path", str(model / "transformer")]
    subprocess.run(named, check=True, capture_output=True, cwd=ROOT)
    alone, explicit = (json.loads((tmp_path / run / "00000.json").read_text()) for run in ("alone", "named"))
    assert alone["type"] == "i2vwbw-demb" and alone["sft_path"] == str(model / "transformer")
    stats = read_stats(cache_dir)
    for written in (alone, explicit):
        assert (written["xyz_latent_mean"], written["xyz_latent_std"]) == (stats.xyz_latent_mean, stats.xyz_latent_std)
    results = [np.load(tmp_path / run / "00000.npz") for run in ("alone", "named")]
    for key in ("rgb", "xyz"):
        assert np.array_equal(results[0][key], results[1][key]), key
    # given no size, the weights' own: their 9 frames, and their 32 x 32 pixels' area at the 720 x 480 image's aspect
    # (round(sqrt(1024 * 480 / 720)) = 26 -> 16 rows, round(sqrt(1024 * 720 / 480)) = 39 -> 32 columns)
    unsized = [arg for arg in sample if arg not in SIZE]
    assert len(unsized) == len(sample) - len(SIZE)
    printed = subprocess.run([*unsized, "--out", str(tmp_path / "unsized")], check=True, capture_output=True,
                             text=True, cwd=ROOT).stdout  # fmt: skip
    assert np.load(tmp_path / "unsized" / "00000.npz")["rgb"].shape == (9, 16, 32, 3)
    # a size asked for by name that is not the weights' own is sampled, with one line saying so; their own is not
    other = subprocess.run([*unsized, "--out", str(tmp_path / "other"), "--height", "16", "--width", "32"],
                           check=True, capture_output=True, text=True, cwd=ROOT).stdout  # fmt: skip
    note = "note: these weights were trained at 9 frames of 32 x 32; at 9 frames of 16 x 32 expect far worse geometry"
    assert note in other and "trained at" not in printed and "trained at" not in at_own  # SIZE: the weights' own


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_a_trained_module_and_its_adapter_through_inference_agree(model_type, tmp_path):
    """Whatever the model type, the transformer training built (LoRA and domain embedding set to random values) and
    the one inference builds from the saved adapter (reading the type from its metadata, LoRA fused) give the same
    output."""
    from peft.utils import get_peft_model_state_dict

    from fourdnex.generate.pipeline import load_pipeline
    from fourdnex.model.adapters import AdapterMeta, resolve_model_type, save_adapter
    from fourdnex.train.engine import LORA_ADAPTER_NAME

    cfg = TrainConfig(model_type=model_type, lora_rank=4, lora_alpha=8, mixed_precision="float32", height=32, width=32)
    trained = build_transformer(cfg, TINY_MODEL, plan=None).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(trained).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    meta = AdapterMeta(rank=4, alpha=8.0, target_modules=list(cfg.lora_targets), model_type=model_type)
    lora = get_peft_model_state_dict(trained, adapter_name=LORA_ADAPTER_NAME)
    save_adapter(tmp_path / "adapter", lora, trained.domain_embedding, meta)
    pipe = load_pipeline(TINY_MODEL, dtype=torch.float32)
    adapter = load_adapter(tmp_path / "adapter")
    pipe.transformer.set_model_type(MODEL_TYPES[resolve_model_type(adapter, None)])
    apply_adapter(pipe.transformer, adapter)
    pipe.transformer.set_modalities("rgbxyz")
    inputs = {
        "hidden_states": torch.randn(1, 36, 2, 4, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 17, 32, generator=g),
    }
    with torch.no_grad():
        ours, theirs = (m(**inputs, return_dict=False)[0] for m in (trained, pipe.transformer))
    assert ours.abs().max() > 0
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_train_step_bench_trainer_matches_plain_diffusers_and_peft(tmp_path):
    """bench/bench_train_step.py on the tiny sizes: the trainer users run and a plain diffusers + peft step, each in
    its own process on the same seeded batches, log the same losses over three optimizer steps (the timed step's
    numbers are read back from the trainer's deferred metrics)."""
    losses = {}
    for mode in ("trainer", "baseline"):
        out = tmp_path / f"{mode}.json"
        command = [sys.executable, "-m", "bench.bench_train_step", "--mode", mode, "--steps", "2", "--warmup", "1"]
        done = subprocess.run([*command, "--json", str(out)], cwd=ROOT, env=finetune_env(), capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        (row,) = json.loads(out.read_text())["rows"]
        losses[mode] = [float(v) for v in row["losses"].split()]
    assert len(losses["trainer"]) == 3 and all(math.isfinite(v) and v > 0 for v in losses["trainer"])
    assert losses["trainer"] == pytest.approx(losses["baseline"], rel=1e-4)
