"""finetune.py --synthetic_clips: the generator's clips encoded in memory are the samples of the cache the file path
builds from the same tree (build_wan_dataset.py, then LatentCache and HeldCache.read), and a run trains on them."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from train_cache import TINY_MODEL, build_cache  # noqa: E402
from training_support import finetune, finetune_two_processes, scalars  # noqa: E402

from fourdnex.data.cache import LatentCache  # noqa: E402
from fourdnex.model.loading import load_vae  # noqa: E402
from fourdnex.train import rendered as rendered_module  # noqa: E402
from fourdnex.train.config import TrainConfig, TrainingError  # noqa: E402
from fourdnex.train.data import HeldCache, SampleStream, VaeConditionEncoder  # noqa: E402
from fourdnex.train.rendered import ClipRenderer  # noqa: E402

CLIPS, SEED, FAMILIES, HEIGHT, WIDTH, FRAMES = 5, 7, ("checkers", "noise"), 32, 48, 9
CPU = torch.device("cpu")
#: finetune.py's flags of three logged steps on the five clips, at their size
THREE_STEPS = ["--max_steps", "3", "--logging_steps", "1", "--checkpointing_steps", "3", "--learning_rate", "1e-3",
               "--lr_warmup_steps", "0", "--train_batch_size", "2", "--model_path", str(TINY_MODEL), "--height",
               str(HEIGHT), "--width", str(WIDTH), "--num_frames", str(FRAMES), "--lora_rank", "8",
               "--lora_alpha", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def same_tree_cache(tmp_path_factory) -> Path:
    """The file path's cache of the tree whose clips the rendered path makes: 5 clips (every subset once), written
    at the training size, so that preparing them crops nothing."""
    size = (HEIGHT, WIDTH)
    return build_cache(tmp_path_factory.mktemp("rendered"), num_clips=CLIPS, size=size, num_frames=FRAMES,
                       cond_num_frames=FRAMES, tree_size=size, seed=SEED, families=FAMILIES)  # fmt: skip


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over b's standard deviation."""
    return float((a.float() - b.float()).abs().max() / b.float().std())


@pytest.mark.parametrize("tasks", ["image", "any"])
def test_rendered_samples_are_the_caches(same_tree_cache, tasks):
    cfg = TrainConfig(synthetic_clips=CLIPS, synthetic_seed=SEED, texture_families=FAMILIES, height=HEIGHT,
                      width=WIDTH, num_frames=FRAMES, condition_tasks=tasks, model_path=str(TINY_MODEL))  # fmt: skip
    video = tasks == "any"
    encoder = VaeConditionEncoder(load_vae(TINY_MODEL), CPU) if video else None
    facts, rendered = ClipRenderer(cfg, workers=2).hold(str(TINY_MODEL), CPU, encoder)
    cache = LatentCache(same_tree_cache, cfg.num_latent_frames, HEIGHT, WIDTH)
    files = HeldCache.read(cache, CPU, video, encoder)

    assert len(facts) == len(cache) == CLIPS
    assert facts.latent_shape == cache.latent_shape
    assert facts.stats.center == cache.stats.center == "clip"
    # the statistics of the same latents, summed in another order (float64 sums of float32 latents)
    assert facts.stats.xyz_latent_mean == pytest.approx(cache.stats.xyz_latent_mean, rel=1e-5, abs=1e-6)
    assert facts.stats.xyz_latent_std == pytest.approx(cache.stats.xyz_latent_std, rel=1e-5)
    # the build encodes one clip a VAE call, the rendered path five: the same latents up to float rounding
    assert rendered.x0.shape == files.x0.shape
    assert relative(rendered.x0, files.x0) < 1e-4
    assert relative(rendered.cond, files.cond) < 1e-4
    assert relative(rendered.image, files.image) < 1e-4
    assert torch.equal(rendered.prompts[rendered.prompt_of], files.prompts[files.prompt_of])
    assert len(rendered.prompts) == len(files.prompts)  # each distinct prompt held once
    if video:  # H.264-coded and decoded as the cache's video is (fourdnex.files.write_video codes frames the same way
        # every time)
        assert torch.equal(rendered.frames, files.frames)
        for name, held in files.patterns.items():
            assert relative(rendered.patterns[name], held) < 1e-4
    else:
        assert rendered.frames is None and files.frames is None


def assert_same_losses(rendered_run: Path, files_run: Path) -> None:
    """The two runs logged the same total loss at steps 1, 2 and 3 (within 1e-3)."""
    rendered, files = scalars(rendered_run, "loss/total"), scalars(files_run, "loss/total")
    assert [step for step, _ in rendered] == [step for step, _ in files] == [1, 2, 3]
    assert [loss for _, loss in rendered] == pytest.approx([loss for _, loss in files], rel=1e-3)


