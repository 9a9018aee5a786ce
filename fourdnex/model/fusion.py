"""Width-wise fusion of RGB and XYZ, the first-frame conditioning, the soft mask and XYZ latent normalization.

Conventions: videos are ``(B, C, F, H, W)`` in [-1, 1]; latents are ``(B, 16, T, h, w)`` with ``T = (F - 1) / 4 + 1``
and ``h, w = H / 8, W / 8``. A fused tensor holds RGB on the left and XYZ on the right half of its width.
"""

from __future__ import annotations

import torch

from fourdnex.config import XYZ_LATENT_MEAN, XYZ_LATENT_STD, Layout


def fuse_width(rgb: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    """``(..., W)`` and ``(..., W)`` -> ``(..., 2W)``: RGB left, XYZ right."""
    if rgb.shape != xyz.shape:
        raise ValueError(
            f"RGB and XYZ must have the same shape to be fused, got {tuple(rgb.shape)} and {tuple(xyz.shape)}"
        )
    return torch.cat([rgb, xyz], dim=-1)


def split_width(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., 2W)`` -> ``(..., W)`` RGB and ``(..., W)`` XYZ."""
    width = fused.shape[-1]
    if width % 2:
        raise ValueError(f"a fused tensor has an even width, got {width}")
    return fused[..., : width // 2], fused[..., width // 2 :]


def sloped_plane(height: int, width: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The fixed first-frame XYZ, ``(3, H, W)`` in [-1, 1].

    X goes -1 -> +1 from left to right, Y goes -1 -> +1 from top to bottom, and Z goes +1 on the top row to -1 on
    the bottom row: a plane sloping away from the camera, as a ground seen from above.
    """
    x = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device).expand(height, width)
    y = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)[:, None].expand(height, width)
    return torch.stack([x, y, -y])


def condition_video(image: torch.Tensor, num_frames: int, layout: Layout) -> torch.Tensor:
    """The video the VAE encodes as the condition: a first frame, then ``num_frames - 1`` zero frames.

    ``image`` is ``(B, 3, H, W)`` in [-1, 1]. The first frame is the image (``"rgb"``), the sloped plane
    (``"xyz"``), or both side by side, ``[image | plane]`` of width 2W (``"rgbxyz"``). Returns ``(B, 3, F, H, W')``.
    """
    batch, _, height, width = image.shape
    plane = sloped_plane(height, width, image.dtype, image.device).expand(batch, -1, -1, -1)
    first = {"rgb": image, "xyz": plane}.get(layout)
    if first is None:
        first = fuse_width(image, plane)
    rest = first.new_zeros(batch, 3, num_frames - 1, height, first.shape[-1])
    return torch.cat([first[:, :, None], rest], dim=2)


def soft_mask(
    batch: int, latent_frames: int, height: int, width: int, layout: Layout, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Wan I2V's 4-channel mask for a latent of ``(T, h, w)``: ``(B, 4, T, h, w)``.

    The first latent frame is 1.0 where the condition is known (the RGB image) and 0.5 where it is only a hint
    (the sloped plane: the XYZ half of a fused latent, or all of an ``"xyz"`` one); all later frames are 0.
    """
    mask = torch.zeros(batch, 4, latent_frames, height, width, dtype=dtype, device=device)
    mask[:, :, 0] = 0.5 if layout == "xyz" else 1.0
    if layout == "rgbxyz":
        mask[:, :, 0, :, width // 2 :] = 0.5
    return mask


def _vae_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wan VAE's per-channel latent mean and 1/std, shaped ``(1, C, 1, 1, 1)`` like ``like``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inv_std


def vae_normalize(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the normalized latents the transformer sees (as diffusers' Wan pipelines compute it)."""
    mean, inv_std = _vae_stats(vae, z)
    return (z - mean) * inv_std


def vae_denormalize(vae, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`vae_normalize`."""
    mean, inv_std = _vae_stats(vae, z)
    return z / inv_std + mean


def encode_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels ``(B, 3, F, H, W)`` in [-1, 1] -> the latents the transformer sees: the VAE posterior's mode after the
    VAE's own normalization, ``(B, 16, T, H/8, W/8)`` float32 on the VAE's execution device.

    The one encoding path of inference's condition, the cache's latents and training's on-the-fly condition.
    """
    from diffusers.utils.torch_utils import get_module_execution_device

    z = vae.encode(video.to(get_module_execution_device(vae), vae.dtype)).latent_dist.mode()
    return vae_normalize(vae, z.float())


def normalize_xyz(z: torch.Tensor, mean: float = XYZ_LATENT_MEAN, std: float = XYZ_LATENT_STD) -> torch.Tensor:
    """VAE-normalized XYZ latents -> unit-scale latents: ``(z - mean) / std``."""
    return (z - mean) / std


def denormalize_xyz(z: torch.Tensor, mean: float = XYZ_LATENT_MEAN, std: float = XYZ_LATENT_STD) -> torch.Tensor:
    """Inverse of :func:`normalize_xyz`."""
    return z * std + mean
