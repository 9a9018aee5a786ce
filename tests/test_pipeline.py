"""The sampling loop against diffusers' WanImageToVideoPipeline, and the fused conditioning."""

import pytest
import torch
from conftest import SMALL
from diffusers import WanImageToVideoPipeline

from fourdnex.model.fusion import (
    condition_video,
    sloped_plane,
    soft_mask,
    split_width,
    vae_denormalize,
    vae_normalize,
)


def test_plain_image_to_video_reproduces_diffusers(tiny_path, tiny_pipe, example_image):
    reference = WanImageToVideoPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    frames = reference(
        image=example_image,
        prompt="a dog runs across a sunny park",
        negative_prompt="",
        generator=torch.Generator().manual_seed(11),
        output_type="np",
        **SMALL,
    ).frames
    ours = tiny_pipe(
        example_image,
        "a dog runs across a sunny park",
        modalities="rgb",
        prompt_suffix="",
        generator=torch.Generator().manual_seed(11),
        **SMALL,
    )
    assert ours.xyz is None
    assert ours.rgb.shape == frames.shape == (1, 5, 32, 48, 3)
    assert frames.std() > 0.01  # a real video, not a constant
    assert torch.allclose(ours.rgb, torch.from_numpy(frames), atol=1e-6)


def test_fused_sampling_feeds_mask_and_condition(tiny_pipe, example_image):
    seen = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args))
    try:
        out = tiny_pipe(example_image, "a cat", generator=torch.Generator().manual_seed(0), **SMALL)
    finally:
        hook.remove()
    assert out.rgb.shape == out.xyz.shape == (1, 5, 32, 48, 3)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1 and out.xyz.min() >= -1 and out.xyz.max() <= 1
    assert out.latents.shape == (1, 16, 2, 4, 12)
    assert len(seen) == 2 * SMALL["num_inference_steps"]  # conditional + unconditional call per step
    model_input, timestep, text, image_tokens = seen[0]
    assert model_input.shape == (1, 36, 2, 4, 12)
    assert torch.equal(model_input[:, 16:20], soft_mask(1, 2, 4, 12, "rgbxyz"))
    pixels = tiny_pipe.video_processor.preprocess(example_image, height=32, width=48)
    expected = vae_normalize(
        tiny_pipe.vae, tiny_pipe.vae.encode(condition_video(pixels, 5, "rgbxyz")).latent_dist.mode()
    )
    assert torch.allclose(model_input[:, 20:], expected, atol=1e-6)
    assert timestep.item() == tiny_pipe.scheduler.timesteps[0].item()
    # The prompt carries the suffix; the negative prompt (second call) is the empty one.
    suffixed, _ = tiny_pipe.encode_prompt(
        "a cat POINTMAP_STYLE.", do_classifier_free_guidance=False, max_sequence_length=512
    )
    assert text.shape == (1, 512, 32)
    assert torch.allclose(text, suffixed, atol=1e-5)
    empty, _ = tiny_pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=512)
    assert torch.allclose(seen[1][2], empty, atol=1e-5)
    assert image_tokens.shape == (1, 17, 32)


