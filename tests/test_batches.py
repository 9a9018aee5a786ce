"""Many lines in one batch (``inference.py --batch_size``): every line as it is sampled alone, up to the rounding of
batched float32 arithmetic; lines grouped by size and given frames; files, records, resuming and torchrun's shares
as at batch 1."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL, TINY

from fourdnex.generate.config import RunConfig, SampleConfig
from fourdnex.generate.run import Job, batches, load_model, sample_batch, sample_job

sys.path.insert(0, str(ROOT))
import inference
from fourdnex.cli import run

#: Measured on this 2-core CPU (float32, the tiny model, 3 steps, 1 and 2 threads): a line sampled in a batch of 3
#: differs from the same line sampled alone by at most 3.4e-6 in its final latents (whose values reach 4.7) and
#: 1.9e-6 in its videos, where the latents of different lines differ by more than 0.27. The tolerance leaves a 30x
#: margin for the kernels of other CPUs.
TOLERANCE = 1e-4
SMALL_FLAGS = ["--height", "32", "--width", "48", "--num_frames", "5", "--steps", "2"]
PROMPTS = ["a red ball rolls", "a cat jumps onto a table", "a dog runs", "a box slides", "the camera turns"]


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_cli(*args):
    """inference.py's command line in this process: returncode 0, or 1 with the one-line message as stderr."""
    try:
        run(inference.main, inference.build_parser(), [str(a) for a in args])
    except SystemExit as exit_:
        return SimpleNamespace(returncode=1 if exit_.code else 0, stderr=str(exit_.code or ""))
    return SimpleNamespace(returncode=0, stderr="")


