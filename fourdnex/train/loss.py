"""The flow-matching objective of fine-tuning, as pure functions; the transformer knows nothing about it.

A fused latent ``x0`` (B, 16, T, h, 2w) (RGB | XYZ side by side) is noised to ``x_t = (1 - s) x0 + s noise`` at a
noise level ``s`` in (0, 1); the transformer sees ``cat([x_t, soft mask, condition latent])`` (16 + 4 + 16
channels, exactly as at inference) and the timestep ``1000 s``, and is trained to predict the velocity
``noise - x0``.

The loss covers the whole fused latent by default, as the reference and Wan's own I2V training do: the first RGB
latent frame is given as the condition, but the pipeline still denoises and decodes it, so the model must reproduce
it; ``rgb_first_frame=False`` leaves it out. The XYZ half of the first frame is only hinted (sloped plane) and
always stays in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from fourdnex.model.fusion import split_width
from fourdnex.train.config import TimestepSampling


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift inference uses: ``s' = shift s / (1 + (shift - 1) s)``, any shape."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(n: int, method: TimestepSampling, generator: torch.Generator | None, shift: float) -> torch.Tensor:
    """Draw ``n`` noise levels ``s`` in (0, 1), float32 ``(n,)``.

    ``uniform``: ``s ~ U(0, 1)`` (the reference); ``shifted``: a uniform draw through :func:`shift_sigmas`, which
    spends training where the inference schedule of that ``shift`` (``TrainConfig.shift``) spends its steps (CDF
    ``s / (shift - (shift - 1) s)``).
    """
    if method == "uniform":
        return torch.rand(n, generator=generator)
    if method == "shifted":
        return shift_sigmas(torch.rand(n, generator=generator), shift)
    raise ValueError(f"timestep sampling must be uniform or shifted, got {method!r}")


@dataclass
class LossWeights:
    """How the flow-matching error is averaged over the fused latent."""

    rgb: float = 1.0
    xyz: float = 1.0
    rgb_first_frame: bool = True  # include the first RGB latent frame (the known condition)
    fused: bool = True  # the latent holds RGB | XYZ; False: the RGB video alone
    xyz_temporal: float = 0.0  # weight of the XYZ half's frame-to-frame error (see flow_matching_loss)


def flow_matching_loss(
    pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted MSE between the predicted velocity and ``noise - x0`` on a fused latent ``(B, 16, T, h, 2w)`` (or,
    without ``weights.fused``, an RGB latent ``(B, 16, T, h, w)``, whose loss is its MSE and whose XYZ part is 0).

    Each half is averaged on its own (the RGB half without its first latent frame if ``rgb_first_frame`` is False); the
    loss is ``(w_rgb * mse_rgb + w_xyz * mse_xyz + w_t * mse_t) / (w_rgb + w_xyz)``, which with equal weights, the whole
    latent and ``w_t = 0`` is the plain MSE. ``mse_t`` is the mean square of the change of the XYZ half's error from one
    latent frame to the next: an error every frame shares (the whole clip's geometry a little off) costs nothing in it,
    one that differs between frames (what moves each frame's camera alone) costs twice its own square where the frames'
    errors are independent and four times where they alternate in sign; it is computed only where ``w_t > 0`` (else 0,
    and neither the step nor its backward pays for it). Returns the loss () and the unweighted MSEs
    ``{"rgb", "xyz", "xyz_t"}`` (detached, ()).
    """
    difference = pred.float() - (noise.float() - x0.float())  # (B, 16, T, h, w')
    rgb, xyz = split_width(difference) if weights.fused else (difference, None)  # (B, 16, T, h, w) each
    if not weights.rgb_first_frame:
        rgb = rgb[:, :, 1:]
    mse_rgb = rgb.square().mean()
    if xyz is None:
        zero = torch.zeros_like(mse_rgb)
        return mse_rgb, {"rgb": mse_rgb.detach(), "xyz": zero, "xyz_t": zero}
    mse_xyz = xyz.square().mean()
    temporal = weights.xyz_temporal > 0 and xyz.shape[2] > 1
    mse_t = xyz.diff(dim=2).square().mean() if temporal else torch.zeros_like(mse_xyz)  # a constant 0: no backward
    loss = (weights.rgb * mse_rgb + weights.xyz * mse_xyz + weights.xyz_temporal * mse_t) / (weights.rgb + weights.xyz)
    return loss, {"rgb": mse_rgb.detach(), "xyz": mse_xyz.detach(), "xyz_t": mse_t.detach()}


@dataclass
class Batch:
    """One micro-batch as the loss needs it (``B`` samples of a fused ``T x h x 2w`` latent)."""

    x0: torch.Tensor  # (B, 16, T, h, w'): w' = 2w fused, w for RGB alone
    condition: torch.Tensor  # (B, 20, T, h, w'): condition mask + condition latent
    prompt_embeds: torch.Tensor  # (B, L, text_dim)
    image_embeds: torch.Tensor  # (B, 257, image_dim)
    noise: torch.Tensor  # (B, 16, T, h, w')
    sigmas: torch.Tensor  # (B,) in (0, 1)

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def transformer_inputs(batch: Batch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The keyword arguments of one transformer call, built as the inference loop builds them."""
    s = batch.sigmas.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * batch.x0 + s * batch.noise  # (B, 16, T, h, 2w)
    return {
        "hidden_states": torch.cat([x_t, batch.condition], dim=1).to(dtype),  # (B, 36, T, h, 2w)
        "timestep": batch.sigmas * 1000,  # (B,)
        "encoder_hidden_states": batch.prompt_embeds.to(dtype),  # (B, L, text_dim)
        "encoder_hidden_states_image": batch.image_embeds.to(dtype),  # (B, 257, image_dim)
    }


def batch_loss(
    model: nn.Module, batch: Batch, weights: LossWeights, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the transformer on a batch and return :func:`flow_matching_loss` of its prediction."""
    pred = model(**transformer_inputs(batch, dtype), return_dict=False)[0]  # (B, 16, T, h, 2w)
    return flow_matching_loss(pred, batch.x0, batch.noise, weights)
