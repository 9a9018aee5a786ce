"""A grown transformer computes what the trained one does, and its copies learn apart."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fourdnex.cli import run
from fourdnex.config import MODEL_TYPES
from fourdnex.files import write_safetensors
from fourdnex.model.grow import build_parser, copies_per_block, grow, main
from fourdnex.model.loading import CONFIG_FILE, WEIGHTS_FILE
from fourdnex.model.transformer import FourDNeXTransformer

METADATA = {"fourdnex_training": json.dumps({"model_type": "i2vwbw-demb-samerope"})}


@pytest.fixture(scope="module")
def trained(tiny_path, tmp_path_factory):
    """The tiny transformer with every weight drawn at random (no zero domain embedding or modulation table left
    to hide a mistake), saved as a transformer folder with training metadata."""
    model = FourDNeXTransformer.from_pretrained(tiny_path, subfolder="transformer")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("trained")
    model.save_config(folder)
    write_safetensors(folder / WEIGHTS_FILE, model.state_dict(), METADATA)
    return folder


def fused(model):
    model.set_model_type(MODEL_TYPES["i2vwbw-demb-samerope"])
    model.set_modalities("rgbxyz")
    return model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 36, 3, 4, 16, generator=g),
        torch.tensor([700, 150]),
        torch.randn(2, 7, 32, generator=g),
        torch.randn(2, 17, 32, generator=g),
    )


def output(model, args):
    with torch.no_grad():
        return model(*args, return_dict=False)[0]


@pytest.mark.parametrize(("blocks", "width"), [(4, 1), (3, 1), (None, 2), (6, 2)])
def test_a_grown_transformer_computes_what_the_trained_one_does(trained, tmp_path, blocks, width):
    source = fused(FourDNeXTransformer.from_pretrained(trained))
    out = grow(trained, tmp_path / "grown", blocks=blocks, width=width)
    grown = fused(FourDNeXTransformer.from_pretrained(out))
    assert len(source.blocks) == 2
    assert len(grown.blocks) == (blocks or 2)
    depth = len(grown.blocks) / len(source.blocks)
    assert grown.config.num_attention_heads == width * source.config.num_attention_heads
    assert grown.config.attention_head_dim == source.config.attention_head_dim
    assert grown.config.ffn_dim == width * source.config.ffn_dim
    params = sum(p.numel() for p in grown.parameters())
    assert params > (depth * width**2 - 1) * sum(p.numel() for p in source.blocks.parameters())
    args = inputs()
    expected = output(source, args)
    assert expected.abs().mean() > 0.1
    assert torch.allclose(output(grown, args), expected, atol=1e-5, rtol=1e-5)
    with safe_open(out / WEIGHTS_FILE, "pt") as f:
        assert f.metadata() == METADATA


def test_the_copies_of_a_wider_transformer_learn_apart(trained, tmp_path):
    grown = fused(FourDNeXTransformer.from_pretrained(grow(trained, tmp_path / "grown", width=2)))
    heads, head_dim = grown.config.num_attention_heads, grown.config.attention_head_dim
    inner = heads * head_dim
    args = inputs(seed=1)
    grown(*args, return_dict=False)[0].square().mean().backward()
    weight = grown.blocks[0].attn1.to_q.weight  # (inner, inner): rows are heads, columns read both copies
    # At the start, a head and its copy compute the same queries ...
    half = inner // 2
    x = torch.randn(5, inner)
    x[:, half:] = x[:, :half]
    queries = x @ weight.detach().T
    assert torch.allclose(queries[:, :half], queries[:, half:], atol=1e-5)
    # ... but the weights that read the two copies differ, and so do their gradients: training tells them apart.
    assert not torch.allclose(weight[:, :half], weight[:, half:], atol=1e-3)
    grad = weight.grad
    assert grad[:half].abs().mean() > 0
    assert not torch.allclose(grad[:half], grad[half:], atol=1e-6, rtol=1e-3)


def test_a_deeper_transformer_adds_blocks_that_start_as_nothing(trained, tmp_path):
    out = grow(trained, tmp_path / "grown", blocks=4)
    state, source = load_file(out / WEIGHTS_FILE), load_file(trained / WEIGHTS_FILE)
    assert torch.equal(state["blocks.2.attn1.to_q.weight"], source["blocks.1.attn1.to_q.weight"])
    for name in ("attn1.to_out.0.weight", "attn2.to_out.0.bias", "ffn.net.2.weight"):
        assert torch.equal(state[f"blocks.2.{name}"], source[f"blocks.1.{name}"])
        assert not state[f"blocks.3.{name}"].any()
    assert "_name_or_path" not in json.loads((out / CONFIG_FILE).read_text())


@pytest.mark.parametrize(
    ("num_layers", "blocks", "counts"),
    [(8, 12, [1, 2, 1, 2, 1, 2, 1, 2]), (8, 16, [2] * 8), (4, 4, [1] * 4), (2, 5, [2, 3]), (4, 5, [1, 1, 1, 2])],
)
def test_added_blocks_are_spread_evenly_over_the_depth(num_layers, blocks, counts):
    assert copies_per_block(num_layers, blocks) == counts


def test_an_uneven_growth_copies_the_later_block(trained, tmp_path):
    state = load_file(grow(trained, tmp_path / "grown", blocks=3) / WEIGHTS_FILE)
    source = load_file(trained / WEIGHTS_FILE)
    assert torch.equal(state["blocks.0.attn1.to_q.weight"], source["blocks.0.attn1.to_q.weight"])
    assert torch.equal(state["blocks.2.attn1.to_q.weight"], source["blocks.1.attn1.to_q.weight"])
    assert torch.equal(state["blocks.1.ffn.net.2.weight"], source["blocks.1.ffn.net.2.weight"])
    assert not state["blocks.2.ffn.net.2.weight"].any()


def test_unknown_weights_and_bad_factors_are_refused(trained, tmp_path, capsys):
    with pytest.raises(SystemExit, match="at least 1"):
        run(main, build_parser(), [str(trained), str(tmp_path / "a"), "--width", "0"])
    with pytest.raises(SystemExit, match="fewer than the transformer's 2 blocks"):
        run(main, build_parser(), [str(trained), str(tmp_path / "a"), "--blocks", "1"])
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / CONFIG_FILE).write_text((trained / CONFIG_FILE).read_text())
    state = load_file(trained / WEIGHTS_FILE)
    state["extra_head.weight"] = torch.zeros(3, 3)
    write_safetensors(odd / WEIGHTS_FILE, state)
    with pytest.raises(SystemExit, match=r"extra_head\.weight"):
        run(main, build_parser(), [str(odd), str(tmp_path / "b"), "--width", "2"])
    with pytest.raises(SystemExit, match="no transformer weights"):
        run(main, build_parser(), [str(tmp_path), str(tmp_path / "c")])


def test_a_finer_transformer_reads_each_latent_pixel_and_starts_near_the_patch_mean(trained, tmp_path, monkeypatch):
    """--patch 1: on a latent constant over each 2 x 2 patch, each of the four tokens of a patch is embedded as the
    coarse token was; the output projection is the mean of the coarse one's four sub-pixels; so the whole model's
    output starts near the coarse model's averaged over each patch (off by the half-step rotary phases only)."""
    import fourdnex.model.transformer as transformer_module

    source = fused(FourDNeXTransformer.from_pretrained(trained))
    out = grow(trained, tmp_path / "fine", patch=1)
    assert json.loads((out / CONFIG_FILE).read_text())["patch_size"] == [1, 1, 1]
    fine = fused(FourDNeXTransformer.from_pretrained(out))
    latent, timestep, text, image = inputs()
    blocky = latent[..., ::2, ::2].repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # (2, 36, 3, 4, 16)

    def per_pixel(x):  # a coarse token's value repeated over its 2 x 2 latent pixels
        return x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)

    with torch.no_grad():
        assert torch.allclose(fine.patch_embedding(blocky), per_pixel(source.patch_embedding(blocky)), atol=1e-5)
        hidden = torch.randn(5, source.proj_out.in_features)
        coarse = source.proj_out(hidden).reshape(5, 4, -1)  # (p_h, p_w) sub-pixels, then channels
        assert torch.allclose(fine.proj_out(hidden), coarse.mean(1), atol=1e-5)

    expected = per_pixel(torch.nn.functional.avg_pool3d(output(source, (blocky, timestep, text, image)), (1, 2, 2)))
    deviation = (output(fine, (blocky, timestep, text, image)) - expected).norm() / expected.norm()
    monkeypatch.setattr(transformer_module, "ROPE_STEP", 1)  # the fine tokens at whole steps instead
    at_whole_steps = fused(FourDNeXTransformer.from_pretrained(out))  # its rotary table is built as it loads
    whole_steps = (output(at_whole_steps, (blocky, timestep, text, image)) - expected).norm() / expected.norm()
    assert deviation < 0.01 and deviation < whole_steps, (deviation, whole_steps)


