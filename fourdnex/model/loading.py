"""Loading a Wan2.1-I2V diffusers folder: the one loader that inference, the cache build and training use, and the
one place that knows what such a folder holds.

A *model folder* is a whole diffusers pipeline: ``model_index.json`` at the top and one sub-folder per component
(:data:`REQUIRED_FILES`). A *transformer folder* is one component on its own (``config.json`` and its weights), as
``finetune.py --train_mode full`` writes and ``inference.py --sft_path`` reads. Every question about either (where a
component lives, its config, its weights files, whether it is complete, whether its weights are random) is answered
by a function here.

Precision: the transformer and the UMT5 text encoder take the run's dtype (bfloat16 on a GPU); the VAE and the CLIP
image encoder take :data:`ENCODER_DTYPE` everywhere, so the latents a cache holds are the latents inference's VAE
computes for the same pixels (BENCHMARKS.md, "Encoder precision", has the measurement behind the default).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fourdnex.errors import FourDNeXError, UsageError

#: The base model's id on the Hugging Face Hub (the download command a missing folder's message gives).
BASE_MODEL_ID = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
#: The dtype of the VAE and the CLIP image encoder, in every pipeline that encodes or decodes.
ENCODER_DTYPE = torch.float32
#: The text tokens every caption is padded to by the UMT5 encoder, in the cache as at inference (Wan's length).
TEXT_TOKENS = 512

#: The file that makes a folder a model folder (a whole pipeline, its components in sub-folders).
MODEL_INDEX_FILE = "model_index.json"
#: A component folder's config.
CONFIG_FILE = "config.json"
#: A diffusers component's weights (the transformer's, the VAE's): one file, or shards that an index file lists.
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
#: The key of ``model_index.json`` that marks a model whose VAE or transformer still has random weights (the tiny
#: test model; :func:`fourdnex.model.presets.save_model` writes it), so that tools can say its outputs are noise.
RANDOM_MARKER = "_fourdnex_tiny_random"

#: Files every Wan2.1-I2V diffusers folder must hold, by component (weights may be sharded: any listed name will do).
REQUIRED_FILES = {
    "index": {MODEL_INDEX_FILE: None},
    "transformer": {f"transformer/{CONFIG_FILE}": (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)},
    "vae": {f"vae/{CONFIG_FILE}": (WEIGHTS_FILE,)},
    "text_encoder": {
        f"text_encoder/{CONFIG_FILE}": ("model.safetensors", "model.safetensors.index.json"),
        "tokenizer/tokenizer_config.json": None,
    },
    "image_encoder": {
        f"image_encoder/{CONFIG_FILE}": ("model.safetensors", "model.safetensors.index.json"),
        "image_processor/preprocessor_config.json": None,
    },
    "scheduler": {"scheduler/scheduler_config.json": None},
}


class ModelFolderError(FourDNeXError, FileNotFoundError):
    """The base model folder is missing or incomplete; the message names the file and how to get the weights."""


def component_folder(model_path: str | Path, component: str) -> Path:
    """Where ``component`` of a model folder lives (``transformer``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``image_encoder``, ``image_processor``, ``scheduler``): the sub-folder diffusers' layout gives it."""
    return Path(model_path) / component


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a model folder (a whole pipeline, with ``model_index.json``) rather than one component's
    folder, such as a transformer folder."""
    return (Path(path) / MODEL_INDEX_FILE).is_file()


def transformer_folder(model_path: str | Path, transformer: str | Path | None = None) -> Path:
    """The transformer folder a run loads: ``transformer`` (a transformer folder of its own, ``--sft_path``) when
    given, else the model folder's ``transformer/``."""
    return Path(transformer) if transformer is not None else component_folder(model_path, "transformer")


def read_config(folder: str | Path) -> dict:
    """The ``config.json`` of a component folder (a transformer folder, ``component_folder(model, "vae")``, ...);
    ModelFolderError naming the file where it is missing or not JSON."""
    path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise ModelFolderError(f"cannot read the model config {path} ({err.strerror or err})") from err
    except ValueError as err:
        raise ModelFolderError(f"the model config {path} is not JSON ({err})") from err


