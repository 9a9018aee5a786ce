"""The 4DNeX sampling pipeline: one image + a caption -> an RGB video and an XYZ pointmap video.

It is diffusers' ``WanImageToVideoPipeline`` (same components, same encoders, same offloading and loading) with the
denoising loop written for a fused latent: RGB on the left half of the width, XYZ on the right. Under context
parallelism (every process of a torchrun launch runs the whole pipeline, see :mod:`fourdnex.generate.parallel`),
:meth:`FourDNeXPipeline.enable_split_decoding` decodes the two halves on two processes at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
import torch.distributed as dist
from diffusers import WanImageToVideoPipeline
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from fourdnex.config import (
    PROMPT_SUFFIX,
    XYZ_LATENT_MEAN,
    XYZ_LATENT_STD,
    Modalities,
    check_video_shape,
    latent_frames,
    video_frames,
)
from fourdnex.model.fusion import (
    condition_frames,
    condition_mask,
    denormalize_xyz,
    encode_image_conditions,
    encode_latents,
    encode_on_cpu,
    split_width,
    vae_denormalize,
)
from fourdnex.model.loading import TEXT_TOKENS, load_components

#: The most pixels (frames x height x width) one VAE call encodes or decodes, unless one video is larger: one
#: modality of a paper-size sample (49 x 480 x 720), which decodes alone. Smaller videos share a call (the samples of
#: a batch, which decode faster per sample together than one by one: BENCHMARKS.md, "Many lines at once"), so a batch
#: never takes the VAE above the memory of a paper-size modality.
VAE_CALL_PIXELS = 49 * 480 * 720


def videos_per_vae_call(pixels: int) -> int:
    """How many videos of ``pixels`` (frames x height x width) one VAE call takes: :data:`VAE_CALL_PIXELS` worth,
    at least one."""
    return max(1, VAE_CALL_PIXELS // pixels)


def decodes_together(modalities: int, pixels: int) -> bool:
    """Whether the videos of ``modalities`` modalities of ``pixels`` each (all of a part's samples) decode in one VAE
    call: where there are several and they fit :data:`VAE_CALL_PIXELS`."""
    return modalities > 1 and modalities * pixels <= VAE_CALL_PIXELS


def decode_videos_per_call(pixels: int, batch: int, modalities: int = 2) -> int:
    """How many videos of ``pixels`` one decode call takes for a batch of ``batch`` samples of ``modalities`` videos
    each: the samples of a part (:data:`VAE_CALL_PIXELS` worth of all their videos, at least one sample), all their
    videos together where they fit (:func:`decodes_together`), else one modality's."""
    samples = min(batch, videos_per_vae_call(pixels * modalities))
    return samples * modalities if decodes_together(modalities, samples * pixels) else samples


#: The condition of one sample: an image (frame 0), or one image per given frame, in frame order.
Condition = PIL.Image.Image | Sequence[PIL.Image.Image]


def _batch_of(
    image: Condition | Sequence[Condition], prompt: str | Sequence[str], given_frames: Sequence[int]
) -> tuple[list[str], list[list[PIL.Image.Image]]]:
    """The B captions and B conditions (``len(given_frames)`` images each) of one caption and its condition, or of
    a list of captions and a list of as many conditions."""
    if isinstance(prompt, str):
        prompts, conditions = [prompt], [image]
    else:
        prompts, conditions = list(prompt), [image] if isinstance(image, PIL.Image.Image) else list(image)
        if len(conditions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(conditions)} conditions: give one condition per prompt")
    conditions = [
        [condition] if isinstance(condition, PIL.Image.Image) else list(condition) for condition in conditions
    ]
    for i, images in enumerate(conditions):
        if len(images) != len(given_frames):
            sample = f" (sample {i})" if len(conditions) > 1 else ""
            raise ValueError(
                f"{len(images)} images for the {len(given_frames)} given frames {list(given_frames)}{sample}"
            )
    return prompts, conditions


@dataclass
class FourDNeXOutput:
    """What one call of :class:`FourDNeXPipeline` returns (``B`` samples, ``F`` frames of ``H x W``).

    With split decoding (:meth:`FourDNeXPipeline.enable_split_decoding`) only the first process gets the videos; the
    others get ``rgb`` and ``xyz`` as None, and the same ``latents`` and their own ``timings``.
    """

    rgb: torch.Tensor | None  # (B, F, H, W, 3) float in [0, 1]; None on the other processes of split decoding
    xyz: torch.Tensor | None  # (B, F, H, W, 3) float in [-1, 1]; None for an RGB-only latent and wherever rgb is None
    latents: torch.Tensor  # (B, 16, T, h, w') the final latents, as the transformer sees them
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class FourDNeXPipeline(WanImageToVideoPipeline):
    """Wan2.1-I2V with the 4DNeX width-wise fusion of RGB and XYZ.

    Load it with :func:`load_pipeline`. The transformer is a
    :class:`~fourdnex.model.transformer.FourDNeXTransformer`; the ``modalities`` argument of ``__call__`` sets what
    its width holds.
    """

    _split_decoding = False  # set by enable_split_decoding

    def enable_split_decoding(self) -> None:
        """In a context-parallel run, decode the RGB half on the first process and the XYZ half on the second.

        Every process of the group must run the pipeline with the same inputs and seed (as under context
        parallelism, where all of them end with the same latents). The two halves then decode at the same time; the
        second process sends its XYZ video (a tensor of known shape, on the VAE's device) to the first, which returns
        both. Every other process returns ``rgb=None, xyz=None``. The videos equal one process's (each modality
        decodes in its own VAE call there too).
        """
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if world_size < 2:
            raise ValueError(f"split decoding needs a process group of at least 2 processes, got {world_size}")
        if self.transformer._parallel_config is None:  # diffusers records enable_parallelism's config here
            raise ValueError(
                "split decoding is for context-parallel runs, where every process holds the same latents: "
                "enable context parallelism on the transformer first"
            )
        self._split_decoding = True

    @torch.no_grad()
    def __call__(
        self,
        image: Condition | Sequence[Condition],
        prompt: str | Sequence[str],
        negative_prompt: str = "",
        height: int = 480,
        width: int = 720,
        num_frames: int = 49,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        modalities: Modalities = "rgbxyz",
        xyz_mean: float = XYZ_LATENT_MEAN,
        xyz_std: float = XYZ_LATENT_STD,
        prompt_suffix: str = PROMPT_SUFFIX,
        max_sequence_length: int = TEXT_TOKENS,
        given_frames: Sequence[int] = (0,),
        callback_on_step_end: Callable[[FourDNeXPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> FourDNeXOutput:
        """Generate one sample, or a batch of ``B``. ``height`` and ``width`` are per modality (the fused frame is
        twice as wide).

        The condition of a sample is one image, frame 0 (image-to-4D), or one image per frame of ``given_frames``
        (sorted frame numbers below ``num_frames``): the first and the last frame, keyframes, or every frame (4D
        reconstruction of a video). CLIP sees the first of them. ``modalities="rgb"`` with an empty ``prompt_suffix``
        is plain Wan2.1 image-to-video, step for step. After :meth:`enable_split_decoding`, only the first process
        returns the videos (see :class:`FourDNeXOutput`).

        A batch: ``prompt`` is a list of ``B`` captions and ``image`` a list of ``B`` conditions (each an image or
        the images of ``given_frames``, which all samples share, as they share the size and the settings). With
        ``generator`` a list of ``B`` generators, sample ``i`` starts from the noise ``generator[i]`` draws alone,
        so it is the sample that generator gives at batch 1, up to the rounding of batched arithmetic; one generator
        draws the whole batch's noise in turn. The VAE takes the samples together, :data:`VAE_CALL_PIXELS` a call.

        ``callback_on_step_end(pipe, step, timestep, {"latents": latents})`` is called after every denoising step, as
        in diffusers (a progress bar, a preview); a ``"latents"`` entry of the dict it returns replaces the latents.
        """
        check_video_shape(num_frames, height, width)
        given_frames = list(given_frames)
        prompts, conditions = _batch_of(image, prompt, given_frames)
        if given_frames != sorted(set(given_frames)) or given_frames[0] < 0 or given_frames[-1] >= num_frames:
            raise ValueError(f"given_frames must be sorted, distinct frames below {num_frames}, got {given_frames}")
        batch = len(prompts)
        if isinstance(generator, Sequence):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for {batch} samples: give one per sample, or one")
            generator = list(generator)  # randn_tensor draws sample i from generator[i]
        self.transformer.set_modalities(modalities)
        device = self._execution_device
        transformer_dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0
        timings: dict[str, float] = {}
        tic = time.perf_counter()

        # 1. Text and image conditions: UMT5 on the captioned prompts, CLIP's penultimate layer on each first image.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=[text + prompt_suffix for text in prompts],
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        prompt_embeds = prompt_embeds.to(transformer_dtype)  # (B, 512, 4096)
        if do_cfg:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)  # (B, 512, 4096)
        first_images = [images[0] for images in conditions]
        image_embeds = self.encode_image(first_images, device).to(transformer_dtype)  # (B, 257, 1280)

        # 2. Timesteps from the checkpoint's scheduler (UniPC, flow prediction, shift 3.0 for Wan2.1-I2V-480P).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 3. Initial noise over the fused latent.
        num_latent_frames = latent_frames(num_frames)
        latent_h = height // self.vae_scale_factor_spatial
        latent_w = width // self.vae_scale_factor_spatial * (2 if modalities == "rgbxyz" else 1)
        shape = (batch, self.vae.config.z_dim, num_latent_frames, latent_h, latent_w)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)  # (B, 16, T, h, w')

        # 4. Condition: the given frames [RGB | sloped plane on frame 0], zeros elsewhere, VAE-encoded (mode) and
        #    VAE-normalized, after the mask of what is given.
        images = [frame for frames in conditions for frame in frames]
        pixels = self.video_processor.preprocess(images, height=height, width=width).to(device, torch.float32)
        pixels = pixels.unflatten(0, (batch, len(given_frames)))  # (B, G, 3, H, W)
        frames = pixels.new_zeros(batch, 3, num_frames, height, width)  # (B, 3, F, H, W)
        frames[:, :, given_frames] = pixels.transpose(1, 2)
        given = torch.zeros(batch, num_frames, dtype=torch.bool, device=device)
        given[:, given_frames] = True
        video = condition_frames(frames, given, modalities)  # (B, 3, F, H, W')
        per_call = videos_per_vae_call(video[0, 0].numel())
        # on a CPU an image's condition only where it depends on frame 0 where that spends fewer FLOPs (at 25 x 192 x
        # 288 3x as fast), other conditions of one sample over the whole clip (2.6-2.9x: BENCHMARKS.md, "The CPU's VAE
        # calls"); on a GPU diffusers' chunks (neither is timed there yet, and their whole-clip layers hold more memory
        # than the chunks)
        encode = encode_latents
        if get_module_execution_device(self.vae).type == "cpu":
            encode = encode_image_conditions if given_frames == [0] else encode_on_cpu
        condition_latents = torch.cat([encode(self.vae, part) for part in video.split(per_call)])
        condition_latents = condition_latents.to(device)  # (B, 16, T, h, w')
        mask = condition_mask(given, latent_h, latent_w, modalities)  # (B, 4, T, h, w')
        condition = torch.cat([mask, condition_latents], dim=1)  # (B, 20, T, h, w')
        timings["encode"] = time.perf_counter() - tic

        # 5. Denoise: 16 noisy + 4 mask + 16 condition channels in; flow velocity out; classifier-free guidance.
        tic = time.perf_counter()
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for step, t in enumerate(timesteps):
                # 5a. The model input: the noisy latents beside the mask and the condition.
                model_input = torch.cat([latents, condition], dim=1).to(transformer_dtype)  # (B, 36, T, h, w')
                # 5b. Velocity, guided: v_uncond + scale * (v_cond - v_uncond).
                with self.transformer.cache_context("cond"):
                    velocity = self.transformer(
                        model_input, t.expand(batch), prompt_embeds, image_embeds, return_dict=False
                    )[0]  # (B, 16, T, h, w')
                if do_cfg:
                    with self.transformer.cache_context("uncond"):
                        velocity_uncond = self.transformer(
                            model_input, t.expand(batch), negative_prompt_embeds, image_embeds, return_dict=False
                        )[0]
                    velocity = velocity_uncond + guidance_scale * (velocity - velocity_uncond)
                # 5c. One solver step on the float32 latents.
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]  # (B, 16, T, h, w')
                if callback_on_step_end is not None:
                    latents = callback_on_step_end(self, step, t, {"latents": latents}).get("latents", latents)
                progress.update()
        timings["denoise"] = time.perf_counter() - tic

        # 6. Decode each modality as a video of its own (as each was encoded for training), after undoing the
        #    normalizations, the samples of a batch in parts of VAE_CALL_PIXELS (both modalities' videos counted):
        #    each part's videos reach host memory before the next decodes (with split decoding: on the first process).
        tic = time.perf_counter()

        def channels_last(video: torch.Tensor | None) -> torch.Tensor | None:
            return None if video is None else video.permute(0, 2, 3, 4, 1).float().cpu()  # (b, F, H, W, 3)

        decoded = []
        per_call = videos_per_vae_call(num_frames * height * width * (2 if modalities == "rgbxyz" else 1))
        for first in range(0, batch, per_call):
            part = slice(first, first + per_call)
            rgb, xyz = self.decode_latents(latents[part], modalities, xyz_mean, xyz_std)  # (b, 3, F, H, W) each
            if modalities == "xyz" and xyz is not None:  # the first input image on every frame, beside decoded XYZ
                rgb = ((pixels[part, 0, :, None] + 1) / 2).clamp(0, 1).expand(-1, -1, num_frames, -1, -1)
            decoded.append((channels_last(rgb), channels_last(xyz)))
        rgb, xyz = (None if videos[0] is None else torch.cat(videos) for videos in zip(*decoded, strict=True))
        timings["decode"] = time.perf_counter() - tic
        self.maybe_free_model_hooks()
        return FourDNeXOutput(rgb=rgb, xyz=xyz, latents=latents, timings=timings)  # videos (B, F, H, W, 3)

    def decode_latents(
        self, latents: torch.Tensor, modalities: Modalities, xyz_mean: float, xyz_std: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Normalized latents ``(B, 16, T, h, w')`` -> RGB ``(B, 3, F, H, W)`` in [0, 1] and XYZ in [-1, 1]: one VAE
        call for both where their videos fit :data:`VAE_CALL_PIXELS`, else one per modality.

        A modality the latent lacks is None; with split decoding, so is every video on processes other than the first.
        """
        if modalities == "rgbxyz":
            rgb_latents, xyz_latents = split_width(latents)
            halves = {"rgb": rgb_latents, "xyz": denormalize_xyz(xyz_latents, xyz_mean, xyz_std)}
        elif modalities == "xyz":
            halves = {"xyz": denormalize_xyz(latents, xyz_mean, xyz_std)}
        else:
            halves = {"rgb": latents}
        if self._split_decoding:
            videos = self._decode_on_two_processes(halves)
        elif decodes_together(len(halves), self._pixels(next(iter(halves.values())))):
            # both modalities in one VAE call: on a CPU 2.7x as fast as a call each at 25 x 192 x 288 (BENCHMARKS.md,
            # "The CPU's VAE calls")
            joined = self._vae_decode(torch.cat(list(halves.values())))
            videos = dict(zip(halves, joined.split(len(latents)), strict=True))
        else:
            videos = {name: self._vae_decode(half) for name, half in halves.items()}
        rgb, xyz = videos.get("rgb"), videos.get("xyz")
        return (None if rgb is None else (rgb / 2 + 0.5).clamp(0, 1)), (None if xyz is None else xyz.clamp(-1, 1))

    def _pixels(self, latents: torch.Tensor) -> int:
        """Pixels (frames x height x width) of the videos that one modality's latents ``(B, 16, T, h, w)`` decode to."""
        batch, _, frames, height, width = latents.shape
        return batch * video_frames(frames) * height * width * self.vae_scale_factor_spatial**2

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents ``(B, 16, T, h, w)`` -> VAE output ``(B, 3, F, H, W)`` on the VAE's device."""
        vae_latents = latents.to(get_module_execution_device(self.vae), self.vae.dtype)
        return self.vae.decode(vae_denormalize(self.vae, vae_latents), return_dict=False)[0]

    def _decode_on_two_processes(self, halves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Process i decodes modality i; the second sends its video to the first, which returns all of them."""
        rank, names = dist.get_rank(), list(halves)
        if rank >= len(names):
            return {}
        video = self._vae_decode(halves[names[rank]])  # (B, 3, F, H, W)
        if rank == 1:
            dist.send(video.contiguous(), dst=0)
            return {}
        videos = {names[0]: video}
        if len(names) == 2:  # the halves have one latent shape, so the XYZ video has the RGB video's shape
            videos[names[1]] = torch.empty(video.shape, dtype=video.dtype, device=video.device)
            dist.recv(videos[names[1]], src=1)
        return videos


def load_pipeline(
    model_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    transformer_path: str | Path | None = None,
) -> FourDNeXPipeline:
    """Load a Wan2.1-I2V diffusers folder as a :class:`FourDNeXPipeline` (on the CPU; move or offload it after),
    with :func:`fourdnex.model.loading.load_components`' precisions. ``transformer_path`` replaces the base
    transformer with a fully fine-tuned one (a diffusers transformer folder)."""
    return FourDNeXPipeline(**load_components(model_path, dtype, transformer=transformer_path or True))