def test_a_run_on_rendered_clips_trains_as_on_the_cache(same_tree_cache, tmp_path):
    """Three steps on the five clips rendered in memory and on their cache: the same losses, step for step."""
    finetune("--synthetic_clips", str(CLIPS), "--synthetic_seed", str(SEED), "--texture_families", *FAMILIES,
             "--output_dir", str(tmp_path / "rendered"), *THREE_STEPS)  # fmt: skip
    finetune("--cache_dir", str(same_tree_cache), "--cache_in_memory", "--output_dir", str(tmp_path / "files"),
             *THREE_STEPS)  # fmt: skip
    assert_same_losses(tmp_path / "rendered", tmp_path / "files")
    assert (tmp_path / "rendered" / "adapter" / "fourdnex_adapter.safetensors").is_file()


@pytest.mark.parametrize("tasks", ["image", "any"])
def test_two_processes_each_render_half_and_train_as_on_the_cache(same_tree_cache, tmp_path, tasks):
    """Two gloo processes: each renders and encodes its share of the five clips (0, 2, 4 and 1, 3), and the gathered
    samples (given any frames: their videos too, which the conditions of other frames than the first are encoded
    from) train as the cache's do under the same two processes, step for step."""
    steps = ["--condition_tasks", tasks, *THREE_STEPS]
    logs = finetune_two_processes("--synthetic_clips", str(CLIPS), "--synthetic_seed", str(SEED), "--texture_families",
                                  *FAMILIES, "--output_dir", str(tmp_path / "rendered"), *steps)  # fmt: skip
    finetune_two_processes("--cache_dir", str(same_tree_cache), "--cache_in_memory", "--output_dir",
                           str(tmp_path / "files"), *steps)  # fmt: skip
    assert re.search(r"synthetic clips \(share 1 of 2\): 100%\S* 3/3", logs[0])
    assert re.search(r"synthetic clips \(share 2 of 2\): 100%\S* 2/2", logs[1])
    assert_same_losses(tmp_path / "rendered", tmp_path / "files")


def test_a_paced_run_draws_only_the_clips_made_by_each_step():
    """16 clips held at the first step and 2.5 more a step: step n draws from the first min(100, 16 + floor(2.5 n))
    clips, the noise levels and given frames are those of an unpaced run, and once every clip is there the clips
    are too."""
    cfg = TrainConfig(synthetic_clips=100, synthetic_clips_per_step=2.5, train_batch_size=8, condition_tasks="any",
                      num_frames=9, seed=3)  # fmt: skip
    paced = SampleStream(cfg, 100, 1, first_clips=16)
    unpaced = SampleStream(dataclasses.replace(cfg, synthetic_clips_per_step=0), 100, 1)
    assert [paced.available(n) for n in (0, 1, 2, 3, 33, 34, 35)] == [16, 18, 21, 23, 98, 100, 100]
    newest = 0
    for step in range(40):
        mine, theirs = paced.draws(step), unpaced.draws(step)
        assert torch.equal(mine.sigmas, theirs.sigmas) and torch.equal(mine.given, theirs.given)
        if step < 34:
            assert int(mine.clips.min()) >= 0 and int(mine.clips.max()) < 16 + 2.5 * step
            newest = max(newest, int(mine.clips.max()))
        else:
            assert torch.equal(mine.clips, theirs.clips)
    assert newest >= 90  # the late clips are drawn as they come