def weights_files(folder: str | Path) -> list[Path]:
    """The safetensors weights of a diffusers component folder: its one :data:`WEIGHTS_FILE`, or every shard its
    :data:`WEIGHTS_INDEX_FILE` lists (sorted); an empty list where it holds neither."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / WEIGHTS_FILE
    return [single] if single.is_file() else []


def weights_file_holding(folder: str | Path, key: str) -> Path | None:
    """The weights file of a component folder (:func:`weights_files`) that holds the tensor ``key``; None where none
    does."""
    from safetensors import safe_open

    for file in weights_files(folder):
        with safe_open(file, "pt") as f:
            if key in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return file
    return None


def has_random_weights(model_path: str | Path) -> bool:
    """Whether a model folder is marked as having a random VAE or transformer (:data:`RANDOM_MARKER`)."""
    index = Path(model_path) / MODEL_INDEX_FILE
    return bool(json.loads(index.read_text()).get(RANDOM_MARKER, False)) if index.is_file() else False


def _first_missing(root: Path, files: dict[str, tuple[str, ...] | None]) -> Path | None:
    """The first file of ``files`` (config -> weights, any one of which will do) missing under ``root``."""
    for config, weights in files.items():
        if not (root / config).is_file():
            return root / config
        if weights and not any((root / config).parent.joinpath(name).is_file() for name in weights):
            return (root / config).parent / weights[0]
    return None


def check_model_folder(
    path: str | Path, components: tuple[str, ...] = tuple(REQUIRED_FILES), how: str | None = None
) -> None:
    """Raise ModelFolderError naming the first missing file of ``components`` of a Wan2.1-I2V diffusers folder, and
    ``how`` to get one (default: the download command of the base model)."""
    path = Path(path)
    how = how or f"download the base model with: hf download {BASE_MODEL_ID} --local-dir {path}"
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist; {how}")
    for component in ("index", *components):
        missing = _first_missing(path, REQUIRED_FILES[component])
        if missing is not None:
            raise ModelFolderError(f"model folder {path} is incomplete: {missing.relative_to(path)} is missing; {how}")


def check_transformer_folder(path: str | Path) -> None:
    """Raise ModelFolderError unless ``path`` is a transformer folder of its own (config and weights, as
    ``finetune.py --train_mode full`` writes it); a model folder is named as such, with its transformer folder."""
    path = Path(path)
    if is_model_folder(path):
        raise ModelFolderError(
            f"{path} is a model folder, not a transformer folder: pass {component_folder(path, 'transformer')}"
        )
    if not path.is_dir():
        raise ModelFolderError(f"transformer folder {path} does not exist")
    files = {Path(config).name: weights for config, weights in REQUIRED_FILES["transformer"].items()}
    missing = _first_missing(path, files)
    if missing is not None:
        raise ModelFolderError(f"transformer folder {path} is incomplete: {missing.name} is missing")


def load_transformer(path: str | Path, dtype: torch.dtype, subfolder: str | None = "transformer"):
    """A :class:`~fourdnex.model.transformer.FourDNeXTransformer` from a model folder (``subfolder``) or a
    transformer folder of its own (``subfolder=None``, e.g. a fully fine-tuned one).

    The domain embedding starts at zero, unless the weights hold the reference implementation's
    ``learnable_domain_embeddings`` key (its fully fine-tuned transformer keeps the embedding there), which is read
    into it; UsageError names both shapes where they differ.
    """
    from fourdnex.model.transformer import REFERENCE_DOMAIN_KEY, FourDNeXTransformer

    model = FourDNeXTransformer.from_pretrained(path, subfolder=subfolder, dtype=dtype)
    file = weights_file_holding(Path(path, subfolder or ""), REFERENCE_DOMAIN_KEY)
    if file is not None:
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            loaded = f.get_tensor(REFERENCE_DOMAIN_KEY)
        embedding = model.domain_embedding
        if tuple(loaded.shape) != tuple(embedding.shape):
            raise UsageError(
                f"{path}: {REFERENCE_DOMAIN_KEY} has shape {tuple(loaded.shape)}, the model expects "
                f"{tuple(embedding.shape)}"
            )
        with torch.no_grad():
            embedding.copy_(loaded.float())
    return model


def channels_last_convolutions(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the weights of its 3D convolutions in channels-last 3D memory (the other parameters have no
    such layout): cuDNN's faster layout for the Wan VAE's convolutions (BENCHMARKS.md, "Dataset building"); returns
    it."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def load_vae(model_path: str | Path, dtype: torch.dtype = ENCODER_DTYPE):
    """The Wan VAE of a model folder."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(component_folder(model_path, "vae"), dtype=dtype)


def load_components(
    model_path: str | Path,
    dtype: torch.dtype,
    transformer: bool | str | Path = True,
    check: bool = True,
    encoder_dtype: torch.dtype = ENCODER_DTYPE,
) -> dict:
    """Every component of a Wan2.1-I2V folder as ``WanImageToVideoPipeline`` takes them, on the CPU.

    The transformer and text encoder take ``dtype``, the VAE and image encoder ``encoder_dtype`` (the cache build
    may ask for another than :data:`ENCODER_DTYPE`). ``transformer``: True loads the folder's own; a path loads that
    transformer folder instead; False leaves it out (None), for the cache build, which needs only the encoders.
    ``check``: first raise ModelFolderError naming any missing file (:func:`check_model_folder`,
    :func:`check_transformer_folder`).
    """
    from diffusers import UniPCMultistepScheduler
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    root = Path(model_path)
    if check:
        needed = tuple(c for c in REQUIRED_FILES if c != "index" and (c != "transformer" or transformer is True))
        check_model_folder(root, needed)
        if transformer and transformer is not True:
            check_transformer_folder(transformer)
    if transformer is True:
        model = load_transformer(root, dtype)
    elif transformer:
        model = load_transformer(transformer, dtype, subfolder=None)
    else:
        model = None
    return {
        "tokenizer": AutoTokenizer.from_pretrained(component_folder(root, "tokenizer")),
        "text_encoder": UMT5EncoderModel.from_pretrained(component_folder(root, "text_encoder"), dtype=dtype),
        "image_encoder": CLIPVisionModel.from_pretrained(component_folder(root, "image_encoder"), dtype=encoder_dtype),
        "image_processor": CLIPImageProcessor.from_pretrained(component_folder(root, "image_processor")),
        "vae": load_vae(root, encoder_dtype),
        "scheduler": UniPCMultistepScheduler.from_pretrained(component_folder(root, "scheduler")),
        "transformer": model,
    }
