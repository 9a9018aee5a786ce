"""What a fine-tuning step trains on: the samples drawn per step, the cache read from its files or held on the
device, the conditions, the loss and its noise levels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from train_cache import TINY_MODEL, build_cache
from training_support import step_batch

from fourdnex.data.cache import CacheError, LatentCache
from fourdnex.model.fusion import condition_video, soft_mask, split_width
from fourdnex.train.config import TrainConfig, TrainingError
from fourdnex.train.data import (
    HELD_PATTERNS,
    HeldCache,
    SampleStream,
    VaeConditionEncoder,
    batch_of_samples,
    pattern_rows,
    read_batch,
)
from fourdnex.train.engine import lr_factor
from fourdnex.train.loss import LossWeights, flow_matching_loss, sample_sigmas, transformer_inputs


def test_lr_schedule():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, schedule="cosine") for s in range(110)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0 and abs(f[60] - 0.5) < 1e-12 and f[-1] < 1e-3
    g = [lr_factor(s, warmup_steps=0, max_steps=100, schedule="cosine", min_ratio=0.1) for s in range(101)]
    assert g[0] == 1.0 and abs(g[50] - 0.55) < 1e-12 and abs(g[100] - 0.1) < 1e-12
    assert [lr_factor(s, warmup_steps=2, max_steps=10, schedule="constant") for s in (0, 1, 2, 9)] == [0.5, 1, 1, 1]


@pytest.mark.parametrize(
    ("method", "cdf"),
    [
        ("uniform", lambda s: s),
        ("shifted", lambda s: s / (3.0 - 2.0 * s)),  # u = s / (shift - (shift - 1) s)
    ],
)
def test_timestep_samplers(method, cdf):
    sigmas = sample_sigmas(20_000, method, torch.Generator().manual_seed(0), shift=3.0)
    assert sigmas.min() > 0 and sigmas.max() < 1
    assert stats.kstest(sigmas.double().numpy(), cdf).pvalue > 0.01
    other = sample_sigmas(20_000, "uniform", torch.Generator().manual_seed(0), shift=3.0)
    if method != "uniform":
        assert stats.kstest(other.double().numpy(), cdf).pvalue < 1e-6  # the test can tell the laws apart
    if method == "shifted":
        assert abs(sigmas.median().item() - 0.75) < 0.01  # shift 3 moves the median from 0.5 to 0.75


def test_loss_weights_and_first_frame():
    g = torch.Generator().manual_seed(0)
    pred, x0, noise = (torch.randn(2, 16, 3, 4, 8, generator=g) for _ in range(3))
    target = noise - x0
    rgb_error, xyz_error = (e.square() for e in split_width(pred - target))
    loss, parts = flow_matching_loss(pred, x0, noise, LossWeights())
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(parts["rgb"], rgb_error.mean())
    only_xyz, _ = flow_matching_loss(pred, x0, noise, LossWeights(rgb=0.0, xyz=1.0))
    torch.testing.assert_close(only_xyz, xyz_error.mean())
    weighted, _ = flow_matching_loss(pred, x0, noise, LossWeights(rgb=1.0, xyz=3.0))
    torch.testing.assert_close(weighted, (rgb_error.mean() + 3 * xyz_error.mean()) / 4)
    no_first, parts = flow_matching_loss(pred, x0, noise, LossWeights(rgb_first_frame=False))
    torch.testing.assert_close(parts["rgb"], rgb_error[:, :, 1:].mean())
    pred2 = pred.clone()
    pred2[:, :, 0, :, :4] += 100.0  # the first RGB latent frame no longer counts
    torch.testing.assert_close(flow_matching_loss(pred2, x0, noise, LossWeights(rgb_first_frame=False))[0], no_first)


def test_xyz_temporal_loss_charges_what_differs_between_frames():
    """An XYZ error every latent frame shares costs nothing in the temporal term; one that flips sign from frame to
    frame costs 4x its square per frame pair; the RGB half never enters it."""
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(2, 16, 5, 4, 8, generator=g) for _ in range(2))
    target = noise - x0
    offset = torch.randn(2, 16, 1, 4, 4, generator=g)
    shared, flipping = target.clone(), target.clone()
    shared[..., 4:] += offset  # the same XYZ error in every frame
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]).view(1, 1, 5, 1, 1)
    flipping[..., 4:] += offset * signs
    weights = LossWeights(rgb=1.0, xyz=3.0, xyz_temporal=2.0)
    loss, parts = flow_matching_loss(shared, x0, noise, weights)
    assert parts["xyz_t"].item() == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(loss, 3 * offset.square().mean() / 4)  # (0 + 3 mse_xyz + 2 * 0) / 4
    loss, parts = flow_matching_loss(flipping, x0, noise, weights)
    torch.testing.assert_close(parts["xyz"], offset.square().mean())
    torch.testing.assert_close(parts["xyz_t"], 4 * offset.square().mean())
    torch.testing.assert_close(loss, (3 + 2 * 4) * offset.square().mean() / 4)
    loss, parts = flow_matching_loss(flipping, x0, noise, LossWeights(rgb=1.0, xyz=3.0))  # the term off
    torch.testing.assert_close(loss, 3 * offset.square().mean() / 4)
    assert parts["xyz_t"].item() == 0.0
    rgb_noise = target.clone()
    rgb_noise[..., :4] += torch.randn(2, 16, 5, 4, 4, generator=g)
    assert flow_matching_loss(rgb_noise, x0, noise, weights)[1]["xyz_t"].item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(TrainingError, match="xyz_temporal_loss_weight"):
        TrainConfig(cache_dir="c", xyz_temporal_loss_weight=-1.0).validate()


def test_sample_is_the_inference_input(cache_dir):
    """x0, mask and condition are laid out as the pipeline builds them; timestep = 1000 s."""
    cfg = TrainConfig(cache_dir=str(cache_dir), height=32, width=32, num_frames=9, train_batch_size=2)
    cache = LatentCache(cache_dir, cfg.num_latent_frames, 32, 32)
    batch = step_batch(cache, cfg, 3)
    inputs = transformer_inputs(batch, torch.float32)
    hidden = inputs["hidden_states"]
    assert hidden.shape == (2, 36, 3, 4, 8)
    s = batch.sigmas.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(hidden[:, :16], (1 - s) * batch.x0 + s * batch.noise)
    torch.testing.assert_close(hidden[:, 16:20], soft_mask(2, 3, 4, 8, "rgbxyz"))
    torch.testing.assert_close(inputs["timestep"], batch.sigmas * 1000)
    # The same global batch gives the same samples however it is split over processes and micro-steps.
    one = TrainConfig(**{**vars(cfg), "train_batch_size": 1})
    two_processes = [step_batch(cache, one, 3, world=2, rank=r) for r in (0, 1)]
    one_process = TrainConfig(**{**vars(one), "gradient_accumulation_steps": 2})
    two_micro_steps = [step_batch(cache, one_process, 3, micro=m) for m in (0, 1)]
    for split in (two_processes, two_micro_steps):
        for name in ("x0", "condition", "noise", "sigmas", "prompt_embeds", "image_embeds"):
            assert torch.equal(torch.cat([getattr(b, name) for b in split]), getattr(batch, name)), name
    # Every clip once per epoch, in a new order each epoch.
    stream = SampleStream(cfg, len(cache), 1)
    epochs = [stream.draws(step).clips.tolist() for step in range(3)]
    assert all(sorted(e) == [0, 1] for e in epochs)


def test_condition_cut_and_encoded(cache_dir, tmp_path):
    """Causal VAE: the first latent frames of a longer condition encoding are the shorter clip's encoding; a cache
    whose condition is too short gets it encoded from the first frame, to the same values."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(TINY_MODEL, subfolder="vae", dtype=torch.float32)
    with torch.no_grad():
        first = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        long = vae.encode(condition_video(first, 9, "rgbxyz")).latent_dist.mode()  # (1, 16, 3, 4, 8)
        short = vae.encode(condition_video(first, 5, "rgbxyz")).latent_dist.mode()  # (1, 16, 2, 4, 8)
    assert torch.equal(long[:, :, :2], short)
    full = LatentCache(cache_dir, 3, 32, 32)
    assert full.cached_condition
    short_cache = build_cache(tmp_path, num_clips=2, cond_num_frames=5)
    encoded = LatentCache(short_cache, 3, 32, 32)
    assert not encoded.cached_condition
    encoder = VaeConditionEncoder(vae, torch.device("cpu"))
    for i in range(2):
        sample = encoded.sample(i)
        assert sample.cond is None
        torch.testing.assert_close(encoder(sample.cond_video[None])[0], full.sample(i).cond, atol=1e-5, rtol=1e-5)
        assert torch.equal(sample.mask, full.sample(i).mask)
    assert LatentCache(short_cache, 2, 32, 32).cached_condition  # 5 frames = 2 latent frames: cached
    with pytest.raises(CacheError, match="holds 9 frames"):
        LatentCache(cache_dir, 4, 32, 32)


