"""The small-VAE trainer (python -m fourdnex.train.vae) on a tiny synthetic tree with the tiny model's VAE."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from fourdnex.cli import run
from fourdnex.data.synthetic import write_tree
from fourdnex.model.loading import load_vae
from fourdnex.train import vae as trainer

SIZE = ["--num_frames", "5", "--height", "32", "--width", "48"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vae-data")
    train = write_tree(root / "train", num_clips=4, num_frames=5, height=32, width=48, seed=1)
    held_out = write_tree(root / "held-out", num_clips=2, num_frames=5, height=32, width=48, seed=2)
    return train, held_out


def train(trees, out: Path, steps: int, *extra: str) -> dict:
    args = ["--data_dir", trees[0], "--eval_data_dir", trees[1], "--model_path", TINY, "--out", out, *SIZE, *extra]
    args += ["--max_steps", str(steps), "--batch_size", "2", "--warmup_steps", "2", "--checkpointing_steps", "5"]
    run(trainer.main, trainer.build_parser(), [*map(str, args), "--device", "cpu", "--workers", "2"])
    return json.loads((out / "metrics.json").read_text())


def test_training_improves_reconstruction_and_sets_the_latent_statistics(trees, tmp_path):
    clips = trainer.load_clips(trees[1], 5, 32, 48, None, 2)
    before = trainer.reconstruction_psnr(load_vae(TINY).eval(), clips, torch.device("cpu"))
    metrics = train(trees, tmp_path / "run", 40)
    after = metrics["held_out_psnr"]
    assert metrics["steps"] == 40 and metrics["held_out_clips"] == 2 and metrics["train_clips"] == 4
    assert after["rgb"] > before["rgb"] + 1 and after["xyz"] > before["xyz"] + 1, (before, after)
    vae = load_vae(tmp_path / "run")
    # The stored statistics are those of the posterior means of the training clips, recomputed here.
    train_clips = trainer.load_clips(trees[0], 5, 32, 48, None, 2)
    with torch.no_grad():
        z = vae.encode(train_clips.videos(np.arange(4), torch.device("cpu"))).latent_dist.mode().double()
    mean = z.mean(dim=(0, 2, 3, 4))
    np.testing.assert_allclose(vae.config.latents_mean, mean.numpy(), atol=2e-3)
    np.testing.assert_allclose(vae.config.latents_std, z.std(dim=(0, 2, 3, 4), correction=0).numpy(), rtol=2e-3)


def test_a_killed_run_resumes_from_its_checkpoint_exactly(trees, tmp_path, monkeypatch):
    calls, loss = [], trainer.vae_loss

    def dies_at_step_8(*args):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # as a killed process: the checkpoint of step 5 is what is left
        return loss(*args)

    monkeypatch.setattr(trainer, "vae_loss", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(trees, tmp_path / "a", 10)
    assert json.loads((tmp_path / "a" / "checkpoint" / "step.json").read_text())["step"] == 5
    monkeypatch.setattr(trainer, "vae_loss", loss)
    assert train(trees, tmp_path / "a", 10)["steps"] == 10
    train(trees, tmp_path / "b", 10)
    resumed = load_vae(tmp_path / "a").state_dict()
    for name, value in load_vae(tmp_path / "b").state_dict().items():
        assert torch.equal(value, resumed[name]), name  # the same batches and noise whether resumed or not


def test_bad_settings_are_one_line(trees, tmp_path):
    with pytest.raises(SystemExit, match=r"^fourdnex.train.vae: num_frames must be 4k"):
        run(trainer.main, trainer.build_parser(), ["--data_dir", str(trees[0]), "--model_path", str(TINY),
                                                   "--out", str(tmp_path), "--num_frames", "6"])  # fmt: skip
    with pytest.raises(SystemExit, match="no VAE config"):
        run(trainer.main, trainer.build_parser(), ["--data_dir", str(trees[0]), "--model_path", str(tmp_path),
                                                   "--out", str(tmp_path), *SIZE])  # fmt: skip
    with pytest.raises(SystemExit, match=r"^fourdnex.train.vae: train_frames must be 4k\+1"):
        train(trees, tmp_path / "c", 1, "--train_frames", "3")
    with pytest.raises(SystemExit, match=r"^fourdnex.train.vae: train_frames must be at most num_frames 5, got 9"):
        train(trees, tmp_path / "c", 1, "--train_frames", "9")


def test_train_frames_are_random_windows_of_the_clips(trees, tmp_path, monkeypatch):
    """Each step's videos are ``train_frames`` consecutive frames of the batch's clips, RGB then XYZ, from a start
    drawn per step; the held-out PSNR is still of whole clips."""
    seen, loss = [], trainer.vae_loss

    def record(vae, videos, *args):
        seen.append(videos.clone())
        return loss(vae, videos, *args)

    monkeypatch.setattr(trainer, "vae_loss", record)
    metrics = train(trees, tmp_path / "run", 12, "--train_frames", "1")
    clips = trainer.load_clips(trees[0], 5, 32, 48, None, 2)
    whole = clips.videos(np.arange(4), torch.device("cpu"))  # (8, 3, 5, 32, 48): 4 RGB, then 4 XYZ
    starts = set()
    for videos in seen:
        assert videos.shape == (4, 3, 1, 32, 48)  # batch 2: its 2 RGB videos, then their 2 XYZ videos
        matches = [
            (clip, frame)
            for clip in range(4)
            for frame in range(5)
            if torch.equal(videos[0, :, 0], whole[clip, :, frame])
            and torch.equal(videos[2, :, 0], whole[4 + clip, :, frame])
        ]
        assert matches, "a training video is not a frame of a clip"
        starts.add(matches[0][1])
    assert len(starts) > 1 and metrics["held_out_clips"] == 2
