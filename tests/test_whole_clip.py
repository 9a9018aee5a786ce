"""The Wan VAE over a whole clip at once (fourdnex.model.whole_clip) against diffusers' chunked encode and decode."""

from pathlib import Path

import pytest
import torch

from fourdnex.model.fusion import condition_video
from fourdnex.model.loading import load_vae
from fourdnex.model.whole_clip import decode_whole, encode_condition_moments, encode_moments, whole_clip_vae
from fourdnex.train.vae import vae_loss

ROOT = Path(__file__).resolve().parents[1]


def videos(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 3, frames, 32, 48, generator=g) * 2 - 1).double()


@pytest.mark.parametrize("model", ["example/tiny-wan-i2v", "example/demo/model"])
@pytest.mark.parametrize("frames", [1, 5, 13])
def test_whole_clip_encodes_and_decodes_as_diffusers(model, frames):
    """In float64 the posterior's moments and the decoded videos equal diffusers' chunked ones to rounding, for the
    tiny VAE (one temporal downsampling) and the demo one (two), from one frame to several chunks."""
    vae = load_vae(ROOT / model).eval().double()
    x = videos(frames)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.parameters
        z = expected[:, : vae.config.z_dim]
        decoded = vae.decode(z).sample
        whole_clip_vae(vae)
        moments, whole = encode_moments(vae, x), decode_whole(vae, z)
    assert moments.shape == expected.shape == (2, 2 * vae.config.z_dim, 1 + (frames - 1) // 4, 4, 6)
    assert torch.allclose(moments, expected, rtol=0, atol=1e-12) and expected.std() > 0.1
    assert whole.shape == decoded.shape == (2, 3, frames, 32, 48)
    assert torch.allclose(whole, decoded, rtol=0, atol=1e-12) and decoded.std() > 0.05


def test_the_temporal_resampling_is_what_makes_it_whole():
    """Without the rewritten resampling the encoder called on all frames skips its temporal downsampling (diffusers
    runs those layers only with a feature cache), so the rewrite is what the equality above rests on."""
    vae = load_vae(ROOT / "example" / "demo" / "model").eval().double()
    with torch.no_grad():
        plain = vae.encoder(videos(9))
        whole_clip_vae(vae)
        rewritten = vae.encoder(videos(9))
    assert plain.shape[2] == 9 and rewritten.shape[2] == 3


def test_training_gradients_are_diffusers():
    """The VAE trainer's loss through the whole clip has diffusers' loss and parameter gradients (float64)."""
    vae = load_vae(ROOT / "example" / "demo" / "model").train().double()
    x = videos(9, seed=3)
    grads = []
    for whole in (False, True):
        if whole:
            whole_clip_vae(vae)
        vae.zero_grad(set_to_none=True)
        loss, _ = vae_loss(vae, x, 1e-3, torch.Generator().manual_seed(5), whole_clip=whole)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in vae.parameters()]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
    assert len(grad_a) > 50 and all(
        torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(grad_a, grad_b, strict=True)
    )
    assert max(a.abs().max() for a in grad_a) > 1e-4


def test_frames_not_4k_plus_1_are_refused():
    vae = whole_clip_vae(load_vae(ROOT / "example" / "tiny-wan-i2v").eval())
    with pytest.raises(ValueError, match="4k\\+1 frames, got 6"):
        encode_moments(vae, videos(6).float())


@pytest.mark.parametrize("model", ["example/tiny-wan-i2v", "example/demo/model"])
@pytest.mark.parametrize(("frames", "given"), [(1, 1), (13, 1), (25, 1), (25, 2), (49, 1)])
def test_a_condition_encodes_as_diffusers(model, frames, given):
    """A condition (the given frames, zeros after them; fused RGB | XYZ as the build encodes it) has diffusers'
    moments in float64, with only what depends on the given frames computed."""
    vae = load_vae(ROOT / model).eval().double()
    x = condition_video(videos(1, seed=frames)[:, :, 0], frames, "rgbxyz")
    if given > 1:
        x[:, :, 1:given] = videos(given - 1, seed=7)[:1].repeat(1, 1, 1, 1, 2)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.parameters
        moments = encode_condition_moments(whole_clip_vae(vae), x, given)
    assert moments.shape == expected.shape and expected.std() > 0.1
    assert torch.allclose(moments, expected, rtol=0, atol=1e-12)


def test_a_condition_s_work_at_the_real_size():
    """The real-size encoder (random weights, small frames: every layer's share is the same at any size) does half
    the work on a 49-frame condition, the same latents to float32 rounding."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import REAL_VAE

    torch.manual_seed(0)
    vae = whole_clip_vae(AutoencoderKLWan(**REAL_VAE, temperal_downsample=[False, True, True]).eval())
    x = condition_video(videos(1)[:1, :, 0].float(), 49, "rgb")  # one clip, as the build encodes it
    counts = []
    with torch.no_grad():
        for encode in (encode_moments, encode_condition_moments):
            with FlopCounterMode(display=False) as flops:
                counts.append((encode(vae, x), flops.get_total_flops()))
    (whole, whole_flops), (condition, condition_flops) = counts
    assert (condition - whole).abs().max() < 1e-4 * whole.std()
    assert 0.45 < condition_flops / whole_flops < 0.55


def test_a_condition_must_end_in_zeros():
    vae = whole_clip_vae(load_vae(ROOT / "example" / "tiny-wan-i2v").eval())
    with pytest.raises(ValueError, match="frames from 1 on must be zeros"):
        encode_condition_moments(vae, videos(5).float())


def test_the_zero_tail_choice_is_counted_once_per_vae_and_shape(monkeypatch):
    """skips_zero_tail counts a shape's FLOPs once in a process (inference pays it once, not per sample), and
    counts again for another shape or another VAE config."""
    from fourdnex.model import whole_clip

    counted = []
    monkeypatch.setattr(whole_clip, "condition_flops", lambda config, shape: counted.append(shape) or (2.0, 1.0))
    whole_clip._skips_zero_tail.cache_clear()
    config = dict(load_vae(ROOT / "example" / "tiny-wan-i2v").config)
    shape = (1, 3, 25, 32, 96)
    assert all(whole_clip.skips_zero_tail(config, shape) for _ in range(3))
    assert whole_clip.skips_zero_tail(config, (1, 3, 9, 32, 96))
    assert whole_clip.skips_zero_tail({**config, "base_dim": 2 * config["base_dim"]}, shape)
    assert counted == [shape, (1, 3, 9, 32, 96), shape]
    whole_clip._skips_zero_tail.cache_clear()  # the monkeypatched answers leave with the monkeypatch
