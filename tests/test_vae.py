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


def train(trees, out: Path, steps: int) -> dict:
    args = ["--data_dir", trees[0], "--eval_data_dir", trees[1], "--model_path", TINY, "--out", out, *SIZE]
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
