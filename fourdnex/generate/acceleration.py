"""Speed and memory settings for the sampling pipeline, all from diffusers' own machinery.

* exact: the attention backend (``set_attention_backend``; ``auto`` runs FlashAttention-4 on Hopper GPUs where it
  is installed, :mod:`fourdnex.model.attention`) and regional ``torch.compile`` of the transformer blocks
  (``compile_repeated_blocks``); the pipeline itself decodes the RGB and XYZ halves one after the other;
* memory modes: ``none`` (everything resident), ``model`` (``enable_model_cpu_offload``: one component at a time
  on the GPU), ``group`` (``enable_group_offload``: transformer blocks streamed in on a side CUDA stream while the
  previous one computes), ``sequential`` (``enable_sequential_cpu_offload``: leaf by leaf); ``auto`` picks the
  fastest that fits the GPU's free memory (or the per-process cap set with
  ``torch.cuda.set_per_process_memory_fraction``);
* approximate: float8 weight storage (``enable_layerwise_casting``), VAE tiling, and First Block Cache
  (``enable_cache``), each opt-in or implied by a low-memory mode.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from fourdnex.config import FLASH_4_BACKEND
from fourdnex.errors import FourDNeXError
from fourdnex.generate.config import MEMORY_MODES, AccelerationConfig
from fourdnex.model.attention import choose_backend, flash4_problem
from fourdnex.model.loading import channels_last_convolutions

GiB = 1024**3
#: Peak VAE decode memory per decoded pixel (frames x height x width), measured on the real Wan VAE (bf16/fp32
#: mix as loaded here): 7.9 GiB for a fused 49 x 480 x 1440 decode.
_DECODE_BYTES_PER_PIXEL = 7.9 * GiB / (49 * 480 * 1440)
#: Tiled decoding keeps the peak near this, whatever the size (measured: 1.3 GiB).
_TILED_DECODE_BYTES = int(1.5 * GiB)
#: Keep this share of the available memory free for the allocator's fragmentation and the CUDA libraries.
_MARGIN = 0.9

log = logging.getLogger(__name__)


class AccelerationError(FourDNeXError, ValueError):
    """A setting this machine cannot run; the message is one line naming the setting."""


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def transformer_working_bytes(tokens: int, inner_dim: int, ffn_dim: int, batch: int, itemsize: int = 2) -> int:
    """Activation memory of one transformer forward at inference: about 8 hidden-sized tensors and 2 FFN ones."""
    return batch * tokens * (8 * inner_dim + 2 * ffn_dim) * itemsize


def memory_needs(pipe, tokens: int, pixels: int, batch: int = 1, fp8: bool = False) -> dict[str, int]:
    """Estimated peak GPU bytes of sampling in each memory mode.

    ``tokens`` is the transformer's sequence length, ``pixels`` the decoded frames x height x width of one
    modality, ``batch`` the samples of one transformer call. The samples of a batch and their RGB and XYZ videos
    decode together as far as :data:`~fourdnex.generate.pipeline.VAE_CALL_PIXELS` allows
    (:func:`~fourdnex.generate.pipeline.decode_videos_per_call`).
    """
    from fourdnex.generate.pipeline import decode_videos_per_call

    config = pipe.transformer.config
    inner_dim = config.num_attention_heads * config.attention_head_dim
    transformer = module_bytes(pipe.transformer)
    if fp8:
        transformer = transformer // pipe.transformer.dtype.itemsize
    blocks = len(pipe.transformer.blocks)
    block = transformer // max(blocks, 1)
    work = transformer_working_bytes(tokens, inner_dim, config.ffn_dim, batch)
    text, image, vae = (module_bytes(m) for m in (pipe.text_encoder, pipe.image_encoder, pipe.vae))
    videos = decode_videos_per_call(pixels, batch)  # in one VAE call
    decode = int(videos * pixels * _DECODE_BYTES_PER_PIXEL)
    tiled = min(decode, videos * _TILED_DECODE_BYTES)
    largest_text_leaf = max(module_bytes(m) for m in pipe.text_encoder.modules() if not list(m.children()))
    return {
        "none": transformer + text + image + vae + max(work, decode),
        "model": max(transformer + work, text, image + vae + decode),
        "group": max(text, min(3, blocks) * block + work, image + vae + tiled),
        "sequential": max(largest_text_leaf, block + work, tiled),
    }


def available_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device: free memory, within any per-process cap."""
    device = torch.device("cuda", torch.cuda.current_device()) if device.index is None else device
    free, total = torch.cuda.mem_get_info(device)
    fraction = (
        torch.cuda.get_per_process_memory_fraction(device)
        if hasattr(torch.cuda, "get_per_process_memory_fraction")
        else 1.0
    )
    cap = total * fraction - torch.cuda.memory_reserved(device)
    return int(min(free, cap))


def choose_memory_mode(needs: dict[str, int], available: int) -> str:
    """The fastest memory mode whose estimated peak fits ``available`` bytes (with a margin)."""
    for mode in MEMORY_MODES:
        if needs[mode] <= _MARGIN * available:
            return mode
    raise AccelerationError(
        f"not enough GPU memory: {available / GiB:.1f} GiB free, --memory sequential needs about "
        f"{needs['sequential'] / GiB:.1f} GiB; use fewer --num_frames or a smaller --height/--width"
    )