@pytest.fixture(scope="module")
def images(example_image):
    """Three different conditions: the scene, mirrored, upside down."""
    return [example_image, example_image.transpose(0), example_image.rotate(180)]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # frame 0 given, RGB | XYZ, guidance 5: two transformer calls of batch 3 per step
        {"modalities": "xyz", "guidance_scale": 1.0, "num_frames": 9, "given_frames": [0, 8]},
    ],
    ids=["image-guided", "first-last-xyz"],
)
def test_a_batch_equals_its_samples_one_by_one(tiny_pipe, images, settings):
    settings = {**SMALL, **settings}
    conditions = [[image, image.transpose(1)] for image in images] if "given_frames" in settings else images
    prompts = PROMPTS[:3]
    seen = []

    def step_done(pipe, step, timestep, kwargs):
        seen.append(kwargs["latents"].shape)
        return kwargs

    batch = tiny_pipe(
        conditions, prompts, generator=[torch.Generator().manual_seed(42) for _ in prompts],
        callback_on_step_end=step_done, **settings,
    )  # fmt: skip
    width = 6 if settings.get("modalities") == "xyz" else 12
    assert seen == [(3, 16, (settings["num_frames"] - 1) // 4 + 1, 4, width)] * SMALL["num_inference_steps"]
    assert batch.rgb.shape == batch.xyz.shape == (3, settings["num_frames"], 32, 48, 3)
    for i in range(3):
        alone = tiny_pipe(conditions[i], prompts[i], generator=torch.Generator().manual_seed(42), **settings)
        for name in ("latents", "rgb", "xyz"):
            assert largest_difference(getattr(batch, name)[i], getattr(alone, name)[0]) < TOLERANCE, (i, name)
    # The rows are three samples (other images and captions, the same noise), their latents far apart beside the
    # tolerance.
    assert min(largest_difference(batch.latents[i], batch.latents[j]) for i, j in ((0, 1), (1, 2), (0, 2))) > 0.1


def test_a_batch_that_does_not_fit_together_is_refused(tiny_pipe, images):
    with pytest.raises(ValueError, match="2 prompts but 3 conditions"):
        tiny_pipe(images, PROMPTS[:2], **SMALL)
    with pytest.raises(ValueError, match="2 generators for 3 samples"):
        tiny_pipe(images, PROMPTS[:3], generator=[torch.Generator(), torch.Generator()], **SMALL)
    # Every sample of a batch has the given frames of the call: a sample with other frames is refused.
    mixed = [images[0], [images[1], images[2]], images[2]]
    with pytest.raises(ValueError, match=r"2 images for the 1 given frames \[0\] \(sample 1\)"):
        tiny_pipe(mixed, PROMPTS[:3], **SMALL)


def test_the_vae_takes_a_batch_in_parts_of_vae_call_pixels(tiny_pipe, images, monkeypatch):
    from fourdnex.generate import pipeline

    calls = {"encode": [], "decode": []}
    for name in calls:
        method = getattr(tiny_pipe.vae, name)

        def counted(x, *args, _method=method, _name=name, **kwargs):
            calls[_name].append(x.shape[0])
            return _method(x, *args, **kwargs)

        monkeypatch.setattr(tiny_pipe.vae, name, counted)
    generators = lambda: [torch.Generator().manual_seed(42) for _ in images]  # noqa: E731
    whole = tiny_pipe(images, PROMPTS[:3], generator=generators(), **SMALL)
    assert calls == {"encode": [3], "decode": [6]}  # the conditions in one call, the RGB and XYZ videos in one
    # Room for two decoded videos (5 x 32 x 48) per call: the fused conditions (5 x 32 x 96) go one by one, and so do
    # the samples, each one's two videos together.
    monkeypatch.setattr(pipeline, "VAE_CALL_PIXELS", 2 * 5 * 32 * 48)
    calls = {"encode": [], "decode": []}
    parts = tiny_pipe(images, PROMPTS[:3], generator=generators(), **SMALL)
    assert calls == {"encode": [1, 1, 1], "decode": [2, 2, 2]}
    # Room for one (as for the paper's size): every video alone.
    monkeypatch.setattr(pipeline, "VAE_CALL_PIXELS", 5 * 32 * 48)
    calls = {"encode": [], "decode": []}
    alone = tiny_pipe(images, PROMPTS[:3], generator=generators(), **SMALL)
    assert calls["decode"] == [1] * 6
    for name in ("rgb", "xyz"):
        assert largest_difference(getattr(alone, name), getattr(whole, name)) < TOLERANCE
    for name in ("latents", "rgb", "xyz"):
        assert largest_difference(getattr(parts, name), getattr(whole, name)) < TOLERANCE


def test_memory_needs_count_the_videos_of_one_vae_call(tiny_pipe):
    from fourdnex.generate.acceleration import _DECODE_BYTES_PER_PIXEL, memory_needs
    from fourdnex.generate.pipeline import VAE_CALL_PIXELS

    pixels = VAE_CALL_PIXELS // 4  # four such videos per VAE call: two samples' RGB and XYZ
    one, four, eight = (memory_needs(tiny_pipe, tokens=10, pixels=pixels, batch=b)["none"] for b in (1, 4, 8))
    assert four - one == pytest.approx(2 * pixels * _DECODE_BYTES_PER_PIXEL, abs=4)  # two videos, then four
    assert eight == four  # the VAE takes four at a time; the tiny transformer's work is far below the decode
    largest = memory_needs(tiny_pipe, tokens=10, pixels=VAE_CALL_PIXELS, batch=2)["none"]
    assert largest - one == pytest.approx(2 * pixels * _DECODE_BYTES_PER_PIXEL, abs=4)  # a paper-size video alone


def job(index: int, frames=(0,), height=32, width=48) -> Job:
    images = tuple(ROOT / "example" / "scene.png" for _ in frames)
    return Job(index, PROMPTS[index % len(PROMPTS)], images, None, tuple(frames), height, width)


def test_batches_group_consecutive_lines_of_one_size_and_given_frames():
    jobs = [job(0), job(1), job(2, frames=(0, 4)), job(3, frames=(0, 4)), job(4), job(5, height=48, width=32), job(6)]
    indices = lambda groups: [[j.index for j in group] for group in groups]  # noqa: E731
    assert indices(batches(jobs, 8)) == [[0, 1], [2, 3], [4], [5], [6]]
    assert indices(batches(jobs, 1)) == [[i] for i in range(7)]
    same = [job(i) for i in range(5)]
    assert indices(batches(same, 2)) == [[0, 1], [2, 3], [4]]
    assert indices(batches(same, 9)) == [[0, 1, 2, 3, 4]]  # a batch size above the number of lines


def test_lines_of_mixed_given_frames_are_sampled_in_groups_as_alone():
    sample = SampleConfig(num_frames=5, height=32, width=48, steps=2, guidance_scale=5.0)
    model = load_model(RunConfig(prompt="x", image="x", model_path=str(TINY), device="cpu"), 100, 5 * 32 * 48)
    model.pipe.set_progress_bar_config(disable=True)
    jobs = [job(0), job(1), job(2, frames=(0, 4)), job(3)]
    groups = batches(jobs, 3)
    assert [len(group) for group in groups] == [2, 1, 1]
    for group in groups:
        result = sample_batch(model, group, sample)
        for row, line in enumerate(group):
            alone = sample_job(model, line, sample)
            assert largest_difference(result.xyz[row], alone.xyz[0]) < TOLERANCE
    with pytest.raises(ValueError, match="one batch needs one size and one set of given frames"):
        sample_batch(model, jobs[1:3], sample)


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """Five lines: three different images in turn, five captions."""
    folder = tmp_path_factory.mktemp("lists")
    from PIL import Image

    with Image.open(ROOT / "example" / "scene.png") as image:
        scene = image.convert("RGB")
    for name, picture in (("a", scene), ("b", scene.transpose(0)), ("c", scene.rotate(180))):
        picture.save(folder / f"{name}.png")
    (folder / "images.txt").write_text("a.png\nb.png\nc.png\na.png\nb.png\n")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


def list_flags(lists, out):
    return ["--prompt", lists / "prompts.txt", "--image", lists / "images.txt", "--out", out, "--model_path", TINY,
            *SMALL_FLAGS]  # fmt: skip


@pytest.fixture(scope="module")
def one_by_one(lists, tmp_path_factory):
    """The five lines at the default --batch_size 1."""
    out = tmp_path_factory.mktemp("one-by-one")
    proc = run_cli(*list_flags(lists, out))
    assert proc.returncode == 0, proc.stderr
    return out


def assert_as_alone(out, reference, index: int) -> None:
    """Line ``index`` of ``out`` is its batch-1 result up to the tolerance (its RGB, stored as uint8, within 1)."""
    with np.load(out / f"{index:05d}.npz") as batched, np.load(reference / f"{index:05d}.npz") as alone:
        assert np.abs(batched["xyz"] - alone["xyz"]).max() < TOLERANCE
        assert np.abs(batched["rgb"].astype(int) - alone["rgb"]).max() <= 1


def test_a_batch_writes_every_line_as_batch_1_does(lists, one_by_one, tmp_path):
    out = tmp_path / "batched"
    proc = run_cli(*list_flags(lists, out), "--batch_size", 8)  # more than the 5 lines: one batch of 5
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_by_one.iterdir())
    records = [json.loads((out / f"{i:05d}.json").read_text()) for i in range(5)]
    for i, record in enumerate(records):
        assert_as_alone(out, one_by_one, i)
        alone = json.loads((one_by_one / f"{i:05d}.json").read_text())
        assert (alone["batch_size"], record["batch_size"]) == (1, 5)
        different = {key for key in record if record[key] != alone[key]}
        assert different <= {"batch_size", "timings"}, different
        assert set(record["timings"]) == set(alone["timings"]) == {"load", "encode", "denoise", "decode"}
    # Each line records its share of the batch's seconds: the same share for all five.
    assert all(record["timings"] == records[0]["timings"] for record in records)


def test_skip_existing_with_batches_samples_only_the_lines_left(lists, one_by_one, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    for suffix in (".npz", ".json"):  # line 1 is done
        shutil.copy(one_by_one / f"00001{suffix}", out / f"00001{suffix}")
    (out / "00003.npz").write_bytes(b"")  # line 3 was killed before its .json was written: not done
    proc = run_cli(*list_flags(lists, out), "--batch_size", 3, "--skip_existing")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "00001.mp4").exists()  # line 1 was not sampled again
    sizes = {i: json.loads((out / f"{i:05d}.json").read_text())["batch_size"] for i in (0, 2, 3, 4)}
    assert sizes == {0: 3, 2: 3, 3: 3, 4: 1}  # the lines left, 0 2 3 4, in batches of 3
    for i in (0, 2, 3, 4):
        assert_as_alone(out, one_by_one, i)


def test_two_processes_batch_their_own_lines(lists, one_by_one, tmp_path):
    """torchrun without --cp: process r of 2 takes lines r, r + 2, ... and batches its own share."""
    out = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "inference.py"),
         *map(str, list_flags(lists, out)), "--batch_size", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = {i: json.loads((out / f"{i:05d}.json").read_text())["batch_size"] for i in range(5)}
    assert sizes == {0: 2, 2: 2, 4: 1, 1: 2, 3: 2}  # process 0: lines 0 2 | 4; process 1: lines 1 3
    for i in range(5):
        assert_as_alone(out, one_by_one, i)


