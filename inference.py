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
    python inference.py ... --ensemble 4 --batch_size 4   # each line's XYZ the mean of 4 samples drawn together
"""

from __future__ import annotations

import argparse

from fourdnex.cli import dtype_flag, field_flag, run, settings, switch
from fourdnex.config import DEFAULT_MODEL_TYPE, MODALITY_ALIASES, MODEL_TYPES
from fourdnex.generate.config import (
    CACHE_MODES,
    CP_MODES,
    MEMORY_MODES,
    SAMPLE_MODALITIES,
    AccelerationConfig,
    RunConfig,
    SampleConfig,
)


def parse_frames(value: str) -> tuple[int, ...]:
    """``--frames``: comma-separated frame numbers."""
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame numbers separated by commas, e.g. 0,24,48; got {value!r}") from None


def main(args: argparse.Namespace) -> None:
    """Generate every selected line (see :func:`fourdnex.generate.run.generate`)."""
    from fourdnex.generate.run import generate

    sample, speed = settings(SampleConfig, args), settings(AccelerationConfig, args)
    generate(settings(RunConfig, args, sample=sample, speed=speed))


def build_parser() -> argparse.ArgumentParser:
    """The command line (the reference's flags keep their names and meaning); every default is a settings field's."""
    parser = argparse.ArgumentParser(
        prog="inference.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = parser.add_argument_group("inputs and outputs")
    field_flag(io, RunConfig, "prompt", required=True, help="a .txt file with one caption per line, or one caption")
    field_flag(
        io,
        RunConfig,
        "image",
        help="a .txt file with one image path per line, or one image path; with --frames, one image per given frame "
        "on each line, separated by commas",
    )
    field_flag(
        io,
        RunConfig,
        "video",
        help="instead of --image: a .txt file with one video path per line, or one video: its frames are the "
        "condition (every frame, 4D reconstruction; or those --frames names)",
    )
    field_flag(
        io,
        RunConfig,
        "frames",
        type=parse_frames,
        help="the given frames, e.g. 0,48 (first and last) or 0,16,32,48 (keyframes); default: 0 for --image, every "
        "frame for --video",
    )
    field_flag(io, RunConfig, "idx", type=int, help="generate only this line (default %(default)s: all lines)")
    field_flag(io, RunConfig, "out", help="output folder (default %(default)s)")
    field_flag(
        io, RunConfig, "skip_existing", action="store_true",
        help="leave out lines whose result in --out is complete (resume a list)",
    )  # fmt: skip
    model = parser.add_argument_group("model")
    field_flag(model, RunConfig, "model_path", help="Wan2.1-I2V-14B-480P diffusers folder (default %(default)s)")
    field_flag(
        model,
        RunConfig,
        "sft_path",
        help="a fully fine-tuned transformer folder replacing the base one (default: the model folder's own "
        "transformer where it is one, e.g. example/demo/model's)",
    )
    field_flag(model, RunConfig, "lora_path", help="adapter: released 4DNeX folder or fourdnex .safetensors")
    field_flag(model, RunConfig, "lora_rank", type=int, help="expected LoRA rank (default: read from the file)")
    field_flag(
        model, RunConfig, "lora_scale", type=float, help="LoRA scale (default: 0.5 released, alpha/rank fourdnex)"
    )
    field_flag(
        model,
        RunConfig,
        "model_type",
        "--type",
        choices=sorted(MODEL_TYPES),
        help=f"model variant (default: the one a fourdnex adapter was trained as, else {DEFAULT_MODEL_TYPE})",
    )
    field_flag(
        model,
        RunConfig,
        "zero_domain_embedding",
        action="store_true",
        help="sample a released adapter folder that lacks learnable_domain_embeddings.pt with a zero embedding",
    )
    field_flag(
        model,
        RunConfig,
        "modalities",
        "--modalities",
        "--mode",
        aliases=MODALITY_ALIASES,
        choices=(*SAMPLE_MODALITIES, *MODALITY_ALIASES),
        help="what the generated frame holds: rgbxyz, RGB | XYZ side by side (default; xyzrgb is the reference's "
        "spelling), or xyz, the whole frame XYZ. --mode is its former name, still accepted",
    )
    sampling = parser.add_argument_group("sampling (defaults reproduce the paper)")
    field_flag(
        sampling,
        SampleConfig,
        "num_frames",
        type=int,
        help="frames, 4k+1 (default: the count the weights were trained at where they record it, as finetune.py's "
        "do, else 49)",
    )
    field_flag(
        sampling,
        SampleConfig,
        "height",
        type=int,
        help="per-modality height, a multiple of 16 (default: the image's aspect ratio at the pixel area the weights "
        "were trained at where they record it, else at 480x720)",
    )
    field_flag(sampling, SampleConfig, "width", type=int, help="per-modality width, a multiple of 16")
    field_flag(sampling, SampleConfig, "steps", type=int, help="denoising steps (default %(default)s)")
    field_flag(sampling, SampleConfig, "guidance_scale", type=float, help="(default %(default)s)")
    field_flag(sampling, SampleConfig, "negative_prompt", help="(default: empty)")
    field_flag(sampling, SampleConfig, "seed", type=int, help="(default %(default)s)")
    field_flag(
        sampling,
        SampleConfig,
        "ensemble",
        type=int,
        metavar="K",
        help="sample each line K times (seeds --seed, --seed + 1, ...) and write the mean of their XYZ videos, with "
        "the first one's RGB video: K times the sampling time for steadier geometry (default %(default)s)",
    )
    hardware = parser.add_argument_group("hardware, speed and memory")
    field_flag(hardware, RunConfig, "device", help="auto, cuda, cuda:N or cpu (default auto: cuda when available)")
    dtype_flag(
        hardware,
        RunConfig,
        "dtype",
        help="transformer and text encoder dtype (default auto: bfloat16 on GPU, float32 on CPU; bf16, fp16, fp32 "
        "are other spellings)",
    )
    field_flag(
        hardware,
        RunConfig,
        "batch_size",
        type=int,
        metavar="N",
        help="sample up to N consecutive lines of the same size together, in one batch (default %(default)s); each "
        "line starts from the noise it gets alone, and its result equals its batch-1 result up to rounding. With "
        "--ensemble K, N counts samples: N // K lines at a time, or one line's samples N at a time",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "attention_backend",
        help="a diffusers attention backend: native, _native_cudnn, _native_flash, flash, sage, ..., or flash_4 "
        "(FlashAttention-4, an optional package for Hopper and Blackwell GPUs; see the README). Default auto: "
        "flash_4 on a Hopper GPU where flash-attn-4 is installed, else native (_native_cudnn with --cp ring)",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "compile",
        type=switch,
        metavar="{auto,on,off}",
        help="regional torch.compile of the transformer blocks (default auto: on for a GPU without group or "
        "sequential offload)",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "memory",
        choices=["auto", *MEMORY_MODES],
        help="none: all on the GPU; model: one component at a time (about 41 GB); group: transformer blocks "
        "streamed from CPU memory (fits 24 GB); sequential: layer by layer, slowest (default auto: the fastest "
        "that fits the GPU's free memory)",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "fp8",
        action="store_true",
        help="store the transformer's weights in float8 (half the memory; approximate)",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "vae_tiling",
        type=switch,
        metavar="{auto,on,off}",
        help="decode the video in tiles (less memory, tiny seams; default auto: on with --memory group/sequential)",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "cache",
        choices=CACHE_MODES,
        help="approximate: fbc skips the transformer's later blocks when its first block barely changed",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "cache_threshold",
        type=float,
        help="--cache fbc threshold; higher skips more (default %(default)s)",
    )
    field_flag(
        hardware,
        AccelerationConfig,
        "cp",
        choices=CP_MODES,
        help="split each sample over the GPUs of a torchrun launch: ulysses (GPU count divides the 40 heads) or "
        "ring (any count dividing the token count)",
    )
    return parser


if __name__ == "__main__":
    run(main, build_parser())