def check_machine(config: AccelerationConfig, device: torch.device) -> None:
    """Refuse, before any weight loads, the settings ``device`` cannot run; one line each."""
    config.validate()
    cuda = device.type == "cuda"
    if config.memory == "sequential" and not cuda:
        raise AccelerationError("--memory sequential needs a CUDA GPU (its offload hooks onload to an accelerator)")
    if config.cp == "ring" and not cuda:
        raise AccelerationError(
            "--cp ring needs CUDA GPUs (its attention backends return the log-sum-exp that ring attention merges); "
            "on CPUs use --cp ulysses"
        )
    if config.memory not in ("none", "auto") and config.cp != "none":
        raise AccelerationError(f"--memory {config.memory} cannot be combined with --cp {config.cp}: use --memory none")
    known = {name.value for name in AttentionBackendName}  # diffusers' own and flash_4
    if config.attention_backend not in (*known, "auto"):
        raise AccelerationError(
            f"--attention_backend {config.attention_backend!r} is not a diffusers backend; one of {sorted(known)}"
        )
    if config.attention_backend == FLASH_4_BACKEND:
        problem = flash4_problem(device)
        if problem is not None:
            raise AccelerationError(f"--attention_backend {FLASH_4_BACKEND}: {problem}")


def resolve(
    config: AccelerationConfig, device: torch.device, pipe, tokens: int, pixels: int, batch: int = 1
) -> AccelerationConfig:
    """Replace every ``auto``/``None`` choice with a concrete one for ``device`` (``--memory auto``: for ``batch``
    samples of ``tokens`` tokens and ``pixels`` pixels per call, see :func:`memory_needs`); refuse what it cannot do."""
    check_machine(config, device)
    cuda = device.type == "cuda"
    memory = config.memory
    if memory == "auto":
        if cuda and config.cp == "none":
            needs = memory_needs(pipe, tokens, pixels, batch=batch, fp8=config.fp8)
            memory = choose_memory_mode(needs, available_memory(device))
        else:
            memory = "none"
    backend = config.attention_backend
    if backend == "auto":
        # FlashAttention-4 where it runs (Hopper): its self-attention kernel beats cuDNN's. Else the fastest forward
        # measured on an H100 at the 4DNeX shape, native SDPA (BENCHMARKS.md, "Earlier measurements" and
        # "FlashAttention-4"); ring attention needs a backend that returns the log-sum-exp, which native SDPA does
        # not (flash_4 does).
        backend, reason = choose_backend(device, fallback="_native_cudnn" if config.cp == "ring" else "native")
        log.info("--attention_backend auto: %s (%s)", backend, reason)
    compile_blocks = config.compile
    if compile_blocks is None:
        compile_blocks = cuda and memory in ("none", "model")
    vae_tiling = config.vae_tiling
    if vae_tiling is None:
        vae_tiling = memory in ("group", "sequential")
    return dataclasses.replace(
        config, memory=memory, attention_backend=backend, compile=compile_blocks, vae_tiling=vae_tiling
    )


def apply_acceleration(pipe, config: AccelerationConfig, device: torch.device) -> None:
    """Set up ``pipe`` (loaded on the CPU) on ``device`` following a resolved ``config``.

    Context parallelism, when asked for, must already be enabled on the transformer
    (:func:`fourdnex.generate.parallel.enable_context_parallel`); it needs the model resident (``memory="none"``).
    """
    transformer = pipe.transformer
    # 1. Attention backend (checked for its package before any weight moves); native SDPA is diffusers' default.
    if config.attention_backend != "native":
        try:
            transformer.set_attention_backend(config.attention_backend)
        except (RuntimeError, ValueError) as err:
            raise AccelerationError(f"--attention_backend {config.attention_backend}: {err}") from err

    # 2. Weight storage: float8 for the transformer, upcast layer by layer to the compute dtype.
    if config.fp8:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=transformer.dtype)

    # 3. Placement: the memory mode.
    if config.memory == "none":
        pipe.to(device)
    elif config.memory == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif config.memory == "group":
        stream = device.type == "cuda"
        pipe.enable_group_offload(
            onload_device=device,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=stream,
            record_stream=stream,
            non_blocking=stream,
        )
    elif config.memory == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise AccelerationError(f"unknown memory mode {config.memory!r}")

    # 4. VAE: tile the frames when memory is tight (each call's videos: fourdnex.generate.pipeline.VAE_CALL_PIXELS).
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    if device.type == "cpu":
        # the convolutions' weights in channels-last memory: on a 2-core CPU the decode of a sample's two videos
        # 1.9-2.3x as fast (BENCHMARKS.md, "The CPU's VAE calls")
        channels_last_convolutions(pipe.vae)

    # 5. Approximate caching of transformer calls.
    if config.cache == "fbc":
        from diffusers import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=config.cache_threshold))

    # 6. Regional compile: each of the 40 identical blocks shares one compiled graph (whole graphs unless hooks of
    # offloading, casting or caching wrap the blocks).
    if config.compile:
        hooked = config.memory not in ("none", "model") or config.fp8 or config.cache != "none"
        transformer.compile_repeated_blocks(fullgraph=not hooked)
