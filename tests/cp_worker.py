"""Run under torchrun (2 CPU processes, gloo): one fused sample on one process, then split with context parallelism.

    torchrun --nproc_per_node 2 tests/cp_worker.py RESULT.json [ulysses|ring]

Rank 0 writes the largest difference between the two samples and the sequence length each process saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMALL = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 5.0}


def main(result_path: str, mode: str) -> None:
    from PIL import Image

    from fourdnex import parallel
    from fourdnex.pipeline import load_pipeline

    process = parallel.init_processes(mode, "cpu")
    pipe = load_pipeline(ROOT / "example" / "tiny-wan-i2v", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        emb = pipe.transformer.domain_embedding
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)))  # the same on every rank
    with Image.open(ROOT / "example" / "scene.png") as image:
        image = image.convert("RGB")

    def sample():
        return pipe(image, "a cat", generator=torch.Generator().manual_seed(3), **SMALL)

    single = sample()
    parallel.enable_context_parallel(pipe.transformer, mode, process.world_size)
    seen = []
    attention = pipe.transformer.blocks[0].attn1  # inside the split region
    attention.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    split = sample()
    if process.is_main:
        result = {
            "world_size": process.world_size,
            "tokens_per_process": seen[0],
            "tokens": parallel.tokens_of(SMALL["num_frames"], SMALL["height"], SMALL["width"], fused=True),
            "max_abs_xyz": (split.xyz - single.xyz).abs().max().item(),
            "max_abs_latents": (split.latents - single.latents).abs().max().item(),
        }
        Path(result_path).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ulysses")
