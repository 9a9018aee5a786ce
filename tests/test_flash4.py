"""FlashAttention-4 as the ``flash_4`` attention backend, on the CPU through its plain-math stand-in
(fourdnex.testing.flash4): the registration and the custom ops' fake kernels; outputs, log-sum-exp and gradients
against float64 SDPA; torch.compile with fullgraph=True through the transformer; fine-tuning's kept attention; context
parallelism (Ulysses and ring) on two processes; and the choice of backend with its fallbacks, one line each."""

import contextlib
import json
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from test_inference_cli import SMALL_FLAGS, assert_one_line_error, run_cli

from fourdnex.generate.acceleration import AccelerationError, check_machine, resolve
from fourdnex.generate.config import AccelerationConfig
from fourdnex.model import attention
from fourdnex.testing.flash4 import installed

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def process_wide_backend():
    """diffusers keeps the last backend any model was set to as the process-wide default: restore it."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture
def stand_in():
    with installed() as calls:
        yield calls


@pytest.fixture
def capability(monkeypatch):
    """Make this machine answer a compute capability when asked about a GPU."""

    def set_to(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_to


def qkv(batch=2, queries=7, keys=7, heads=3, dim=8, seed=0) -> list[torch.Tensor]:
    """Random q ``(B, N, H, D)``, k and v ``(B, M, H, D)`` (diffusers' layout), float32, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, queries, heads, dim), (batch, keys, heads, dim), (batch, keys, heads, dim)]
    return [torch.randn(shape, generator=g).requires_grad_() for shape in shapes]


def sdpa64(q, k, v, scale=None):
    """The reference: torch's SDPA in float64 on (B, H, N, D), back to diffusers' layout."""
    out = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)), scale=scale)
    return out.transpose(1, 2)


def test_backend_and_ops_are_registered(stand_in):
    assert attention.registration_problem() is None and attention.package_problem() is None
    member = AttentionBackendName("flash_4")
    assert member.value == "flash_4" and member in set(AttentionBackendName)
    assert _AttentionBackendRegistry._backends[member] is attention.flash4_attention
    assert _AttentionBackendRegistry._is_context_parallel_available(member)
    q, k, v = qkv(queries=5, keys=9)
    # schema, fake kernel against the real one (shapes, strides, dtypes), the autograd registration, traced by AOT
    torch.library.opcheck(torch.ops.fourdnex.flash4_forward.default, (q, k, v, 0.3, False))
    q, k, v = (x.detach() for x in (q, k, v))  # the backward op is not differentiated again
    out, lse = torch.ops.fourdnex.flash4_forward(q, k, v, 0.3, False)
    torch.library.opcheck(
        torch.ops.fourdnex.flash4_backward.default, (torch.randn_like(out), q, k, v, out, lse, 0.3, False)
    )
    assert stand_in["forward"] > 0 and stand_in["backward"] > 0