@pytest.mark.parametrize("value", [0, -3])
def test_a_batch_size_below_1_is_one_line(lists, tmp_path, value):
    proc = run_cli(*list_flags(lists, tmp_path / "out"), "--batch_size", value)
    assert proc.returncode != 0
    assert proc.stderr == f"inference.py: --batch_size must be at least 1, got {value}"
    assert not (tmp_path / "out").exists()


def test_an_ensemble_writes_the_mean_of_its_members_xyz_and_the_first_ones_rgb(lists, one_by_one, tmp_path):
    """--ensemble 2 --batch_size 4: two lines (four samples) per pipeline call; each line's XYZ video is the mean of
    its results sampled alone with seeds 42 and 43 (two independent runs at batch 1), its RGB video the seed-42 one,
    its record says so."""
    seed_43 = tmp_path / "seed-43"
    proc = run_cli(*list_flags(lists, seed_43), "--seed", 43)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ensemble"
    proc = run_cli(*list_flags(lists, out), "--ensemble", 2, "--batch_size", 4)
    assert proc.returncode == 0, proc.stderr
    for i in range(5):
        xyz = [np.load(member / f"{i:05d}.npz")["xyz"].astype(np.float64) for member in (one_by_one, seed_43)]
        assert np.abs(xyz[0] - xyz[1]).max() > 0.05  # the members differ: their mean is not either of them
        with np.load(out / f"{i:05d}.npz") as result, np.load(one_by_one / f"{i:05d}.npz") as first:
            assert np.abs(result["xyz"] - np.mean(xyz, axis=0)).max() < TOLERANCE
            assert np.abs(result["rgb"].astype(int) - first["rgb"]).max() <= 1
        record = json.loads((out / f"{i:05d}.json").read_text())
        assert (record["ensemble"], record["seed"], record["batch_size"]) == (2, 42, 1 if i == 4 else 2)


