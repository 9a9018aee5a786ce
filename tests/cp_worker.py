"""Run under torchrun (2 CPU processes, gloo): one fused sample on one process, then split with context parallelism.

    torchrun --nproc_per_node 2 tests/cp_worker.py RESULT.json [ulysses|ring] [ATTENTION_BACKEND]

Both runs decode with VAE slicing, as inference does; the split run also decodes the RGB and XYZ halves on two
processes. Rank 0 writes the largest differences between the two runs (per modalities), the largest difference between
the split run's videos and one process's decoding of the same latents, which videos each process got back, and the
sequence length each process saw. With the attention backend ``flash_4`` both runs attend through FlashAttention-4's
CPU stand-in (fourdnex.testing.flash4), whose calls are counted too.
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
MODALITIES = ("rgbxyz", "xyz")


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main(result_path: str, mode: str, backend: str) -> None:
    from fourdnex.testing.flash4 import installed

    with installed() as calls:
        run(result_path, mode, backend, calls)


def run(result_path: str, mode: str, backend: str, calls: dict) -> None:
    from PIL import Image

    from fourdnex.config import XYZ_LATENT_MEAN, XYZ_LATENT_STD
    from fourdnex.generate import parallel
    from fourdnex.generate.pipeline import FourDNeXPipeline, load_pipeline

    process = parallel.init_processes(mode, "cpu")
    pipe = load_pipeline(ROOT / "example" / "tiny-wan-i2v", dtype=torch.float32)
    pipe.transformer.set_attention_backend(backend)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()
    with torch.no_grad():
        emb = pipe.transformer.domain_embedding
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)))  # the same on every rank
    with Image.open(ROOT / "example" / "scene.png") as image:
        image = image.convert("RGB")

    def sample(modalities: str):
        return pipe(image, "a cat", generator=torch.Generator().manual_seed(3), modalities=modalities, **SMALL)

    def gradients() -> list[torch.Tensor]:
        """Gradients of a transformer loss w.r.t. its input and two weights, summed over the processes."""
        g = torch.Generator().manual_seed(5)
        x = torch.randn(1, 36, 2, 4, 12, generator=g, requires_grad=True)  # 24 tokens, fused RGB | XYZ
        text, image_tokens = torch.randn(1, 16, 32, generator=g), torch.randn(1, 257, 32, generator=g)
        weights = [pipe.transformer.domain_embedding, pipe.transformer.blocks[0].attn1.to_q.weight]
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = pipe.transformer(x, torch.tensor([500.0]), text, image_tokens, return_dict=False)[0]
            grads = torch.autograd.grad(out.square().mean(), [x, *weights])
        for w in weights:
            w.requires_grad_(False)
        grads = [grads[0], *(grad.contiguous() for grad in grads[1:])]
        for grad in grads if dist.is_initialized() else []:
            dist.all_reduce(grad)
        return grads

    single = {m: sample(m) for m in MODALITIES}
    single_grads = gradients()
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
    single_calls = dict(calls)
    split = {m: sample(m) for m in MODALITIES}
    split_grads = gradients()
    native_split_grads = None
    if mode == "ulysses":  # native SDPA returns no log-sum-exp, which ring attention needs
        pipe.transformer.set_attention_backend("native")
        native_split_grads = gradients()
    held = {m: [name for name in ("rgb", "xyz") if getattr(split[m], name) is not None] for m in MODALITIES}
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
            "backend": backend,
            "flash4_calls": {"single": single_calls, "both": dict(calls)},
            # The split run's gradients (summed over processes) against one process's, and against the split run's with
            # native SDPA: diffusers' context-parallel backward leaves each process 1 / world_size of its share.
            "grads_vs_single": [
                max_rel(process.world_size * a, b) for a, b in zip(split_grads, single_grads, strict=True)
            ],
            "grads_vs_native_split": native_split_grads
            and [max_rel(a, b) for a, b in zip(split_grads, native_split_grads, strict=True)],
        }
        for modalities in MODALITIES:
            out, reference = split[modalities], single[modalities]
            rgb, xyz = plain.decode_latents(out.latents, modalities, XYZ_LATENT_MEAN, XYZ_LATENT_STD)
            result[modalities] = {
                "max_abs_latents": (out.latents - reference.latents).abs().max().item(),
                "max_abs_rgb": (out.rgb - reference.rgb).abs().max().item(),
                "max_abs_xyz": (out.xyz - reference.xyz).abs().max().item(),
                "decode_max_abs_xyz": (out.xyz - xyz.permute(0, 2, 3, 4, 1)).abs().max().item(),
            }
            if rgb is not None:
                result[modalities]["decode_max_abs_rgb"] = (out.rgb - rgb.permute(0, 2, 3, 4, 1)).abs().max().item()
        Path(result_path).write_text(json.dumps(result))
    dist.barrier()  # no process leaves while a transfer to or from it is in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(arguments[0], *arguments[1:2] or ["ulysses"], *arguments[2:3] or ["native"])
