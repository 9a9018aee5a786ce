"""The 4DNeX transformer against diffusers' stock Wan transformer."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend

from fourdnex.config import MODEL_TYPES
from fourdnex.errors import UsageError
from fourdnex.model.transformer import FourDNeXTransformer


@pytest.fixture(scope="module")
def models(tiny_path):
    ours = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    stock = WanTransformer3DModel.from_pretrained(tiny_path, subfolder="transformer")
    return ours, stock


def inputs(width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 36, 3, 4, width, generator=g),
        torch.tensor([700]),
        torch.randn(1, 7, 32, generator=g),
        torch.randn(1, 17, 32, generator=g),
    )


def run(model, args):
    with torch.no_grad():
        return model(*args, return_dict=False)[0]


def test_loads_base_checkpoint_with_zero_domain_embedding(models):
    ours, _ = models
    assert ours.domain_embedding.shape == (2, 24)
    assert not ours.domain_embedding.is_meta
    assert (ours.domain_embedding == 0).all()


def test_equals_stock_model_with_zero_embedding_one_modality(models):
    ours, stock = models
    ours.set_modalities("rgb")
    args = inputs()
    assert torch.equal(run(ours, args), run(stock, args))


def test_shared_rope_gives_twins_identical_phases(models):
    ours, stock = models
    fused = torch.zeros(1, 36, 3, 4, 16)  # latent width 16 -> 8 token columns, 4 per half
    ours.set_modalities("rgbxyz")
    cos, sin = ours.rope(fused)
    stock_cos, _ = stock.rope(fused)
    assert cos.shape == stock_cos.shape == (1, 3 * 2 * 8, 1, 12)
    grid_cos, grid_sin = cos.reshape(3, 2, 8, 12), sin.reshape(3, 2, 8, 12)
    assert torch.equal(grid_cos[:, :, :4], grid_cos[:, :, 4:]) and torch.equal(grid_sin[:, :, :4], grid_sin[:, :, 4:])
    # The left half keeps the stock phases; the stock model gives the right half new ones.
    stock_grid = stock_cos.reshape(3, 2, 8, 12)
    assert torch.equal(grid_cos[:, :, :4], stock_grid[:, :, :4])
    assert not torch.equal(stock_grid[:, :, :4], stock_grid[:, :, 4:])


def test_domain_embedding_offsets_each_half(models):
    ours, _ = models
    ours.set_modalities("rgbxyz")
    x = torch.randn(1, 36, 3, 4, 16)
    with torch.no_grad():
        plain = torch.nn.functional.conv3d(x, ours.patch_embedding.weight, ours.patch_embedding.bias, stride=(1, 2, 2))
        ours.domain_embedding.copy_(torch.randn(2, 24))
        embedded = ours.patch_embedding(x)
        rgb_row, xyz_row = ours.domain_embedding
        assert torch.allclose(
            embedded[..., :4] - plain[..., :4], rgb_row[None, :, None, None, None].expand(1, 24, 3, 2, 4)
        )
        assert torch.allclose(
            embedded[..., 4:] - plain[..., 4:], xyz_row[None, :, None, None, None].expand(1, 24, 3, 2, 4)
        )
        ours.set_modalities("xyz")
        assert torch.allclose(ours.patch_embedding(x) - plain, xyz_row[None, :, None, None, None].expand_as(plain))
        ours.set_model_type(MODEL_TYPES["i2vwbw"])
        assert torch.equal(ours.patch_embedding(x), plain)
        ours.set_model_type(MODEL_TYPES["i2vwbw-demb-samerope"])
        ours.domain_embedding.zero_()


def test_model_type_switches_shared_rope(models):
    ours, stock = models
    fused = torch.zeros(1, 36, 3, 4, 16)
    ours.set_modalities("rgbxyz")
    ours.set_model_type(MODEL_TYPES["i2vwbw-demb"])
    assert torch.equal(ours.rope(fused)[0], stock.rope(fused)[0])
    ours.set_model_type(MODEL_TYPES["i2vwbw-demb-samerope"])
    assert not torch.equal(ours.rope(fused)[0], stock.rope(fused)[0])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_path):
    model = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    model.set_modalities("rgbxyz")
    args = inputs(width=16, seed=3)

    def grads():
        model.zero_grad()
        model(*args, return_dict=False)[0].square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(plain) == len(checkpointed) > 0
    assert model.domain_embedding.grad is not None and model.domain_embedding.grad.abs().sum() > 0
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_attention_backends_agree(models):
    ours, _ = models
    ours.set_modalities("rgbxyz")
    args = inputs(width=16, seed=5)
    default = run(ours, args)
    with attention_backend("_native_math"):  # the process-wide choice, restored on exit
        assert torch.allclose(run(ours, args), default, atol=1e-5)
    with attention_backend("native"):  # set_attention_backend also moves the process-wide choice: restore it
        ours.set_attention_backend("_native_math")
        try:
            assert torch.allclose(run(ours, args), default, atol=1e-5)
        finally:
            ours.reset_attention_backend()
    assert _AttentionBackendRegistry.get_active_backend()[0] == "native"


def test_keeps_the_names_diffusers_machinery_relies_on(models):
    ours, _ = models
    assert ours._cp_plan is WanTransformer3DModel._cp_plan
    names = dict(ours.named_modules())
    for key in ours._cp_plan:
        assert key == "" or key in names
    assert ours._repeated_blocks == ["WanTransformerBlock"]


def test_regional_compile_traces_without_graph_breaks(tiny_path):
    model = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    model.set_modalities("rgbxyz")
    args = inputs(width=16, seed=7)
    eager = run(model, args)
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    assert torch.allclose(run(model, args), eager, atol=1e-6)


def test_a_reference_fine_tuned_folder_brings_its_domain_embedding(tiny_path, tmp_path):
    """The reference's fully fine-tuned transformer keeps its domain embedding under ``learnable_domain_embeddings``;
    loading such a folder (inference.py --sft_path) puts it into the domain embedding, and a wrong shape is named."""
    from safetensors.torch import load_file, save_file

    from fourdnex.model.loading import load_transformer

    model = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    model.save_pretrained(tmp_path / "sft")
    weights = tmp_path / "sft" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["patch_embedding.domain_embedding"]
    state["learnable_domain_embeddings"] = torch.randn(2, 24, generator=torch.Generator().manual_seed(0))
    save_file(state, weights)
    loaded = load_transformer(tmp_path / "sft", torch.float32, subfolder=None)
    assert torch.equal(loaded.domain_embedding.detach(), state["learnable_domain_embeddings"])
    state["learnable_domain_embeddings"] = torch.zeros(2, 7)
    save_file(state, weights)
    expected = r"learnable_domain_embeddings has shape \(2, 7\), the model expects \(2, 24\)"
    with pytest.raises(UsageError, match=expected):
        load_transformer(tmp_path / "sft", torch.float32, subfolder=None)


def test_a_finer_patch_places_its_tokens_at_half_steps_of_wan_s_rotary_positions():
    """Rotary positions count Wan's 2-latent-pixel step whatever the patch: at patch 2 the phases are diffusers'
    own table, at patch 1 token (t, h, w) has the phases of position (t, h / 2, w / 2), computed here."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from fourdnex.model.transformer import SharedRotaryPosEmbed

    latent = torch.zeros(1, 36, 3, 4, 6)
    coarse, stock = SharedRotaryPosEmbed(12, (1, 2, 2), 64), WanRotaryPosEmbed(12, (1, 2, 2), 64)
    assert all(torch.equal(a, b) for a, b in zip(coarse(latent), stock(latent), strict=True))

    cos, sin = SharedRotaryPosEmbed(12, (1, 1, 1), 64)(latent)
    assert cos.shape == (1, 3 * 4 * 6, 1, 12)
    t, h, w = torch.meshgrid(torch.arange(3.0), torch.arange(4.0) / 2, torch.arange(6.0) / 2, indexing="ij")
    angles = []
    for position, dim in ((t, 4), (h, 4), (w, 4)):  # head dim 12: time, height, width 4 each
        inverse = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append((position.double()[..., None] * inverse).repeat_interleave(2, dim=-1))
    angle = torch.cat(angles, dim=-1).reshape(1, -1, 1, 12)
    assert cos.dtype == torch.float32  # as diffusers' table
    assert torch.allclose(cos, angle.cos().float(), atol=1e-6) and torch.allclose(sin, angle.sin().float(), atol=1e-6)
