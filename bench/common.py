"""Builders and timers shared by the benchmarks: Wan2.1-I2V-14B components at their real sizes with random weights,
built directly on the GPU in their inference dtypes (or the bundled tiny model's sizes with ``tiny=True``)."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from fourdnex.generate.pipeline import FourDNeXPipeline
from fourdnex.model import presets
from fourdnex.model.transformer import FourDNeXTransformer

GiB = 1024**3

#: Wan2.1-I2V-14B-480P's transformer config (diffusers layout).
REAL_TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
    "rope_max_seq_len": 1024,
}
TINY_TRANSFORMER = {**REAL_TRANSFORMER, **presets.PRESETS["tiny"].transformer}
REAL_UMT5 = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
TINY_UMT5 = {**REAL_UMT5, "vocab_size": 256, **presets.PRESETS["tiny"].text_encoder}
REAL_CLIP = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
TINY_CLIP = {**REAL_CLIP, **presets.PRESETS["tiny"].image_encoder}
REAL_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}
TINY_VAE = {"z_dim": 16, **presets.PRESETS["tiny"].vae}


@dataclass(frozen=True)
class Shape:
    """One sample: frames and per-modality pixels; the transformer sees twice the width (RGB | XYZ)."""

    frames: int
    height: int
    width: int

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, 2 * self.width // 8

    @property
    def tokens(self) -> int:
        t, h, w = self.latent
        return t * (h // 2) * (w // 2)


REAL_SHAPE = Shape(49, 480, 720)  # 35,100 tokens
TINY_SHAPE = Shape(5, 32, 48)


class WordTokenizer:
    """A stand-in tokenizer (word hashes) for transformers versions whose T5Tokenizer cannot be built from a vocab."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, texts, max_length: int = 512, **_) -> SimpleNamespace:
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            words = [zlib.crc32(word.encode()) % (self.vocab_size - 3) + 3 for word in text.split()][: max_length - 1]
            tokens = [*words, 1]  # 1: end of sequence
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


def build_tokenizer(vocab_size: int):
    """The tiny model's T5 tokenizer, or a word-hash stand-in where this transformers version cannot build it."""
    try:
        return presets.build_tokenizer(presets.TOY_CAPTIONS)
    except (TypeError, ValueError, ImportError, OSError):
        return WordTokenizer(vocab_size)


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no slow float32 host initialisation)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(tiny: bool, device: torch.device, dtype: torch.dtype, stock: bool = False, seed: int = 0):
    """A random transformer: diffusers' stock ``WanTransformer3DModel`` or ours, on the 4DNeX fused layout."""
    torch.manual_seed(seed)
    config = TINY_TRANSFORMER if tiny else REAL_TRANSFORMER
    with building_on(device, dtype):
        model = (WanTransformer3DModel if stock else FourDNeXTransformer)(**config)
    if not stock:
        model.set_modalities("rgbxyz")
    return model.eval().requires_grad_(False)


def build_components(
    tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0, vision_dtype: torch.dtype = torch.float32
) -> dict:
    """Every pipeline component but the transformer: UMT5 in ``dtype``, CLIP ViT-H/14 and the VAE in
    ``vision_dtype`` (float32 as inference loads them; the dataset builder runs all encoders in one dtype)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer((TINY_UMT5 if tiny else REAL_UMT5)["vocab_size"])
    with building_on(device, dtype):
        text_encoder = UMT5EncoderModel(UMT5Config(**(TINY_UMT5 if tiny else REAL_UMT5)))
    with building_on(device, vision_dtype):
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**(TINY_CLIP if tiny else REAL_CLIP)))
        vae = AutoencoderKLWan(**(TINY_VAE if tiny else REAL_VAE), temperal_downsample=[False, True, True])
    size = TINY_CLIP["image_size"] if tiny else REAL_CLIP["image_size"]
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval().requires_grad_(False),
        "image_encoder": image_encoder.eval().requires_grad_(False),
        "vae": vae.eval().requires_grad_(False),
        "image_processor": CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
        ),
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        ),
    }


def ours_pipeline(components: dict, transformer) -> FourDNeXPipeline:
    pipe = FourDNeXPipeline(transformer=transformer, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_inputs(tiny: bool, shape: Shape, device: torch.device, dtype: torch.dtype, batch: int = 1):
    """Random (latents+mask+condition, timestep, text tokens, image tokens) at the sample's shape."""
    generator = torch.Generator(device).manual_seed(1)
    config = TINY_TRANSFORMER if tiny else REAL_TRANSFORMER
    t, h, w = shape.latent
    x = torch.randn(batch, 36, t, h, w, generator=generator, device=device, dtype=dtype)
    text = torch.randn(batch, 512, config["text_dim"], generator=generator, device=device, dtype=dtype)
    image = torch.randn(batch, 257, config["image_dim"], generator=generator, device=device, dtype=dtype)
    return x, torch.full((batch,), 500.0, device=device), text, image


