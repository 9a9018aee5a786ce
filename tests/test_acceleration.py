"""Speed and memory settings give the outputs of the plain pipeline: memory modes, caching,
context parallelism over 2 CPU processes, and one-line refusals of what the machine cannot do."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL, TINY
from test_inference_cli import SMALL_FLAGS, assert_one_line_error, run_cli

from fourdnex.generate.acceleration import (
    AccelerationError,
    GiB,
    apply_acceleration,
    choose_memory_mode,
    memory_needs,
    resolve,
)
from fourdnex.generate.config import AccelerationConfig
from fourdnex.generate.parallel import check_split, tokens_of

CPU = torch.device("cpu")


def sample(pipe, image, **kwargs):
    return pipe(image, "a cat", generator=torch.Generator().manual_seed(7), **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def exact(example_image):
    """The plain two-call sample every setting is compared against."""
    from fourdnex.generate.pipeline import load_pipeline

    pipe = load_pipeline(TINY, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return sample(pipe, example_image)


def accelerated(config: AccelerationConfig):
    from fourdnex.generate.pipeline import load_pipeline

    pipe = load_pipeline(TINY, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    resolved = resolve(config, CPU, pipe, tokens=24, pixels=5 * 32 * 48)
    apply_acceleration(pipe, resolved, CPU)
    return pipe, resolved


def test_a_cpu_holds_the_vae_convolutions_channels_last(example_image, exact):
    """On a CPU the VAE's convolution weights are held in channels-last memory (its decode about 2x as fast there): the
    sample is the same to rounding."""
    pipe, _ = accelerated(AccelerationConfig())
    convolutions = [m for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convolutions)
    out = sample(pipe, example_image)
    assert torch.allclose(out.latents, exact.latents, atol=1e-5)
    assert torch.allclose(out.xyz, exact.xyz, atol=1e-5)


@pytest.mark.parametrize("memory", ["model", "group"])
def test_memory_modes_equal_the_resident_model(memory, example_image, exact):
    pipe, resolved = accelerated(AccelerationConfig(memory=memory))
    assert resolved.memory == memory and not resolved.compile  # no compile on a CPU
    out = sample(pipe, example_image)
    assert torch.allclose(out.latents, exact.latents, atol=1e-5)
    assert torch.allclose(out.xyz, exact.xyz, atol=1e-5)


def test_fp8_weights_stay_close(example_image, exact):
    pipe, _ = accelerated(AccelerationConfig(fp8=True))
    assert pipe.transformer.blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn
    out = sample(pipe, example_image)
    deviation = (out.xyz - exact.xyz).abs().max().item()
    assert 0 < deviation < 0.1  # approximate: 3 mantissa bits per weight


def test_first_block_cache_exact_at_zero_threshold_and_skips_above(example_image, exact):
    from diffusers import FirstBlockCacheConfig

    pipe, _ = accelerated(AccelerationConfig(cache="fbc", cache_threshold=1e-9))
    assert torch.allclose(sample(pipe, example_image).latents, exact.latents, atol=1e-5)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    last_block_calls = []
    pipe.transformer.blocks[-1].ffn.register_forward_pre_hook(lambda module, args: last_block_calls.append(1))
    out = sample(pipe, example_image)
    assert len(last_block_calls) < 2 * SMALL["num_inference_steps"]  # later steps reuse the cached residual
    assert not torch.allclose(out.latents, exact.latents, atol=1e-3)


def test_memory_needs_order_and_auto_choice(tiny_pipe):
    needs = memory_needs(tiny_pipe, tokens=35_100, pixels=5 * 32 * 48)
    assert needs["none"] > needs["model"] >= needs["group"] >= needs["sequential"] > 0
    assert choose_memory_mode(needs, available=needs["none"] * 2) == "none"
    assert choose_memory_mode(needs, available=int(needs["model"] / 0.9) + 1) == "model"
    with pytest.raises(AccelerationError, match="not enough GPU memory"):
        choose_memory_mode(needs, available=needs["sequential"] // 2)
    batched = memory_needs(tiny_pipe, tokens=35_100, pixels=5 * 32 * 48, batch=2)
    assert batched["model"] > needs["model"]


def test_memory_needs_at_the_real_size_pick_the_documented_modes():
    """Real Wan2.1-I2V-14B byte counts (bf16 transformer and UMT5, float32 CLIP and VAE) at 35,100 tokens."""

    class Sized(torch.nn.Module):
        def __init__(self, nbytes: float) -> None:
            super().__init__()
            self.nbytes = int(nbytes)

    sizes = {"transformer": 32.8e9, "text_encoder": 11.4e9, "image_encoder": 2.5e9, "vae": 0.5e9}
    pipe = type("Pipe", (), {})()
    transformer = Sized(sizes["transformer"])
    transformer.config = type("C", (), {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824})
    transformer.blocks = [None] * 40
    transformer.dtype = torch.bfloat16
    pipe.transformer, pipe.text_encoder = transformer, Sized(sizes["text_encoder"])
    pipe.image_encoder, pipe.vae = Sized(sizes["image_encoder"]), Sized(sizes["vae"])
    import fourdnex.generate.acceleration as acceleration

    original = acceleration.module_bytes
    acceleration.module_bytes = lambda module: module.nbytes
    try:
        needs = memory_needs(pipe, tokens=35_100, pixels=49 * 480 * 720)
    finally:
        acceleration.module_bytes = original
    assert choose_memory_mode(needs, 79 * GiB) == "none"
    assert choose_memory_mode(needs, 47 * GiB) == "model"
    assert choose_memory_mode(needs, 23 * GiB) == "group"


def test_settings_the_machine_cannot_do_are_refused(tiny_pipe):
    with pytest.raises(AccelerationError, match="--memory sequential needs a CUDA GPU"):
        resolve(AccelerationConfig(memory="sequential"), CPU, tiny_pipe, tokens=24, pixels=1)
    with pytest.raises(AccelerationError, match="--cp ring needs CUDA GPUs"):
        resolve(AccelerationConfig(cp="ring"), CPU, tiny_pipe, tokens=24, pixels=1)
    with pytest.raises(AccelerationError, match="cannot be combined with --cp"):
        resolve(AccelerationConfig(cp="ulysses", memory="model"), CPU, tiny_pipe, tokens=24, pixels=1)
    with pytest.raises(ValueError, match="memory must be one of"):
        resolve(AccelerationConfig(memory="huge"), CPU, tiny_pipe, tokens=24, pixels=1)
    auto = resolve(AccelerationConfig(), CPU, tiny_pipe, tokens=24, pixels=1)
    assert dataclasses.astuple(auto)[:5] == ("native", False, "none", False, False)


def test_context_parallel_split_checks():
    assert tokens_of(49, 480, 720, fused=True) == 35_100
    check_split("ulysses", 4, 35_100, 40)
    check_split("ring", 3, 35_100, 40)
    with pytest.raises(AccelerationError, match="heads do not split over 3 processes; use --cp ring"):
        check_split("ulysses", 3, 35_100, 40)
    with pytest.raises(AccelerationError, match="35100 tokens of this video size do not split evenly over 8"):
        check_split("ulysses", 8, 35_100, 40)


def test_context_parallel_on_two_cpu_processes_matches_one(tmp_path):
    result = tmp_path / "cp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(ROOT / "tests" / "cp_worker.py"), str(result), "ulysses"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # A gloo process aborted in C++ (once in a CI run of the whole suite; not reproduced alone or under load):
        # the run is made once more, and must then end cleanly.
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(result.read_text())
    assert numbers["world_size"] == 2
    assert numbers["tokens_per_process"] * 2 == numbers["tokens"]  # the sequence really was split
    assert "enable context parallelism on the transformer first" in numbers["refused_before_cp"]
    for modalities in ("rgbxyz", "xyz"):
        deviation = numbers[modalities]
        assert deviation["max_abs_latents"] < 1e-5, modalities
        assert deviation["max_abs_rgb"] < 1e-5 and deviation["max_abs_xyz"] < 1e-5, modalities
        # Split decoding (RGB on rank 0, XYZ on rank 1, sent to rank 0) equals one process decoding the same latents.
        assert deviation["decode_max_abs_xyz"] == deviation.get("decode_max_abs_rgb", 0.0) == 0.0, modalities
    both = ["rgb", "xyz"]
    assert numbers["videos_held"] == [{"rgbxyz": both, "xyz": both}, {"rgbxyz": [], "xyz": []}]  # rank 0 only
    assert numbers["decode_timed"]


def test_cli_refuses_context_parallel_outside_torchrun(tmp_path):
    common = ["--prompt", "x", "--image", ROOT / "example" / "scene.png", "--out", tmp_path, "--model_path", TINY]
    proc = run_cli(*common, *SMALL_FLAGS, "--cp", "ulysses")
    # The launch command names this very interpreter's torch, so it works from a virtual environment that is not
    # activated (no torchrun on PATH needed).
    assert_one_line_error(proc, "--cp ulysses needs several processes", f"{sys.executable} -m torch.distributed.run")


def test_available_memory_of_a_device_without_an_index(monkeypatch):
    """``--device cuda`` (no index) is the current GPU: torch's memory queries refuse a CUDA device without an
    index, so the query must name it (a fake CUDA runtime that refuses like torch does stands in for the GPU)."""
    from fourdnex.generate import acceleration

    def indexed(device) -> int:
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        return device.index if isinstance(device, torch.device) else device

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    free_and_total = {1: (60 * gib, 80 * gib)}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: free_and_total[indexed(device)])
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.5 + 0 * indexed(device))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * gib + 0 * indexed(device))
    # free 60 GiB, but the process may use half of 80 GiB, 2 GiB of which it holds already
    assert acceleration.available_memory(torch.device("cuda")) == 38 * gib
    assert acceleration.available_memory(torch.device("cuda", 1)) == 38 * gib
