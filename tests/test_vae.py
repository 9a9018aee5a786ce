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
    """40 steps on 4 clips: both modalities of the training clips are coded better by more than 1 dB, and the
    pointmaps of unseen scenes too (their RGB, in textures and colours the 4 clips do not cover, is reported: at this
    size it does not carry over)."""
    untrained = load_vae(TINY).eval()
    cpu = torch.device("cpu")
    before = trainer.reconstruction_psnr(untrained, trainer.load_clips(trees[0], 5, 32, 48, None, 2), cpu)
    before_held = trainer.reconstruction_psnr(untrained, trainer.load_clips(trees[1], 5, 32, 48, None, 2), cpu)
    metrics = train(trees, tmp_path / "run", 40)
    after, after_held = metrics["train_psnr"], metrics["held_out_psnr"]
    assert metrics["steps"] == 40 and metrics["held_out_clips"] == 2 and metrics["train_clips"] == 4
    assert after["rgb"] > before["rgb"] + 1 and after["xyz"] > before["xyz"] + 1, (before, after)
    assert after_held["xyz"] > before_held["xyz"] + 1, (before_held, after_held)
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


def test_the_gpu_s_whole_clip_step_trains_as_the_chunks_do(trees, tmp_path, monkeypatch):
    """The trainer's GPU path (each layer over the whole clip, channels-last convolutions and videos), taken here on
    the CPU: the same losses and weights as diffusers' chunks, step by step."""
    losses, original = {}, trainer.vae_loss

    def recording(kind):
        def vae_loss(*args):
            loss, parts = original(*args)
            losses.setdefault(kind, []).append((loss.item(), args[-1]))
            return loss, parts

        return vae_loss

    for kind, whole in (("chunks", False), ("whole", True)):
        monkeypatch.setattr(trainer, "runs_whole_clip", lambda device, whole=whole: whole)
        monkeypatch.setattr(trainer, "vae_loss", recording(kind))
        train(trees, tmp_path / kind, 6)
    assert [w for _, w in losses["chunks"]] == [False] * 6 and [w for _, w in losses["whole"]] == [True] * 6
    np.testing.assert_allclose([v for v, _ in losses["whole"]], [v for v, _ in losses["chunks"]], rtol=1e-4)
    whole = load_vae(tmp_path / "whole").state_dict()
    for name, value in load_vae(tmp_path / "chunks").state_dict().items():
        torch.testing.assert_close(whole[name], value, rtol=1e-3, atol=1e-5, msg=name)


def test_bad_settings_are_one_line(trees, tmp_path):
    with pytest.raises(SystemExit, match=r"^fourdnex.train.vae: num_frames must be 4k"):
        run(trainer.main, trainer.build_parser(), ["--data_dir", str(trees[0]), "--model_path", str(TINY),
                                                   "--out", str(tmp_path), "--num_frames", "6"])  # fmt: skip
    with pytest.raises(SystemExit, match=r"incomplete: model_index\.json is missing; build the model first"):
        run(trainer.main, trainer.build_parser(), ["--data_dir", str(trees[0]), "--model_path", str(tmp_path),
                                                   "--out", str(tmp_path), *SIZE])  # fmt: skip
    with pytest.raises(SystemExit, match="one of the two"):
        run(trainer.main, trainer.build_parser(), ["--data_dir", str(trees[0]), "--synthetic_clips", "4",
                                                   "--model_path", str(TINY), "--out", str(tmp_path)])  # fmt: skip


def synthetic(out: Path, *more: str) -> dict:
    """A run on generator clips rendered in memory, held out of two families, with a curve point every 2 steps."""
    args = ["--synthetic_clips", "4", "--eval_synthetic_clips", "2", "--texture_families", "checkers", "plain"]
    args += ["--eval_steps", "2", "--model_path", TINY, "--out", out, *SIZE, "--batch_size", "2"]
    args += ["--warmup_steps", "2", "--checkpointing_steps", "100", "--device", "cpu", "--workers", "2", *more]
    run(trainer.main, trainer.build_parser(), list(map(str, args)))
    return json.loads((out / "metrics.json").read_text())


def test_generator_clips_a_learning_curve_and_time_bounded_chunks(tmp_path):
    """Generator clips need no files: the curve has the PSNR of held-out clips of the training families and of the
    families left out at every point; a run stopped after its time resumes where it stopped, ending exactly where an
    uninterrupted run ends."""
    whole = synthetic(tmp_path / "whole", "--max_steps", "4")
    assert whole["finished"] and whole["train_clips"] == 4 and whole["held_out_clips"] == 2
    assert [p["step"] for p in whole["curve"]] == [2, 4]
    assert set(whole["curve"][0]) == {"step", "clips_seen", "held_out_rgb", "held_out_xyz", "held_out_family_rgb",
                                      "held_out_family_xyz"}  # fmt: skip
    assert whole["held_out_family_psnr"]["rgb"] != whole["held_out_psnr"]["rgb"]
    # Clips of the families left out are those of the same seeds retextured: other pixels, the same geometry.
    held_in = trainer.synthetic_clips(2, 2, 5, 32, 48, ("checkers", "plain"), 1)
    held_out = trainer.synthetic_clips(2, 2, 5, 32, 48, ("stripes", "noise", "gradients"), 1)
    assert not np.array_equal(held_in.rgb, held_out.rgb) and np.array_equal(held_in.xyz, held_out.xyz)
    stopped = synthetic(tmp_path / "chunks", "--max_steps", "4", "--stop_after_minutes", "1e-6")
    assert not stopped["finished"] and stopped["steps"] == 2
    resumed = synthetic(tmp_path / "chunks", "--max_steps", "4")
    assert resumed["finished"] and [p["step"] for p in resumed["curve"]] == [2, 4]
    expected = load_vae(tmp_path / "whole").state_dict()
    for name, value in load_vae(tmp_path / "chunks").state_dict().items():
        assert torch.equal(value, expected[name]), name