def test_a_long_image_condition_is_diffusers_latents(tiny_pipe, example_image):
    """At 25 frames the condition is encoded only where it depends on frame 0 (fewer FLOPs than diffusers' chunks
    from about 17 frames on): what the transformer sees is diffusers' latents of the condition video to rounding."""
    from fourdnex.model.whole_clip import skips_zero_tail

    seen = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    size = {**SMALL, "num_frames": 25, "num_inference_steps": 1}
    try:
        tiny_pipe(example_image, "a cat", generator=torch.Generator().manual_seed(0), **size)
    finally:
        hook.remove()
    pixels = tiny_pipe.video_processor.preprocess(example_image, height=32, width=48)
    video = condition_video(pixels, 25, "rgbxyz")
    assert skips_zero_tail(tiny_pipe.vae.config, tuple(video.shape))
    expected = vae_normalize(tiny_pipe.vae, tiny_pipe.vae.encode(video).latent_dist.mode())
    condition = seen[0][:, 20:]
    assert condition.shape == expected.shape == (1, 16, 7, 4, 12)
    assert (condition - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_video_condition_is_diffusers_latents(tiny_pipe, example_image, monkeypatch):
    """Given every frame, one sample's condition is encoded over the whole clip on a CPU: what the transformer sees is
    diffusers' latents of the condition video to rounding."""
    from fourdnex.model import whole_clip
    from fourdnex.model.fusion import condition_frames

    whole = []
    encode_moments = whole_clip.encode_moments
    monkeypatch.setattr(whole_clip, "encode_moments", lambda vae, x: whole.append(x.shape) or encode_moments(vae, x))
    seen = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    frames = [example_image.transpose(k % 2) for k in range(5)]  # the image, mirrored every other frame
    try:
        tiny_pipe(frames, "a cat", given_frames=range(5), generator=torch.Generator().manual_seed(0),
                  **{**SMALL, "num_inference_steps": 1})  # fmt: skip
    finally:
        hook.remove()
    pixels = tiny_pipe.video_processor.preprocess(frames, height=32, width=48)  # (5, 3, H, W)
    video = condition_frames(pixels.transpose(0, 1)[None], torch.ones(1, 5, dtype=torch.bool), "rgbxyz")
    expected = vae_normalize(tiny_pipe.vae, tiny_pipe.vae.encode(video).latent_dist.mode())
    condition = seen[0][:, 20:]
    assert whole == [video.shape]  # one call over the whole clip
    assert condition.shape == expected.shape == (1, 16, 2, 4, 12)
    assert (condition - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize(("call_pixels", "calls"), [(None, 1), (5 * 32 * 48, 2)])
def test_both_modalities_decode_in_one_call_where_they_fit(tiny_pipe, monkeypatch, call_pixels, calls):
    """A sample's RGB and XYZ videos decode in one VAE call where both fit VAE_CALL_PIXELS, else one call each; the
    videos are the same either way (to rounding)."""
    from fourdnex.generate import pipeline

    torch.manual_seed(0)
    fused = torch.randn(1, 16, 2, 4, 12)
    vae = tiny_pipe.vae
    with torch.no_grad():
        separate = [vae.decode(vae_denormalize(vae, half), return_dict=False)[0] for half in split_width(fused)]
    if call_pixels is not None:
        monkeypatch.setattr(pipeline, "VAE_CALL_PIXELS", call_pixels)
    decoded = []
    hook = vae.decoder.register_forward_hook(lambda module, args, out: decoded.append(len(args[0])))
    try:
        with torch.no_grad():
            rgb, xyz = tiny_pipe.decode_latents(fused, "rgbxyz", xyz_mean=0.0, xyz_std=1.0)
    finally:
        hook.remove()
    assert decoded == [2 // calls] * (2 * calls)  # videos per decoder call; diffusers' calls: one per latent frame
    assert torch.allclose(rgb, (separate[0] / 2 + 0.5).clamp(0, 1), atol=1e-5)
    assert torch.allclose(xyz, separate[1].clamp(-1, 1), atol=1e-5)


def test_decode_inverts_each_modality(tiny_pipe):
    torch.manual_seed(0)
    vae = tiny_pipe.vae
    rgb_latents, xyz_latents = torch.randn(2, 1, 16, 2, 4, 6)
    fused = torch.cat([rgb_latents, (xyz_latents - 0.2) / 1.5], dim=-1)
    rgb, xyz = tiny_pipe.decode_latents(fused, "rgbxyz", xyz_mean=0.2, xyz_std=1.5)
    direct = vae.decode(vae_denormalize(vae, torch.cat([rgb_latents, xyz_latents])), return_dict=False)[0]
    assert torch.allclose(rgb, (direct[:1] / 2 + 0.5).clamp(0, 1), atol=1e-5)
    assert torch.allclose(xyz, direct[1:].clamp(-1, 1), atol=1e-5)


def test_split_decoding_needs_several_processes(tiny_pipe):
    with pytest.raises(ValueError, match="at least 2 processes, got 1"):
        tiny_pipe.enable_split_decoding()


def test_same_seed_same_sample(tiny_pipe, example_image):
    a = tiny_pipe(example_image, "a cat", generator=torch.Generator().manual_seed(5), **SMALL)
    b = tiny_pipe(example_image, "a cat", generator=torch.Generator().manual_seed(5), **SMALL)
    c = tiny_pipe(example_image, "a cat", generator=torch.Generator().manual_seed(6), **SMALL)
    assert torch.equal(a.xyz, b.xyz) and not torch.equal(a.xyz, c.xyz)


def test_xyz_mode_generates_one_wide_xyz_video(tiny_pipe, example_image):
    out = tiny_pipe(example_image, "a cat", modalities="xyz", generator=torch.Generator().manual_seed(0), **SMALL)
    assert out.latents.shape == (1, 16, 2, 4, 6)  # one modality: no doubled width
    assert out.xyz.shape == out.rgb.shape == (1, 5, 32, 48, 3)
    pixels = tiny_pipe.video_processor.preprocess(example_image, height=32, width=48)
    expected = ((pixels[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0)
    assert all(torch.allclose(frame, expected, atol=1e-6) for frame in out.rgb[0])  # the input image on every frame


def test_first_and_last_frames_given_feed_a_hand_built_condition(tiny_pipe, example_image):
    """9 frames, frames 0 and 8 given: the mask (1 on those RGB pixel frames, 0.5 on XYZ frame 0) and the condition
    ([frame | plane] at 0, [frame | 0] at 8, zeros between), built here by hand."""
    seen = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    last = example_image.transpose(0)  # a mirrored image as the last frame
    settings = {**SMALL, "num_frames": 9}
    try:
        tiny_pipe([example_image, last], "a cat", generator=torch.Generator().manual_seed(0), given_frames=[0, 8],
                  **settings)  # fmt: skip
    finally:
        hook.remove()
    model_input = seen[0]  # (1, 36, 3, 4, 12)
    mask = torch.zeros(1, 4, 3, 4, 12)
    mask[:, :, 0, :, :6] = 1.0  # latent frame 0 = pixel frame 0, all 4 channels
    mask[:, :, 0, :, 6:] = 0.5  # the plane's hint
    mask[:, 3, 2, :, :6] = 1.0  # latent frame 2, channel 3 = pixel frame 8
    assert torch.equal(model_input[:, 16:20], mask)
    pixels = tiny_pipe.video_processor.preprocess([example_image, last], height=32, width=48)  # (2, 3, 32, 48)
    video = torch.zeros(1, 3, 9, 32, 96)
    video[0, :, 0, :, :48], video[0, :, 8, :, :48] = pixels[0], pixels[1]
    video[0, :, 0, :, 48:] = sloped_plane(32, 48)
    expected = vae_normalize(tiny_pipe.vae, tiny_pipe.vae.encode(video).latent_dist.mode())
    assert torch.allclose(model_input[:, 20:], expected, atol=1e-6)
    with pytest.raises(ValueError, match="sorted, distinct frames below 9"):
        tiny_pipe([example_image, last], "a cat", given_frames=[8, 0], **settings)
