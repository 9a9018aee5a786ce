"""bench/depth_probe.py on tiny synthetic trees: its floor against one computed here, its curve, its load report."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from bench.depth_probe import main, score
from fourdnex.data.synthetic import write_tree
from fourdnex.evaluation.truth import clip_sources, load_truth

SIZE = (32, 48)  # multiples of 16: the network's bottom is 2 x 3
TINY = ROOT / "example" / "tiny-wan-i2v"  # its VAE: 8x smaller latents
BROKEN = "dynamic/dynamic_3/10002"  # write_tree's clip 2, an .npz, overwritten with bytes no reader accepts


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    train = write_tree(root / "train", num_clips=6, num_frames=3, height=SIZE[0], width=SIZE[1], seed=1)
    held = write_tree(root / "held", num_clips=3, num_frames=3, height=SIZE[0], width=SIZE[1], seed=2)
    family = write_tree(
        root / "family", num_clips=2, num_frames=3, height=SIZE[0], width=SIZE[1], seed=2, families=("stripes",)
    )
    (train / f"{BROKEN}.npz").write_bytes(b"not an npz")
    return train, held, family, root


def _frame0_depths(data_dir, skip=()):
    """Frame 0's depth of every clip of a tree but ``skip``, in clip-id order, read here."""
    clips = clip_sources(data_dir)
    return np.stack([load_truth(data_dir, clips[c], 1, *SIZE).depth[0] for c in sorted(clips) if c not in skip])


def _median_scaled_errors(pred, true):
    """AbsRel and delta < 1.25 of one frame after scaling by median(true) / median(pred), written out."""
    valid = true > 0
    p, g = pred[valid].astype(np.float64), true[valid].astype(np.float64)
    p = p * (np.median(g) / np.median(p))
    return np.mean(np.abs(p - g) / g), np.mean(np.maximum(p / g, g / p) < 1.25)


def test_a_prediction_right_up_to_scale_scores_no_error():
    true = np.linspace(1.0, 9.0, 2 * 32 * 48, dtype=np.float32).reshape(2, 32, 48)
    true[0, :4] = 0  # undefined pixels are left out
    out = score(2 * true + (true == 0), true)  # the prediction's own where the truth has none
    assert out["absrel"] == pytest.approx([0, 0], abs=1e-12) and list(out["delta1"]) == [1, 1]


