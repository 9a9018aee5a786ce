"""Small Wan2.1-I2V models in the exact diffusers folder layout, built from the real classes, deterministically.

Two presets share one builder:

* ``tiny``: every component at toy size with random weights; it runs the whole pipeline in seconds on a CPU and is
  what the tests use (``tests/`` holds a built copy). Its outputs are noise.
* ``demo``: the architecture of the small model that ``scripts/train_demo.sh`` trains on synthetic 4D scenes
  (a VAE and a transformer trained by this project; the UMT5 text and CLIP image encoders keep fixed random weights,
  whose features still tell captions and images apart). Built here untrained, as the recipe's starting point; the
  shipped model's transformer was later grown to twice its blocks (:mod:`fourdnex.model.grow`).

A folder whose VAE or transformer is still random carries :data:`fourdnex.model.loading.RANDOM_MARKER` in its
``model_index.json``, so that tools can say plainly that its outputs are noise.

    python -m fourdnex.model.presets OUT --preset demo
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass
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

from fourdnex.cli import run
from fourdnex.errors import UsageError
from fourdnex.model.loading import (
    CONFIG_FILE,
    MODEL_INDEX_FILE,
    RANDOM_MARKER,
    WEIGHTS_FILE,
    component_folder,
    read_config,
)

SEED = 20260121

#: A few toy captions: the default tokenizer vocabulary of a preset pipeline.
TOY_CAPTIONS = [
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


@dataclass(frozen=True)
class Preset:
    """Component sizes of a small Wan2.1-I2V model (diffusers / transformers config keyword arguments)."""

    transformer: dict
    vae: dict
    text_encoder: dict
    image_encoder: dict
    image_size: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        transformer={
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "text_dim": 32,
            "freq_dim": 32,
            "ffn_dim": 48,
            "num_layers": 2,
            "image_dim": 32,
            "added_kv_proj_dim": 24,
            "rope_max_seq_len": 64,
        },
        vae={"base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1},
        text_encoder={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
        image_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        image_size=32,
    ),
    # About 4.4M transformer and 2.6M VAE parameters (15 MB in half precision with the encoders; 22 MB with the
    # transformer grown to 8 blocks): a 25-frame 96 x 144 sample takes seconds on a CPU.
    "demo": Preset(
        transformer={
            "num_attention_heads": 4,
            "attention_head_dim": 64,
            "text_dim": 64,
            "freq_dim": 256,
            "ffn_dim": 512,
            "num_layers": 4,
            "image_dim": 64,
            "added_kv_proj_dim": 256,
            "rope_max_seq_len": 1024,
        },
        vae={"base_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1},
        text_encoder={"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
        image_encoder={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        image_size=64,
    ),
}


def build_tokenizer(corpus: list[str]) -> T5Tokenizer:
    """A T5 (unigram) tokenizer over the words and characters of ``corpus``, scored by frequency.

    The vocabulary is built directly rather than trained, so that it is the same on every machine and every run.
    """
    words = Counter(f"\u2581{word}" for line in corpus for word in line.split())
    chars = Counter(char for line in corpus for char in line if not char.isspace())
    total = sum(words.values()) + sum(chars.values())
    pieces = [(piece, math.log(count / total)) for piece, count in sorted((words + chars).items())]
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0)


def build_pipeline(preset: str = "tiny", seed: int = SEED, corpus: list[str] | None = None) -> WanImageToVideoPipeline:
    """Every component of a Wan2.1-I2V pipeline at a preset's size, deterministically from ``seed``; the tokenizer's
    vocabulary is the words and characters of ``corpus`` (default: a few toy captions)."""
    sizes = PRESETS[preset]
    tokenizer = build_tokenizer(corpus or TOY_CAPTIONS)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=36, out_channels=16, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, **sizes.transformer,
    )  # fmt: skip
    vae = AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True], **sizes.vae)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                   **sizes.text_encoder)
    )  # fmt: skip
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**sizes.image_encoder))
    side = sizes.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=True
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


def save_model(
    path: str | Path,
    preset: str = "tiny",
    seed: int = SEED,
    trained: dict[str, Path] | None = None,
    corpus: list[str] | None = None,
    encoders_from: str | Path | None = None,
) -> Path:
    """Write a preset's model to ``path`` (a diffusers folder); ``trained`` maps component names (``vae``,
    ``transformer``) to trained folders put in place of the random ones, their weights stored in float16 (half the
    bytes; pipelines load them at their own dtype) with the metadata they carry (a fully fine-tuned transformer's
    says what it was trained as, so the folder samples as that model). Marked random unless both are trained.
    ``corpus``: captions whose words the tokenizer knows (every folder of one model must be given the same).
    ``encoders_from``: a model folder whose tokenizer, text and image encoders (:data:`ENCODER_COMPONENTS`) are
    copied instead of built: a model trained further must keep the encoders it learned with (the random encoders of
    a seed differ between library versions, the tokenizer between corpora)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fourdnex.files import write_safetensors

    path = Path(path)
    trained = trained or {}
    build_pipeline(preset, seed, corpus).save_pretrained(path)
    if encoders_from is not None:
        copy_encoders(Path(encoders_from), path)
    for name, folder in trained.items():
        target = component_folder(path, name)
        shutil.rmtree(target)
        target.mkdir()
        config = read_config(folder)
        config.pop("_name_or_path", None)  # where it was trained: a path of another machine
        (target / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        weights = Path(folder) / WEIGHTS_FILE
        state = load_file(weights)
        with safe_open(weights, "pt") as f:
            metadata = f.metadata()
        write_safetensors(target / WEIGHTS_FILE, {key: value.half() for key, value in state.items()}, metadata)
    index_file = path / MODEL_INDEX_FILE
    index = json.loads(index_file.read_text())
    if not {"vae", "transformer"} <= set(trained):
        index[RANDOM_MARKER] = True
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    return path


#: The components of a model folder that turn captions and images into the transformer's conditions.
ENCODER_COMPONENTS = ("tokenizer", "text_encoder", "image_encoder", "image_processor")
#: Each encoder's config key of the width the transformer reads it at (``text_dim``, ``image_dim``).
_ENCODER_WIDTHS = {"text_encoder": ("d_model", "text_dim"), "image_encoder": ("hidden_size", "image_dim")}


def copy_encoders(source: Path, model: Path) -> None:
    """Put ``source``'s :data:`ENCODER_COMPONENTS` in place of ``model``'s (both model folders); UsageError where
    ``source`` lacks one or gives it another width than ``model``'s transformer reads."""
    transformer = read_config(component_folder(model, "transformer"))
    for name in ENCODER_COMPONENTS:
        folder = component_folder(source, name)
        if not folder.is_dir():
            raise UsageError(f"{source} has no {name} folder to take the encoders from")
        if name in _ENCODER_WIDTHS:
            key, reads = _ENCODER_WIDTHS[name]
            width = read_config(folder).get(key)
            if width != transformer[reads]:
                raise UsageError(
                    f"{folder}: {key} is {width}, the transformer reads its {name} at {reads} {transformer[reads]}"
                )
        target = component_folder(model, name)
        shutil.rmtree(target)
        shutil.copytree(folder, target)


def main(args: argparse.Namespace) -> None:
    """Write the model ``args`` describe."""
    trained = {name: Path(value) for name in ("vae", "transformer") if (value := getattr(args, name))}
    corpus = None
    if args.corpus:
        if not Path(args.corpus).is_file():
            raise UsageError(f"corpus file {args.corpus} does not exist")
        corpus = [line for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    written = save_model(args.out, args.preset, args.seed, trained, corpus, args.encoders_from)
    print(f"wrote the {args.preset} model to {written}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fourdnex.model.presets``."""
    parser = argparse.ArgumentParser(
        prog="fourdnex.model.presets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="folder to write the diffusers model to")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--vae", default=None, help="a trained VAE folder to use instead of a random one")
    parser.add_argument("--transformer", default=None, help="a trained transformer folder to use instead")
    parser.add_argument(
        "--encoders_from",
        default=None,
        help="a model folder whose tokenizer, text and image encoders to take instead of building them (a model "
        "trained further keeps those it learned with; --corpus is then not used)",
    )
    parser.add_argument(
        "--corpus",
        default=None,
        help="a text file of captions, one a line, whose words the tokenizer knows (the training captions; "
        "default: a few toy captions)",
    )
    return parser


if __name__ == "__main__":
    run(main, build_parser())
