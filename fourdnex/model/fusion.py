"""Width-wise fusion of RGB and XYZ, the first-frame conditioning, the soft mask and XYZ latent normalization.

Conventions: videos are ``(B, C, F, H, W)`` in [-1, 1]; latents are ``(B, 16, T, h, w)`` with ``T = (F - 1) / 4 + 1``
and ``h, w = H / 8, W / 8``. A fused tensor holds RGB on the left and XYZ on the right half of its width.
"""

from __future__ import annotations

import torch

from fourdnex.config import TEMPORAL_FACTOR, XYZ_LATENT_MEAN, XYZ_LATENT_STD, Modalities, video_frames


def video_pixels(frames: torch.Tensor) -> torch.Tensor:
    """Video frames ``(..., F, H, W, 3)`` uint8 -> the VAE's pixels ``(..., 3, F, H, W)`` float32 in [-1, 1]."""
    return frames.movedim(-1, -4).float() / 127.5 - 1.0


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


def condition_video(image: torch.Tensor, num_frames: int, modalities: Modalities) -> torch.Tensor:
    """The condition of image-to-4D: the image as frame 0 of ``num_frames``, every other frame unknown.

    ``image`` is ``(B, 3, H, W)`` in [-1, 1]; returns :func:`condition_frames` of it, ``(B, 3, F, H, W')``.
    """
    video = image.new_zeros(image.shape[0], 3, num_frames, *image.shape[2:])
    video[:, :, 0] = image
    given = torch.zeros(image.shape[0], num_frames, dtype=torch.bool, device=image.device)
    given[:, 0] = True
    return condition_frames(video, given, modalities)


def condition_frames(video: torch.Tensor, given: torch.Tensor, modalities: Modalities) -> torch.Tensor:
    """The video the VAE encodes as the condition: the given RGB frames, zeros for the others.

    ``video`` is ``(B, 3, F, H, W)`` in [-1, 1] (only its given frames are read), ``given`` ``(B, F)`` bool. The
    frame is the RGB frame (``"rgb"``), the XYZ frame (``"xyz"``) or both side by side, width 2W (``"rgbxyz"``).
    The XYZ of frame 0 is the sloped plane, a hint of a ground seen from above; every other XYZ frame is zero (XYZ
    is always generated). Returns ``(B, 3, F, H, W')``.
    """
    height, width = video.shape[-2:]
    rgb = torch.where(given[:, None, :, None, None], video, torch.zeros((), dtype=video.dtype, device=video.device))
    xyz = torch.zeros_like(video)
    xyz[:, :, 0] = sloped_plane(height, width, video.dtype, video.device)
    if modalities == "rgbxyz":
        return fuse_width(rgb, xyz)
    return rgb if modalities == "rgb" else xyz


def soft_mask(
    batch: int, latent_frames: int, height: int, width: int, modalities: Modalities, dtype=torch.float32, device=None
) -> torch.Tensor:
    """The mask of :func:`condition_video` (frame 0 given) for a latent of ``(T, h, w)``: ``(B, 4, T, h, w)``.

    The first latent frame is 1.0 where the condition is known (the RGB image) and 0.5 where it is only a hint
    (the sloped plane: the XYZ half of a fused latent, or all of an ``"xyz"`` one); all later frames are 0.
    """
    given = torch.zeros(batch, video_frames(latent_frames), dtype=torch.bool, device=device)
    given[:, 0] = True
    return condition_mask(given, height, width, modalities, dtype)