def test_the_probe_s_floor_curve_and_load_report(trees, capsys):
    """Two held-out sets, each scored on its own (named by their folders); the floor against one computed here."""
    train, held, family, root = trees
    steps, batch, every = 4, 2, 2
    out = root / "probe.json"
    result = main(
        ["--train", str(train), "--held_out", str(held), str(family), "--steps", str(steps), "--batch", str(batch),
         "--eval_every", str(every), "--device", "cpu", "--height", str(SIZE[0]), "--width", str(SIZE[1]),
         "--workers", "2", "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out

    # the broken clip is counted and named, in one line and in the JSON
    assert f"--train {train}: 5 of 6 clips loaded, 1 failed (first: {BROKEN}: " in printed
    assert result["train"]["loaded"] == 5 and [c for c, _ in result["train"]["failed"]] == [BROKEN]
    assert result["held_out"]["held"] == {"path": str(held), "clips": 3, "loaded": 3, "failed": []}
    assert result["held_out"]["family"]["loaded"] == 2

    # the mean-depth floor, computed here: each training frame over its median, averaged per pixel where defined
    train_depth = _frame0_depths(train, skip={BROKEN})
    normalized = [np.where(d > 0, d / np.median(d[d > 0]), np.nan) for d in train_depth]
    floor = np.nan_to_num(np.nanmean(normalized, axis=0), nan=1.0)
    sets = {"held": _frame0_depths(held), "family": _frame0_depths(family)}
    reports = {name: result["floor"]["held_out"][name] for name in sets} | {"train": result["floor"]["train"]}
    for name, depths in (*sets.items(), ("train", train_depth)):
        errors = np.array([_median_scaled_errors(floor, d) for d in depths])
        reported = reports[name]
        assert reported["absrel_mean"] == pytest.approx(errors[:, 0].mean(), rel=1e-6), name
        assert reported["absrel_median"] == pytest.approx(np.median(errors[:, 0]), rel=1e-6), name
        assert reported["delta1_mean"] == pytest.approx(errors[:, 1].mean(), rel=1e-6), name
    assert 0.05 < result["floor"]["held_out"]["held"]["absrel_mean"] < 1

    # the learning curve: one row per evaluation, in the JSON as returned, with the printed table
    curve = result["curve"]
    assert [(r["step"], r["samples"]) for r in curve] == [(2, 4), (4, 8)]
    for row in curve:
        for part in (row["train"], *row["held_out"].values()):
            assert 0 < part["absrel_mean"] < 10 and 0 <= part["delta1_mean"] <= 1
        assert list(row["held_out"]) == ["held", "family"]
        assert np.isfinite(row["running_loss"]) and row["elapsed_s"] > 0
    for name in sets:
        frames = [v["absrel"] for v in result["held_out_frames"][name].values()]
        assert len(frames) == len(sets[name])
        assert curve[-1]["held_out"][name]["absrel_mean"] == pytest.approx(np.mean(frames))
    written = json.loads(out.read_text())
    assert written["curve"] == curve and written["finished"] is True and result["finished"] is True
    assert "| held: AbsRel mean / median, δ<1.25 | family: AbsRel mean / median, δ<1.25 |" in printed
    assert "| 4 | 8 | " in printed and "| mean-depth floor | - | " in printed


def test_a_folder_without_clips_is_refused_in_one_line(trees, tmp_path):
    train, *_ = trees
    with pytest.raises(SystemExit) as stop:
        main(["--train", str(train), "--held_out", str(tmp_path), "--device", "cpu", "--workers", "1", "--height", "32",
              "--width", "48"])  # fmt: skip
    assert str(stop.value).startswith(f"--held_out {tmp_path}: no clips under")


def test_the_latent_view_is_the_vae_s_own_encoding_of_each_frame_and_its_mirror(trees):
    """--vae_from: each frame and its mirror image encoded one at a time by diffusers' VAE here, and the input the
    network reads: those latents repeated over each latent pixel's 8 x 8 image pixels."""
    from diffusers import AutoencoderKLWan

    from bench.depth_probe import Inputs, encode_frames

    train, *_ = trees
    clips = clip_sources(train)
    rgb = np.stack([load_truth(train, clips[c], 1, *SIZE).rgb[0] for c in sorted(clips)[:3]])
    latents = encode_frames(TINY, rgb, torch.device("cpu"), batch=2)  # batches of 2 and 1
    vae = AutoencoderKLWan.from_pretrained(TINY / "vae", dtype=torch.float32).eval()
    for n, frame in enumerate(rgb):
        for side, image in enumerate((frame, frame[:, ::-1])):
            pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
            with torch.no_grad():
                expected = vae.encode(pixels).latent_dist.mode()[0, :, 0]
            torch.testing.assert_close(latents[n, side], expected, atol=1e-5, rtol=1e-4)
    inputs = Inputs(torch.from_numpy(rgb), latents)
    x = inputs.take(torch.tensor([2, 0]), torch.tensor([True, False]))
    assert x.shape == (2, latents.shape[2], *SIZE)
    torch.testing.assert_close(x[0], latents[2, 1].repeat_interleave(8, 1).repeat_interleave(8, 2))
    torch.testing.assert_close(x[1], latents[0, 0].repeat_interleave(8, 1).repeat_interleave(8, 2))


def test_the_pooled_view_is_each_frame_s_block_means_repeated(trees, capsys):
    """--pool 8: the input of each frame (and of its mirror image) is the mean of each 8 x 8 block of its pixels in
    [-1, 1], computed here in NumPy, over the block's 64 pixels; a whole run reads it so."""
    from bench.depth_probe import Inputs, pool_frames

    train, held, *_ = trees
    clips = clip_sources(train)
    rgb = np.stack([load_truth(train, clips[c], 1, *SIZE).rgb[0] for c in sorted(clips)[:2]])
    inputs = Inputs(torch.from_numpy(rgb), pool_frames(rgb, 8, torch.device("cpu")))
    x = inputs.take(torch.tensor([1, 0]), torch.tensor([True, False])).numpy()
    for row, (n, mirrored) in enumerate(((1, True), (0, False))):
        image = rgb[n, :, ::-1] if mirrored else rgb[n]
        means = (image.astype(np.float64) / 127.5 - 1).reshape(SIZE[0] // 8, 8, SIZE[1] // 8, 8, 3).mean((1, 3))
        expected = means.repeat(8, 0).repeat(8, 1).transpose(2, 0, 1)
        np.testing.assert_allclose(x[row], expected, atol=1e-5)
    result = main(
        ["--train", str(train), "--held_out", str(held), "--steps", "2", "--batch", "2", "--device", "cpu",
         "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--workers", "1", "--pool", "8"]
    )  # fmt: skip
    assert "read as pixels averaged over 8 x 8 blocks:" in capsys.readouterr().out and len(result["curve"]) == 2
    with pytest.raises(SystemExit, match=r"^--pool 8: give it without --vae_from"):
        main(["--train", str(train), "--held_out", str(held), "--device", "cpu", "--pool", "8", "--vae_from", str(TINY),
              "--height", str(SIZE[0]), "--width", str(SIZE[1])])  # fmt: skip


def test_the_probe_reads_through_a_vae(trees, capsys):
    train, held, *_ = trees
    result = main(
        ["--train", str(train), "--held_out", str(held), "--steps", "2", "--batch", "2", "--device", "cpu",
         "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--workers", "1", "--vae_from", str(TINY)]
    )  # fmt: skip
    assert f"read through the VAE of {TINY}:" in capsys.readouterr().out
    assert result["args"]["vae_from"] == str(TINY) and len(result["curve"]) == 2


def test_the_json_holds_the_curve_at_every_evaluation(trees, monkeypatch):
    """A run cut short keeps its numbers: --json is rewritten at each evaluation, marked finished at the last."""
    import bench.depth_probe as probe

    train, held, _, root = trees
    snapshots = []
    write = probe.write_json

    def record(path, obj):
        snapshots.append(json.loads(json.dumps(obj)))
        write(path, obj)

    monkeypatch.setattr(probe, "write_json", record)
    out = root / "cut.json"
    main(
        ["--train", str(train), "--held_out", str(held), "--steps", "6", "--batch", "2", "--eval_every", "2",
         "--device", "cpu", "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--workers", "1", "--json", str(out)]
    )  # fmt: skip
    assert [([r["step"] for r in s["curve"]], s["finished"]) for s in snapshots] == [
        ([2], False),
        ([2, 4], False),
        ([2, 4, 6], True),
    ]
    assert json.loads(out.read_text()) == snapshots[-1]
    first = snapshots[0]["held_out_frames"]["held"]
    assert len(first) == 3 and np.mean([v["absrel"] for v in first.values()]) == pytest.approx(
        snapshots[0]["curve"][0]["held_out"]["held"]["absrel_mean"]
    )