def forward_flops(tiny: bool, tokens: int, context: int = 769) -> float:
    """Matmul FLOPs of one transformer forward (projections, attention, FFN; norms and RoPE ignored)."""
    c = TINY_TRANSFORMER if tiny else REAL_TRANSFORMER
    d, f = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"]
    self_attention = 4 * 2 * tokens * d * d + 2 * 2 * tokens * tokens * d
    cross_attention = 2 * 2 * tokens * d * d + 4 * 2 * context * d * d + 2 * 2 * tokens * context * d
    ffn = 2 * 2 * tokens * d * f
    return c["num_layers"] * (self_attention + cross_attention + ffn)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after the caller's warm-up) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        tic = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times), result


@dataclass
class CallTimer:
    """Times every call of a module (synchronizing the GPU around it); hooks stay until ``remove``."""

    module: torch.nn.Module
    device: torch.device
    seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tic = 0.0
        self._handles = [
            self.module.register_forward_pre_hook(self._start),
            self.module.register_forward_hook(self._stop),
        ]

    def _start(self, *_) -> None:
        synchronize(self.device)
        self._tic = time.perf_counter()

    def _stop(self, *_) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._tic)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def extrapolate(total: float, call_seconds: list[float], calls_wanted: int) -> float:
    """Seconds of a run with ``calls_wanted`` transformer calls, from one run's total and its per-call times.

    The calls actually made keep their measured time (a first call that onloads weights counts once); every
    further call costs the median call.
    """
    extra = calls_wanted - len(call_seconds)
    return total + extra * statistics.median(call_seconds)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


#: Kernel-name fragments of each kind of GPU work, checked in this order (cuDNN's attention kernels also say "sm90").
KERNEL_KINDS = {
    "attention": ("flash", "fmha", "attention", "cudnn", "sdpa"),
    "matmul": (
        "gemm",
        "cutlass",
        "xmma",
        "nvjet",
        "sm90",
        "matmul",
        "triton_tem",
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
    ),
}


def kernel_split(prof, on_gpu: bool) -> dict[str, float]:
    """Seconds of a finished ``torch.profiler`` run by kind of kernel (attention, matmul, other).

    On a GPU these are kernel times (copies included); on a CPU the ``aten::`` ops stand in for kernels.
    """
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    totals = dict.fromkeys((*KERNEL_KINDS, "other"), 0.0)
    for event in prof.key_averages():
        seconds = getattr(event, key, 0) / 1e6
        # on a GPU only the kernels themselves count: an aten op also reports its kernels' time as its own
        kernel = event.device_type == torch.autograd.DeviceType.CUDA if on_gpu else event.key.startswith("aten::")
        if seconds <= 0 or not kernel:
            continue
        name = event.key.lower()
        kind = next((k for k, frags in KERNEL_KINDS.items() if any(f in name for f in frags)), "other")
        totals[kind] += seconds
    return totals


def chosen_sections(text: str, known, program: str) -> list[str]:
    """The comma-separated sections of ``--sections``; exits with one line naming those not in ``known``."""
    sections = text.split(",")
    unknown = set(sections) - set(known)
    if unknown:
        sys.exit(f"{program}: unknown sections {sorted(unknown)}; choose from {','.join(known)}")
    return sections
