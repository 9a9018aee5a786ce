"""A tiny Wan2.1-I2V model in the exact diffusers folder layout, built deterministically with random weights.

It runs the whole fourdnex pipeline in seconds on a CPU, which is what the tests and the README's quick start use
until trained weights are at hand. Its outputs are noise: the weights are random.

    python -m fourdnex.testing.tiny example/tiny-wan-i2v
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

#: Marker written into model_index.json so that tools can say plainly that the weights are random.
TINY_MARKER = "_fourdnex_tiny_random"
SEED = 20260121

_CORPUS = [
    "a dog runs across a sunny park POINTMAP_STYLE.",
    "a woman walks along the beach at sunset while waves roll in POINTMAP_STYLE.",
    "a red car drives down a busy city street with tall buildings POINTMAP_STYLE.",
    "a cat sits on a wooden table next to a window POINTMAP_STYLE.",
    "the camera slowly orbits a statue in a museum hall POINTMAP_STYLE.",
    "a man rides a bicycle through a forest trail POINTMAP_STYLE.",
    "two children play football on green grass POINTMAP_STYLE.",
    "a bird flies over a lake surrounded by mountains POINTMAP_STYLE.",
    "procedural scene with a moving box, a sphere and a textured ground POINTMAP_STYLE.",
    "an empty room with white walls, a chair and a lamp POINTMAP_STYLE.",
]


def tiny_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer over the words and characters of a few captions, scored by frequency.

    The vocabulary is built directly rather than trained, so that it is the same on every machine and every run.
    """
    words = Counter(f"\u2581{word}" for line in _CORPUS for word in line.split())
    chars = Counter(char for line in _CORPUS for char in line if not char.isspace())
    total = sum(words.values()) + sum(chars.values())
    pieces = [(piece, math.log(count / total)) for piece, count in sorted((words + chars).items())]
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0)


def build_tiny_pipeline(seed: int = SEED) -> WanImageToVideoPipeline:
    """Build every component of a Wan2.1-I2V pipeline at toy size, deterministically from ``seed``."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=32,
        added_kv_proj_dim=24,
        rope_max_seq_len=64,
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    # The scheduler settings of Wan2.1-I2V-14B-480P-Diffusers.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


def save_tiny_model(path: str | Path, seed: int = SEED) -> Path:
    """Write the tiny model to ``path`` (a diffusers folder) and mark it as random."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index[TINY_MARKER] = True
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the diffusers model to")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    print(f"wrote the tiny random model to {save_tiny_model(args.out, args.seed)}")
