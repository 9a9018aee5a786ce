"""Adapters: the LoRA and domain embedding that turn Wan2.1-I2V into 4DNeX, in two on-disk formats.

Released format (the 4DNeX authors' release), a folder holding
    pytorch_lora_weights.safetensors   diffusers LoRA naming, ``transformer.blocks.N.attnK.to_q.lora_A.weight``
                                       (rank, in) and ``...lora_B.weight`` (out, rank); no alpha stored
    learnable_domain_embeddings.pt     a plain tensor (2, inner_dim), read with ``weights_only=True``
and applied at scale 0.5 by default (it was trained with rank 64, alpha 32).

fourdnex format, one file ``fourdnex_adapter.safetensors`` (or a folder holding it): the same LoRA keys plus
``domain_embedding`` (2, inner_dim), and JSON metadata (rank, alpha, target modules, XYZ latent statistics, model type,
base model). It is applied at scale alpha / rank by default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fourdnex.config import DEFAULT_MODEL_TYPE, MODEL_TYPES
from fourdnex.errors import FourDNeXError
from fourdnex.files import atomic_path
from fourdnex.model.loading import weights_files

ADAPTER_FILE = "fourdnex_adapter.safetensors"
RELEASED_LORA_FILE = "pytorch_lora_weights.safetensors"
RELEASED_DOMAIN_FILE = "learnable_domain_embeddings.pt"
DOMAIN_KEY = "domain_embedding"
FORMAT_NAME = "fourdnex-adapter"
FORMAT_VERSION = 1
ADAPTER_NAME = "4dnex"
#: The released adapter was trained with rank 64 and alpha 32; its file stores no alpha.
RELEASED_SCALE = 0.5


class AdapterError(FourDNeXError, ValueError):
    """An adapter that cannot be read or does not fit the model; the message names the key and the shapes."""


@dataclass
class AdapterMeta:
    """What an adapter says about itself (the fourdnex format stores all of it; the released one none)."""

    rank: int
    alpha: float
    target_modules: list[str]
    model_type: str = DEFAULT_MODEL_TYPE
    xyz_latent_mean: float | None = None
    xyz_latent_std: float | None = None
    base_model: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Adapter:
    """An adapter in memory: LoRA tensors keyed like the transformer's modules, plus the domain embedding."""

    lora: dict[
        str, torch.Tensor
    ]  # "blocks.0.attn1.to_q.lora_A.weight" -> (rank, in); "...lora_B.weight" -> (out, rank)
    domain_embedding: torch.Tensor | None  # (2, inner_dim)
    meta: AdapterMeta
    format: str  # "released" or "fourdnex"
    path: Path | None = None

    @property
    def default_scale(self) -> float:
        """The LoRA scale the adapter was trained for."""
        return RELEASED_SCALE if self.format == "released" else self.meta.alpha / self.meta.rank


