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

A condition (its first frames given, zeros after them) is half the cache build's VAE work at the real size, and most of
it is the same for every clip: :func:`encode_condition_moments` computes only what depends on the given frames.

Timed by ``bench/bench_train_throughput.py --vae`` and ``bench/bench_dataset.py --vae_variants`` on a GPU and
``bench/bench_whole_clip.py`` on the CPU (BENCHMARKS.md): the VAE trainer runs whole clips on a GPU, the cache build
and inference on a CPU encode long image conditions with :func:`encode_condition_moments`
(:func:`fourdnex.model.fusion.encode_image_conditions`); the rest runs diffusers' chunks.
"""

from __future__ import annotations

import functools
import json

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


def runs_whole_clip(device: torch.device) -> bool:
    """Whether the VAE's trainer and the transformer trainer's condition encoder run each layer once over the whole
    clip, the convolutions in channels-last memory (the same numbers as diffusers' chunks): on a GPU, where the VAE's
    training step ran 1.35x and the trainer's condition encode 1.35-1.40x as fast on an H100 (BENCHMARKS.md, "Each layer
    over the whole clip"); on a CPU the chunks are faster."""
    return device.type == "cuda"


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


def _encoder_steps(encoder) -> list[tuple[int | None, object]]:
    """The Wan2.1 encoder as ``(reach, layer)`` in order: ``reach`` is how many earlier frames one output frame of the
    layer reads (two per causal 3x3x3 convolution; ``None``: the temporal downsampling, frame ``j`` from frames
    ``2j-2 .. 2j``)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample, WanResidualBlock

    steps: list[tuple[int | None, object]] = [(2, encoder.conv_in)]
    for layer in encoder.down_blocks:
        if isinstance(layer, WanResidualBlock):
            steps.append((4, layer))
        elif isinstance(layer, WanResample) and layer.mode == "downsample3d":
            steps.append((None, layer))
        else:  # per-frame attention, spatial downsampling
            steps.append((0, layer))
    mid = encoder.mid_block
    steps.append((4, mid.resnets[0]))
    for attention, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        steps += [(0, attention)] * (attention is not None) + [(4, resnet)]
    steps.append((2, lambda x: encoder.conv_out(encoder.nonlinearity(encoder.norm_out(x)))))
    return steps


def encode_condition_moments(vae, videos: torch.Tensor, given: int = 1) -> torch.Tensor:
    """:func:`encode_moments` of videos whose frames from ``given`` on are zeros (a condition: the given frames, then
    nothing), computing only what depends on the given frames.

    A layer's output frame ``t`` reads its input frames ``t - reach .. t``, so past the given frames plus the reach of
    the layers so far every frame of every clip holds the same values: what the encoder makes of an endless run of
    zero frames (the steady frame, one per layer, found by running the layer on a few copies of the one before).
    Each layer runs on the frames that still depend on the given ones, the steady frame stands for the rest. At the
    real size the full-resolution layers, most of the encoder's work, then run on a fraction of a 49-frame
    condition's frames (``tests/test_whole_clip.py`` counts the FLOPs). The same latents as diffusers' to rounding;
    ``vae`` prepared by :func:`whole_clip_vae`.
    """
    _, channels, frames, height, width = videos.shape
    _check_frames(frames)
    if not 1 <= given <= frames:
        raise ValueError(f"given frames must be 1..{frames}, got {given}")
    if given < frames and videos.device.type != "meta" and videos[:, :, given:].count_nonzero():  # meta: FLOP counts
        raise ValueError(f"a condition's frames from {given} on must be zeros")
    x, steady, total = videos[:, :, :given], videos.new_zeros(1, channels, 1, height, width), frames

    def extended(count: int) -> torch.Tensor:  # the known frames, then the steady frame up to ``count`` frames
        tail = steady.expand(x.shape[0], -1, count - x.shape[2], -1, -1)
        return torch.cat([x, tail], dim=2) if count > x.shape[2] else x

    for reach, layer in _encoder_steps(vae.encoder):
        if reach is None:  # output frame j >= 1 reads input frames 2j-2 .. 2j
            total = 1 + (total - 1) // 2
            known = min(total, -(-x.shape[2] // 2) + 1)
            x = layer(extended(2 * known - 1))
            steady = layer(steady.expand(-1, -1, 3, -1, -1).contiguous())[:, :, -1:]
        else:
            x = layer(extended(min(total, x.shape[2] + reach)))
            steady = layer(steady.expand(-1, -1, reach + 1, -1, -1).contiguous())[:, :, -1:]
    return vae.quant_conv(extended(total))


def condition_flops(vae_config: dict, shape: tuple[int, ...]) -> tuple[float, float]:
    """Encoder FLOPs of a condition video of ``shape`` ``(B, 3, F, H, W)``: in diffusers' chunks, and through
    :func:`encode_condition_moments` (counted on the meta device). The second is the smaller from about 17 frames
    on (0.75 of the first at 25 frames with the demo model's VAE, 0.52 at 49 with the real one); below, every frame
    depends on the first one and the steady frames are extra work."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = whole_clip_vae(AutoencoderKLWan.from_config(vae_config))
        video = torch.empty(shape)
    counts = []
    for encode in (lambda: vae.encode(video), lambda: encode_condition_moments(vae, video)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            encode()
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


def skips_zero_tail(vae_config: dict, shape: tuple[int, ...]) -> bool:
    """Whether a condition video of ``shape`` costs fewer FLOPs through :func:`encode_condition_moments` than in
    diffusers' chunks (:func:`condition_flops`), counted once per VAE config and shape in a process."""
    return _skips_zero_tail(json.dumps(dict(vae_config), sort_keys=True, default=str), tuple(shape))


@functools.lru_cache(maxsize=64)
def _skips_zero_tail(vae_config: str, shape: tuple[int, ...]) -> bool:
    chunks, zero_tail = condition_flops(json.loads(vae_config), shape)
    return zero_tail < chunks
