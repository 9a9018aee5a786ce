"""The Wan VAE's fused norm + SiLU and convolution-padded borders (fourdnex.model.fast_vae) against diffusers' own."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fourdnex.model.fast_vae import fuse_norm_silu, norm_silu, pad_in_convolutions
from fourdnex.model.loading import load_vae
from fourdnex.model.whole_clip import decode_whole, encode_condition_moments, encode_moments, whole_clip_vae

ROOT = Path(__file__).resolve().parents[1]
REWRITES = {"fused": (fuse_norm_silu,), "padded": (pad_in_convolutions,), "both": (fuse_norm_silu, pad_in_convolutions)}


def videos(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 3, frames, 32, 48, generator=g) * 2 - 1).double()


def demo_vae():
    return load_vae(ROOT / "example" / "demo" / "model").eval().double()


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
@pytest.mark.parametrize("frames", [1, 9])
def test_chunked_encode_and_decode_are_diffusers(rewrite, frames):
    """diffusers' own encode and decode (chunks with a feature cache) through the rewritten layers give its numbers in
    float64, from one frame to three chunks."""
    vae = demo_vae()
    x = videos(frames)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.parameters
        decoded = vae.decode(expected[:, :16]).sample
        for apply in REWRITES[rewrite]:
            apply(vae)
        moments = vae.encode(x).latent_dist.parameters
        redecoded = vae.decode(expected[:, :16]).sample
    assert moments.shape == expected.shape and redecoded.shape == decoded.shape == x.shape
    assert torch.allclose(moments, expected, rtol=0, atol=1e-12) and expected.std() > 0.1
    assert torch.allclose(redecoded, decoded, rtol=0, atol=1e-12) and decoded.std() > 0.05


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_whole_clip_paths_are_diffusers(rewrite, monkeypatch):
    """Without a feature cache (fourdnex.model.whole_clip: each layer over all frames, the convolutions padding the
    time axis themselves), the moments, the condition's moments and the decoded video are diffusers' too; with the
    padded convolutions no padded copy of a video is written (the 2D downsamplings' one-sided padding stays)."""
    pads = []
    pad = F.pad
    monkeypatch.setattr(F, "pad", lambda x, p, *args, **kwargs: pads.append(len(p)) or pad(x, p, *args, **kwargs))
    vae = demo_vae()
    x = videos(13, seed=1)
    condition = torch.cat([x[:, :, :1], torch.zeros_like(x[:, :, 1:])], dim=2)
    with torch.no_grad():
        expected, expected_condition = (vae.encode(v).latent_dist.parameters for v in (x, condition))
        decoded = vae.decode(expected[:, :16]).sample
        whole_clip_vae(vae)
        for apply in REWRITES[rewrite]:
            apply(vae)
        pads.clear()
        moments, condition_moments = encode_moments(vae, x), encode_condition_moments(vae, condition)
        redecoded = decode_whole(vae, expected[:, :16])
    assert torch.allclose(moments, expected, rtol=0, atol=1e-12)
    assert torch.allclose(condition_moments, expected_condition, rtol=0, atol=1e-12)
    assert torch.allclose(redecoded, decoded, rtol=0, atol=1e-12)
    assert (pads.count(6) == 0) == (rewrite != "fused")


def test_rewrites_keep_the_state_dict_and_remove_the_silu_modules():
    """Only forwards change: the weights' names and values stay, and every SiLU module the norms absorbed is gone."""
    vae = demo_vae()
    before = vae.state_dict()
    silus = sum(isinstance(m, torch.nn.SiLU) for m in vae.modules())
    fuse_norm_silu(pad_in_convolutions(vae))
    after = vae.state_dict()
    assert silus > 0 and not any(isinstance(m, torch.nn.SiLU) for m in vae.modules())
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_norm_silu_against_its_definition_and_in_bfloat16():
    """norm_silu is SiLU(x / max(|x| over channels, 1e-12) * w + b), computed independently here in float64; on a
    bfloat16 input it rounds the float32 result once, so it sits within bfloat16's half-ulp of the exact value."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 3, 5, 4, generator=g, dtype=torch.float64)
    x[0, :, 0, 0, 0] = 0.0  # a zero vector: the clamp keeps it finite
    w = torch.rand(8, 1, 1, 1, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(8, 1, 1, 1, generator=g, dtype=torch.float64)

    def exact(x, w, b):
        y = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12) * w + b
        return y * torch.sigmoid(y)

    assert torch.allclose(norm_silu(x, w, b), exact(x, w, b), rtol=0, atol=1e-14)
    assert torch.allclose(norm_silu(x, w, 0.5), exact(x, w, 0.5), rtol=0, atol=1e-14)  # a bias given as a number
    assert torch.equal(norm_silu(x, w, b)[0, :, 0, 0, 0], F.silu(b[:, 0, 0, 0]))
    half = norm_silu(x.bfloat16(), w.bfloat16(), b.bfloat16())
    target = exact(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double())
    assert half.dtype == torch.bfloat16
    assert ((half.double() - target).abs() <= target.abs() * 2**-8 + 1e-30).all()


def test_unexpected_layers_are_refused():
    """A VAE whose norms are followed by another activation is refused in one line, not silently mis-fused."""
    vae = demo_vae()
    vae.encoder.nonlinearity = torch.nn.GELU()
    with pytest.raises(ValueError, match="fuses SiLU, found GELU"):
        fuse_norm_silu(vae)
