"""Run under torchrun (2 CPU processes, gloo): one fused sample on one process, then split with context parallelism.

    torchrun --nproc_per_node 2 tests/cp_worker.py RESULT.json [ulysses|ring]

Both runs decode with VAE slicing, as inference does; the split run also decodes the RGB and XYZ halves on two
processes. Rank 0 writes the largest differences between the two runs (per layout), the largest difference between
the split run's videos and one process's decoding of the same latents, which videos each process got back, and the
sequence length each process saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMALL = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 5.0}
LAYOUTS = ("rgbxyz", "xyz")


def main(result_path: str, mode: str) -> None:
    from PIL import Image

    from fourdnex.config import XYZ_LATENT_MEAN, XYZ_LATENT_STD
    from fourdnex.generate import parallel
    from fourdnex.generate.pipeline import FourDNeXPipeline, load_pipeline

    process = parallel.init_processes(mode, "cpu")
    pipe = load_pipeline(ROOT / "example" / "tiny-wan-i2v", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()
    with torch.no_grad():
        emb = pipe.transformer.domain_embedding
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)))  # the same on every rank
    with Image.open(ROOT / "example" / "scene.png") as image:
        image = image.convert("RGB")

    def sample(layout: str):
        return pipe(image, "a cat", generator=torch.Generator().manual_seed(3), layout=layout, **SMALL)

    single = {layout: sample(layout) for layout in LAYOUTS}
    try:
        pipe.enable_split_decoding()
    except ValueError as err:
        refused = str(err)
    else:
        refused = None
    parallel.enable_context_parallel(pipe.transformer, mode, process.world_size)
    pipe.enable_split_decoding()
    seen = []
    attention = pipe.transformer.blocks[0].attn1  # inside the split region
    attention.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    split = {layout: sample(layout) for layout in LAYOUTS}
    held = {layout: [name for name in ("rgb", "xyz") if getattr(split[layout], name) is not None] for layout in LAYOUTS}
    every_held = [None] * process.world_size
    dist.all_gather_object(every_held, held)
    if process.is_main:
        plain = FourDNeXPipeline(**pipe.components)  # the same modules, decoding on this process alone
        result = {
            "world_size": process.world_size,
            "tokens_per_process": seen[0],
            "tokens": parallel.tokens_of(SMALL["num_frames"], SMALL["height"], SMALL["width"], fused=True),
            "refused_before_cp": refused,
            "videos_held": every_held,
            "decode_timed": all("decode" in out.timings for out in split.values()),
        }
        for layout in LAYOUTS:
            out, reference = split[layout], single[layout]
            rgb, xyz = plain.decode_latents(out.latents, layout, XYZ_LATENT_MEAN, XYZ_LATENT_STD)
            result[layout] = {
                "max_abs_latents": (out.latents - reference.latents).abs().max().item(),
                "max_abs_rgb": (out.rgb - reference.rgb).abs().max().item(),
                "max_abs_xyz": (out.xyz - reference.xyz).abs().max().item(),
                "decode_max_abs_xyz": (out.xyz - xyz.permute(0, 2, 3, 4, 1)).abs().max().item(),
            }
            if rgb is not None:
                result[layout]["decode_max_abs_rgb"] = (out.rgb - rgb.permute(0, 2, 3, 4, 1)).abs().max().item()
        Path(result_path).write_text(json.dumps(result))
    dist.barrier()  # no process leaves while a transfer to or from it is in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ulysses")