@pytest.mark.parametrize("keys", [35_100, 512])
def test_fake_kernels_give_the_kernels_shapes_at_the_real_size(keys):
    """On the meta device (no kernel runs): the 4DNeX self-attention (35,100 tokens x 40 heads x 128, bf16) and the
    text cross-attention (512 keys): out as q, the log-sum-exp (B, H, N) float32, gradients as their inputs."""
    q = torch.empty(1, 35_100, 40, 128, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(1, keys, 40, 128, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.fourdnex.flash4_forward(q, k, v, 128**-0.5, False)
    assert (out.shape, out.dtype) == (q.shape, torch.bfloat16) and out.is_contiguous()
    assert (lse.shape, lse.dtype) == ((1, 40, 35_100), torch.float32)
    dq, dk, dv = torch.ops.fourdnex.flash4_backward(out, q, k, v, out, lse, 128**-0.5, False)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape) and dq.dtype == torch.bfloat16


@pytest.mark.parametrize(("queries", "keys", "scale"), [(7, 7, None), (6, 11, 0.2)])
def test_outputs_log_sum_exp_and_gradients_equal_float64_sdpa(stand_in, queries, keys, scale):
    """Through diffusers' dispatch, as the Wan attention calls it; the log-sum-exp in diffusers' (B, N, H) layout."""
    q, k, v = qkv(queries=queries, keys=keys)
    out, lse = dispatch_attention_fn(q, k, v, scale=scale, backend="flash_4", attention_kwargs={"return_lse": True})
    reference = sdpa64(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out - reference).abs().max() < 1e-6
    scores = torch.einsum("bnhd,bmhd->bnhm", q.double(), k.double()) * (scale or q.shape[-1] ** -0.5)
    assert lse.shape == (2, queries, 3) and (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-5
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(reference, (q, k, v), grad.double())
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max() / b.abs().max() < 1e-6
    assert (stand_in["forward"], stand_in["backward"]) == (1, 1)


def test_masks_and_dropout_are_refused(stand_in):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flash_4 attention backend takes no attention mask"):
        dispatch_attention_fn(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.bool), backend="flash_4")
    with pytest.raises(ValueError, match=r"has no dropout, got dropout_p=0\.1"):
        dispatch_attention_fn(q, k, v, dropout_p=0.1, backend="flash_4")


def tiny_transformer():
    from fourdnex.model.transformer import FourDNeXTransformer

    model = FourDNeXTransformer.from_pretrained(TINY, subfolder="transformer", dtype=torch.float32)
    model.set_modalities("rgbxyz")
    return model


def tiny_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 36, 3, 4, 8, generator=g, requires_grad=True),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 257, 32, generator=g),
    }


def test_regional_compile_traces_whole_blocks_and_matches_native_sdpa(stand_in):
    """compile_repeated_blocks(fullgraph=True) with inductor: a graph break anywhere in a block would raise. The
    compiled flash_4 model's output and input gradient equal eager native SDPA's; the stand-in ran in the compiled
    forward (3 attention calls per block: self, text, image) and in its backward."""
    model = tiny_transformer()
    inputs = tiny_inputs()
    reference = model(**inputs, return_dict=False)[0]
    (reference_grad,) = torch.autograd.grad(reference.square().mean(), inputs["hidden_states"])
    model.set_attention_backend("flash_4")
    model.compile_repeated_blocks(fullgraph=True)
    try:
        out = model(**inputs, return_dict=False)[0]
        (grad,) = torch.autograd.grad(out.square().mean(), inputs["hidden_states"])
    finally:
        torch._dynamo.reset()
    assert (out - reference).abs().max() < 1e-5
    assert (grad - reference_grad).abs().max() / reference_grad.abs().max() < 1e-5
    blocks = len(model.blocks)
    assert (stand_in["forward"], stand_in["backward"]) == (3 * blocks, 3 * blocks)


