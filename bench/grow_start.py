"""How near a grown transformer (``python -m fourdnex.model.grow``) starts to what its source computes.

Both transformers run fused (RGB | XYZ, the 4DNeX model type) on one random latent of the given size, a random
timestep and random text and image features. Where the patch is the same, the two outputs are compared directly
(deeper and wider growth: equal up to float rounding). Where the grown one reads a token per latent pixel
(``--patch 1``), the latent is made constant over each 2 x 2 patch and the grown output is compared with the
source's averaged over each patch, which is what it is built to start from; beside it, how far the source's output
varies within its patches, and the same comparison with the grown tokens at whole rotary steps instead of half steps.

    python bench/grow_start.py example/demo/model/transformer runs/fine/transformer
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fourdnex.model.transformer as transformer_module
from fourdnex.config import MODEL_TYPES
from fourdnex.model.transformer import FourDNeXTransformer


def load(path: Path) -> FourDNeXTransformer:
    """The transformer folder ``path`` in float32, fused, in eval mode."""
    model = FourDNeXTransformer.from_pretrained(path, torch_dtype=torch.float32)
    model.set_model_type(MODEL_TYPES["i2vwbw-demb-samerope"])
    model.set_modalities("rgbxyz")
    return model.eval()


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    """|x - y| / |y| over every element."""
    return float((x - y).norm() / y.norm())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the transformer folder grown from")
    parser.add_argument("grown", type=Path, help="the grown transformer folder")
    parser.add_argument("--latent_frames", type=int, default=7, help="latent frames (7: 25 video frames)")
    parser.add_argument("--latent_height", type=int, default=12, help="latent rows (12: 96 pixels)")
    parser.add_argument("--latent_width", type=int, default=18, help="latent columns of one modality (18: 144 pixels)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source, grown = load(args.source), load(args.grown)
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, source.config.in_channels, args.latent_frames, args.latent_height, 2 * args.latent_width)
    latent = torch.randn(shape, generator=g)
    timestep = torch.randint(0, 1000, (1,), generator=g)
    text = torch.randn(1, 16, source.config.text_dim, generator=g)
    image = torch.randn(1, 257, source.config.image_dim, generator=g)
    refined = list(grown.config.patch_size) != list(source.config.patch_size)
    if refined:  # constant over each 2 x 2 patch
        latent = latent[..., ::2, ::2].repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)

    def run(model: FourDNeXTransformer) -> torch.Tensor:
        with torch.no_grad():
            return model(latent, timestep, text, image, return_dict=False)[0]

    reference = run(source)
    result = {"source": str(args.source), "grown": str(args.grown), "refined": refined}
    if refined:
        mean = F.avg_pool3d(reference, (1, 2, 2)).repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        result["grown_vs_source_patch_mean"] = relative(run(grown), mean)
        result["source_within_patches"] = relative(reference, mean)
        step = transformer_module.ROPE_STEP
        transformer_module.ROPE_STEP = 1  # the grown tokens at whole rotary steps (the table is built at load)
        try:
            whole_steps = load(args.grown)
        finally:
            transformer_module.ROPE_STEP = step
        result["grown_whole_steps_vs_source_patch_mean"] = relative(run(whole_steps), mean)
    else:
        result["grown_vs_source"] = relative(run(grown), reference)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