def test_ensemble_members_split_over_calls_equal_their_samples_alone():
    """Two lines of an ensemble of 3 in calls of 4 samples (the second member of both lines and the first of each
    share a call): each line's XYZ is the mean of its three seeds' samples alone, its RGB and latents seed 42's."""
    model = load_model(RunConfig(prompt="x", image="x", model_path=str(TINY), device="cpu"), 100, 5 * 32 * 48, batch=4)
    model.pipe.set_progress_bar_config(disable=True)
    sample = SampleConfig(num_frames=5, height=32, width=48, steps=2, guidance_scale=1.0, ensemble=3)
    jobs = [job(0), job(1)]
    result = sample_batch(model, jobs, sample, rows_per_call=4)
    for row, line in enumerate(jobs):
        alone = [sample_job(model, line, dataclasses.replace(sample, ensemble=1, seed=42 + m)) for m in range(3)]
        mean = torch.stack([member.xyz[0].double() for member in alone]).mean(0)
        assert largest_difference(result.xyz[row], mean) < TOLERANCE
        assert largest_difference(result.xyz[row], alone[0].xyz[0]) > 0.01
        assert largest_difference(result.rgb[row], alone[0].rgb[0]) < TOLERANCE
        assert largest_difference(result.latents[row], alone[0].latents[0]) < TOLERANCE
    assert set(result.timings) == {"encode", "denoise", "decode"}


def test_an_ensemble_below_1_is_one_line(lists, tmp_path):
    proc = run_cli(*list_flags(lists, tmp_path / "out"), "--ensemble", 0)
    assert proc.returncode != 0
    assert proc.stderr == "inference.py: ensemble must be at least 1, got 0"
    assert not (tmp_path / "out").exists()
