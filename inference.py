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
    torchrun --nproc_per_node 4 inference.py ... --skip_existing   # the lines shared out over 4 GPUs
    python inference.py ... --batch_size 8          # 8 lines of one size sampled together (small models)
"""

from __future__ import annotations

import argparse

from fourdnex.cli import aliased, run
from fourdnex.config import (
    CACHE_MODES,
    CP_MODES,
    DEFAULT_MODEL_PATH,
    DEFAULT_MODEL_TYPE,
    MEMORY_MODES,
    MODEL_TYPES,
    MODES,
    AccelerationConfig,
    SampleConfig,
)
from fourdnex.generate.run import RunConfig
from fourdnex.runtime import DTYPE_ALIASES, DTYPE_CHOICES


def parse_frames(value: str) -> tuple[int, ...]:
    """``--frames``: comma-separated frame numbers."""
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame numbers separated by commas, e.g. 0,24,48; got {value!r}") from None


def main(args: argparse.Namespace) -> None:
    """Generate every selected line (see :func:`fourdnex.generate.run.generate`)."""
    from fourdnex.generate.run import generate

    switch = {"auto": None, "on": True, "off": False}
    sample = SampleConfig(
        **{name: getattr(args, name) for name in ("num_frames", "height", "width", "steps", "guidance_scale", "seed")},
        negative_prompt=args.negative_prompt,
    )
    speed = AccelerationConfig(
        attention_backend=args.attention_backend,
        compile=switch[args.compile],
        memory=args.memory,
        fp8=args.fp8,
        vae_tiling=switch[args.vae_tiling],
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        cp=args.cp,
    )
    names = (
        "prompt",
        "image",
        "video",
        "frames",
        "out",
        "idx",
        "model_path",
        "sft_path",
        "lora_path",
        "lora_rank",
        "lora_scale",
    )
    names += ("model_type", "zero_domain_embedding", "mode", "device", "dtype", "skip_existing", "batch_size")
    generate(RunConfig(**{name: getattr(args, name) for name in names}, sample=sample, speed=speed))


def build_parser() -> argparse.ArgumentParser:
    """The command line (the reference's flags keep their names and meaning)."""
    parser = argparse.ArgumentParser(
        prog="inference.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--prompt", required=True, help="a .txt file with one caption per line, or one caption")
    io.add_argument(
        "--image",
        default=None,
        help="a .txt file with one image path per line, or one image path; with --frames, one image per given frame "
        "on each line, separated by commas",
    )
    io.add_argument(
        "--video",
        default=None,
        help="instead of --image: a .txt file with one video path per line, or one video: its frames are the "
        "condition (every frame, 4D reconstruction; or those --frames names)",
    )
    io.add_argument(
        "--frames",
        default=None,
        type=parse_frames,
        help="the given frames, e.g. 0,48 (first and last) or 0,16,32,48 (keyframes); default: 0 for --image, every "
        "frame for --video",
    )
    io.add_argument("--idx", type=int, default=-1, help="generate only this line (default -1: all lines)")
    io.add_argument("--out", default="./results", help="output folder (default ./results)")
    io.add_argument(
        "--skip_existing", action="store_true", help="leave out lines whose result in --out is complete (resume a list)"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_path", default=DEFAULT_MODEL_PATH, help="Wan2.1-I2V-14B-480P diffusers folder")
    model.add_argument("--sft_path", default=None, help="a fully fine-tuned transformer folder replacing the base one")
    model.add_argument("--lora_path", default=None, help="adapter: released 4DNeX folder or fourdnex .safetensors")
    model.add_argument("--lora_rank", type=int, default=None, help="expected LoRA rank (default: read from the file)")
    model.add_argument(
        "--lora_scale", type=float, default=None, help="LoRA scale (default: 0.5 released, alpha/rank fourdnex)"
    )
    model.add_argument(
        "--type",
        dest="model_type",
        default=None,
        choices=sorted(MODEL_TYPES),
        help=f"model variant (default: the one a fourdnex adapter was trained as, else {DEFAULT_MODEL_TYPE})",
    )
    model.add_argument(
        "--zero_domain_embedding",
        action="store_true",
        help="sample a released adapter folder that lacks learnable_domain_embeddings.pt with a zero embedding",
    )
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
    hardware.add_argument(
        "--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto: cuda when available)"
    )
    hardware.add_argument(
        "--dtype",
        default="auto",
        type=aliased(DTYPE_ALIASES),
        choices=DTYPE_CHOICES,
        help="transformer and text encoder dtype (default auto: bfloat16 on GPU, float32 on CPU; bf16, fp16, fp32 "
        "are other spellings)",
    )
    hardware.add_argument(
        "--batch_size",
        type=int,
        default=1,
        metavar="N",
        help="sample up to N consecutive lines of the same size together, in one batch (default 1); each line starts "
        "from the noise it gets alone, and its result equals its batch-1 result up to rounding",
    )
    hardware.add_argument(
        "--attention_backend",
        default="auto",
        help="a diffusers attention backend: native, _native_cudnn, _native_flash, flash, sage, ..., or flash_4 "
        "(FlashAttention-4, an optional package for Hopper and Blackwell GPUs; see the README). Default auto: "
        "flash_4 on a Hopper GPU where flash-attn-4 is installed, else native (_native_cudnn with --cp ring)",
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
