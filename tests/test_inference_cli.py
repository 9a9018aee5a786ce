"""inference.py end to end on the tiny model, and every kind of bad input (in-process: the script's own main and
command line through fourdnex.cli.run, which is what ``python inference.py`` runs)."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, TINY
from safetensors.torch import save_file

from fourdnex.files import read_video
from fourdnex.model.adapters import AdapterMeta, save_adapter

SMALL_FLAGS = ["--height", "32", "--width", "48", "--num_frames", "5", "--steps", "2"]


sys.path.insert(0, str(ROOT))
import inference  # noqa: E402  (the script, imported from the repository root)
from fourdnex.cli import run  # noqa: E402


def run_cli(*args):
    """Run inference.py's command line in this process: returncode 0, or 1 with the one-line message as stderr (an
    uncaught exception, i.e. a traceback, propagates and fails the test)."""
    try:
        run(inference.main, inference.build_parser(), [str(a) for a in args])
    except SystemExit as exit_:
        return SimpleNamespace(returncode=1 if exit_.code else 0, stderr=str(exit_.code or ""))
    return SimpleNamespace(returncode=0, stderr="")


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "\n" not in proc.stderr.strip()
    assert proc.stderr.startswith("inference.py: ")
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(ROOT / "example" / "scene.png", folder / "a.png")
    (folder / "b.png").write_bytes((ROOT / "example" / "scene.png").read_bytes())
    (folder / "images.txt").write_text("a.png\nb.png\n")
    (folder / "prompts.txt").write_text("a red ball rolls\n\na cat jumps onto a table\n")
    return folder


@pytest.fixture(scope="module")
def generated(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    proc = run_cli(
        "--prompt", inputs / "prompts.txt", "--image", inputs / "images.txt", "--out", out,
        "--model_path", TINY, *SMALL_FLAGS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_writes_every_output_with_documented_shapes(generated, inputs):
    names = sorted(p.name for p in generated.iterdir())
    expected = [f"{i:05d}{suffix}" for i in (0, 1) for suffix in (".json", ".mp4", ".npz", "_rgb.mp4", "_xyz.mp4")]
    assert names == sorted(expected)
    with np.load(generated / "00001.npz", allow_pickle=False) as data:
        assert data["rgb"].shape == (5, 32, 48, 3) and data["rgb"].dtype == np.uint8
        assert data["xyz"].shape == (5, 32, 48, 3) and data["xyz"].dtype == np.float32
        assert data["xyz"].min() >= -1 and data["xyz"].max() <= 1
        rgb = data["rgb"]
    side_by_side = read_video(generated / "00001.mp4")
    assert side_by_side.shape == (5, 32, 96, 3)
    assert read_video(generated / "00001_rgb.mp4").shape == (5, 32, 48, 3)
    assert np.abs(side_by_side[..., :48, :].astype(int) - rgb).mean() < 20  # lossy, but the same video
    meta = json.loads((generated / "00001.json").read_text())
    assert meta["prompt"] == "a cat jumps onto a table"
    assert meta["image"].endswith("b.png")
    assert (meta["seed"], meta["steps"], meta["guidance_scale"], meta["num_frames"]) == (42, 2, 5.0, 5)
    assert (meta["height"], meta["width"], meta["random_weights"]) == (32, 48, True)
    assert set(meta["timings"]) == {"load", "encode", "denoise", "decode"}
    assert meta["versions"]["diffusers"] == "0.42.1"


def test_literal_prompt_single_image_and_idx(tmp_path, inputs, generated):
    proc = run_cli(
        "--prompt", "a cat jumps onto a table", "--image", inputs / "b.png", "--out", tmp_path,
        "--model_path", TINY, *SMALL_FLAGS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "00000.npz") as single, np.load(generated / "00001.npz") as listed:
        assert np.array_equal(single["xyz"], listed["xyz"])  # same prompt, image and seed: same sample
    proc = run_cli(
        "--prompt", inputs / "prompts.txt", "--image", inputs / "images.txt", "--idx", 1, "--out", tmp_path / "one",
        "--model_path", TINY, *SMALL_FLAGS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "one").glob("*.npz")) == ["00001.npz"]


def test_both_adapter_formats_change_the_output(tmp_path, inputs, generated):
    g = torch.Generator().manual_seed(0)
    lora = {}
    for block in range(2):
        for attn in ("attn1", "attn2"):
            for name in ("to_q", "to_k", "to_v", "to_out.0"):
                lora[f"transformer.blocks.{block}.{attn}.{name}.lora_A.weight"] = torch.randn(4, 24, generator=g)
                lora[f"transformer.blocks.{block}.{attn}.{name}.lora_B.weight"] = torch.randn(24, 4, generator=g)
    released = tmp_path / "released"
    released.mkdir()
    save_file(lora, released / "pytorch_lora_weights.safetensors")
    torch.save(torch.randn(2, 24, generator=g), released / "learnable_domain_embeddings.pt")
    ours = save_adapter(
        tmp_path / "ours.safetensors", lora, torch.randn(2, 24, generator=g),
        AdapterMeta(rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"], xyz_latent_mean=0.0,
                    xyz_latent_std=1.0),
    )  # fmt: skip
    with np.load(generated / "00000.npz") as base:
        base_xyz = base["xyz"]
    for name, adapter in (("released", released), ("ours", ours)):
        proc = run_cli(
            "--prompt", inputs / "prompts.txt", "--image", inputs / "images.txt", "--idx", 0,
            "--out", tmp_path / name, "--model_path", TINY, "--lora_path", adapter, *SMALL_FLAGS,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        meta = json.loads((tmp_path / name / "00000.json").read_text())
        with np.load(tmp_path / name / "00000.npz") as data:
            assert np.abs(data["xyz"] - base_xyz).max() > 1e-3
        assert meta["lora_scale"] == (0.5 if name == "released" else 1.0)
        assert meta["xyz_latent_std"] == (1.7 if name == "released" else 1.0)


def test_bad_inputs_fail_with_one_line(tmp_path, inputs):
    out = tmp_path / "out"
    common = ["--out", out, "--model_path", TINY, *SMALL_FLAGS]
    prompts, images = inputs / "prompts.txt", inputs / "images.txt"
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "one.txt").write_text("a cat\n")
    cases = [
        (["--prompt", "x", "--image", tmp_path / "missing.png", *common], ["image", "missing.png", "does not exist"]),
        (["--prompt", "x", "--image", tmp_path / "broken.png", *common], ["broken.png", "cannot be read"]),
        (["--prompt", tmp_path / "one.txt", "--image", images, *common], ["1 prompts but 2 images"]),
        (["--prompt", prompts, "--image", images, "--idx", 7, *common], ["--idx 7 is out of range"]),
        (["--prompt", "x", "--image", inputs / "a.png", *common, "--num_frames", 48], ["4k+1", "48"]),
        (["--prompt", "x", "--image", inputs / "a.png", *common, "--height", 40], ["multiple of 16", "40"]),
        # no size given: 1500 x 1 pixels at the 480 x 720 area would be round(sqrt(345600 / 1500)) = 15 -> 0 rows
        (
            ["--prompt", "x", "--image", tmp_path / "thin.png", "--out", out, "--model_path", TINY, "--steps", 2],
            ["1500 x 1 image", "too narrow", "--height and --width"],
        ),
    ]
    PIL.Image.new("RGB", (1500, 1)).save(tmp_path / "thin.png")
    for args, fragments in cases:
        assert_one_line_error(run_cli(*args), *fragments)
    assert not out.exists()  # nothing written by any of them


def test_missing_or_incomplete_model_folder(tmp_path, inputs):
    common = ["--prompt", "x", "--image", inputs / "a.png", "--out", tmp_path / "out", *SMALL_FLAGS]
    proc = run_cli(*common, "--model_path", tmp_path / "nowhere")
    assert_one_line_error(proc, "does not exist", "hf download Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")
    partial = tmp_path / "partial"
    shutil.copytree(TINY, partial)
    (partial / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    proc = run_cli(*common, "--model_path", partial)
    assert_one_line_error(proc, "incomplete", "vae/diffusion_pytorch_model.safetensors", "hf download")
    assert not any((tmp_path / "out").iterdir())


def test_adapter_that_does_not_fit(tmp_path, inputs):
    folder = tmp_path / "wide"
    folder.mkdir()
    save_file(
        {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 5120),
         "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(5120, 4)},
        folder / "pytorch_lora_weights.safetensors",
    )  # fmt: skip
    common = ["--prompt", "x", "--image", inputs / "a.png", "--out", tmp_path / "out", "--model_path", TINY]
    proc = run_cli(*common, "--lora_path", folder, *SMALL_FLAGS)
    # The reference's own trainer writes no domain embedding file: said in one line, with the flag that accepts that.
    assert_one_line_error(proc, "learnable_domain_embeddings.pt is missing", "--zero_domain_embedding")
    proc = run_cli(*common, "--lora_path", folder, "--zero_domain_embedding", *SMALL_FLAGS)
    assert_one_line_error(proc, "blocks.0.attn1.to_q.lora_A.weight has shape (4, 5120), the model expects (4, 24)")
    assert not any((tmp_path / "out").iterdir())


def test_unwritable_out(tmp_path, inputs):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("--prompt", "x", "--image", inputs / "a.png", "--out", blocker / "sub", "--model_path", TINY)
    assert_one_line_error(proc, "cannot write to --out")


def test_out_of_memory_names_the_memory_options(tmp_path, inputs, monkeypatch):
    from fourdnex.errors import UsageError
    from fourdnex.generate.pipeline import FourDNeXPipeline

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(FourDNeXPipeline, "__call__", out_of_memory)
    args = inference.build_parser().parse_args(
        ["--prompt", "x", "--image", str(inputs / "a.png"), "--out", str(tmp_path), "--model_path", str(TINY),
         "--device", "cpu", *SMALL_FLAGS]
    )  # fmt: skip
    with pytest.raises(UsageError, match="out of GPU memory: try --dtype bfloat16"):
        inference.main(args)
    assert not any(tmp_path.iterdir())


def test_help_lists_the_reference_flags():
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--prompt", "--image", "--out", "--sft_path", "--type", "--mode", "--lora_path", "--lora_rank",
                 "--idx", "--model_path", "--lora_scale", "--num_frames", "--height", "--width", "--steps",
                 "--guidance_scale", "--negative_prompt", "--seed", "--device", "--dtype"):  # fmt: skip
        assert flag in proc.stdout
    assert os.linesep.join(["i2vwbw-demb-samerope"]) in proc.stdout


def test_model_type_comes_from_the_adapter_and_a_contradiction_is_one_line(tmp_path, inputs):
    g = torch.Generator().manual_seed(1)
    lora = {}
    for attn in ("attn1", "attn2"):
        lora[f"blocks.0.{attn}.to_q.lora_A.weight"] = torch.randn(4, 24, generator=g)
        lora[f"blocks.0.{attn}.to_q.lora_B.weight"] = torch.randn(24, 4, generator=g)
    meta = AdapterMeta(rank=4, alpha=4.0, target_modules=["to_q"], model_type="i2vwbw-demb")
    adapter = save_adapter(tmp_path / "demb.safetensors", lora, torch.randn(2, 24, generator=g), meta)
    common = ["--prompt", "x", "--image", inputs / "a.png", "--model_path", TINY, "--lora_path", adapter, *SMALL_FLAGS]
    assert run_cli(*common, "--out", tmp_path / "auto").returncode == 0
    assert json.loads((tmp_path / "auto" / "00000.json").read_text())["type"] == "i2vwbw-demb"
    assert run_cli(*common, "--out", tmp_path / "same", "--type", "i2vwbw-demb").returncode == 0
    with np.load(tmp_path / "auto" / "00000.npz") as a, np.load(tmp_path / "same" / "00000.npz") as b:
        assert np.array_equal(a["xyz"], b["xyz"])
    proc = run_cli(*common, "--out", tmp_path / "other", "--type", "i2vwbw-demb-samerope")
    assert_one_line_error(proc, "--type i2vwbw-demb-samerope contradicts", "trained as i2vwbw-demb")
    assert not (tmp_path / "other").exists()


def test_lines_shared_over_two_processes_equal_one_process(tmp_path, inputs):
    """torchrun without --cp: process r of 2 samples lines r, r + 2, ..., each exactly as one process does (with one
    CPU thread each, as torchrun sets for several processes, so both sum in the same order)."""
    (tmp_path / "prompts.txt").write_text("a red ball rolls\na cat jumps onto a table\na dog runs\n")
    (tmp_path / "images.txt").write_text(f"{inputs / 'a.png'}\n{inputs / 'b.png'}\n{inputs / 'a.png'}\n")

    def launch(processes: int, out, *extra) -> None:
        args = ["--prompt", tmp_path / "prompts.txt", "--image", tmp_path / "images.txt", "--out", out]
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
             str(ROOT / "inference.py"), *map(str, args), "--model_path", str(TINY), *SMALL_FLAGS, *extra],
            capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, one)
    two.mkdir()
    for suffix in (".npz", ".json"):  # line 0 is done: --skip_existing leaves it out
        shutil.copy(one / f"00000{suffix}", two / f"00000{suffix}")
    (two / "00002.npz").write_bytes(b"")  # a line killed before its .json was written is not done
    launch(2, two, "--skip_existing")
    assert not (two / "00000.mp4").exists()  # skipped: not generated again
    for index in (1, 2):
        with np.load(two / f"{index:05d}.npz") as a, np.load(one / f"{index:05d}.npz") as b:
            assert np.array_equal(a["xyz"], b["xyz"]) and np.array_equal(a["rgb"], b["rgb"])
        assert (
            json.loads((two / f"{index:05d}.json").read_text())["prompt"]
            == json.loads((one / f"{index:05d}.json").read_text())["prompt"]
        )


def test_video_and_frames_conditions(tmp_path, inputs, capsys):
    from fourdnex.files import write_video

    g = np.random.default_rng(0)
    clip = tmp_path / "clip.mp4"
    write_video(clip, g.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8))
    common = ["--prompt", "x", "--out", tmp_path / "out", "--model_path", TINY, *SMALL_FLAGS]
    assert run_cli(*common, "--video", clip).returncode == 0  # every frame given: 4D reconstruction
    assert "trained given frame 0 only" in capsys.readouterr().out  # the tiny model's weights record no any-frame
    meta = json.loads((tmp_path / "out" / "00000.json").read_text())
    assert meta["given_frames"] == [0, 1, 2, 3, 4] and meta["video"] == str(clip) and meta["image"] is None
    images = f"{inputs / 'a.png'},{inputs / 'b.png'}"
    assert run_cli(*common, "--image", images, "--frames", "0,4", "--idx", 0).returncode == 0  # first and last
    assert json.loads((tmp_path / "out" / "00000.json").read_text())["given_frames"] == [0, 4]
    cases = [
        (["--video", clip, "--frames", "0,5"], ["--frames must lie in 0..4", "5"]),
        (["--video", clip, "--frames", "3,1"], ["increasing order", "3,1"]),
        (["--video", clip, "--frames", "1,1"], ["a frame twice", "1,1"]),
        (["--video", clip, "--num_frames", 9], ["ends before frame 8", "clip.mp4"]),
        (["--image", images, "--frames", "0,2,4"], ["names 2 images for the 3 frames"]),
        (["--image", inputs / "a.png", "--video", clip], ["--image", "--video", "one of them"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(run_cli(*common, *args), *fragments)  # a later --num_frames wins
