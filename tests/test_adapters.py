"""Both adapter formats: load, apply, round-trip, and refuse adapters that do not fit."""

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from fourdnex.model.adapters import (
    ADAPTER_FILE,
    AdapterError,
    AdapterMeta,
    apply_adapter,
    load_adapter,
    read_adapter_meta,
    read_transformer_meta,
    save_adapter,
    trained_meta,
    trained_meta_at,
)
from fourdnex.model.transformer import FourDNeXTransformer

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(rank=4, dim=24, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for block in range(layers):
        for attn in ("attn1", "attn2"):
            for name in TARGETS:
                prefix = f"transformer.blocks.{block}.{attn}.{name}"
                lora[f"{prefix}.lora_A.weight"] = torch.randn(rank, dim, generator=g) * 0.2
                lora[f"{prefix}.lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.2
    return lora


@pytest.fixture
def transformer(tiny_path):
    model = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    model.set_modalities("rgbxyz")
    return model


@pytest.fixture
def released(tmp_path):
    folder = tmp_path / "released"
    folder.mkdir()
    save_file(random_lora(), folder / "pytorch_lora_weights.safetensors")
    torch.save(
        torch.randn(2, 24, generator=torch.Generator().manual_seed(1)), folder / "learnable_domain_embeddings.pt"
    )
    return folder


def forward(model):
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 36, 3, 4, 16, generator=g), torch.tensor([300]))
    args += (torch.randn(1, 7, 32, generator=g), torch.randn(1, 17, 32, generator=g))
    with torch.no_grad():
        return model(*args, return_dict=False)[0]


def merged_by_hand(tiny_path, lora, domain, scale):
    """The expected result: W + scale * B @ A on every target, and the domain embedding copied in."""
    model = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    model.set_modalities("rgbxyz")
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." in key:
                module = model.get_submodule(key.removeprefix("transformer.").split(".lora_A.")[0])
                module.weight += scale * lora[key.replace(".lora_A.", ".lora_B.")] @ a
        model.domain_embedding.copy_(domain)
    return model


def test_released_format_loads_at_half_scale_and_changes_output(tiny_path, transformer, released):
    adapter = load_adapter(released)
    assert adapter.format == "released" and adapter.meta.rank == 4 and adapter.default_scale == 0.5
    assert adapter.meta.target_modules == sorted(TARGETS)
    assert read_adapter_meta(released) is None  # the released format says nothing of its training
    assert read_adapter_meta(released / "pytorch_lora_weights.safetensors") is None
    # what the weights were trained as, from the loaded adapter or its path alike: a released adapter beside a fully
    # trained transformer folder says what that folder's weights say
    own = ROOT / "example" / "demo" / "model" / "transformer"
    assert trained_meta(adapter, own) == trained_meta_at(released, own) == read_transformer_meta(own) is not None
    assert trained_meta(adapter) is None and trained_meta_at(released) is None and trained_meta_at(None) is None
    before = forward(transformer)
    assert apply_adapter(transformer, adapter) == 0.5
    after = forward(transformer)
    assert (after - before).abs().max() > 1e-2
    expected = merged_by_hand(tiny_path, random_lora(), adapter.domain_embedding, 0.5)
    assert torch.allclose(after, forward(expected), atol=1e-5)
    assert torch.equal(transformer.domain_embedding, adapter.domain_embedding)


def test_lora_scale_overrides(tiny_path, transformer, released):
    adapter = load_adapter(released)
    assert apply_adapter(transformer, adapter, scale=1.25) == 1.25
    expected = merged_by_hand(tiny_path, random_lora(), adapter.domain_embedding, 1.25)
    assert torch.allclose(forward(transformer), forward(expected), atol=1e-5)


