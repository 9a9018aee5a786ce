"""Generate 4D results (an RGB video and an XYZ pointmap video) from images and captions.

    python inference.py --prompt ./example/prompt.txt --image ./example/image.txt --out ./results \\
        --model_path ./pretrained/Wan2.1-I2V-14B-480P-Diffusers --lora_path ./pretrained/4dnex-lora

``--prompt`` and ``--image`` are text files with one caption / one image path per line (or a literal caption and a
single image path). For each selected line i it writes, into ``--out``:

    {i:05d}.mp4      RGB | XYZ side by side, 24 fps
    {i:05d}_rgb.mp4  the RGB video
    {i:05d}_xyz.mp4  the XYZ video, [-1, 1] shown as colours
    {i:05d}.npz      rgb (F, H, W, 3) uint8, xyz (F, H, W, 3) float32 in [-1, 1]
    {i:05d}.json     prompt, image, settings, model and adapter, versions, timings

Speed and memory (defaults suit one 80 GB GPU: native attention, regional torch.compile, everything resident when
it fits, else the fastest offload that does; see BENCHMARKS.md):

    python inference.py ... --memory group          # a 24 GB card: transformer blocks streamed from CPU memory
    python inference.py ... --cache fbc --steps 20  # approximate: fewer steps, First Block Cache
    torchrun --nproc_per_node 4 inference.py ... --cp ulysses   # one sample split over 4 GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from fourdnex import __version__
from fourdnex.cli import run
from fourdnex.config import (
    CACHE_MODES,
    CP_MODES,
    DEFAULT_MODEL_PATH,
    DEFAULT_MODEL_TYPE,
    MEMORY_MODES,
    MODEL_TYPES,
    MODES,
    XYZ_LATENT_MEAN,
    XYZ_LATENT_STD,
    AccelerationConfig,
    SampleConfig,
    size_for_aspect,
)
from fourdnex.errors import UsageError


def read_lines_or_literal(value: str, what: str) -> tuple[list[str], Path | None]:
    """A ``.txt`` file's non-empty lines, or the value itself; returns the list and the file it came from."""
    path = Path(value)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UsageError(f"{what} list {path} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"{what} list {path} is empty")
        return lines, path
    return [value], None


def resolve_image(name: str, list_file: Path | None) -> Path:
    """An image path as written, or relative to the list file that names it."""
    path = Path(name).expanduser()
    if not path.is_file() and list_file is not None and (list_file.parent / path).is_file():
        path = list_file.parent / path
    if not path.is_file():
        raise UsageError(f"image {name} does not exist")
    return path


def load_image(path: Path):
    """Open an image as RGB, or raise UsageError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"image {path} cannot be read ({err})") from err


def select_jobs(args: argparse.Namespace) -> list[tuple[int, str, Path]]:
    """(line index, prompt, image path) for every line to generate, all checked before any model loads."""
    prompts, _ = read_lines_or_literal(args.prompt, "prompt")
    images, image_list = read_lines_or_literal(args.image, "image")
    if len(prompts) != len(images):
        raise UsageError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt line")
    indices = range(len(prompts)) if args.idx < 0 else [args.idx]
    if args.idx >= len(prompts):
        raise UsageError(f"--idx {args.idx} is out of range: there are {len(prompts)} lines")
    jobs = []
    for i in indices:
        path = resolve_image(images[i], image_list)
        load_image(path)
        jobs.append((i, prompts[i], path))
    return jobs


def prepare_out(out: Path) -> None:
    """Create the output folder and prove it is writable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --out {out} ({err.strerror or err})") from err


def sample_config(args: argparse.Namespace) -> SampleConfig:
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither (then the image's aspect ratio decides)")
    config = SampleConfig(
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    try:
        config.validate()
    except ValueError as err:
        raise UsageError(str(err)) from err
    return config


def acceleration_config(args: argparse.Namespace) -> AccelerationConfig:
    """The speed and memory flags as an AccelerationConfig (``auto`` choices resolved once the model is loaded)."""
    if args.cache_threshold <= 0:
        raise UsageError(f"--cache_threshold must be positive, got {args.cache_threshold}")
    switch = {"auto": None, "on": True, "off": False}
    return AccelerationConfig(
        attention_backend=args.attention_backend,
        compile=switch[args.compile],
        memory=args.memory,
        fp8=args.fp8,
        vae_tiling=switch[args.vae_tiling],
        batch_guidance=args.batch_guidance,
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        cp=args.cp,
    )


def sample_size(config: SampleConfig, image_path: Path) -> tuple[int, int]:
    """Per-modality (height, width): as given, or the reference's 480x720-area rule on the image's aspect."""
    if config.height:
        return config.height, config.width
    image = load_image(image_path)
    return size_for_aspect(image.height, image.width)


def transformer_heads(args: argparse.Namespace) -> int:
    """Attention heads of the transformer that will be loaded, read from its config."""
    folder = Path(args.sft_path) if args.sft_path else Path(args.model_path) / "transformer"
    try:
        return json.loads((folder / "config.json").read_text())["num_attention_heads"]
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot read the attention head count from {folder / 'config.json'} ({err})") from err


def resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA GPU is visible")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch
    import transformers

    return {
        "fourdnex": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def main(args: argparse.Namespace) -> None:
    config = sample_config(args)
    speed = acceleration_config(args)
    if args.lora_rank is not None and args.lora_rank < 1:
        raise UsageError(f"--lora_rank must be positive, got {args.lora_rank}")
    jobs = select_jobs(args)
    out = Path(args.out)
    device, dtype = resolve_device_dtype(args.device, args.dtype)

    import torch
    from tqdm.auto import tqdm

    from fourdnex.generate import parallel
    from fourdnex.generate.acceleration import AccelerationError, apply_acceleration, check_machine, resolve
    from fourdnex.generate.pipeline import load_pipeline
    from fourdnex.geometry.results import write_sample
    from fourdnex.model.adapters import apply_adapter, read_adapter
    from fourdnex.testing.tiny import TINY_MARKER

    # Several processes: each runs the pipeline on its own GPU; the transformer's sequence is split among them, the
    # first two decode the RGB and the XYZ half at the same time, and the first gets both videos and writes them.
    layout = MODES[args.mode]
    sizes = {index: sample_size(config, path) for index, _, path in jobs}
    tokens = [parallel.tokens_of(config.num_frames, h, w, fused=layout == "rgbxyz") for h, w in sizes.values()]
    world_size, is_main = 1, True
    try:
        check_machine(speed, device)
        if speed.cp == "none" and parallel.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise UsageError("launched by torchrun with several processes: add --cp ulysses or --cp ring")
        if speed.cp != "none":
            process = parallel.init_processes(speed.cp, device.type)
            device, world_size, is_main = process.device, process.world_size, process.is_main
            heads = transformer_heads(args)
            for count in tokens:
                parallel.check_split(speed.cp, world_size, count, heads)
    except AccelerationError as err:
        raise UsageError(str(err)) from err
    if is_main:
        prepare_out(out)

    adapter = read_adapter(args.lora_path) if args.lora_path else None
    tic = time.perf_counter()
    pipe = load_pipeline(args.model_path, dtype=dtype, transformer_path=args.sft_path)
    pipe.transformer.set_model_type(MODEL_TYPES[args.type])
    lora_scale, xyz_mean, xyz_std = None, XYZ_LATENT_MEAN, XYZ_LATENT_STD
    if adapter is not None:
        lora_scale = apply_adapter(pipe.transformer, adapter, scale=args.lora_scale, lora_rank=args.lora_rank)
        if adapter.meta.xyz_latent_mean is not None:
            xyz_mean, xyz_std = adapter.meta.xyz_latent_mean, adapter.meta.xyz_latent_std
    largest_height, largest_width = max(sizes.values(), key=lambda size: size[0] * size[1])
    try:
        if speed.cp != "none":
            parallel.enable_context_parallel(pipe.transformer, speed.cp, world_size)
            pipe.enable_split_decoding()
        speed = resolve(
            speed,
            device,
            pipe,
            tokens=max(tokens),
            pixels=config.num_frames * largest_height * largest_width,
        )
        apply_acceleration(pipe, speed, device)
    except AccelerationError as err:
        raise UsageError(str(err)) from err
    if not is_main:
        pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - tic
    random_weights = json.loads((Path(args.model_path) / "model_index.json").read_text()).get(TINY_MARKER, False)
    if random_weights and is_main:
        print(f"note: {args.model_path} is the tiny test model with random weights: its outputs are noise")
    if adapter is None and is_main:
        print("note: no --lora_path given: sampling the base Wan2.1 model, which was not trained for pointmaps")

    for index, prompt, image_path in tqdm(jobs, desc="samples", unit="sample", disable=len(jobs) == 1 or not is_main):
        image = load_image(image_path)
        height, width = sizes[index]
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        try:
            result = pipe(
                image,
                prompt,
                negative_prompt=config.negative_prompt,
                height=height,
                width=width,
                num_frames=config.num_frames,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance_scale,
                generator=generator,
                layout=layout,
                xyz_mean=xyz_mean,
                xyz_std=xyz_std,
                batch_guidance=speed.batch_guidance,
            )
        except torch.OutOfMemoryError as err:
            raise UsageError(
                "out of GPU memory: try --dtype bfloat16, --memory model or group (or sequential), --fp8, "
                "fewer --num_frames, a smaller --height/--width, or run on a GPU with more memory"
            ) from err
        if not is_main:
            continue
        tic = time.perf_counter()
        meta = {
            "prompt": prompt,
            "image": str(image_path),
            "index": index,
            **dataclasses.asdict(config),
            "height": height,
            "width": width,
            "mode": args.mode,
            "type": args.type,
            "model_path": str(args.model_path),
            "sft_path": args.sft_path,
            "random_weights": random_weights,
            "lora_path": args.lora_path,
            "adapter_format": adapter.format if adapter else None,
            "lora_scale": lora_scale,
            "xyz_latent_mean": xyz_mean,
            "xyz_latent_std": xyz_std,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "acceleration": dataclasses.asdict(speed),
            "processes": world_size,
            "versions": versions(),
            "timings": {"load": load_seconds, **result.timings},
        }
        write_sample(out, index, result.rgb[0].numpy(), result.xyz[0].numpy(), meta)
        print(f"wrote {out / f'{index:05d}'}.{{mp4,npz,json}} ({sum(result.timings.values()):.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--prompt", required=True, help="a .txt file with one caption per line, or one caption")
    io.add_argument("--image", required=True, help="a .txt file with one image path per line, or one image path")
    io.add_argument("--idx", type=int, default=-1, help="generate only this line (default -1: all lines)")
    io.add_argument("--out", default="./results", help="output folder (default ./results)")
    model = parser.add_argument_group("model")
    model.add_argument("--model_path", default=DEFAULT_MODEL_PATH, help="Wan2.1-I2V-14B-480P diffusers folder")
    model.add_argument("--sft_path", default=None, help="a fully fine-tuned transformer folder replacing the base one")
    model.add_argument("--lora_path", default=None, help="adapter: released 4DNeX folder or fourdnex .safetensors")
    model.add_argument("--lora_rank", type=int, default=None, help="expected LoRA rank (default: read from the file)")
    model.add_argument(
        "--lora_scale", type=float, default=None, help="LoRA scale (default: 0.5 released, alpha/rank fourdnex)"
    )
    model.add_argument("--type", default=DEFAULT_MODEL_TYPE, choices=sorted(MODEL_TYPES), help="model variant")
    model.add_argument(
        "--mode",
        default="xyzrgb",
        choices=sorted(MODES),
        help="xyzrgb: RGB | XYZ side by side (default); xyz: the whole frame is XYZ",
    )
    sampling = parser.add_argument_group("sampling (defaults reproduce the paper)")
    defaults = SampleConfig()
    sampling.add_argument("--num_frames", type=int, default=defaults.num_frames, help="frames, 4k+1 (default 49)")
    sampling.add_argument("--height", type=int, default=None, help="per-modality height (default: 480x720 area)")
    sampling.add_argument("--width", type=int, default=None, help="per-modality width, a multiple of 16")
    sampling.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps (default 50)")
    sampling.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale, help="(default 5.0)")
    sampling.add_argument("--negative_prompt", default=defaults.negative_prompt, help="(default: empty)")
    sampling.add_argument("--seed", type=int, default=defaults.seed, help="(default 42)")
    hardware = parser.add_argument_group("hardware, speed and memory")
    hardware.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    hardware.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="transformer and text encoder dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    hardware.add_argument(
        "--attention_backend",
        default="auto",
        help="a diffusers attention backend: native, _native_cudnn, _native_flash, flash, sage, ... "
        "(default auto: native; _native_cudnn with --cp ring)",
    )
    hardware.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="regional torch.compile of the transformer blocks (default auto: on for a GPU without group or "
        "sequential offload)",
    )
    hardware.add_argument(
        "--memory",
        default="auto",
        choices=["auto", *MEMORY_MODES],
        help="none: all on the GPU; model: one component at a time (about 41 GB); group: transformer blocks "
        "streamed from CPU memory (fits 24 GB); sequential: layer by layer, slowest (default auto: the fastest "
        "that fits the GPU's free memory)",
    )
    hardware.add_argument(
        "--fp8", action="store_true", help="store the transformer's weights in float8 (half the memory; approximate)"
    )
    hardware.add_argument(
        "--vae_tiling",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode the video in tiles (less memory, tiny seams; default auto: on with --memory group/sequential)",
    )
    hardware.add_argument(
        "--batch_guidance",
        action="store_true",
        help="conditional and unconditional passes as one batch of 2 (same output; may help with --cp)",
    )
    hardware.add_argument(
        "--cache",
        default="none",
        choices=CACHE_MODES,
        help="approximate: fbc skips the transformer's later blocks when its first block barely changed",
    )
    hardware.add_argument(
        "--cache_threshold", type=float, default=0.05, help="--cache fbc threshold; higher skips more (default 0.05)"
    )
    hardware.add_argument(
        "--cp",
        default="none",
        choices=CP_MODES,
        help="split each sample over the GPUs of a torchrun launch: ulysses (GPU count divides the 40 heads) or "
        "ring (any count dividing the token count)",
    )
    return parser


if __name__ == "__main__":
    run(main, build_parser())
