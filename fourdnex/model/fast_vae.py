"""Two rewrites of diffusers' Wan VAE layers that compute the same numbers with fewer passes over memory.

A profile of the cache build's VAE on one H100 (BENCHMARKS.md, "Where the VAE's time goes") put its 3D convolutions
at 28 % of the kernel time; the rest went to copies (the padding and the cached frames joined to each chunk), and to
the RMS norm and SiLU that precede each convolution, which diffusers runs as about nine kernels over the whole
activation (in bfloat16: a copy to float32, the norm, its clamp, the division, the copy back, two products, the bias
and the SiLU).

- :func:`fuse_norm_silu`: each RMS norm that a SiLU follows (both of each residual block's, and the encoder's and
  decoder's last) becomes one function computing the norm in float32 and the SiLU before rounding once to the
  activation's dtype; on a GPU it is compiled (one kernel that reads the activation once and writes it once). The
  SiLU modules it absorbs become identities. In float32 and float64 the numbers are diffusers' to rounding; in
  bfloat16 they round once where diffusers rounds three times.
- :func:`pad_in_convolutions`: each causal convolution lets the convolution pad its frames' borders instead of
  writing a padded copy of its input (``F.pad``). With a feature cache (diffusers' chunks) the cached frames are
  still joined to the chunk (one copy instead of two); without one (:mod:`fourdnex.model.whole_clip`) the
  convolution pads the time axis on both sides too and the output's last frames are dropped: no copy at all, at the
  cost of ``kernel - 1`` extra output frames. The same products as diffusers'.

Both change only the modules' ``forward`` (the state dict is untouched) and apply to encoder and decoder alike.
``tests/test_fast_vae.py`` holds them to diffusers' encode and decode in float64.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | float) -> torch.Tensor:
    """SiLU of diffusers' channel-first RMS norm of ``x`` ``(B, C, ...)``: ``x / max(|x|_C, 1e-12) * weight + bias``,
    computed in float32 (or wider: ``x``'s dtype) and rounded once; ``weight``: the norm's scale times its gamma."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    y = xf / torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(1e-12) * weight.to(compute)
    if isinstance(bias, torch.Tensor) or bias:  # diffusers' norms without a bias have the number 0
        y = y + (bias.to(compute) if isinstance(bias, torch.Tensor) else bias)
    return F.silu(y).to(x.dtype)


@functools.cache
def _compiled_norm_silu():
    """:func:`norm_silu` compiled once for every shape: the activations' frame counts and sizes vary from layer to layer
    and chunk to chunk."""
    return torch.compile(norm_silu, dynamic=True)


def _fused_norm_forward(norm, x: torch.Tensor) -> torch.Tensor:
    """The norm and the SiLU after it: compiled on a GPU (one kernel a call), eager elsewhere."""
    fn = _compiled_norm_silu() if x.device.type == "cuda" else norm_silu
    return fn(x, norm.gamma * norm.scale, norm.bias)


def fuse_norm_silu(vae):
    """Fuse each RMS norm of ``vae`` that a SiLU follows with that SiLU (module docstring). Returns ``vae``."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanDecoder3d, WanEncoder3d, WanResidualBlock

    for module in vae.modules():
        if isinstance(module, WanResidualBlock):
            norms = (module.norm1, module.norm2)
        elif isinstance(module, (WanEncoder3d, WanDecoder3d)):
            norms = (module.norm_out,)
        else:
            continue
        if not isinstance(module.nonlinearity, torch.nn.SiLU):
            raise ValueError(f"fuse_norm_silu fuses SiLU, found {type(module.nonlinearity).__name__}")
        for norm in norms:
            if not norm.channel_first:
                raise ValueError("fuse_norm_silu expects channel-first RMS norms")
            norm.forward = _fused_norm_forward.__get__(norm)
        module.nonlinearity = torch.nn.Identity()
    return vae


def _causal_conv_forward(conv, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """``WanCausalConv3d.forward`` with the borders padded by the convolution (:func:`pad_in_convolutions`)."""
    pad_w, _, pad_h, _, pad_t, _ = conv._padding
    if cache_x is not None and pad_t > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        pad_t -= cache_x.shape[2]
    if pad_t > 0 and conv.stride[0] == 1:
        # both ends padded by the convolution; the outputs past the input's last frame are dropped
        out = F.conv3d(x, conv.weight, conv.bias, conv.stride, (pad_t, pad_h, pad_w), conv.dilation, conv.groups)
        return out[:, :, : x.shape[2] + pad_t - conv.dilation[0] * (conv.kernel_size[0] - 1)]
    if pad_t > 0:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, pad_h, pad_w), conv.dilation, conv.groups)


def pad_in_convolutions(vae):
    """Let each causal convolution of ``vae`` pad its own borders (module docstring). Returns ``vae``."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    for module in vae.modules():
        if isinstance(module, WanCausalConv3d):
            pad_w, pad_w_end, pad_h, pad_h_end, _, pad_t_end = module._padding
            if (pad_w, pad_h, pad_t_end) != (pad_w_end, pad_h_end, 0) or module.padding != (0, 0, 0):
                raise ValueError(f"pad_in_convolutions expects diffusers' causal padding, got {module._padding}")
            module.forward = _causal_conv_forward.__get__(module)
    return vae