def test_the_gpu_s_condition_encoder_gives_the_chunks_latents(monkeypatch):
    """The condition encoder's GPU path (each layer over the whole clip, channels-last convolutions and videos), taken
    here on the CPU, gives the latents of diffusers' chunks (the CPU path) for conditions given random keyframes."""
    from fourdnex.model.fusion import condition_frames, video_pixels
    from fourdnex.model.loading import load_vae
    from fourdnex.train import data

    generator = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (3, 9, 32, 32, 3), dtype=torch.uint8, generator=generator)
    given = torch.zeros(3, 9, dtype=torch.bool)
    given[:, 0], given[0, [3, 8]], given[1, 1:], given[2, 5] = True, True, True, True
    videos = condition_frames(video_pixels(frames), given, "rgbxyz")  # (3, 3, 9, 32, 64)
    latents = {}
    for whole in (False, True):
        monkeypatch.setattr(data, "runs_whole_clip", lambda device, whole=whole: whole)
        encoder = VaeConditionEncoder(load_vae(TINY_MODEL), torch.device("cpu"))
        assert encoder.whole_clip == whole
        latents[whole] = encoder(videos)
    assert latents[False].shape == (3, 16, 3, 4, 8)
    torch.testing.assert_close(latents[True], latents[False], rtol=1e-4, atol=1e-5)