def unscaled_xyz(held: HeldCache, stats) -> torch.Tensor:
    """The XYZ half of held fused latents, without the held set's normalization."""
    xyz = held.x0[..., held.x0.shape[-1] // 2 :]
    return xyz * stats.xyz_latent_std + stats.xyz_latent_mean


@pytest.mark.parametrize("tasks", ["image", "any"])
def test_a_paced_renderer_holds_the_clips_as_they_are_needed(monkeypatch, tasks):
    """40 clips, the first 16 held by hold() (the statistics' share, made 16 here), the rest by advance(): the same
    samples as 40 clips held at once, but for the XYZ normalization, which is that of the first 16 clips alone."""
    monkeypatch.setattr(rendered_module, "STATS_CLIPS", 16)
    base = TrainConfig(synthetic_clips=40, synthetic_seed=SEED, texture_families=FAMILIES, height=HEIGHT, width=WIDTH,
                       num_frames=FRAMES, condition_tasks=tasks, model_path=str(TINY_MODEL))  # fmt: skip
    video = tasks == "any"
    encoder = VaeConditionEncoder(load_vae(TINY_MODEL), CPU) if video else None

    renderer = ClipRenderer(dataclasses.replace(base, synthetic_clips_per_step=3), workers=2)
    facts, paced = renderer.hold(str(TINY_MODEL), CPU, encoder)
    assert renderer.first_clips == 16 and not renderer.done and len(facts) == len(paced.x0) == 40
    first_facts, _ = ClipRenderer(dataclasses.replace(base, synthetic_clips=16), workers=2).hold(
        str(TINY_MODEL), CPU, encoder
    )
    assert facts.stats == first_facts.stats  # the same sums of the same 16 clips
    assert len(paced.prompts) == len(set(paced.prompt_of[:16].tolist()))
    assert renderer.advance(17) is False  # whole encoder batches: 32 clips
    assert renderer.advance(40) is True and renderer.done

    full_facts, full = ClipRenderer(base, workers=2).hold(str(TINY_MODEL), CPU, encoder)
    assert full_facts.stats != facts.stats
    half = full.x0.shape[-1] // 2
    assert torch.equal(paced.x0[..., :half], full.x0[..., :half])  # RGB
    assert relative(unscaled_xyz(paced, facts.stats), unscaled_xyz(full, full_facts.stats)) < 1e-5
    assert torch.equal(paced.cond, full.cond) and torch.equal(paced.image, full.image)
    assert torch.equal(paced.prompts[paced.prompt_of], full.prompts[full.prompt_of])
    assert len(paced.prompts) == len(full.prompts)  # each distinct prompt held once
    if video:
        assert torch.equal(paced.frames, full.frames)
        for name, held in full.patterns.items():  # encoded in other batches
            assert relative(paced.patterns[name], held) < 1e-4
    else:
        assert paced.frames is None and not paced.patterns


#: finetune.py with the statistics' share of a paced run made 16 clips, so that a run of 40 tiny clips is paced
PACED_16 = (
    sys.executable,
    "-c",
    "import runpy, sys; import fourdnex.train.rendered as r; r.STATS_CLIPS = 16; "
    f"sys.argv = [{str(ROOT / 'finetune.py')!r}, *sys.argv[1:]]; runpy.run_path(sys.argv[0], run_name='__main__')",
)


def test_a_paced_run_splits_over_processes_as_the_clips_come(tmp_path):
    """40 clips, 16 at the first step and 4 more a step (all there from step 6): two processes, each rendering its
    share and both gathering at the same steps, train as one process taking both micro-batches, step by step."""
    steps = ["--synthetic_clips", "40", "--synthetic_clips_per_step", "4", "--synthetic_seed", str(SEED),
             "--texture_families", *FAMILIES, *THREE_STEPS, "--max_steps", "8",
             "--checkpointing_steps", "8"]  # fmt: skip
    one = finetune(*steps, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one"),
                   command=PACED_16)  # fmt: skip
    logs = finetune_two_processes(*steps, "--output_dir", str(tmp_path / "two"), command=PACED_16)
    assert "on 40 clips held on cpu" in one.stderr and "the first 16 and 4 more a step" in one.stderr
    assert re.search(r"synthetic clips \(share 2 of 2\): 100%\S* 20/20", logs[1])
    losses = [scalars(tmp_path / run, "loss/total") for run in ("one", "two")]
    assert [step for step, _ in losses[0]] == [step for step, _ in losses[1]] == list(range(1, 9))
    assert [loss for _, loss in losses[0]] == pytest.approx([loss for _, loss in losses[1]], rel=1e-3)


def test_a_paced_run_resumed_before_its_clips_are_all_there_trains_on(tmp_path):
    """Stopped at step 4 (24 clips there) and resumed to step 8, a paced run renders its clips again, waits for those
    step 5 draws from, and logs the losses of the run that went through."""
    steps = ["--synthetic_clips", "40", "--synthetic_clips_per_step", "4", "--synthetic_seed", str(SEED),
             "--texture_families", *FAMILIES, *THREE_STEPS, "--lr_schedule", "constant",
             "--checkpointing_steps", "4"]  # fmt: skip
    finetune(*steps, "--max_steps", "8", "--output_dir", str(tmp_path / "through"), command=PACED_16)
    finetune(*steps, "--max_steps", "4", "--output_dir", str(tmp_path / "resumed"), command=PACED_16)
    finetune(*steps, "--max_steps", "8", "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
             "latest", command=PACED_16)  # fmt: skip
    through, resumed = (scalars(tmp_path / run, "loss/total") for run in ("through", "resumed"))
    assert [step for step, _ in resumed] == list(range(1, 9))
    assert resumed == through


def test_more_processes_than_clips_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = TrainConfig(synthetic_clips=3, model_path=str(TINY_MODEL))
    with pytest.raises(TrainingError, match="--synthetic_clips 3 is fewer than the run's 4 processes"):
        ClipRenderer(cfg, workers=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "give the training clips as --cache_dir or as --synthetic_clips N, one of the two"),
        ({"cache_dir": "c", "synthetic_clips": 4}, "one of the two"),
        ({"synthetic_clips": -1}, "synthetic_clips must be at least 1, got -1"),
        ({"synthetic_clips": 4, "texture_families": ("checkers", "dots")}, "texture_families must be some of"),
        ({"synthetic_clips": 4, "texture_families": ()}, "texture_families must be some of"),
        ({"synthetic_clips": 4, "synthetic_clips_per_step": -1}, "synthetic_clips_per_step must be 0 or more, got -1"),
        ({"cache_dir": "c", "synthetic_clips_per_step": 2}, "--synthetic_clips_per_step needs --synthetic_clips"),
    ],
)
def test_the_training_clips_are_named_once(settings, message):
    with pytest.raises(TrainingError, match=message):
        TrainConfig(**settings).validate_data()