def test_only_a_patch_2_transformer_is_refined(trained, tmp_path):
    fine = grow(trained, tmp_path / "fine", patch=1)
    with pytest.raises(SystemExit, match=r"refines a transformer of patch \(1, 2, 2\), this one has \(1, 1, 1\)"):
        run(main, build_parser(), [str(fine), str(tmp_path / "finer"), "--patch", "1"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([str(trained), str(tmp_path / "a"), "--patch", "2"])


def test_the_bench_measures_where_a_grown_transformer_starts(trained, tmp_path):
    """bench/grow_start.py: a deeper transformer starts where its source is; a finer one near its patch mean."""
    from bench.grow_start import main as grow_start

    size = ["--latent_frames", "3", "--latent_height", "4", "--latent_width", "8"]
    deep = grow_start([str(trained), str(grow(trained, tmp_path / "deep", blocks=4)), *size])
    assert not deep["refined"] and deep["grown_vs_source"] < 1e-5
    fine = grow_start([str(trained), str(grow(trained, tmp_path / "fine", patch=1)), *size])
    assert fine["refined"] and fine["grown_vs_source_patch_mean"] < 0.01 < fine["source_within_patches"]
    assert fine["grown_vs_source_patch_mean"] < fine["grown_whole_steps_vs_source_patch_mean"]