def test_any_frame_tasks_and_rgb_alone_read_hand_built_conditions(cache_dir):
    """Each task's mask and condition video are built here from the cached clip's own frames; an RGB-only latent
    holds the RGB latent alone, conditioned on [first frame] without the plane."""
    from fourdnex.files import read_video
    from fourdnex.model.fusion import condition_frames, condition_mask
    from fourdnex.train.config import CONDITION_TASKS
    from fourdnex.train.data import draw_given

    cache = LatentCache(cache_dir, 3, 32, 32)
    record = json.loads((cache_dir / "manifest.jsonl").read_text().splitlines()[0])
    frames = read_video(cache_dir / record["files"]["video"])  # (9, 32, 32, 3)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    given = torch.tensor([True, False, False, True, False, False, False, False, True])
    sample = cache.sample(0, given)
    assert sample.cond is None
    torch.testing.assert_close(sample.cond_video, condition_frames(video, given[None], "rgbxyz")[0])
    assert torch.equal(sample.mask, condition_mask(given[None], 4, 8, "rgbxyz")[0])
    assert torch.equal(sample.mask[:, 2, :, :4], torch.tensor([0.0, 0, 0, 1])[:, None, None].expand(4, 4, 4))
    rgb = LatentCache(cache_dir, 3, 32, 32, "rgb").sample(0)
    assert torch.equal(rgb.x0, load_file(cache_dir / record["files"]["latents"])["rgb"][:, :3].float())
    first = torch.zeros(9, dtype=torch.bool)
    first[0] = True
    assert torch.equal(rgb.mask, condition_mask(first[None], 4, 4, "rgb")[0])
    # Its condition is cached: the tiny VAE's encoding of [first frame, then zeros], without the plane.
    from PIL import Image

    from fourdnex.model.loading import load_vae

    png = np.array(Image.open(cache_dir / record["files"]["first_frame"]))  # lossless, as the build encoded it
    first_frame = torch.from_numpy(png).permute(2, 0, 1).float()[None, :, None] / 127.5 - 1  # (1, 3, 1, H, W)
    video = torch.cat([first_frame, torch.zeros(1, 3, 8, 32, 32)], dim=2)
    vae = load_vae(TINY_MODEL).eval()
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert rgb.cond_video is None
    torch.testing.assert_close(rgb.cond, ((z - mean) / std)[0], atol=1e-5, rtol=1e-5)
    # The task shares: close to the preset over many draws; keyframes are frame 0 and 2-4 others.
    counts = {"image": 0, "first_last": 0, "keyframes": 0, "video": 0}
    for drawn in draw_given(CONDITION_TASKS["any"], 9, 2000, torch.Generator().manual_seed(0)):
        kind = ("video" if drawn.all() else "first_last" if drawn.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 1]
                else "image" if drawn.sum() == 1 else "keyframes")  # fmt: skip
        counts[kind] += 1
        assert drawn[0]
        if kind == "keyframes":
            assert 3 <= int(drawn.sum()) <= 5
    for kind, share in CONDITION_TASKS["any"].items():
        assert abs(counts[kind] / 2000 - share) < 0.04, counts  # binomial std 0.011


