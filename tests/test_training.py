"""Fine-tuning: finetune.py under DeepSpeed ZeRO-2 on CPU (gloo) with the tiny model, and the pure pieces it uses."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from train_cache import TINY_MODEL, build_cache

from fourdnex.cli import run
from fourdnex.config import MODEL_TYPES
from fourdnex.data.cache import CacheError, LatentCache
from fourdnex.geometry.results import load_result
from fourdnex.model.adapters import apply_adapter, read_adapter
from fourdnex.model.fusion import condition_video, soft_mask, split_width
from fourdnex.model.transformer import FourDNeXTransformer
from fourdnex.train import memory_policy
from fourdnex.train.checkpoints import export_adapter, list_checkpoints
from fourdnex.train.config import TrainConfig, TrainingError
from fourdnex.train.engine import deepspeed_config, lr_factor, trainable_parameters
from fourdnex.train.loop import build_transformer, make_batch, sample_generator, stream_positions
from fourdnex.train.loss import LossWeights, batch_loss, flow_matching_loss, sample_sigmas, transformer_inputs
from fourdnex.train.memory_policy import Machine, RecomputePlan, choose_activation_memory

ROOT = Path(__file__).resolve().parent.parent
SIZE = ["--height", "32", "--width", "32", "--num_frames", "9"]
TINY = [*SIZE, "--lora_rank", "8", "--lora_alpha", "8"]


def finetune_env() -> dict[str, str]:
    """The environment of a one-process finetune.py run (it picks a free port itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def finetune(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), *args], env=finetune_env(), capture_output=True, text=True
    )
    if result.returncode:
        raise AssertionError(f"finetune.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs that a run logged to TensorBoard under ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((run / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return values


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache"), num_clips=2)


def overfit_args(cache_dir: Path, out: Path) -> list[str]:
    """30 steps of bf16 ZeRO-2 on two clips, a checkpoint every 10 steps (2 kept), a validation sample at the end."""
    return [
        "--cache_dir", str(cache_dir), "--output_dir", str(out), *TINY,
        "--learning_rate", "3e-3", "--lr_warmup_steps", "0", "--lr_schedule", "constant",
        "--max_steps", "30", "--checkpointing_steps", "10", "--validation_steps", "30",
        "--validation_image", str(ROOT / "example" / "scene.png"), "--validation_prompt", "a red ball",
        "--validation_inference_steps", "2",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def overfit_run(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overfit")
    finetune(*overfit_args(cache_dir, out))
    return out


def fixed_batches(cache_dir: Path, n: int = 4):
    """Held-fixed noisy samples of the training clips (positions no training step uses)."""
    cfg = TrainConfig(cache_dir=str(cache_dir), height=32, width=32, num_frames=9)
    cache = LatentCache(cache_dir, cfg.num_latent_frames, 32, 32)
    return [make_batch(cache, cfg, list(range(10_000 + 8 * i, 10_008 + 8 * i))) for i in range(n)]


def eval_loss(batches, adapter: Path | None) -> float:
    transformer = FourDNeXTransformer.from_pretrained(TINY_MODEL, subfolder="transformer", dtype=torch.float32)
    transformer.set_layout("rgbxyz")
    if adapter is not None:
        apply_adapter(transformer, read_adapter(adapter))
    with torch.no_grad():
        return sum(batch_loss(transformer, b, LossWeights(), torch.float32)[0].item() for b in batches) / len(batches)


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
    assert all(abs(v - 3e-3) < 1e-9 for _, v in scalars(overfit_run, "lr"))


def test_checkpoints_pruned_and_exported(overfit_run, cache_dir):
    kept = list_checkpoints(overfit_run)
    assert [p.name for p in kept] == ["checkpoint-000020", "checkpoint-000030"]
    assert not list((overfit_run / "checkpoints").glob(".*partial*"))
    saved = read_adapter(kept[-1] / "adapter")
    final = read_adapter(overfit_run / "adapter")
    exported = read_adapter(export_adapter(kept[-1], overfit_run / "exported"))  # DeepSpeed's zero_to_fp32
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
    assert tuned.meta["xyz_latent_mean"] == read_adapter(overfit_run / "adapter").meta.xyz_latent_mean
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
    whole, resumed = read_adapter(overfit_run / "adapter"), read_adapter(interrupted / "adapter")
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
    args = [sys.executable, str(ROOT / "finetune.py"), "--cache_dir", str(cache_dir), "--output_dir", str(out), *TINY]
    args += ["--max_steps", "3", "--lr_warmup_steps", "2", "--learning_rate", "1e-3", "--lr_schedule", "cosine"]
    args += ["--deepspeed_config", str(tmp_path / "zero3.json")]
    env = {**finetune_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [
        subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    saved = read_adapter(out / "adapter")
    merged = read_adapter(export_adapter(out / "checkpoints" / "checkpoint-000003", tmp_path / "merged"))
    assert len(saved.lora) == 32 and saved.lora["blocks.1.attn2.to_out.0.lora_B.weight"].shape == (24, 8)
    assert all(torch.equal(saved.lora[k], merged.lora[k]) for k in merged.lora)
    assert saved.domain_embedding.shape == (2, 24) and torch.equal(saved.domain_embedding, merged.domain_embedding)
    logged = [v for _, v in scalars(out, "lr")]
    expected = [1e-3 * lr_factor(s, warmup_steps=2, max_steps=3, schedule="cosine") for s in range(3)]
    assert logged == pytest.approx(expected, rel=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(name: str):
    """A top-level script as a module (its ``if __name__ == "__main__"`` block does not run)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_script", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_cache", "does not exist"),
        ("other_resolution", "built at 32x32 per modality, training asks for 48x48"),
        ("missing_stats", "stats.json: missing"),
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


def test_lr_schedule():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, schedule="cosine") for s in range(110)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0 and abs(f[60] - 0.5) < 1e-12 and f[-1] < 1e-3
    g = [lr_factor(s, warmup_steps=0, max_steps=100, schedule="cosine", min_ratio=0.1) for s in range(101)]
    assert g[0] == 1.0 and abs(g[50] - 0.55) < 1e-12 and abs(g[100] - 0.1) < 1e-12
    assert [lr_factor(s, warmup_steps=2, max_steps=10, schedule="constant") for s in (0, 1, 2, 9)] == [0.5, 1, 1, 1]


@pytest.mark.parametrize(
    ("method", "cdf"),
    [
        ("uniform", lambda s: s),
        ("shifted", lambda s: s / (3.0 - 2.0 * s)),  # u = s / (shift - (shift - 1) s)
    ],
)
def test_timestep_samplers(method, cdf):
    sigmas = sample_sigmas(20_000, method, torch.Generator().manual_seed(0), shift=3.0)
    assert sigmas.min() > 0 and sigmas.max() < 1
    assert stats.kstest(sigmas.double().numpy(), cdf).pvalue > 0.01
    other = sample_sigmas(20_000, "uniform", torch.Generator().manual_seed(0))
    if method != "uniform":
        assert stats.kstest(other.double().numpy(), cdf).pvalue < 1e-6  # the test can tell the laws apart
    if method == "shifted":
        assert abs(sigmas.median().item() - 0.75) < 0.01  # shift 3 moves the median from 0.5 to 0.75


def test_loss_weights_and_first_frame():
    g = torch.Generator().manual_seed(0)
    pred, x0, noise = (torch.randn(2, 16, 3, 4, 8, generator=g) for _ in range(3))
    target = noise - x0
    rgb_error, xyz_error = (e.square() for e in split_width(pred - target))
    loss, parts = flow_matching_loss(pred, x0, noise, LossWeights())
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(parts["rgb"], rgb_error.mean())
    only_xyz, _ = flow_matching_loss(pred, x0, noise, LossWeights(rgb=0.0, xyz=1.0))
    torch.testing.assert_close(only_xyz, xyz_error.mean())
    weighted, _ = flow_matching_loss(pred, x0, noise, LossWeights(rgb=1.0, xyz=3.0))
    torch.testing.assert_close(weighted, (rgb_error.mean() + 3 * xyz_error.mean()) / 4)
    no_first, parts = flow_matching_loss(pred, x0, noise, LossWeights(rgb_first_frame=False))
    torch.testing.assert_close(parts["rgb"], rgb_error[:, :, 1:].mean())
    pred2 = pred.clone()
    pred2[:, :, 0, :, :4] += 100.0  # the first RGB latent frame no longer counts
    torch.testing.assert_close(flow_matching_loss(pred2, x0, noise, LossWeights(rgb_first_frame=False))[0], no_first)


def test_sample_is_the_inference_input(cache_dir):
    """x0, mask and condition are laid out as the pipeline builds them; timestep = 1000 s."""
    cfg = TrainConfig(cache_dir=str(cache_dir), height=32, width=32, num_frames=9)
    cache = LatentCache(cache_dir, cfg.num_latent_frames, 32, 32)
    batch = make_batch(cache, cfg, [0, 1])
    inputs = transformer_inputs(batch, torch.float32)
    hidden = inputs["hidden_states"]
    assert hidden.shape == (2, 36, 3, 4, 8)
    s = batch.sigmas.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(hidden[:, :16], (1 - s) * batch.x0 + s * batch.noise)
    torch.testing.assert_close(hidden[:, 16:20], soft_mask(2, 3, 4, 8, "rgbxyz"))
    torch.testing.assert_close(inputs["timestep"], batch.sigmas * 1000)
    # the same positions give the same noise and clips however they are grouped
    again = make_batch(cache, cfg, [1])
    assert torch.equal(again.noise[0], batch.noise[1]) and torch.equal(again.x0[0], batch.x0[1])
    one = TrainConfig(train_batch_size=2)
    two = TrainConfig(train_batch_size=1)
    assert stream_positions(one, 3, 0, 0, 1) == stream_positions(two, 3, 0, 0, 2) + stream_positions(two, 3, 0, 1, 2)


def test_condition_cut_and_encoded(cache_dir, tmp_path):
    """Causal VAE: the first latent frames of a longer condition encoding are the shorter clip's encoding; a cache
    whose condition is too short gets it encoded from the first frame, to the same values."""
    from diffusers import AutoencoderKLWan

    from fourdnex.data.cache import VaeConditionEncoder

    vae = AutoencoderKLWan.from_pretrained(TINY_MODEL, subfolder="vae", dtype=torch.float32)
    with torch.no_grad():
        first = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        long = vae.encode(condition_video(first, 9, "rgbxyz")).latent_dist.mode()  # (1, 16, 3, 4, 8)
        short = vae.encode(condition_video(first, 5, "rgbxyz")).latent_dist.mode()  # (1, 16, 2, 4, 8)
    assert torch.equal(long[:, :, :2], short)
    full = LatentCache(cache_dir, 3, 32, 32)
    assert full.cached_condition
    short_cache = build_cache(tmp_path, num_clips=2, cond_num_frames=5)
    encoded = LatentCache(short_cache, 3, 32, 32)
    assert not encoded.cached_condition
    encoder = VaeConditionEncoder(vae, torch.device("cpu"))
    for i in range(2):
        sample = encoded.sample(i)
        assert sample.cond is None
        torch.testing.assert_close(encoder(sample.cond_video[None])[0], full.sample(i).cond, atol=1e-5, rtol=1e-5)
        assert torch.equal(sample.mask, full.sample(i).mask)
    assert LatentCache(short_cache, 2, 32, 32).cached_condition  # 5 frames = 2 latent frames: cached
    with pytest.raises(CacheError, match="holds 9 frames"):
        LatentCache(cache_dir, 4, 32, 32)


def test_keeping_attention_keeps_gradients_and_skips_recompute():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                CountAttention.calls += 1
            return func(*args, **(kwargs or {}))

    inputs = tiny_inputs()
    grads, calls = [], []
    for plan in (None, RecomputePlan(attention=True)):  # plain checkpointing, then both blocks' attention kept
        model = tiny_training_model(plan=plan)
        CountAttention.calls = 0
        with CountAttention():
            model(**inputs, return_dict=False)[0].square().mean().backward()
        calls.append(CountAttention.calls)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    # 2 blocks x 2 attentions run forward once; full checkpointing runs them again before backward
    assert calls[1] < calls[0]


def test_keeping_ffn_keeps_gradients_and_skips_recompute():
    """Keeping the feed-forward pre-activation: the same gradients as plain checkpointing, and the feed-forward runs
    once per block (its forward) instead of twice (forward and recompute); its backward runs as before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountGelu(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = {"forward": 0, "backward": 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.gelu.default:
                self.calls["forward"] += 1
            if func is torch.ops.aten.gelu_backward.default:
                self.calls["backward"] += 1
            return func(*args, **(kwargs or {}))

    inputs = tiny_inputs()
    grads, calls = [], []
    for plan in (None, RecomputePlan(ffn=True)):  # plain checkpointing, then both blocks' feed-forward kept
        model = tiny_training_model(plan=plan)
        with CountGelu() as counter:
            model(**inputs, return_dict=False)[0].square().mean().backward()
        calls.append(counter.calls)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-9) for n in grads[0])
    # 2 blocks, plus the GELUs of the text and the image embedders (run once, outside the blocks)
    assert calls[0] == {"forward": 2 * 2 + 2, "backward": 2}
    assert calls[1] == {"forward": 2 + 2, "backward": 2}


def test_kept_ffn_refuses_what_it_cannot_replay():
    """LoRA on the feed-forward or a trained modulation table: one ValueError naming why, before any step."""
    from fourdnex.train.activation_memory import enable_block_recompute

    model = FourDNeXTransformer.from_pretrained(TINY_MODEL, subfolder="transformer", dtype=torch.float32)
    model.blocks[1].scale_shift_table.requires_grad_(True)
    with pytest.raises(ValueError, match="its weights and the block's modulation frozen"):
        enable_block_recompute(model, RecomputePlan(ffn=True))
    lora = tiny_training_model(lora_targets=("to_q", "ffn.net.2"))
    with pytest.raises(ValueError, match="Linear-GELU-Linear without LoRA"):
        enable_block_recompute(lora, RecomputePlan(ffn=True, blocks=1))


def tiny_inputs() -> dict[str, torch.Tensor]:
    """One fused tiny-model input (35 channels + mask, 3 x 4 x 8 latent, 16 text tokens, CLIP tokens)."""
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 36, 3, 4, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 257, 32, generator=g),
    }


def tiny_training_model(plan: RecomputePlan | None = None, **settings) -> torch.nn.Module:
    """The tiny transformer in fp32 prepared as for training (gradient checkpointing keeping what ``plan`` says), with
    random (not zero) LoRA B and domain embedding."""
    # explicitly native SDPA: diffusers keeps the last backend any model was set to as the process-wide default
    cfg = TrainConfig(**{"lora_rank": 4, "mixed_precision": "no", "attention_backend": "native", **settings})
    model = FourDNeXTransformer.from_pretrained(TINY_MODEL, subfolder="transformer", dtype=torch.float32)
    model = build_transformer(cfg, transformer=model, plan=plan)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return model


def two_backwards(model: torch.nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of two forward + backward passes (gradients accumulate; host buffers are reused) and the gradients."""
    losses = []
    for _ in range(2):
        loss = model(**tiny_inputs(), return_dict=False)[0].square().mean()
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class CountingKernel:
    """Stands in for the CPU attention kernel of the block recompute; counts its forward and backward calls."""

    def __init__(self, monkeypatch) -> None:
        from fourdnex.train import activation_memory

        self.forward_calls = self.backward_calls = 0
        kernel = activation_memory.CPU_FLASH

        def forward(*args):
            self.forward_calls += 1
            return kernel.forward(*args)

        def backward(*args):
            self.backward_calls += 1
            return kernel.backward(*args)

        counting = activation_memory.AttentionKernel("counting", forward, backward)
        monkeypatch.setattr(activation_memory, "CPU_FLASH", counting)


ALL_KEPT_AND_PARKED = RecomputePlan(attention=True, ffn=True, park_inputs=True, park_attention=True, park_ffn=True)
ATTENTION_KEPT_AND_PARKED = RecomputePlan(attention=True, park_inputs=True, park_attention=True)


@pytest.fixture(scope="session")
def plain_references() -> dict:
    """Losses and gradients of plain gradient checkpointing, by (compiled, model type), computed once."""
    return {}


@pytest.mark.parametrize(
    ("plan", "compiled", "model_type"),
    [
        (RecomputePlan(attention=True), False, "i2vwbw-demb-samerope"),
        (RecomputePlan(park_inputs=True), False, "i2vwbw-demb-samerope"),
        (RecomputePlan(attention=True, blocks=1, park_inputs=True), False, "i2vwbw-demb-samerope"),
        (ATTENTION_KEPT_AND_PARKED, False, "i2vwbw"),
        (ATTENTION_KEPT_AND_PARKED, True, "i2vwbw-demb"),
        (RecomputePlan(ffn=True, park_ffn=True), False, "i2vwbw-demb-samerope"),
        (ALL_KEPT_AND_PARKED, False, "i2vwbw"),
        (ALL_KEPT_AND_PARKED, True, "i2vwbw-demb"),
    ],
    ids=[
        "keep",
        "park",
        "keep1-park",
        "keep-park-all-no-domain-emb",
        "keep-park-all-compiled",
        "ffn-park",
        "attention-ffn-all-no-domain-emb",
        "attention-ffn-all-compiled",
    ],
)
def test_kept_and_parked_equal_plain_checkpointing(plan, compiled, model_type, plain_references, monkeypatch):
    """Keeping attention outputs and feed-forward pre-activations and parking them and the block inputs in host memory
    change what the backward recomputes, not the numbers: loss and every trainable gradient (LoRA A/B, the domain
    embedding) equal plain checkpointing's in fp32 (measured: bit for bit eager and with kept attention compiled; a
    kept feed-forward compiled runs eagerly where plain checkpointing fuses it, 5e-7 apart), the attention kernel of a
    kept block runs once forward and once backward per pass, and the host buffers are allocated once. "i2vwbw" has no
    trainable input to block 0 (frozen domain embedding): its LoRA still gets gradients. The bytes parked are counted
    by the benchmark's copier (bench/bench_train_step.py), which times the copies on CUDA."""
    from bench.bench_train_step import TimedCopier
    from fourdnex.train.activation_memory import block_recompute

    common = {"compile_blocks": compiled, "model_type": model_type}
    if (compiled, model_type) not in plain_references:
        plain_references[compiled, model_type] = two_backwards(tiny_training_model(**common))
    ref_losses, ref = plain_references[compiled, model_type]
    counter = CountingKernel(monkeypatch)
    model = tiny_training_model(plan=plan, **common)
    recompute = block_recompute(model)
    copier = TimedCopier.install(recompute, torch.device("cpu"))
    losses, grads = two_backwards(model)
    # compiled, a kept feed-forward runs eagerly (a graph break) where the reference's is fused: fp32 rounding apart
    tolerance = 1e-6 if compiled and plan.ffn else 1e-7
    assert losses == pytest.approx(ref_losses, rel=tolerance, abs=0)
    assert grads.keys() == ref.keys() and len(ref) == 2 * 2 * 4 * 2 + (model_type != "i2vwbw")  # blocks*attn*AB*4
    worst = max(((grads[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)
    print(f"{plan} compiled={compiled}: max |grad - plain| / max |plain| = {worst:.1e}")
    assert worst <= 1e-6 and all(ref[n].abs().max() > 0 for n in ref)
    blocks = min(plan.blocks or 2, 2)
    kept, kept_ffn = blocks * plan.attention, blocks * plan.ffn
    assert (counter.forward_calls, counter.backward_calls) == (2 * kept, 2 * kept)
    stats = copier.pop_stats(recompute)
    block_input, lse = 24 * 24 * 4, 2 * 24 * 4  # bytes: 24 tokens x 24 channels, 2 heads x 24 tokens, fp32
    hidden = 24 * 48 * 4  # the feed-forward pre-activation: 24 tokens x 48, fp32
    per_pass = 2 * block_input * plan.park_inputs
    per_pass += kept * (block_input + lse) * plan.park_attention
    per_pass += kept_ffn * hidden * plan.park_ffn
    assert stats["parked_gb"] * 1e9 == pytest.approx(2 * per_pass)
    assert stats["host_gb"] * 1e9 == pytest.approx(per_pass)  # one pass's worth, reused by the second


def test_kept_attention_processor_outside_checkpointing_is_stock():
    """Without a checkpointed forward around it (inference, validation) a kept block computes what diffusers'
    processor computes, bit for bit."""
    stock = tiny_training_model()
    kept = tiny_training_model(plan=RecomputePlan(attention=True))
    assert type(kept.blocks[0].attn1.processor).__name__ == "KeptSelfAttentionProcessor"
    with torch.no_grad():
        assert torch.equal(stock(**tiny_inputs())[0], kept(**tiny_inputs())[0])


@pytest.mark.parametrize("kernel_name", ["CUDA_FLASH", "CUDNN"])
def test_cuda_attention_ops_on_meta(kernel_name):
    """The CUDA kernels' aten forward and backward calls, checked against the ops' schemas and shape functions on
    the meta device (35,100 tokens x 40 heads x 128, bf16, as at the real size), through the replaying Function."""
    from fourdnex.train import activation_memory

    kernel = getattr(activation_memory, kernel_name)
    shape = (1, 35_100, 40, 128)  # (B, N, H, D), as the processor builds them
    q, k, v = (torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        out, lse, extra = kernel.forward(q_t.detach(), k_t.detach(), v_t.detach())
    assert out.shape == (1, 40, 35_100, 128) and lse.shape[:3] == (1, 40, 35_100) and lse.dtype == torch.float32
    replayed = activation_memory._KeptAttention.apply(q_t, k_t, v_t, (out, lse, extra), kernel)
    replayed.transpose(1, 2).flatten(2, 3).sum().backward()
    assert q.grad.shape == k.grad.shape == v.grad.shape == shape


def test_kept_and_parked_train_like_plain(overfit_run, cache_dir, tmp_path):
    """finetune.py's training under DeepSpeed ZeRO-2 (bf16, gloo) with both blocks' attention and feed-forward kept
    and everything parked (what --activation_memory attention+ffn does on CUDA; tests/train_worker.py) logs the same
    losses and writes the same adapter as the overfit run's plain gradient checkpointing, all 30 steps."""
    out = tmp_path / "kept"
    worker = [sys.executable, str(ROOT / "tests" / "train_worker.py"), *overfit_args(cache_dir, out)]
    result = subprocess.run(worker, env=finetune_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    plain_losses, kept_losses = scalars(overfit_run, "loss/total"), scalars(out, "loss/total")
    print("losses", plain_losses[-3:], kept_losses[-3:])
    assert len(plain_losses) == 30 and kept_losses == plain_losses
    plain, kept = read_adapter(overfit_run / "adapter"), read_adapter(out / "adapter")
    assert all(torch.equal(kept.lora[k], plain.lora[k]) for k in plain.lora)
    assert torch.equal(kept.domain_embedding, plain.domain_embedding)


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
    assert read_adapter(run / "adapter").lora  # the inference-ready adapter, LoRA tensors in it


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


# --------------------------------------------------------------------------------------------------------------------
# --activation_memory auto: the policy, on stand-in machines.

GB = 1e9


def gpu_node(free_gb: float, processes: int = 1) -> Machine:
    return Machine(cuda=True, free_host_bytes=int(free_gb * GB), processes=processes)


@pytest.mark.parametrize(
    ("free_gb", "processes", "expected"),
    [
        (160, 2, "attention+ffn"),  # 80 GB per process: 68 GB needed for both, with room to spare
        (100, 2, "attention"),  # 50 GB: the attention outputs (30 GB) fit, the pre-activations too would not
        (60, 2, "recompute"),
        (76, 1, "attention+ffn"),  # the thresholds themselves
        (75.9, 1, "attention"),
        (34, 1, "attention"),
        (33.9, 1, "recompute"),
        (1000, 16, "attention"),  # 62.5 GB each: 16 processes share the RAM
    ],
)
def test_auto_keeps_what_host_ram_allows(free_gb, processes, expected):
    """Under ZeRO-2 on CUDA, auto compares the free host RAM per process with 76 GB (attention+ffn) and 34 GB
    (attention) at 49x480x720, the thresholds scripts/finetune.sh used."""
    assert choose_activation_memory(TrainConfig(), zero_stage=2, machine=gpu_node(free_gb, processes)) == expected


def test_auto_recomputes_without_cuda_under_zero3_and_where_it_cannot_replay():
    plenty = gpu_node(1000)
    assert choose_activation_memory(TrainConfig(), 3, plenty) == "recompute"  # ZeRO-3 partitions the LoRA weights
    assert choose_activation_memory(TrainConfig(), 2, Machine(False, None, 1)) == "recompute"  # no CUDA, no RAM read
    flex = TrainConfig(attention_backend="flex")
    assert choose_activation_memory(flex, 2, plenty) == "recompute"
    ffn_lora = TrainConfig(lora_targets=("to_q", "ffn.net.0.proj"))
    assert choose_activation_memory(ffn_lora, 2, plenty) == "attention"  # the feed-forward is trained: recomputed
    assert choose_activation_memory(TrainConfig(gradient_checkpointing=False), 2, plenty) == "recompute"


def test_auto_thresholds_scale_with_tokens_batch_and_dtype():
    """The kept bytes are proportional to the tokens of a micro-batch and the bytes per element."""
    short = TrainConfig(num_frames=25)  # 7 latent frames: 18,900 tokens, thresholds x 0.54 (41 GB / 18 GB)
    assert short.tokens_per_sample == 18_900 and TrainConfig().tokens_per_sample == 35_100
    assert choose_activation_memory(short, 2, gpu_node(45)) == "attention+ffn"
    assert choose_activation_memory(short, 2, gpu_node(40)) == "attention"
    for doubled in (TrainConfig(train_batch_size=2), TrainConfig(mixed_precision="no")):  # 152 GB / 68 GB
        assert choose_activation_memory(doubled, 2, gpu_node(150)) == "attention"
        assert choose_activation_memory(doubled, 2, gpu_node(152)) == "attention+ffn"


def test_auto_logs_one_line_on_rank_zero(caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level(logging.INFO, logger="fourdnex.train.memory_policy"):
        choose_activation_memory(TrainConfig(), 2, gpu_node(100, 2))
    (record,) = caplog.records
    assert record.getMessage() == (
        "activation memory: auto -> attention: 50.0 GB free host RAM per process (100.0 GB / 2); attention+ffn "
        "needs 76.0 GB, attention 34.0 GB at 35,100 tokens per micro-batch, parked in page-locked host memory"
    )
    caplog.clear()
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger="fourdnex.train.memory_policy"):
        choose_activation_memory(TrainConfig(), 2, gpu_node(100, 2))
    assert not caplog.records


def test_machine_reads_processes_per_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory_policy, "free_host_bytes", lambda: 123 * GB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory_policy.Machine.read() == Machine(cuda=True, free_host_bytes=123 * GB, processes=1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun and accelerate set it
    assert memory_policy.Machine.read().processes == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory_policy.Machine.read().free_host_bytes is None  # not needed without CUDA


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_free_host_ram_reads_meminfo_and_cgroup_limits(tmp_path):
    """Free host RAM is the smaller of MemAvailable and what the tightest cgroup memory limit on the process (or an
    ancestor) leaves: limit - usage + reclaimable file cache; v2 and v1 files, "max" and v1's 2**63 mean no limit."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemAvailable:   100000000 kB\nSwapTotal: 0 kB\n")
    v2, own = tmp_path / "v2", tmp_path / "cgroup"
    own.write_text("0::/job/step\n")
    write_files(v2, {"memory.max": "max", "job/memory.max": "max", "job/step/memory.max": "max"})
    assert memory_policy.cgroup_free_bytes(v2, own) is None
    assert memory_policy.free_host_bytes(meminfo, v2, own) == 100_000_000 * 1024  # no limit: MemAvailable
    write_files(
        v2,
        {
            "job/memory.max": str(50 * 10**9),
            "job/memory.current": str(30 * 10**9),
            "job/memory.stat": "anon 1\ninactive_file 4000000000\nactive_file 7\n",
            "job/step/memory.max": str(60 * 10**9),
            "job/step/memory.current": str(10 * 10**9),
        },
    )
    assert memory_policy.cgroup_free_bytes(v2, own) == 24 * 10**9  # the ancestor's 50 - 30 + 4 is the tighter
    assert memory_policy.free_host_bytes(meminfo, v2, own) == 24 * 10**9
    container = tmp_path / "container"  # a container's own cgroup is its root: /proc/self/cgroup says 0::/
    write_files(container, {"memory.max": str(8 * 10**9), "memory.current": str(3 * 10**9)})
    (tmp_path / "root_cgroup").write_text("0::/\n")
    assert memory_policy.cgroup_free_bytes(container, tmp_path / "root_cgroup") == 5 * 10**9
    v1, own_v1 = tmp_path / "v1", tmp_path / "cgroup_v1"
    own_v1.write_text("5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
    write_files(
        v1,
        {
            "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
            "memory/docker/abc/memory.limit_in_bytes": str(16 * 10**9),
            "memory/docker/abc/memory.usage_in_bytes": str(10 * 10**9),
            "memory/docker/abc/memory.stat": "inactive_file 1\ntotal_inactive_file 2000000000\n",
        },
    )
    assert memory_policy.cgroup_free_bytes(v1, own_v1) == 8 * 10**9
    assert memory_policy.cgroup_free_bytes(tmp_path / "nothing", tmp_path / "no_such_file") is None


def test_explicit_setting_under_zero3_refused_in_one_line():
    for setting in ("attention", "attention+ffn"):
        with pytest.raises(TrainingError, match=f"--activation_memory {re.escape(setting)} needs ZeRO-2") as err:
            choose_activation_memory(TrainConfig(activation_memory=setting), 3, gpu_node(1000))
        assert "\n" not in str(err.value)
    assert choose_activation_memory(TrainConfig(activation_memory="recompute"), 3, gpu_node(1000)) == "recompute"
    assert choose_activation_memory(TrainConfig(activation_memory="attention"), 2, gpu_node(1)) == "attention"


@pytest.mark.parametrize("problem", ["old_torch", "new_torch", "missing_op", "missing_diffusers_internal"])
def test_keeping_falls_back_to_recompute_outside_tested_versions(problem, caplog, monkeypatch):
    """Outside the torch versions the private calls are tested with, or where one is missing, a setting that keeps
    runs plain recompute instead, with one warning line saying why."""
    assert memory_policy.keeping_unsupported() is None  # this machine's torch and diffusers
    symbols = memory_policy.PRIVATE_SYMBOLS
    change = {
        "old_torch": lambda: monkeypatch.setattr(torch, "__version__", "2.10.1+cu128"),
        "new_torch": lambda: monkeypatch.setattr(torch, "__version__", "2.14.0"),
        "missing_op": lambda: monkeypatch.setattr(
            memory_policy, "PRIVATE_SYMBOLS", (*symbols, ("torch", "ops.aten._no_such_attention"))
        ),
        "missing_diffusers_internal": lambda: monkeypatch.setattr(
            memory_policy, "PRIVATE_SYMBOLS", (*symbols, ("diffusers.models.attention_dispatch", "_no_such_thing"))
        ),
    }
    change[problem]()
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level(logging.INFO, logger="fourdnex.train.memory_policy"):
        assert choose_activation_memory(TrainConfig(activation_memory="attention+ffn"), 2, gpu_node(1)) == "recompute"
        assert choose_activation_memory(TrainConfig(), 2, gpu_node(1000)) == "recompute"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    expected = {
        "old_torch": "torch 2.10.1+cu128 is outside the tested 2.11-2.13",
        "new_torch": "torch 2.14.0 is outside",
        "missing_op": "torch.ops.aten._no_such_attention is missing",
        "missing_diffusers_internal": "diffusers.models.attention_dispatch._no_such_thing is missing",
    }
    assert warnings[0].startswith("activation memory: attention+ffn falls back to recompute: ")
    assert expected[problem] in warnings[0]


def test_plan_of_each_setting():
    """On CUDA the kept tensors and the block inputs are parked; on a CPU nothing is (host memory is the device's)."""
    assert RecomputePlan.for_setting("recompute", park=True) is None
    assert RecomputePlan.for_setting("attention", park=True) == RecomputePlan(
        attention=True, park_inputs=True, park_attention=True
    )
    assert RecomputePlan.for_setting("attention+ffn", park=False) == RecomputePlan(attention=True, ffn=True)
    assert RecomputePlan.for_setting("attention+ffn", park=True) == ALL_KEPT_AND_PARKED


def test_any_frame_tasks_and_the_rgb_layout_read_hand_built_conditions(cache_dir):
    """Each task's mask and condition video are built here from the cached clip's own frames; the RGB layout holds the
    RGB latent alone, conditioned on [first frame] without the plane."""
    from fourdnex.files import read_video
    from fourdnex.model.fusion import condition_frames, condition_mask
    from fourdnex.train.config import CONDITION_TASKS
    from fourdnex.train.loop import draw_given

    cache = LatentCache(cache_dir, 3, 32, 32)
    record = json.loads((cache_dir / "manifest.jsonl").read_text().splitlines()[0])
    frames = read_video(cache_dir / record["files"]["video"])  # (9, 32, 32, 3)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    given = torch.tensor([True, False, False, True, False, False, False, False, True])
    sample = cache.sample(0, given)
    assert sample.cond is None
    torch.testing.assert_close(sample.cond_video, condition_frames(video, given[None], "rgbxyz")[0])
    assert torch.equal(sample.mask, condition_mask(given[None], 4, 8, "rgbxyz")[0])
    assert torch.equal(sample.mask[:, 2, :, :4], torch.tensor([0.0, 0, 0, 1])[:, None, None].expand(4, 4, 4))
    rgb = LatentCache(cache_dir, 3, 32, 32, "rgb").sample(0)
    assert torch.equal(rgb.x0, load_file(cache_dir / record["files"]["latents"])["rgb"][:, :3].float())
    first = torch.zeros(9, dtype=torch.bool)
    first[0] = True
    assert torch.equal(rgb.mask, condition_mask(first[None], 4, 4, "rgb")[0])
    # Its condition is cached: the tiny VAE's encoding of [first frame, then zeros], without the plane.
    from PIL import Image

    from fourdnex.model.loading import load_vae

    png = np.array(Image.open(cache_dir / record["files"]["first_frame"]))  # lossless, as the build encoded it
    first_frame = torch.from_numpy(png).permute(2, 0, 1).float()[None, :, None] / 127.5 - 1  # (1, 3, 1, H, W)
    video = torch.cat([first_frame, torch.zeros(1, 3, 8, 32, 32)], dim=2)
    vae = load_vae(TINY_MODEL).eval()
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert rgb.cond_video is None
    torch.testing.assert_close(rgb.cond, ((z - mean) / std)[0], atol=1e-5, rtol=1e-5)
    # The task shares: drawn from the sample's own generator, close to the preset over many draws.
    counts = {"image": 0, "first_last": 0, "keyframes": 0, "video": 0}
    for position in range(2000):
        g = sample_generator(0, position)
        drawn = draw_given(CONDITION_TASKS["any"], 9, g)
        kind = ("video" if drawn.all() else "first_last" if drawn.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 1]
                else "image" if drawn.sum() == 1 else "keyframes")  # fmt: skip
        counts[kind] += 1
        assert drawn[0]
    for kind, share in CONDITION_TASKS["any"].items():
        assert abs(counts[kind] / 2000 - share) < 0.04, counts  # binomial std 0.011


def test_full_training_of_a_plain_image_to_video_base(cache_dir, tmp_path):
    """--train_mode full --layout rgb: every weight trained on the RGB latents alone; the run writes a diffusers
    transformer folder (what inference.py --sft_path loads) equal to DeepSpeed's own fp32 merge of the state."""
    from fourdnex.model.loading import load_transformer
    from fourdnex.train.checkpoints import fp32_trainable_state

    out = tmp_path / "base"
    finetune("--cache_dir", str(cache_dir), "--output_dir", str(out), *SIZE, "--train_mode", "full",
             "--layout", "rgb", "--type", "i2vwbw", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
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
        run(load_script("finetune.py").main, load_script("finetune.py").build_parser(),
            ["--cache_dir", str(cache_dir), "--train_mode", "full", "--activation_memory", "attention+ffn", *SIZE])


def test_the_training_target_is_what_the_inference_sampler_steps_with():
    """Checked against the sampler, not the trainer: at each noise level s the inference scheduler (the Wan
    checkpoint's UniPC, flow prediction, shift 3) visits, x_t = (1 - s) x0 + s noise with the model answering the
    trainer's target noise - x0 is stepped to the next level's (1 - s') x0 + s' noise, and finally onto x0."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_pretrained(TINY_MODEL, subfolder="scheduler")
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 2, 4, 8, generator=g), torch.randn(1, 16, 2, 4, 8, generator=g)
    sigmas = scheduler.sigmas.tolist()  # 4 levels, then 0
    x = (1 - sigmas[0]) * x0 + sigmas[0] * noise
    for i, t in enumerate(scheduler.timesteps):
        assert abs(float(t) - 1000 * sigmas[i]) <= 1  # the trainer's timestep 1000 s, up to the sampler's rounding
        x = scheduler.step(noise - x0, t, x, return_dict=False)[0]
        torch.testing.assert_close(x, (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise, rtol=0, atol=1e-5)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_a_trained_module_and_its_adapter_through_inference_agree(model_type, tmp_path):
    """Whatever the model type, the transformer training built (LoRA and domain embedding set to random values) and
    the one inference builds from the saved adapter (reading the type from its metadata, LoRA fused) give the same
    output."""
    from peft.utils import get_peft_model_state_dict

    from fourdnex.generate.pipeline import load_pipeline
    from fourdnex.model.adapters import AdapterMeta, resolve_model_type, save_adapter
    from fourdnex.train.engine import LORA_ADAPTER_NAME

    cfg = TrainConfig(model_type=model_type, lora_rank=4, lora_alpha=8, mixed_precision="no", height=32, width=32)
    trained = build_transformer(cfg, TINY_MODEL, plan=None).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(trained).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    meta = AdapterMeta(rank=4, alpha=8.0, target_modules=list(cfg.lora_targets), model_type=model_type)
    lora = get_peft_model_state_dict(trained, adapter_name=LORA_ADAPTER_NAME)
    save_adapter(tmp_path / "adapter", lora, trained.domain_embedding, meta)
    pipe = load_pipeline(TINY_MODEL, dtype=torch.float32)
    adapter = read_adapter(tmp_path / "adapter")
    pipe.transformer.set_model_type(MODEL_TYPES[resolve_model_type(adapter, None)])
    apply_adapter(pipe.transformer, adapter)
    pipe.transformer.set_layout("rgbxyz")
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


def test_a_cache_in_memory_gives_the_samples_of_its_files(cache_dir, tmp_path):
    """--cache_in_memory reads every file a run uses once: the samples equal those read from the files, and the
    run no longer needs the files."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    for layout in ("rgbxyz", "rgb"):
        on_disk = LatentCache(copy, 3, 32, 32, layout)
        held = LatentCache(copy, 3, 32, 32, layout, in_memory=True)
        assert len(held.memory) == 2 + 2 + len({item["files"]["prompt"] for item in held.items})
        expected = [on_disk.sample(i) for i in range(2)]
        for folder in ("latents", "clip", "prompt"):
            shutil.rmtree(copy / folder)
        for i, sample in enumerate(expected):
            again = held.sample(i)
            for name in ("x0", "mask", "cond", "prompt_embeds", "image_embeds"):
                assert torch.equal(getattr(again, name), getattr(sample, name)), (layout, name)
        shutil.rmtree(copy)
        shutil.copytree(cache_dir, copy)


def test_a_cache_without_the_rgb_condition_encodes_it(cache_dir, tmp_path):
    """A cache built before ``cond_rgb`` existed still trains the RGB layout: the condition is encoded from the
    first frame, to the values the cache would hold."""
    from safetensors.torch import save_file

    from fourdnex.data.cache import VaeConditionEncoder
    from fourdnex.model.loading import load_vae

    old = tmp_path / "old"
    shutil.copytree(cache_dir, old)
    for path in (old / "latents").rglob("*.safetensors"):
        tensors = load_file(path)
        del tensors["cond_rgb"]
        save_file(tensors, path)
    cached = LatentCache(cache_dir, 3, 32, 32, "rgb")
    encoded = LatentCache(old, 3, 32, 32, "rgb")
    assert cached.cached_condition and not encoded.cached_condition
    encoder = VaeConditionEncoder(load_vae(TINY_MODEL), torch.device("cpu"))
    for i in range(2):
        sample = encoded.sample(i)
        torch.testing.assert_close(encoder(sample.cond_video[None])[0], cached.sample(i).cond, atol=1e-5, rtol=1e-5)