def _strip_prefix(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop the diffusers ``transformer.`` prefix; refuse keys that are not LoRA A/B weights."""
    lora = {}
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        if not (name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")):
            raise AdapterError(
                f"{path}: {key} is not a LoRA weight (expected '...lora_A.weight' or '...lora_B.weight')"
            )
        lora[name] = value
    if not lora:
        raise AdapterError(f"{path}: holds no LoRA weights")
    return lora


def _lora_rank(lora: dict[str, torch.Tensor], path: Path) -> int:
    """The common rank of all LoRA pairs; a pair of another rank is named."""
    ranks = {key: t.shape[0] if ".lora_A." in key else t.shape[1] for key, t in lora.items()}
    first_key, rank = next(iter(ranks.items()))
    for key, r in ranks.items():
        if r != rank:
            raise AdapterError(f"{path}: {key} has rank {r} but {first_key} has rank {rank}")
    return rank


def _target_modules(lora: dict[str, torch.Tensor]) -> list[str]:
    """The module names the LoRA keys adapt, e.g. ``["to_k", "to_out.0", "to_q", "to_v"]``."""
    names = {key.rsplit(".lora_", 1)[0] for key in lora}
    return sorted({name.split(".", 3)[3] if name.count(".") >= 3 else name for name in names})


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter in either format from a folder or a ``.safetensors`` file."""
    path = Path(path)
    file = _fourdnex_file(path)
    if file is not None:
        return _read_fourdnex(file)
    return _read_released(path) if path.is_dir() else _read_released(path.parent, lora_file=path)


def read_adapter_meta(path: str | Path) -> AdapterMeta | None:
    """What the adapter at ``path`` (as :func:`load_adapter` takes it) says it was trained as, read from its file's
    metadata without its tensors; None for a released-format adapter, which says nothing."""
    file = _fourdnex_file(Path(path))
    return None if file is None else _read_fourdnex_meta(file)


def _fourdnex_file(path: Path) -> Path | None:
    """The fourdnex-format file of the adapter at ``path``, None where it is a released-format one."""
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return path / ADAPTER_FILE
        if (path / RELEASED_LORA_FILE).is_file():
            return None
        raise AdapterError(f"{path}: holds neither {ADAPTER_FILE} nor {RELEASED_LORA_FILE}")
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            ours = (f.metadata() or {}).get("format") == FORMAT_NAME
        return path if ours else None
    raise AdapterError(f"{path}: no such adapter folder or .safetensors file")


def _read_released(folder: Path, lora_file: Path | None = None) -> Adapter:
    lora_file = lora_file or folder / RELEASED_LORA_FILE
    lora = _strip_prefix(load_file(lora_file), lora_file)
    domain = None
    domain_file = folder / RELEASED_DOMAIN_FILE
    if domain_file.is_file():
        try:
            domain = torch.load(domain_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a file that is not a plain tensor
            raise AdapterError(f"{domain_file}: not a plain tensor file ({err})") from err
        if not isinstance(domain, torch.Tensor):
            raise AdapterError(f"{domain_file}: expected a tensor (2, inner_dim), got {type(domain).__name__}")
    rank = _lora_rank(lora, lora_file)
    meta = AdapterMeta(rank=rank, alpha=rank * RELEASED_SCALE, target_modules=_target_modules(lora))
    return Adapter(lora, domain, meta, "released", folder)


def _read_fourdnex_meta(file: Path) -> AdapterMeta:
    with safe_open(file, "pt") as f:
        metadata = f.metadata() or {}
    try:
        version = int(metadata["format_version"])
        meta = AdapterMeta(**json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as err:
        raise AdapterError(f"{file}: unreadable fourdnex adapter metadata ({err})") from err
    if version > FORMAT_VERSION:
        raise AdapterError(f"{file}: adapter format version {version} is newer than this fourdnex ({FORMAT_VERSION})")
    return meta


def _read_fourdnex(file: Path) -> Adapter:
    meta = _read_fourdnex_meta(file)
    state = load_file(file)
    domain = state.pop(DOMAIN_KEY, None)
    lora = _strip_prefix(state, file)
    rank = _lora_rank(lora, file)
    if rank != meta.rank:
        raise AdapterError(f"{file}: metadata says rank {meta.rank} but the LoRA tensors have rank {rank}")
    return Adapter(lora, domain, meta, "fourdnex", file)


def save_adapter(
    path: str | Path, lora: dict[str, torch.Tensor], domain_embedding: torch.Tensor, meta: AdapterMeta
) -> Path:
    """Write an adapter in the fourdnex format, atomically. ``path`` is a folder or a ``.safetensors`` file.

    ``lora`` is keyed like the transformer's modules (``blocks.0.attn1.to_q.lora_A.weight``, with or without the
    ``transformer.`` prefix); ``domain_embedding`` is ``(2, inner_dim)``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / ADAPTER_FILE
    tensors = {f"transformer.{k.removeprefix('transformer.')}": v.detach().cpu().contiguous() for k, v in lora.items()}
    tensors[DOMAIN_KEY] = domain_embedding.detach().cpu().contiguous()
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": json.dumps(asdict(meta))}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


#: The metadata key under which a fully trained transformer's weights file (``finetune.py --train_mode full``) keeps
#: what it was trained as: an :class:`AdapterMeta` as JSON (its LoRA fields unused), so that sampling it with
#: ``--sft_path`` takes the model type and the XYZ latent statistics of its training data, as an adapter's do.
TRANSFORMER_META_KEY = "fourdnex_training"


def transformer_metadata(meta: AdapterMeta) -> dict[str, str]:
    """The safetensors metadata a fully trained transformer's weights file carries."""
    return {TRANSFORMER_META_KEY: json.dumps(asdict(meta))}


def read_transformer_meta(folder: str | Path) -> AdapterMeta | None:
    """What a transformer folder's weights say they were trained as (see :data:`TRANSFORMER_META_KEY`); None for a
    folder without it (a base model, the reference's fine-tuned transformer)."""
    for path in weights_files(folder):
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(TRANSFORMER_META_KEY)
        if raw is None:
            continue
        try:
            return AdapterMeta(**json.loads(raw))
        except (ValueError, TypeError) as err:
            raise AdapterError(f"{path}: unreadable {TRANSFORMER_META_KEY} metadata ({err})") from err
    return None


def trained_meta(adapter: Adapter | None, transformer: str | Path | None = None) -> AdapterMeta | None:
    """What the weights to sample were trained as: a fourdnex adapter's metadata, else a fully trained transformer
    folder's (:func:`read_transformer_meta`), else None (the released adapter, a base model)."""
    return _adapter_else_transformer(adapter.meta if adapter is not None and adapter.format == "fourdnex" else None,
                                     transformer)  # fmt: skip


def trained_meta_at(lora_path: str | Path | None, transformer: str | Path | None = None) -> AdapterMeta | None:
    """:func:`trained_meta` of the adapter at ``lora_path`` (None: no adapter), its tensors left unread."""
    return _adapter_else_transformer(read_adapter_meta(lora_path) if lora_path else None, transformer)


def _adapter_else_transformer(adapter_meta: AdapterMeta | None, transformer: str | Path | None) -> AdapterMeta | None:
    """A fourdnex adapter's metadata where there is one, else the transformer folder's, else None."""
    if adapter_meta is not None:
        return adapter_meta
    return read_transformer_meta(transformer) if transformer is not None else None


def resolve_model_type(
    adapter: Adapter | None,
    requested: str | None,
    zero_domain_embedding: bool = False,
    transformer: str | Path | None = None,
) -> str:
    """The model type (a ``MODEL_TYPES`` key) to sample with: the one the weights were trained as (a fourdnex adapter,
    or a fully trained ``transformer`` folder: :func:`trained_meta`), else ``requested``, else the default.

    Raises AdapterError when ``requested`` contradicts what the weights were trained as (for the other RoPE or
    embedding, so sampling would silently differ), and when a released-format folder lacks the domain embedding file
    its model type needs (the reference's trainer never writes it) unless ``zero_domain_embedding``.
    """
    meta = trained_meta(adapter, transformer)
    trained = meta.model_type if meta is not None else None
    if requested is not None and trained is not None and requested != trained:
        source = f"the adapter {adapter.path}" if adapter is not None else f"the transformer {transformer}"
        raise AdapterError(
            f"--type {requested} contradicts {source}, which was trained as {trained}: "
            f"drop --type or pass --type {trained}"
        )
    model_type = trained or requested or DEFAULT_MODEL_TYPE
    needs_domain = MODEL_TYPES[model_type].domain_embedding
    if needs_domain and adapter is not None and adapter.domain_embedding is None and not zero_domain_embedding:
        raise AdapterError(
            f"{adapter.path}: {RELEASED_DOMAIN_FILE} is missing, which --type {model_type} needs; pass "
            "--zero_domain_embedding to sample with a zero domain embedding, or --type i2vwbw"
        )
    return model_type


def check_adapter_fits(transformer: nn.Module, adapter: Adapter, lora_rank: int | None = None) -> None:
    """Raise AdapterError naming the first key whose module is missing or whose shape does not fit."""
    where = adapter.path or "adapter"
    for key, tensor in adapter.lora.items():
        module_name, kind = key.rsplit(".lora_", 1)
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            raise AdapterError(f"{where}: {key} adapts {module_name}, which this transformer does not have") from None
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"{where}: {key} adapts {module_name}, which is not a linear layer")
        rank = lora_rank or adapter.meta.rank
        expected = (rank, base.in_features) if kind.startswith("A") else (base.out_features, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model expects {expected}")
    if adapter.domain_embedding is not None:
        expected = tuple(transformer.domain_embedding.shape)
        if tuple(adapter.domain_embedding.shape) != expected:
            raise AdapterError(
                f"{where}: {DOMAIN_KEY} has shape {tuple(adapter.domain_embedding.shape)}, the model expects {expected}"
            )


def apply_adapter(
    transformer: nn.Module,
    adapter: Adapter,
    scale: float | None = None,
    fuse: bool = True,
    lora_rank: int | None = None,
) -> float:
    """Attach an adapter to a :class:`~fourdnex.model.transformer.FourDNeXTransformer`; returns the LoRA scale used.

    The LoRA goes in through PEFT at ``scale`` (default: the adapter's own) and, with ``fuse``, is merged into the
    base weights, leaving a plain transformer that runs at the base model's speed. The domain embedding is copied in.
    """
    check_adapter_fits(transformer, adapter, lora_rank)
    scale = adapter.default_scale if scale is None else scale
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in adapter.lora})
    rank = adapter.meta.rank
    config = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=modules, init_lora_weights=False)
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    dtype = transformer.dtype
    state = {key: value.to(dtype) for key, value in adapter.lora.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise AdapterError(f"{adapter.path or 'adapter'}: keys the model did not take: {unexpected[:3]}")
    if fuse:
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()
    if adapter.domain_embedding is not None:
        with torch.no_grad():
            transformer.domain_embedding.copy_(adapter.domain_embedding.to(transformer.domain_embedding))
    return scale
