"""Loading a Wan2.1-I2V diffusers folder: the one loader that inference, the cache build and training use.

Precision: the transformer and the UMT5 text encoder take the run's dtype (bfloat16 on a GPU); the VAE and the CLIP
image encoder take :data:`ENCODER_DTYPE` everywhere, so the latents a cache holds are the latents inference's VAE
computes for the same pixels (BENCHMARKS.md, "Encoder precision", has the measurement behind the default).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fourdnex.errors import FourDNeXError

#: The base model's id on the Hugging Face Hub (the download command a missing folder's message gives).
BASE_MODEL_ID = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
#: The dtype of the VAE and the CLIP image encoder, in every pipeline that encodes or decodes.
ENCODER_DTYPE = torch.float32

#: Files every Wan2.1-I2V diffusers folder must hold, by component (weights may be sharded: any listed name will do).
REQUIRED_FILES = {
    "index": {"model_index.json": None},
    "transformer": {
        "transformer/config.json": (
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        )
    },
    "vae": {"vae/config.json": ("diffusion_pytorch_model.safetensors",)},
    "text_encoder": {
        "text_encoder/config.json": ("model.safetensors", "model.safetensors.index.json"),
        "tokenizer/tokenizer_config.json": None,
    },
    "image_encoder": {
        "image_encoder/config.json": ("model.safetensors", "model.safetensors.index.json"),
        "image_processor/preprocessor_config.json": None,
    },
    "scheduler": {"scheduler/scheduler_config.json": None},
}


class ModelFolderError(FourDNeXError, FileNotFoundError):
    """The base model folder is missing or incomplete; the message names the file and how to get the weights."""


def check_model_folder(path: str | Path, components: tuple[str, ...] = tuple(REQUIRED_FILES)) -> None:
    """Raise ModelFolderError naming the first missing file of ``components`` of a Wan2.1-I2V diffusers folder."""
    path = Path(path)
    how = f"download the base model with: hf download {BASE_MODEL_ID} --local-dir {path}"
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist; {how}")
    for component in ("index", *components):
        for config, weights in REQUIRED_FILES[component].items():
            if not (path / config).is_file():
                raise ModelFolderError(f"model folder {path} is incomplete: {config} is missing; {how}")
            if weights and not any((path / config).parent.joinpath(name).is_file() for name in weights):
                missing = (path / config).parent / weights[0]
                raise ModelFolderError(f"model folder {path} is incomplete: {missing} is missing; {how}")


def load_transformer(path: str | Path, dtype: torch.dtype, subfolder: str | None = "transformer"):
    """A :class:`~fourdnex.model.transformer.FourDNeXTransformer` from a Wan2.1 folder (``subfolder``) or a
    transformer folder of its own (``subfolder=None``, e.g. a fully fine-tuned one)."""
    from fourdnex.model.transformer import FourDNeXTransformer

    return FourDNeXTransformer.from_pretrained(path, subfolder=subfolder, dtype=dtype)


def load_vae(model_path: str | Path, dtype: torch.dtype = ENCODER_DTYPE):
    """The Wan VAE of a Wan2.1 folder."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(model_path, subfolder="vae", dtype=dtype)


def load_components(
    model_path: str | Path, dtype: torch.dtype, transformer: bool | str | Path = True, check: bool = True
) -> dict:
    """Every component of a Wan2.1-I2V folder as ``WanImageToVideoPipeline`` takes them, on the CPU.

    The transformer and text encoder take ``dtype``, the VAE and image encoder :data:`ENCODER_DTYPE`.
    ``transformer``: True loads the folder's own; a path loads that transformer folder instead; False leaves it out
    (None), for the cache build, which needs only the encoders.
    """
    from diffusers import UniPCMultistepScheduler
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    root = Path(model_path)
    if check:
        needed = tuple(c for c in REQUIRED_FILES if c != "index" and (c != "transformer" or transformer is True))
        check_model_folder(root, needed)
    if transformer is True:
        model = load_transformer(root, dtype)
    elif transformer:
        model = load_transformer(transformer, dtype, subfolder=None)
    else:
        model = None
    return {
        "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer"),
        "text_encoder": UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype),
        "image_encoder": CLIPVisionModel.from_pretrained(root / "image_encoder", dtype=ENCODER_DTYPE),
        "image_processor": CLIPImageProcessor.from_pretrained(root / "image_processor"),
        "vae": load_vae(root),
        "scheduler": UniPCMultistepScheduler.from_pretrained(root, subfolder="scheduler"),
        "transformer": model,
    }