def test_the_training_target_is_what_the_inference_sampler_steps_with():
    """Checked against the sampler, not the trainer: at each noise level s the inference scheduler (the Wan
    checkpoint's UniPC, flow prediction, shift 3) visits, x_t = (1 - s) x0 + s noise with the model answering the
    trainer's target noise - x0 is stepped to the next level's (1 - s') x0 + s' noise, and finally onto x0."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_pretrained(TINY_MODEL, subfolder="scheduler")
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 2, 4, 8, generator=g), torch.randn(1, 16, 2, 4, 8, generator=g)
    sigmas = scheduler.sigmas.tolist()  # 4 levels, then 0
    x = (1 - sigmas[0]) * x0 + sigmas[0] * noise
    for i, t in enumerate(scheduler.timesteps):
        assert abs(float(t) - 1000 * sigmas[i]) <= 1  # the trainer's timestep 1000 s, up to the sampler's rounding
        x = scheduler.step(noise - x0, t, x, return_dict=False)[0]
        torch.testing.assert_close(x, (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise, rtol=0, atol=1e-5)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("modalities", "tasks"), [("rgbxyz", "image"), ("rgb", "image"), ("rgbxyz", "any")])
def test_a_cache_held_in_memory_gives_the_batches_of_its_files(modalities, tasks, cache_dir, tmp_path):
    """--cache_in_memory reads every file a run uses once: its batches equal those read from the files for the same
    draws (conditions encoded from the held frames included), and the run no longer needs the files."""
    from fourdnex.model.loading import load_vae

    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    cfg = TrainConfig(
        cache_dir=str(copy), height=32, width=32, num_frames=9, modalities=modalities, condition_tasks=tasks
    )
    cfg.train_batch_size = 6
    on_disk = LatentCache(copy, 3, 32, 32, modalities)
    encoder = VaeConditionEncoder(load_vae(TINY_MODEL), torch.device("cpu"))
    stream = SampleStream(cfg, len(on_disk), 1)
    steps = range(4)
    noise = [stream.noise(step, (16, 3, 4, 8 if modalities == "rgbxyz" else 4), torch.device("cpu")) for step in steps]
    cpu = torch.device("cpu")
    expected = [batch_of_samples(read_batch(on_disk, stream.draws(s)), stream.draws(s), noise[s], encoder, cpu)
                for s in steps]  # fmt: skip
    held = HeldCache.read(on_disk, cpu, tasks == "any", encoder)
    assert set(held.patterns) == (set(HELD_PATTERNS) if tasks == "any" else set())
    assert held.x0.shape == (2, 16, 3, 4, 8 if modalities == "rgbxyz" else 4)
    if tasks == "any":
        assert not all(stream.draws(s).image_only for s in steps)  # some samples are given other frames
    for folder in ("latents", "clip", "prompt", "videos", "first_frames"):
        shutil.rmtree(copy / folder)
    for step in steps:
        again = held.batch(stream.draws(step), noise[step], encoder)
        for name in ("x0", "condition", "noise", "sigmas", "prompt_embeds", "image_embeds"):
            torch.testing.assert_close(getattr(again, name), getattr(expected[step], name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("large", [False, True])
def test_held_videos_are_each_clips_frames_in_order_from_processes_or_threads(cache_dir, monkeypatch, large):
    """HeldCache's videos come from worker processes for small frames, from threads for large ones (here: every
    frame counted large); either way clip i's frames are what the cache gives for clip i."""
    from fourdnex import files
    from fourdnex.train import data

    monkeypatch.setattr(files, "THREADED_DECODE_PIXELS", 0 if large else 10**9)
    started = []
    real = data.worker_processes
    monkeypatch.setattr(data, "worker_processes", lambda count: started.append(count) or real(count))
    on_disk = LatentCache(cache_dir, 3, 32, 32, "rgbxyz")
    with data.cached_videos(on_disk) as videos:
        read = list(videos)
    assert started == [0 if large else data.DECODE_PROCESSES]
    assert len(read) == len(on_disk) >= 2
    for i, frames in enumerate(read):
        assert np.array_equal(frames, on_disk.frames(i))
    assert not np.array_equal(read[0], read[1])  # distinct clips, so the order is checked
    # A cache held without frames (image conditions only) decodes no video.
    monkeypatch.setattr(data, "cached_videos", lambda cache: pytest.fail("decoded videos it does not hold"))
    assert data.HeldCache.read(on_disk, torch.device("cpu"), False, None).nbytes > 0