def condition_mask(
    given: torch.Tensor, height: int, width: int, modalities: Modalities, dtype=torch.float32
) -> torch.Tensor:
    """Wan I2V's 4-channel mask of a condition, ``(B, 4, T, h, w)``, from the given pixel frames ``(B, F)`` bool.

    Wan folds pixel frames into latent frames as its VAE does: latent frame 0 holds pixel frame 0 in all 4 channels,
    latent frame t >= 1 holds pixel frames 4t-3 .. 4t in channels 0 .. 3. An RGB pixel frame is 1.0 when given and
    0 otherwise; the XYZ half (and all of an ``"xyz"`` latent) is 0.5 at frame 0, the plane's hint, and 0 after.
    ``width`` is the latent width ``w`` (of the fused latent for ``"rgbxyz"``).
    """
    batch, frames = given.shape
    if (frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"a condition covers 4k+1 frames, got {frames}")

    def fold(per_frame: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, 4, T): a channel per pixel frame of a latent one
        folded = torch.cat([per_frame[:, :1].expand(-1, TEMPORAL_FACTOR), per_frame[:, 1:]], dim=1)  # (B, 4T)
        return folded.view(batch, -1, TEMPORAL_FACTOR).transpose(1, 2)

    rgb = fold(given.to(dtype))
    hint = torch.zeros(batch, frames, dtype=dtype, device=given.device)
    hint[:, 0] = 0.5
    xyz = fold(hint)
    if modalities == "rgbxyz":
        half = width // 2
        per_column = torch.cat([rgb[..., None].expand(-1, -1, -1, half), xyz[..., None].expand(-1, -1, -1, half)], -1)
        return per_column[:, :, :, None, :].expand(-1, -1, -1, height, -1).contiguous()
    mask = rgb if modalities == "rgb" else xyz
    return mask[..., None, None].expand(-1, -1, -1, height, width).contiguous()


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


def mode_latents(vae, moments: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's moments ``(B, 2 z_dim, T, h, w)`` (means, then log variances) -> the latents
    :func:`encode_latents` gives: the mode after the VAE's own normalization, float32."""
    return vae_normalize(vae, moments[:, : vae.config.z_dim].float())


def encode_image_conditions(vae, video: torch.Tensor) -> torch.Tensor:
    """Condition videos ``(B, 3, F, H, W)`` whose frames after the first are zeros (an image's condition) -> the
    latents :func:`encode_latents` gives them; where that spends fewer FLOPs
    (:func:`fourdnex.model.whole_clip.skips_zero_tail`: from about 17 frames on), computing only what depends on the
    first frame (:func:`fourdnex.model.whole_clip.encode_condition_moments`: the same latents to rounding).

    The cache build's image conditions, and inference's on a CPU.
    """
    from diffusers.utils.torch_utils import get_module_execution_device

    from fourdnex.model.whole_clip import encode_condition_moments, skips_zero_tail, whole_clip_vae

    if not skips_zero_tail(vae.config, tuple(video.shape)):
        return encode_latents(vae, video)
    return mode_latents(
        vae, encode_condition_moments(whole_clip_vae(vae), video.to(get_module_execution_device(vae), vae.dtype))
    )


def encode_on_cpu(vae, video: torch.Tensor) -> torch.Tensor:
    """Condition videos ``(B, 3, F, H, W)`` in [-1, 1] -> the latents :func:`encode_latents` gives them, on a CPU: a
    single video over the whole clip (:func:`fourdnex.model.whole_clip.encode_moments`, the same latents to rounding),
    where diffusers' chunks take a slow path for a batch of one (a fused 25 x 192 x 576 video: 3.5 s against 10.2 s
    with channels-last weights), a batch in the chunks, faster from two videos on. Inference's conditions other than
    an image's (:func:`encode_image_conditions`)."""
    from diffusers.utils.torch_utils import get_module_execution_device

    from fourdnex.model.whole_clip import encode_moments, whole_clip_vae

    if len(video) > 1:
        return encode_latents(vae, video)
    return mode_latents(vae, encode_moments(whole_clip_vae(vae), video.to(get_module_execution_device(vae), vae.dtype)))


def vae_round_trip(vae, videos: torch.Tensor) -> torch.Tensor:
    """Videos ``(B, 3, F, H, W)`` in [-1, 1] through the VAE: the decoded posterior mode, float32 clamped to [-1, 1]
    (no gradients)."""
    with torch.no_grad():
        latents = vae.encode(videos.to(vae.device, vae.dtype)).latent_dist.mode()
        return vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1)


def normalize_xyz(z: torch.Tensor, mean: float = XYZ_LATENT_MEAN, std: float = XYZ_LATENT_STD) -> torch.Tensor:
    """VAE-normalized XYZ latents -> unit-scale latents: ``(z - mean) / std``."""
    return (z - mean) / std


def denormalize_xyz(z: torch.Tensor, mean: float = XYZ_LATENT_MEAN, std: float = XYZ_LATENT_STD) -> torch.Tensor:
    """Inverse of :func:`normalize_xyz`."""
    return z * std + mean