def test_fourdnex_format_round_trips_bit_exactly(tiny_path, transformer, tmp_path):
    lora = random_lora(rank=4, seed=3)
    domain = torch.randn(2, 24)
    meta = AdapterMeta(rank=4, alpha=2.0, target_modules=list(TARGETS), xyz_latent_mean=0.1, xyz_latent_std=1.9)
    path = save_adapter(tmp_path / "ours", lora, domain, meta)
    assert path == tmp_path / "ours" / ADAPTER_FILE
    adapter = load_adapter(tmp_path / "ours")
    assert adapter.format == "fourdnex" and adapter.meta == meta and adapter.default_scale == 0.5
    assert torch.equal(adapter.domain_embedding, domain)
    assert set(adapter.lora) == {k.removeprefix("transformer.") for k in lora}
    assert all(torch.equal(adapter.lora[k.removeprefix("transformer.")], v) for k, v in lora.items())
    # Saving what was read gives the same bytes' worth of tensors and metadata again.
    again = load_adapter(save_adapter(tmp_path / "again.safetensors", adapter.lora, adapter.domain_embedding, meta))
    assert again.meta == meta and all(torch.equal(again.lora[k], v) for k, v in adapter.lora.items())
    # its metadata alone, from the folder or the file, is what was saved
    assert read_adapter_meta(tmp_path / "ours") == meta and read_adapter_meta(tmp_path / "again.safetensors") == meta
    # beside a transformer whose weights record their own training too, the adapter's metadata is the one taken
    demo = ROOT / "example" / "demo" / "model" / "transformer"
    assert trained_meta(adapter, demo) == trained_meta_at(tmp_path / "ours", demo) == meta
    apply_adapter(transformer, adapter)
    expected = merged_by_hand(tiny_path, lora, domain, 0.5)
    assert torch.allclose(forward(transformer), forward(expected), atol=1e-5)


def test_unfused_adapter_computes_the_same(tiny_path, released):
    fused = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    unfused = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    for model, fuse in ((fused, True), (unfused, False)):
        model.set_modalities("rgbxyz")
        apply_adapter(model, load_adapter(released), fuse=fuse)
    assert torch.allclose(forward(fused), forward(unfused), atol=1e-5)


def test_rank_mismatch_names_key_and_shapes(transformer, tmp_path):
    lora = random_lora()
    key = "transformer.blocks.1.attn2.to_v.lora_A.weight"
    lora[key] = torch.randn(8, 24)
    save_file(lora, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterError, match=r"blocks\.1\.attn2\.to_v\.lora_A\.weight has rank 8 but .* rank 4"):
        load_adapter(tmp_path)


def test_expected_rank_flag_mismatch(transformer, released):
    adapter = load_adapter(released)
    message = r"blocks\.0\.attn1\.to_k\.lora_A\.weight has shape \(4, 24\), the model expects \(64, 24\)"
    with pytest.raises(AdapterError, match=message):
        apply_adapter(transformer, adapter, lora_rank=64)


def test_adapter_for_another_width_is_refused(transformer, tmp_path):
    save_file(random_lora(dim=32), tmp_path / "pytorch_lora_weights.safetensors")
    message = r"blocks\.0\.attn1\.to_k\.lora_A\.weight has shape \(4, 32\), the model expects \(4, 24\)"
    with pytest.raises(AdapterError, match=message):
        apply_adapter(transformer, load_adapter(tmp_path))


def test_missing_module_and_bad_domain_embedding(transformer, tmp_path):
    lora = random_lora(layers=3)  # the tiny model has 2 blocks
    save_file(lora, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterError, match=r"blocks\.2\.attn1\.to_k\.lora_A\.weight adapts blocks\.2\.attn1\.to_k"):
        apply_adapter(transformer, load_adapter(tmp_path))
    save_file(random_lora(), tmp_path / "pytorch_lora_weights.safetensors")
    torch.save(torch.zeros(2, 5120), tmp_path / "learnable_domain_embeddings.pt")
    with pytest.raises(AdapterError, match=r"domain_embedding has shape \(2, 5120\), the model expects \(2, 24\)"):
        apply_adapter(transformer, load_adapter(tmp_path))


def test_pickled_code_in_domain_file_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    save_file(random_lora(), tmp_path / "pytorch_lora_weights.safetensors")
    torch.save({"payload": Exploit()}, tmp_path / "learnable_domain_embeddings.pt")
    with pytest.raises(AdapterError, match="not a plain tensor file"):
        load_adapter(tmp_path)


def test_not_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="holds neither"):
        load_adapter(tmp_path)
    with pytest.raises(AdapterError, match="holds neither"):
        read_adapter_meta(tmp_path)
    save_file({"something.weight": torch.zeros(2)}, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterError, match="is not a LoRA weight"):
        load_adapter(tmp_path)
    bad_meta = tmp_path / "bad.safetensors"
    save_file({"domain_embedding": torch.zeros(2, 24)}, bad_meta, metadata={"format": "fourdnex-adapter"})
    for read in (load_adapter, read_adapter_meta):
        with pytest.raises(AdapterError, match="unreadable fourdnex adapter metadata"):
            read(bad_meta)