def test_kept_attention_replays_flash4_and_keeps_plain_gradients(stand_in):
    """Fine-tuning with --activation_memory attention on flash_4: the kept self-attention is the kernel's own output,
    its backward FlashAttention-4's backward from the kept log-sum-exp; loss and every trainable gradient equal plain
    checkpointing on native SDPA, and the recompute skips the two self-attention kernels of a pass."""
    from test_activation_memory import tiny_training_model, two_backwards

    from fourdnex.train.block_recompute import FLASH_4, attention_kernel
    from fourdnex.train.memory_policy import RecomputePlan

    assert attention_kernel(CPU, "flash_4") is FLASH_4
    ref_losses, ref = two_backwards(tiny_training_model())
    stand_in.clear()
    model = tiny_training_model(plan=RecomputePlan(attention=True), attention_backend="flash_4")
    losses, grads = two_backwards(model)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    worst = max(((grads[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)
    assert grads.keys() == ref.keys() and worst < 1e-5
    # per pass and block: forward 3 calls (self, text, image) + recompute 2 (the kept self-attention is replayed),
    # backward 3; plain checkpointing would run 6 forward calls per block
    blocks = len(model.blocks)
    assert (stand_in["forward"], stand_in["backward"]) == (2 * 5 * blocks, 2 * 3 * blocks)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_context_parallel_on_two_processes_with_flash4(mode, tmp_path):
    """Two gloo processes (tests/cp_worker.py): the split pipeline equals one process (Ulysses exactly; ring merges
    partial softmaxes with the log-sum-exp, to rounding), and the split transformer's gradients (its backward drives
    the backward op with the merged output and log-sum-exp under ring) equal one process's and native SDPA's."""
    result = tmp_path / "cp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "tests" / "cp_worker.py"),
         str(result), mode, "flash_4"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(result.read_text())
    assert numbers["tokens_per_process"] * 2 == numbers["tokens"]
    for modalities in ("rgbxyz", "xyz"):
        assert numbers[modalities]["max_abs_latents"] < (1e-7 if mode == "ulysses" else 1e-5), modalities
        assert numbers[modalities]["max_abs_xyz"] < 1e-5, modalities
    assert max(numbers["grads_vs_single"]) < 1e-5
    if mode == "ulysses":
        assert max(numbers["grads_vs_native_split"]) < 1e-5
    calls = numbers["flash4_calls"]
    assert (
        calls["both"]["forward"] > calls["single"]["forward"]
        and calls["both"]["backward"] > calls["single"]["backward"]
    )


def test_auto_picks_flash4_on_hopper_where_installed(stand_in, capability, tiny_pipe, caplog):
    capability(9, 0)
    caplog.set_level(logging.INFO, logger="fourdnex.generate.acceleration")
    settings = AccelerationConfig(memory="none", compile=False)
    assert resolve(settings, GPU, tiny_pipe, tokens=24, pixels=1).attention_backend == "flash_4"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["--attention_backend auto: flash_4 (flash-attn-4 4.0.0b36+stand-in on a Hopper GPU)"]
    ring = AccelerationConfig(memory="none", compile=False, cp="ring")  # the log-sum-exp ring attention needs
    assert resolve(ring, GPU, tiny_pipe, tokens=24, pixels=1).attention_backend == "flash_4"
    from fourdnex.generate.run import versions

    assert versions("flash_4")["flash-attn-4"] == "4.0.0b36+stand-in" and "flash-attn-4" not in versions("native")


@pytest.mark.parametrize(
    ("gpu", "installed_", "cp", "expected", "reason"),
    [
        (None, True, "none", "native", "flash_4 runs on CUDA GPUs, not on cpu"),
        ((9, 0), False, "none", "native", "flash-attn-4 does not import (ModuleNotFoundError: No module named"),
        ((9, 0), False, "ring", "_native_cudnn", 'install it with: pip install "flash-attn-4[cu13]==4.0.0b36"'),
        ((8, 0), True, "none", "native", "needs compute capability 9.0 or newer (Hopper, Blackwell); this GPU has 8.0"),
        (
            (10, 0),
            True,
            "none",
            "native",
            "auto picks flash_4 on Hopper (compute capability 9.x, where it was measured)",
        ),
    ],
    ids=["cpu", "hopper-not-installed", "hopper-not-installed-ring", "ampere", "blackwell"],
)
def test_auto_falls_back_with_one_line(gpu, installed_, cp, expected, reason, capability, tiny_pipe, caplog):
    device = CPU if gpu is None else GPU
    if gpu is not None:
        capability(*gpu)
    caplog.set_level(logging.INFO, logger="fourdnex.generate.acceleration")
    with installed() if installed_ else contextlib.nullcontext():
        resolved = resolve(AccelerationConfig(memory="none", compile=False, cp=cp), device, tiny_pipe, 24, 1)
    assert resolved.attention_backend == expected
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"--attention_backend auto: {expected} (") and reason in line


def test_explicit_flash4_is_refused_where_it_cannot_run(capability, tmp_path):
    with pytest.raises(AccelerationError, match="--attention_backend flash_4: flash_4 runs on CUDA GPUs, not on cpu"):
        check_machine(AccelerationConfig(attention_backend="flash_4"), CPU)
    capability(9, 0)
    with pytest.raises(AccelerationError, match="flash-attn-4 does not import"):
        check_machine(AccelerationConfig(attention_backend="flash_4"), GPU)
    with installed():
        check_machine(AccelerationConfig(attention_backend="flash_4"), GPU)  # Hopper, installed: accepted
        capability(10, 0)
        check_machine(AccelerationConfig(attention_backend="flash_4"), GPU)  # Blackwell, asked for: accepted
    common = ["--prompt", "x", "--image", ROOT / "example" / "scene.png", "--out", tmp_path, "--model_path", TINY]
    proc = run_cli(*common, *SMALL_FLAGS, "--device", "cpu", "--attention_backend", "flash_4")
    assert_one_line_error(proc, "--attention_backend flash_4: flash_4 runs on CUDA GPUs, not on cpu")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_finetune_refuses_flash4_where_it_cannot_run(tmp_path):
    from training_support import load_script

    from fourdnex.cli import run

    cli = load_script("finetune.py")
    with pytest.raises(SystemExit) as exit_info:
        run(cli.main, cli.build_parser(), ["--cache_dir", str(tmp_path), "--attention_backend", "flash_4"])
    message = exit_info.value.code
    assert message == "finetune.py: --attention_backend flash_4: flash_4 runs on CUDA GPUs, not on cpu"


@pytest.mark.parametrize(
    ("gpu", "installed_", "expected", "reason"),
    [
        ((9, 0), True, "flash_4", "flash-attn-4 4.0.0b36+stand-in on a Hopper GPU"),
        ((9, 0), False, None, "flash-attn-4 does not import"),
        ((8, 0), True, None, "needs compute capability 9.0 or newer (Hopper, Blackwell); this GPU has 8.0"),
        (None, True, None, "flash_4 runs on CUDA GPUs, not on cpu"),
    ],
    ids=["hopper", "hopper-not-installed", "ampere", "cpu"],
)
def test_training_auto_picks_flash4_on_hopper_else_native(
    gpu, installed_, expected, reason, capability, monkeypatch, caplog
):
    """finetune.py's default --attention_backend auto: flash_4 where inference's auto picks it, else diffusers'
    default (native SDPA, set as None), with the reason in one line; an explicit backend is taken as given."""
    from fourdnex.train import loop
    from fourdnex.train.config import TrainConfig

    if gpu is not None:
        capability(*gpu)
        monkeypatch.setattr(loop, "device_of", lambda name: GPU)
    caplog.set_level(logging.INFO, logger="fourdnex.train.loop")
    with installed() if installed_ else contextlib.nullcontext():
        assert loop.attention_backend(TrainConfig()) == expected
        assert loop.attention_backend(TrainConfig(attention_backend="_native_cudnn")) == "_native_cudnn"
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"--attention_backend auto: {expected or 'native'} (") and reason in line


def test_bench_runs_every_section_on_the_stand_in(tmp_path):
    """bench/bench_fa4.py --tiny (the GPU benchmark's own code on the CPU stand-in): every section runs to its table
    and JSON, the stand-in's attention matches SDPA's to float32 rounding in the kernels, the forward and the
    sample, and the second native sample repeats the first exactly (the floor the flash_4 sample is held to)."""
    out = tmp_path / "fa4.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_fa4", "--tiny", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(out.read_text())
    for kind in ("self", "text", "image"):
        pair = numbers["kernels"][f"{kind}: flash_4 vs sdpa (cpu)"]
        assert pair["max_abs"] < 1e-5 and max(pair["grad_rel_diff"]) < 1e-5, kind
    for label, row in numbers["forward"].items():
        assert row["max_abs_dev_native_eager"] < 1e-5 and row["seconds"] > 0, label
    sample = numbers["sample"]
    assert sample["native, again"]["max_abs_dev_latents"] == 0.0
    assert 0.0 < sample["flash_4"]["max_abs_dev_latents"] < 1e-4
    assert sample["native, eager"]["max_abs_dev_latents"] < 1e-4  # compiling changes the float order only
    assert all(row["estimate_seconds"] > 0 for row in sample.values())