def test_held_patterns_leave_only_the_key_frame_samples_to_the_vae(cache_dir):
    """With the conditions of the first-and-last and every-frame patterns held, a step of the any-frame mix encodes
    only its samples given random key frames (of 9 frames, the last one may be among them: such a sample is encoded
    unless it is exactly the first and last frames)."""
    from fourdnex.model.loading import load_vae

    cfg = TrainConfig(cache_dir=str(cache_dir), height=32, width=32, num_frames=9, condition_tasks="any")
    cfg.train_batch_size = 64
    on_disk = LatentCache(cache_dir, 3, 32, 32, "rgbxyz")
    encoder = VaeConditionEncoder(load_vae(TINY_MODEL), torch.device("cpu"))
    encoded = []

    def counting(videos):
        encoded.append(len(videos))
        return encoder(videos)

    held = HeldCache.read(on_disk, torch.device("cpu"), True, encoder)
    draws = SampleStream(cfg, len(on_disk), 1).draws(0)
    first_last = (draws.given[:, [0, -1]].all(dim=1) & ~draws.given[:, 1:-1].any(dim=1)).sum()
    every = draws.given.all(dim=1).sum()
    image = (~draws.given[:, 1:].any(dim=1)).sum()
    assert first_last > 0 and every > 0 and image > 0
    assert int(pattern_rows(draws.given, "first_last").sum()) == first_last
    assert int(pattern_rows(draws.given, "video").sum()) == every
    held.batch(draws, torch.zeros(64, 16, 3, 4, 8), counting)
    assert sum(encoded) == 64 - first_last - every - image


def test_a_cache_without_the_rgb_condition_encodes_it(cache_dir, tmp_path):
    """A cache built before ``cond_rgb`` existed still trains on RGB alone: the condition is encoded from the
    first frame, to the values the cache would hold."""
    from safetensors.torch import save_file

    from fourdnex.model.loading import load_vae

    old = tmp_path / "old"
    shutil.copytree(cache_dir, old)
    for path in (old / "latents").rglob("*.safetensors"):
        tensors = load_file(path)
        del tensors["cond_rgb"]
        save_file(tensors, path)
    cached = LatentCache(cache_dir, 3, 32, 32, "rgb")
    encoded = LatentCache(old, 3, 32, 32, "rgb")
    assert cached.cached_condition and not encoded.cached_condition
    encoder = VaeConditionEncoder(load_vae(TINY_MODEL), torch.device("cpu"))
    for i in range(2):
        sample = encoded.sample(i)
        torch.testing.assert_close(encoder(sample.cond_video[None])[0], cached.sample(i).cond, atol=1e-5, rtol=1e-5)
