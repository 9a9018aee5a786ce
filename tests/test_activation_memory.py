"""What gradient checkpointing keeps (--activation_memory): kept and parked tensors give the gradients of plain
checkpointing and skip the recompute; the automatic choice from host memory, processes and the DeepSpeed stage."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_cache import TINY_MODEL
from training_support import ROOT, finetune_env, overfit_args, scalars

from fourdnex.model.adapters import load_adapter
from fourdnex.model.transformer import FourDNeXTransformer
from fourdnex.train import memory_policy
from fourdnex.train.config import TrainConfig, TrainingError
from fourdnex.train.loop import build_transformer
from fourdnex.train.memory_policy import Machine, RecomputePlan, choose_activation_memory


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
    from fourdnex.train.block_recompute import enable_block_recompute

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
    cfg = TrainConfig(**{"lora_rank": 4, "mixed_precision": "float32", "attention_backend": "native", **settings})
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
        from fourdnex.train import block_recompute

        self.forward_calls = self.backward_calls = 0
        kernel = block_recompute.CPU_FLASH

        def forward(*args):
            self.forward_calls += 1
            return kernel.forward(*args)

        def backward(*args):
            self.backward_calls += 1
            return kernel.backward(*args)

        counting = block_recompute.AttentionKernel("counting", forward, backward)
        monkeypatch.setattr(block_recompute, "CPU_FLASH", counting)


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
    from fourdnex.train.block_recompute import block_recompute

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
    from fourdnex.train import block_recompute

    kernel = getattr(block_recompute, kernel_name)
    shape = (1, 35_100, 40, 128)  # (B, N, H, D), as the processor builds them
    q, k, v = (torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        out, lse, extra = kernel.forward(q_t.detach(), k_t.detach(), v_t.detach())
    assert out.shape == (1, 40, 35_100, 128) and lse.shape[:3] == (1, 40, 35_100) and lse.dtype == torch.float32
    replayed = block_recompute._KeptAttention.apply(q_t, k_t, v_t, (out, lse, extra), kernel)
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
    plain, kept = load_adapter(overfit_run / "adapter"), load_adapter(out / "adapter")
    assert all(torch.equal(kept.lora[k], plain.lora[k]) for k in plain.lora)
    assert torch.equal(kept.domain_embedding, plain.domain_embedding)


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
    for doubled in (TrainConfig(train_batch_size=2), TrainConfig(mixed_precision="float32")):  # 152 GB / 68 GB
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


def test_the_readme_states_the_thresholds_the_policy_uses():
    """The README's --activation_memory table says the thresholds of fourdnex.train.memory_policy, where they live."""
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `auto` (default) |"))
    assert f"from {memory_policy.ATTENTION_FFN_HOST_BYTES / 1e9:.0f} GB" in row
    assert f"`attention` from {memory_policy.ATTENTION_HOST_BYTES / 1e9:.0f} GB" in row
