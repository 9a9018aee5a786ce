"""Width fusion, the sloped plane, the soft mask, latent normalizations and the sampling settings."""

import pytest
import torch

from fourdnex.generate.config import SampleConfig, size_for_aspect
from fourdnex.model.fusion import (
    condition_frames,
    condition_mask,
    condition_video,
    denormalize_xyz,
    fuse_width,
    normalize_xyz,
    sloped_plane,
    soft_mask,
    split_width,
    vae_denormalize,
    vae_normalize,
)


def test_fuse_split_round_trip():
    rgb, xyz = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 16, 3, 4, 6)
    fused = fuse_width(rgb, xyz)
    assert fused.shape == (2, 16, 3, 4, 12)
    assert torch.equal(fused[..., :6], rgb) and torch.equal(fused[..., 6:], xyz)
    back_rgb, back_xyz = split_width(fused)
    assert torch.equal(back_rgb, rgb) and torch.equal(back_xyz, xyz)


def test_fuse_rejects_mismatched_halves():
    with pytest.raises(ValueError, match="same shape"):
        fuse_width(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5))


def test_xyz_normalization_round_trip_and_values():
    z = torch.randn(1, 16, 2, 3, 4, dtype=torch.float64)
    assert torch.allclose(denormalize_xyz(normalize_xyz(z)), z)
    assert torch.allclose(normalize_xyz(torch.full((1,), -0.13)), torch.zeros(1))
    assert torch.allclose(normalize_xyz(torch.full((1,), 1.70 - 0.13)), torch.ones(1))
    assert torch.allclose(normalize_xyz(z, 0.5, 2.0), (z - 0.5) / 2.0)


def test_vae_normalization_round_trip(tiny_pipe):
    vae = tiny_pipe.vae
    z = torch.randn(1, 16, 2, 3, 4)
    normalized = vae_normalize(vae, z)
    mean = torch.tensor(vae.config.latents_mean)[None, :, None, None, None]
    std = torch.tensor(vae.config.latents_std)[None, :, None, None, None]
    assert torch.allclose(normalized, (z - mean) / std, atol=1e-6)
    assert torch.allclose(vae_denormalize(vae, normalized), z, atol=1e-6)


def test_sloped_plane_corners():
    plane = sloped_plane(5, 7)
    assert plane.shape == (3, 5, 7)
    corners = {(0, 0): (-1, -1, 1), (0, -1): (1, -1, 1), (-1, 0): (-1, 1, -1), (-1, -1): (1, 1, -1)}
    for (row, col), xyz in corners.items():
        assert plane[:, row, col].tolist() == list(map(float, xyz))
    assert torch.allclose(plane[0, 2], torch.linspace(-1, 1, 7))  # X along the width
    assert torch.allclose(plane[2, :, 3], torch.linspace(1, -1, 5))  # Z from +1 (top) to -1 (bottom)


def test_soft_mask_values():
    mask = soft_mask(2, 3, 4, 10, "rgbxyz")
    assert mask.shape == (2, 4, 3, 4, 10)
    assert (mask[:, :, 0, :, :5] == 1.0).all() and (mask[:, :, 0, :, 5:] == 0.5).all()
    assert (mask[:, :, 1:] == 0).all()
    assert (soft_mask(1, 2, 2, 2, "rgb")[:, :, 0] == 1.0).all()
    assert (soft_mask(1, 2, 2, 2, "xyz")[:, :, 0] == 0.5).all()


def test_condition_video_of_each_modalities():
    image = torch.rand(1, 3, 4, 6) * 2 - 1
    video = condition_video(image, 5, "rgbxyz")
    assert video.shape == (1, 3, 5, 4, 12)
    assert torch.equal(video[0, :, 0, :, :6], image[0])
    assert torch.equal(video[0, :, 0, :, 6:], sloped_plane(4, 6))
    assert (video[:, :, 1:] == 0).all()
    assert torch.equal(condition_video(image, 5, "rgb")[0, :, 0], image[0])
    assert torch.equal(condition_video(image, 5, "xyz")[0, :, 0], sloped_plane(4, 6))


def test_aspect_rule():
    assert size_for_aspect(480, 720) == (480, 720)
    assert size_for_aspect(1080, 1920) == (432, 784)  # round(sqrt(345600 * 9 / 16)) = 441 -> 432; 784
    assert size_for_aspect(720, 480) == (720, 480)
    assert size_for_aspect(512, 512) == (576, 576)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_frames": 48}, "4k\\+1"),
        ({"height": 100}, "multiple of 16"),
        ({"width": 0}, "multiple of 16"),
        ({"steps": 0}, "at least 1"),
    ],
)
def test_sample_config_rejects(settings, message):
    with pytest.raises(ValueError, match=message):
        SampleConfig(**settings).validate()


def test_condition_mask_folds_pixel_frames_as_wan_does():
    """Hand-built: 9 frames -> 3 latent frames; frame 0 fills latent frame 0, frames 1-4 and 5-8 the next two."""
    given = torch.zeros(1, 9, dtype=torch.bool)
    given[0, [0, 3, 8]] = True  # keyframes
    mask = condition_mask(given, 2, 6, "rgbxyz")
    assert mask.shape == (1, 4, 3, 2, 6)
    rgb, xyz = mask[0, :, :, 0, 0], mask[0, :, :, 0, 5]  # (4 channels, 3 latent frames)
    expected_rgb = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.float32)
    assert torch.equal(rgb, expected_rgb)  # channel c of latent frame t >= 1 is pixel frame 4(t-1) + 1 + c
    assert torch.equal(xyz, torch.tensor([[0.5, 0, 0]] * 4))
    assert torch.equal(mask[..., :3], rgb[None, :, :, None, None].expand(1, 4, 3, 2, 3))
    every = condition_mask(torch.ones(2, 9, dtype=torch.bool), 2, 2, "rgb")
    assert (every == 1).all()


def test_image_condition_is_the_first_frame_case_of_any_frames():
    image = torch.rand(1, 3, 4, 6) * 2 - 1
    video = torch.rand(1, 3, 5, 4, 6) * 2 - 1
    video[:, :, 0] = image
    first = torch.zeros(1, 5, dtype=torch.bool)
    first[0, 0] = True
    for modalities in ("rgbxyz", "rgb", "xyz"):
        assert torch.equal(condition_frames(video, first, modalities), condition_video(image, 5, modalities))
        assert torch.equal(condition_mask(first, 3, 8, modalities), soft_mask(1, 2, 3, 8, modalities))
    both = first.clone()
    both[0, 4] = True  # first and last
    cond = condition_frames(video, both, "rgbxyz")
    assert torch.equal(cond[:, :, 4, :, :6], video[:, :, 4]) and not cond[:, :, 1:4].any()
    assert not cond[:, :, 4, :, 6:].any()  # XYZ is never given after frame 0
