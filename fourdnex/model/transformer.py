"""The 4DNeX transformer: diffusers' Wan2.1 transformer plus a domain embedding and a RoPE shared across halves.

A fused latent holds the RGB video on the left and the XYZ pointmap video on the right half of its width:
``(B, C, T, h, 2w)``. Two things change relative to Wan2.1, and both are small modules swapped into the stock
model so that every diffusers feature keyed on module names keeps working (attention backends, gradient
checkpointing, regional compile of ``blocks``, offloading, LoRA loading and the context-parallel plan, which splits
the output of ``rope`` and the input of ``blocks.0``):

* ``patch_embedding`` adds a learnable ``(2, inner_dim)`` domain embedding to its output: row 0 on RGB tokens,
  row 1 on XYZ tokens (zero-initialised, trained with the LoRA);
* ``rope`` gives an XYZ token the rotary phases of its RGB twin at the same (t, h, w): width position ``w mod W/2``.

Its rotary positions along height and width count steps of Wan's 2 x 2 latent-pixel patch, whatever the patch: a
transformer of patch 1 (grown from one of patch 2 by :mod:`fourdnex.model.grow`) places its tokens at positions 0,
0.5, 1, ... of the same scale, so the phases its blocks learned at patch 2 keep their meaning.
"""

from __future__ import annotations

import inspect
import logging

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch import nn

from fourdnex.config import Modalities, ModelType
from fourdnex.model import attention  # noqa: F401 - registers the flash_4 attention backend with diffusers

#: Latent pixels per rotary position step along height and width: Wan's spatial patch.
ROPE_STEP = 2
#: Wan's rotary base (diffusers' ``WanRotaryPosEmbed`` default).
ROPE_THETA = 10000.0


class _DropMessagesNaming(logging.Filter):
    """Drops log records that contain one of ``texts`` (the expected missing or unexpected key of a checkpoint)."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


class DomainPatchEmbedding(nn.Conv3d):
    """Wan's 3D patch embedding followed by a per-modality offset along the (still explicit) latent width."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride)
        self.domain_embedding = nn.Parameter(torch.zeros(2, out_channels))
        self.modalities: Modalities = "rgb"
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)  # (B, D, t, h, w)
        if not self.enabled:
            return x
        emb = self.domain_embedding.to(x.dtype)  # (2, D)
        if self.modalities == "rgbxyz":
            half = x.shape[-1] // 2
            offset = emb.repeat_interleave(half, dim=0)  # (w, D): row 0 for the left half, row 1 for the right
            return x + offset.t()[None, :, None, None, :]
        row = emb[1 if self.modalities == "xyz" else 0]
        return x + row[None, :, None, None, None]


