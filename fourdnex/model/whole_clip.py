"""The Wan VAE over a whole clip at once: the latents and pixels of diffusers' ``AutoencoderKLWan``, every layer
called once over all of a clip's frames instead of once per chunk of frames.

diffusers encodes a clip of ``1 + 4k`` frames as ``k + 1`` chunks (the first frame, then four at a time) and decodes
it one latent frame at a time; each causal convolution carries its input's last two frames from one chunk to the next
(the feature cache), so the chunks compute what one causal convolution over all frames computes. Two layers act on a
chunk as a whole and are rewritten here for all frames:

- the encoder's temporal downsampling (``WanResample`` ``downsample3d``) keeps the first frame, then convolves three
  frames with stride 2: over all frames, the first frame followed by the stride-2 convolution without padding;
- the decoder's temporal upsampling (``upsample3d``) keeps the first frame and turns each later frame into two by a
  causal convolution that never sees the first frame: over all frames, the first frame followed by the causal
  convolution of the frames after it, each output frame's two halves interleaved in time.

The rest (residual blocks, per-frame attention, RMS norms) already runs over all frames when called without a
feature cache. The same products in another order: float64 agrees with diffusers to rounding
(``tests/test_whole_clip.py``). Each layer runs once on a tensor as long as the clip, so memory grows with the clip's
length, as training's activations do anyway.
"""

from __future__ import annotations

import torch


def _resample_whole(resample, x: torch.Tensor, feat_cache=None, feat_idx=(0,)) -> torch.Tensor:
    """``WanResample.forward`` over all frames where no feature cache is given; diffusers' own with one."""
    if feat_cache is not None:
        return type(resample).forward(resample, x, feat_cache, feat_idx)
    b, c, t, h, w = x.shape
    if resample.mode == "upsample3d" and t > 1:
        later = resample.time_conv(x[:, :, 1:])  # (B, 2C, T-1, H, W): each later frame's two halves
        later = later.view(b, 2, c, t - 1, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * (t - 1), h, w)
        x = torch.cat([x[:, :, :1], later], dim=2)
    t = x.shape[2]
    frames = resample.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
    x = frames.view(b, t, *frames.shape[1:]).transpose(1, 2)
    if resample.mode == "downsample3d" and t > 1:
        x = torch.cat([x[:, :, :1], resample.time_conv(x)], dim=2)
    return x


def whole_clip_vae(vae):
    """Let ``vae``'s encoder and decoder run over all frames of a clip when called without a feature cache (the
    temporal resampling layers, rewritten as the module's docstring says); diffusers' chunked ``encode`` and
    ``decode``, which always pass one, are unchanged. Returns ``vae``."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    if vae.config.get("is_residual") or vae.config.get("patch_size") is not None:
        raise ValueError("whole-clip encoding supports the Wan2.1 VAE (no residual blocks, no patches)")
    for module in vae.modules():
        if isinstance(module, WanResample):
            module.forward = _resample_whole.__get__(module)
    return vae


def _check_frames(frames: int) -> None:
    if (frames - 1) % 4:
        raise ValueError(f"a clip for the Wan VAE has 4k+1 frames, got {frames}")


def encode_moments(vae, videos: torch.Tensor) -> torch.Tensor:
    """Videos ``(B, 3, 4k+1, H, W)`` -> the posterior's moments ``(B, 2 z_dim, k+1, H/8, W/8)`` (means, then log
    variances) that ``vae.encode`` computes; ``vae`` prepared by :func:`whole_clip_vae`."""
    _check_frames(videos.shape[2])
    return vae.quant_conv(vae.encoder(videos))


def encode_whole(vae, videos: torch.Tensor):
    """``vae.encode(videos).latent_dist`` over all frames at once (a diffusers ``DiagonalGaussianDistribution``)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(encode_moments(vae, videos))


def decode_whole(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, z_dim, T, h, w)`` -> ``vae.decode(z)``'s videos ``(B, 3, 4(T-1)+1, 8h, 8w)`` clamped to [-1, 1],
    over all frames at once; ``vae`` prepared by :func:`whole_clip_vae`."""
    return torch.clamp(vae.decoder(vae.post_quant_conv(z)), min=-1.0, max=1.0)