class SharedRotaryPosEmbed(WanRotaryPosEmbed):
    """Wan's 3D RoPE; on a fused latent, the right half of the width repeats the left half's positions. Height and
    width positions count :data:`ROPE_STEP` latent pixels (Wan's patch), at fractions of it for a finer patch."""

    def __init__(self, attention_head_dim: int, patch_size, max_seq_len: int) -> None:
        super().__init__(attention_head_dim, patch_size, max_seq_len)
        self.enabled = True  # the model type uses shared RoPE
        self.fused = False  # the latent holds two halves
        _, p_h, p_w = patch_size
        if (p_h, p_w) != (ROPE_STEP, ROPE_STEP):  # Wan's table, its height and width rows at fractional positions
            tables = [
                get_1d_rotary_pos_embed(
                    dim, torch.arange(max_seq_len, dtype=torch.float64) * step, ROPE_THETA, use_real=True,
                    repeat_interleave_real=True, freqs_dtype=torch.float64,
                )
                for dim, step in ((self.t_dim, 1.0), (self.h_dim, p_h / ROPE_STEP), (self.w_dim, p_w / ROPE_STEP))
            ]  # fmt: skip
            self.freqs_cos = torch.cat([cos for cos, _ in tables], dim=1)
            self.freqs_sin = torch.cat([sin for _, sin in tables], dim=1)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.enabled and self.fused):
            return super().forward(hidden_states)
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        if width % (2 * p_w):
            raise ValueError(f"a fused latent needs a width divisible by {2 * p_w}, got {width}")
        cos, sin = super().forward(hidden_states[..., : width // 2])  # (1, t*h*w/2, 1, D) each
        grid = (frames // p_t, height // p_h, width // (2 * p_w), cos.shape[-1])

        def repeat_halves(freqs: torch.Tensor) -> torch.Tensor:
            freqs = freqs.reshape(grid)
            return torch.cat([freqs, freqs], dim=2).reshape(1, -1, 1, grid[-1])  # (1, t*h*w, 1, D)

        return repeat_halves(cos), repeat_halves(sin)


class FourDNeXTransformer(WanTransformer3DModel):
    """``WanTransformer3DModel`` with the 4DNeX domain embedding and shared RoPE.

    Loads any Wan2.1 transformer folder (``from_pretrained``); the domain embedding starts at zero. With the
    default ``modalities="rgb"`` and no shared RoPE it computes exactly what the stock model computes.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        stock = self.patch_embedding
        self.patch_embedding = DomainPatchEmbedding(
            stock.in_channels, stock.out_channels, kernel_size=stock.kernel_size, stride=stock.stride
        )
        self.rope = SharedRotaryPosEmbed(self.config.attention_head_dim, self.config.patch_size, self.rope.max_seq_len)

    # diffusers reads the config keys off the __init__ signature: expose the stock model's.
    __init__.__signature__ = inspect.signature(WanTransformer3DModel.__init__)

    @property
    def domain_embedding(self) -> nn.Parameter:
        """The learnable ``(2, inner_dim)`` domain embedding (row 0: RGB, row 1: XYZ)."""
        return self.patch_embedding.domain_embedding

    @property
    def modalities(self) -> Modalities:
        return self.patch_embedding.modalities

    def set_model_type(self, model_type: ModelType) -> None:
        """Switch the domain embedding and the shared RoPE on or off (the ``--type`` presets)."""
        self.patch_embedding.enabled = model_type.domain_embedding
        self.rope.enabled = model_type.shared_rope

    def set_modalities(self, modalities: Modalities) -> None:
        """Choose what the latent width holds: ``"rgbxyz"`` (RGB | XYZ halves), or one modality, ``"rgb"``/``"xyz"``."""
        if modalities not in ("rgb", "xyz", "rgbxyz"):
            raise ValueError(f"modalities must be 'rgb', 'xyz' or 'rgbxyz', got {modalities!r}")
        self.patch_embedding.modalities = modalities
        self.rope.fused = modalities == "rgbxyz"

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, **kwargs) -> FourDNeXTransformer:
        """Load a Wan2.1 transformer folder (``path``/``subfolder``); the domain embedding, absent from Wan
        checkpoints, starts at zero (:func:`fourdnex.model.loading.load_transformer` also reads the reference
        implementation's, where its weights hold one under :data:`REFERENCE_DOMAIN_KEY`)."""
        loader_log = logging.getLogger("diffusers.models.modeling_utils")
        # Wan checkpoints lack our key; the reference's hold theirs, which diffusers would call unexpected.
        expected = _DropMessagesNaming("['patch_embedding.domain_embedding']", f"['{REFERENCE_DOMAIN_KEY}']")
        loader_log.addFilter(expected)
        try:
            model = super().from_pretrained(path, subfolder=subfolder, **kwargs)
        finally:
            loader_log.removeFilter(expected)
        embedding = model.patch_embedding.domain_embedding
        if embedding.is_meta:
            weight = model.patch_embedding.weight
            model.patch_embedding.domain_embedding = nn.Parameter(
                torch.zeros(embedding.shape, device=weight.device, dtype=weight.dtype)
            )
        return model


#: Where the reference implementation's fully fine-tuned transformer keeps its domain embedding.
REFERENCE_DOMAIN_KEY = "learnable_domain_embeddings"
