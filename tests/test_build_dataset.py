"""build_wan_dataset.py with the tiny model on synthetic 4DNeX-10M trees: formats, shapes, geometry, stats, shards,
failures and re-runs."""

import csv
import importlib.util
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from fourdnex.cli import run
from fourdnex.data import cache, prepare, sources
from fourdnex.data.build import BuildConfig, Encoders, build, merge_shards
from fourdnex.data.cache import read_stats
from fourdnex.data.synthetic import render_scene, write_captions, write_dynamic_npz, write_static_npz, write_tree
from fourdnex.errors import UsageError
from fourdnex.files import write_video
from fourdnex.geometry.cameras import umeyama
from fourdnex.geometry.registration import register

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "example" / "tiny-wan-i2v")
SOURCE = (7, 40, 64)  # frames (padded to 9 by playing backwards), height, width of the synthetic clips
RES = (32, 48)  # the cache's per-modality size
NATIVE = 20000  # a dynamic_3 clip at exactly the cache's size: no resampling, exact geometry
NATIVE_SEED = 77


def _add_caption(data_dir: Path, subset: str, number: int, caption: str) -> None:
    path = data_dir / "caption" / f"{subset}_with_caption_upload.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.append({"number": str(number), "caption": caption})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["number", "caption"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """One clip of every subset (40 x 64, 7 frames) plus a 9-frame 32 x 48 dynamic_3 clip."""
    root = tmp_path_factory.mktemp("synthetic")
    data_dir = write_tree(root, num_clips=5, num_frames=SOURCE[0], height=SOURCE[1], width=SOURCE[2], seed=1)
    scene = render_scene(NATIVE_SEED, 9, *RES)
    write_dynamic_npz(scene, data_dir / "dynamic" / "dynamic_3" / f"{NATIVE}.npz", "focal")
    _add_caption(data_dir, "dynamic_3", NATIVE, scene.caption)
    (data_dir / "dynamic" / "dynamic_3" / "preview.gif").write_bytes(b"GIF89a")  # not a clip: reported, not read
    return data_dir


@pytest.fixture(scope="module")
def encoders() -> Encoders:
    return Encoders.load(TINY, "cpu", torch.float32)


def _config(data_dir: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(
        data_dir=str(data_dir),
        out=str(out),
        model_path=TINY,
        num_frames=9,
        resolution_h=RES[0],
        resolution_w=RES[1],
        **kw,
    )


@pytest.fixture(scope="module")
def single(tree, tmp_path_factory) -> Path:
    """The whole tree built in one run through the command line's main()."""
    out = tmp_path_factory.mktemp("single")
    spec = importlib.util.spec_from_file_location("build_wan_dataset", ROOT / "build_wan_dataset.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--data_dir", str(tree), "--out", str(out), "--model_path", TINY, "--num_frames", "9"]
    args += ["--resolution_h", str(RES[0]), "--resolution_w", str(RES[1]), "--device", "cpu"]
    run(cli.main, cli.build_parser(), args)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_every_format_round_trips(single, tree):
    records = _records(single)
    assert {r["format"] for r in records} == {"monst3r", "dynamic_npz", "static_npz"}
    assert len(records) == 6 and (single / "failures.jsonl").read_text() == ""
    assert {r["reader"] for r in records} >= {"decord", "images", "npz"}
    prompts = (single / "prompts.txt").read_text().splitlines()
    videos = (single / "videos.txt").read_text().splitlines()
    assert prompts == [r["caption"] for r in records]  # as the reference writes it; inference adds the suffix
    assert all(r["prompt"] == r["caption"] + " POINTMAP_STYLE." for r in records)  # what UMT5 encoded
    assert videos == [r["files"]["video"] for r in records]
    for r in records:
        files = {k: single / v for k, v in r["files"].items()}
        lat = load_file(files["latents"])
        assert lat["rgb"].shape == lat["xyz"].shape == (16, 3, RES[0] // 8, RES[1] // 8)
        assert lat["cond"].shape == (16, 3, RES[0] // 8, 2 * RES[1] // 8)
        assert lat["cond_rgb"].shape == (16, 3, RES[0] // 8, RES[1] // 8)
        assert load_file(files["clip"])["clip_embeds"].shape == (17, 32)  # tiny CLIP: 4 x 4 patches + class token
        assert load_file(files["prompt"])["prompt_embeds"].shape == (512, 32)
        geo = load_file(files["pointmap"])
        assert geo["pointmap"].shape == (9, *RES, 3) and geo["pointmap"].abs().max() <= 1.0
        assert (
            geo["center"].shape == (9, 3)
            and geo["intrinsics"].shape == (9, 3, 3)
            and geo["cam2world"].shape == (9, 4, 4)
        )
        assert np.asarray(Image.open(files["first_frame"])).shape == (*RES, 3)
        for key in ("video", "pointmap_preview"):
            frames, _ = sources._read_video(files[key], list(range(9)))
            assert frames.shape == (9, *RES, 3)
        if r["source_frames"] == 7:  # padded by playing backwards
            assert geo["frame_indices"].tolist() == [0, 1, 2, 3, 4, 5, 6, 5, 4]
    stats = json.loads((single / "stats.json").read_text())
    assert stats["num_clips"] == 6 and stats["resolution_h"] == RES[0] and stats["num_frames"] == 9


def test_video_start_offset_and_rgb_order(single, tree):
    """A MonST3R clip's RGB starts at frame <start> of its video; image folders are read as RGB."""
    for r in _records(single):
        first = np.asarray(Image.open(single / r["files"]["first_frame"])).astype(np.float64)
        i = r["number"] - 10000  # write_tree numbers clip i 10000 + i and renders it from seed 1 * 100003 + i
        if r["format"] == "monst3r":
            start = int(r["id"].rsplit("_", 1)[1].split("-")[0])
            scene = render_scene(1 * 100003 + i, start + 2, *SOURCE[1:])
            crops = [
                prepare.cover_crop(torch.from_numpy(f).permute(2, 0, 1)[None].float(), *RES, "bilinear")[0]
                for f in scene.rgb
            ]
            errors = [np.abs(c[0].permute(1, 2, 0).numpy() - first).mean() for c in crops]
            assert int(np.argmin(errors)) == start
        if r["reader"] == "images":
            scene = render_scene(1 * 100003 + i, 1, *SOURCE[1:], dynamic=False)
            np.testing.assert_allclose(first.mean((0, 1)), scene.rgb[0].mean((0, 1)), atol=3.0)


def test_decord_fallback_reads_frames_by_index_through_pyav(tmp_path):
    """decord 0.6 cannot copy out 48 x 32 frames, so PyAV decodes them, frame for frame; at 64 x 40 both agree."""
    for (height, width), expected in (((32, 48), "pyav"), ((40, 64), "decord")):
        scene = render_scene(5, 9, height, width)
        path = tmp_path / f"{height}x{width}.mp4"
        write_video(path, scene.rgb)
        frames, reader = sources._read_video(path, [2, 3, 4])
        assert reader == expected and frames.shape == (3, height, width, 3) and frames.dtype == np.uint8
        errors = np.abs(frames[:, None].astype(int) - scene.rgb[None]).mean(axis=(2, 3, 4))  # (3, 9)
        assert errors.argmin(axis=1).tolist() == [2, 3, 4]
        # The same H.264 decode and RGB conversion (measured identical here); neighbouring frames differ by 10+.
        assert np.abs(sources._read_video_pyav(path, [2, 3, 4]).astype(int) - frames).mean() < 0.5
    with pytest.raises(sources.ClipError, match="ends before frame 9"):
        sources._read_video_pyav(path, [8, 9])
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(sources.ClipError, match=r"cannot decode video .*broken\.mp4"):
        sources._read_video_pyav(tmp_path / "broken.mp4", [0])


def test_without_decord_videos_are_read_by_pyav(tmp_path, monkeypatch):
    """Where decord is not installed, PyAV reads the frames (the same frames, recorded as the reader)."""
    scene = render_scene(5, 9, 40, 64)
    write_video(tmp_path / "clip.mp4", scene.rgb)
    with_decord, reader = sources._read_video(tmp_path / "clip.mp4", [1, 5])
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now fails
    without, fallback = sources._read_video(tmp_path / "clip.mp4", [1, 5])
    assert (reader, fallback) == ("decord", "pyav") and np.array_equal(without, with_decord)


def test_saved_normalization_recovers_metric_points(single):
    scene = render_scene(NATIVE_SEED, 9, *RES)
    record = next(r for r in _records(single) if r["number"] == NATIVE)
    geo = load_file(single / record["files"]["pointmap"])
    metric = prepare.metric_pointmap(geo["pointmap"].double().numpy(), geo["center"].numpy(), float(geo["scale"]))
    w2c0 = np.linalg.inv(scene.cam2world[0].astype(np.float64))
    truth = scene.points.astype(np.float64) @ w2c0[:3, :3].T + w2c0[:3, 3]
    lo, hi = np.percentile(truth.reshape(-1, 3), prepare.PERCENTILES, axis=0)  # --center clip: one box per clip
    inside = ((truth > lo) & (truth < hi)).all(-1)
    assert inside.mean() > 0.8
    assert (geo["center"] == geo["center"][0]).all() and (geo["half_range"] == geo["half_range"][0]).all()
    np.testing.assert_allclose(geo["center"][0].numpy(), (lo + hi) / 2, atol=1e-5 * float(geo["scale"]))
    scale = float(geo["scale"])
    err = np.abs(metric - truth)[inside].max()
    assert err < 1e-3 * scale  # float16 storage of values in [-1, 1]
    np.testing.assert_allclose(geo["cam2world0"].numpy(), scene.cam2world[0], atol=1e-6)
    np.testing.assert_allclose(geo["intrinsics"].numpy(), scene.K, rtol=1e-6)
    world = metric @ geo["cam2world0"].numpy()[:3, :3].T + geo["cam2world0"].numpy()[:3, 3]
    assert np.abs(world - scene.points)[inside].max() < 2e-3 * scale
    # In float64 (before storage) the round trip is exact, with either centring.
    lo_f = np.percentile(truth.reshape(9, -1, 3), prepare.PERCENTILES[0], axis=1)  # per frame
    for center, box_lo in (("clip", np.broadcast_to(lo, (9, 3))), ("per_frame", lo_f)):
        norm = prepare.fit_normalization(truth, center)
        normalized = prepare.normalize_pointmap(truth, norm)
        np.testing.assert_allclose(norm.center - norm.half_range, box_lo, atol=1e-12)
        kept = ((truth > norm.center[:, None, None] - norm.half_range[:, None, None]) &
                (truth < norm.center[:, None, None] + norm.half_range[:, None, None])).all(-1)  # fmt: skip
        restored = prepare.metric_pointmap(normalized, norm.center, norm.scale)
        np.testing.assert_allclose(restored[kept], truth[kept], atol=1e-9)
        assert np.abs(normalized).max() <= 1.0 + 1e-12


def test_cropped_intrinsics_match_the_cropped_pointmaps(single):
    """Every clip's metric points, seen from each frame's camera, project onto their pixels with the saved K."""
    v, u = np.meshgrid(np.arange(RES[0]) + 0.5, np.arange(RES[1]) + 0.5, indexing="ij")  # pixel centres
    for r in _records(single):
        geo = {k: t.double().numpy() for k, t in load_file(single / r["files"]["pointmap"]).items()}
        metric = prepare.metric_pointmap(geo["pointmap"], geo["center"], float(geo["scale"]))
        margin = 2.0**-10 * float(geo["scale"])  # float16 rounding of a clipped point can move it inside the box
        inside = np.abs(metric - geo["center"][:, None, None]) < geo["half_range"][:, None, None] - margin
        unclipped = inside.all(-1)
        assert unclipped.mean() > 0.8
        for f in (0, 8):
            cam_f = np.linalg.inv(geo["cam2world"][f]) @ geo["cam2world0"]
            p = metric[f] @ cam_f[:3, :3].T + cam_f[:3, 3]
            pix = p @ geo["intrinsics"][f].T
            du = pix[..., 0] / pix[..., 2] - u
            dv = pix[..., 1] / pix[..., 2] - v
            ok = unclipped[f]
            # Nearest sampling moves a point by up to half a source pixel (0.4 output pixels here); float16 storage
            # moves it by up to 2^-11 * scale in each axis, i.e. fx * 2^-11 * scale / z pixels.
            sampling = 0.4 if r["source_frames"] == 7 else 0.0
            storage = 2 * geo["intrinsics"][f][0, 0] * 2.0**-11 * float(geo["scale"]) / p[..., 2]
            tol = sampling + storage + 1e-6
            assert (np.abs(du) < tol)[ok].all() and (np.abs(dv) < tol)[ok].all(), (r["id"], f)
            if r["intrinsics_source"] == "fitted":
                assert r["format"] == "static_npz"


def test_fitted_intrinsics_recover_the_camera_from_every_fourth_pixel():
    height, width, step = 30, 45, prepare.FIT_STEP
    K = np.array(
        [[[52.0, 0.0, 21.0], [0.0, 49.0, 16.5], [0.0, 0.0, 1.0]], [[80.0, 0.0, 22.5], [0.0, 80.0, 15], [0, 0, 1]]]
    )
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    z = 2.0 + np.sin(u / 7.0) * np.cos(v / 5.0)  # any depths in front of the camera
    points = np.stack([np.stack([(u - k[0, 2]) / k[0, 0] * z, (v - k[1, 2]) / k[1, 1] * z, z], -1) for k in K])
    np.testing.assert_allclose(prepare.fit_intrinsics(points[:, ::step, ::step], step), K, atol=1e-9)


def test_stats_match_a_direct_computation(single):
    xyz = torch.stack([load_file(single / r["files"]["latents"])["xyz"].double() for r in _records(single)])
    stats = json.loads((single / "stats.json").read_text())
    assert stats["count"] == xyz.numel()
    assert stats["xyz_latent_mean"] == pytest.approx(xyz.mean().item(), rel=1e-10, abs=1e-12)
    assert stats["xyz_latent_std"] == pytest.approx(xyz.std(unbiased=False).item(), rel=1e-9)
    channel = xyz.transpose(0, 1).reshape(16, -1)
    np.testing.assert_allclose(stats["xyz_latent_channel_mean"], channel.mean(1).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["xyz_latent_channel_std"], channel.std(1, unbiased=False).numpy(), rtol=1e-8)


def test_shards_then_merge_equal_a_single_run(single, tree, encoders, tmp_path):
    first = build(_config(tree, tmp_path, num_tasks=2, task_idx=0), encoders, show_progress=False)
    assert not first.merged and first.pending == 3 and not (tmp_path / "manifest.jsonl").exists()
    second = build(_config(tree, tmp_path, num_tasks=2, task_idx=1), encoders, show_progress=False)
    assert second.merged and second.done == 6 and first.processed + second.processed == 6
    for name in ("manifest.jsonl", "prompts.txt", "videos.txt", "failures.jsonl", "stats.json", "build_config.json"):
        assert (tmp_path / name).read_text() == (single / name).read_text(), name
    (tmp_path / "manifest.jsonl").unlink()  # the explicit merge step writes the same lists again
    assert merge_shards(tree, tmp_path).done == 6
    assert (tmp_path / "manifest.jsonl").read_text() == (single / "manifest.jsonl").read_text()
    for r in _records(single):
        for key in ("latents", "clip", "prompt"):
            a, b = load_file(single / r["files"][key]), load_file(tmp_path / r["files"][key])
            assert all(torch.equal(a[k], b[k]) for k in a), (r["id"], key)


class _Counting:
    """Encoders that count their calls."""

    def __init__(self, encoders: Encoders):
        self.inner, self.calls = encoders, 0
        self.vae = encoders.vae

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def counted(*args, **kw):
            self.calls += 1
            return method(*args, **kw)

        return counted


def test_rerun_does_no_repeated_work(single, tree, encoders, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    counting = _Counting(encoders)
    summary = build(_config(tree, out), counting, show_progress=False)
    assert summary.processed == 0 and summary.skipped == 6 and counting.calls == 0 and summary.merged
    assert summary.ignored == ["dynamic/dynamic_3/preview.gif"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes  # nothing rewritten
    # A run killed mid-clip leaves no record (written last) and maybe a temporary file: only that clip is redone.
    victim = _records(single)[2]
    (out / "records" / f"{victim['id']}.json").unlink()
    (out / "latents" / f"{victim['id']}.safetensors").unlink()
    (out / "latents" / "dynamic" / ".x.partial.safetensors").write_bytes(b"half")
    summary = build(_config(tree, out), counting, show_progress=False)
    assert summary.processed == 1 and summary.skipped == 5 and summary.merged
    # VAE for RGB + XYZ, VAE for the fused condition, VAE for the RGB condition, CLIP; the prompt exists
    assert counting.calls == 4
    assert (out / "manifest.jsonl").read_text() == (single / "manifest.jsonl").read_text()


def _safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(path, "pt") as fh:
        return fh.metadata(), {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - not a dict


def test_worker_processes_and_one_process_write_the_same_files(single, tree, encoders, tmp_path):
    """The clips read, prepared and written by worker processes (the single run: 2 of them, through the command line)
    and by the encoders' own process (--num_workers 0) give the same files: images byte for byte, every tensor and
    metadata entry equal (safetensors orders its metadata by a per-process hash, so not its bytes). The mp4 files are
    left out: libx264 encodes the same frames differently from run to run whoever writes them (measured on the
    32 x 48 clip: decoded frames up to 16 levels apart in two of four builds, one process or several)."""
    summary = build(_config(tree, tmp_path, num_workers=0, limit=3), encoders, show_progress=False)
    assert summary.processed == 3 and summary.merged
    records = _records(tmp_path)
    assert records == _records(single)[:3]
    for r in records:
        for key, name in r["files"].items():
            ours, theirs = tmp_path / name, single / name
            if name.endswith(".safetensors"):
                (meta, tensors), (their_meta, their_tensors) = _safetensors(ours), _safetensors(theirs)
                assert meta == their_meta and tensors.keys() == their_tensors.keys(), (r["id"], key)
                assert all(torch.equal(tensors[k], their_tensors[k]) for k in tensors), (r["id"], key)
            elif not name.endswith(".mp4"):
                assert ours.read_bytes() == theirs.read_bytes(), (r["id"], key)


def test_bfloat16_encoders_are_recorded_and_close(single, tree, tmp_path):
    """--encoder_dtype bfloat16: recorded in build_config.json, every file keeps its float32 dtype, the latents stay
    within a few percent of the float32 build's (RMS over their spread), and a float32 cache refuses a bfloat16 run."""
    cfg = _config(tree, tmp_path, encoder_dtype="bfloat16", limit=2)
    summary = build(cfg, show_progress=False)  # loads the encoders itself, in bfloat16
    assert summary.processed == 2
    assert json.loads((tmp_path / "build_config.json").read_text())["encoder_dtype"] == "bfloat16"
    for r in _records(tmp_path):
        half, full = load_file(tmp_path / r["files"]["latents"]), load_file(single / r["files"]["latents"])
        for key in cache.LATENT_KEYS:
            assert half[key].dtype == torch.float32
            rms = (half[key] - full[key]).square().mean().sqrt() / full[key].std()
            assert 0 < rms < 0.05, (r["id"], key, rms.item())
        embeds = load_file(tmp_path / r["files"]["clip"])["clip_embeds"]
        assert embeds.dtype == torch.float32
    with pytest.raises(UsageError, match="'encoder_dtype': \\('float32', 'bfloat16'\\)"):
        build(_config(tree, single, encoder_dtype="bfloat16"), show_progress=False)


def test_broken_clips_are_recorded_and_the_rest_built(tree, encoders, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tree, data_dir)
    (data_dir / "raw" / "dynamic" / "dynamic_1" / "10000.mp4").write_bytes(b"not a video" * 100)
    depth_dir = data_dir / "dynamic" / "dynamic_2" / "10001_1-7"
    (depth_dir / "frame_0003.npy").unlink()
    npz = data_dir / "dynamic" / "dynamic_3" / f"{NATIVE}.npz"
    arrays = dict(np.load(npz))
    arrays["depths"][4, 3, 5] = np.nan
    np.savez(npz, **arrays)
    caption_file = data_dir / "caption" / "static_1_with_caption_upload.csv"
    caption_file.write_text("number,caption\n")
    truncated = data_dir / "static" / "static_2" / "10004.npz"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    out = tmp_path / "cache"
    summary = build(_config(data_dir, out), encoders, show_progress=False)
    assert summary.done == 1 and summary.failed == 5 and summary.merged
    assert "5 failed" in summary.line()
    failures = {json.loads(line)["id"]: json.loads(line)["reason"] for line in (out / "failures.jsonl").open()}
    assert re.search("cannot open video .*10000.mp4", failures["dynamic/dynamic_1/10000_0-6"])
    assert "missing ['frame_0003.npy']" in failures["dynamic/dynamic_2/10001_1-7"]
    assert "NaN" in failures[f"dynamic/dynamic_3/{NATIVE}"] and "frame 4" in failures[f"dynamic/dynamic_3/{NATIVE}"]
    assert "no caption for number 10003" in failures["static/static_1/10003"]
    assert "cannot read" in failures["static/static_2/10004"] and "10004.npz" in failures["static/static_2/10004"]
    assert [r["id"] for r in _records(out)] == ["dynamic/dynamic_3/10002"]
    again = build(_config(data_dir, out), encoders, show_progress=False)
    assert again.processed == 0 and again.failed_now == 0 and again.failed == 5


def test_a_pointmap_of_integers_is_refused(tree, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(tree, data_dir)
    npz = data_dir / "static" / "static_2" / "10004.npz"
    arrays = dict(np.load(npz))
    np.savez(npz, pts3d=arrays["pts3d"].astype(np.int32), poses=arrays["poses"])
    clip = {c.id: c for c in sources.find_clips(data_dir).clips}["static/static_2/10004"]
    with pytest.raises(sources.ClipError, match="pts3d must hold floating-point coordinates, not int32"):
        sources.read_clip(clip, sources.Captions(data_dir))


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Path:
    """Two MonST3R clips (frames 0-4 and 1-5 of their scenes) and a dynamic_3 clip, 5 frames of 24 x 32."""
    return write_tree(tmp_path_factory.mktemp("masked"), num_clips=3, num_frames=5, height=24, width=32)


def test_the_dynamic_mask_read_is_the_renderer_s(masked):
    clips = {c.id: c for c in sources.find_clips(masked).clips}
    captions = sources.Captions(masked)
    for seed, (clip_id, start) in enumerate((("dynamic/dynamic_1/10000_0-4", 0), ("dynamic/dynamic_2/10001_1-5", 1))):
        raw = sources.read_clip(clips[clip_id], captions)
        expected = render_scene(seed, start + 5, 24, 32).dynamic_mask[start:]  # the clip's frames of its scene
        assert raw.dynamic.dtype == bool and raw.dynamic.shape == (5, 24, 32)
        np.testing.assert_array_equal(raw.dynamic, expected)
        assert 0.01 < raw.dynamic.mean() < 0.5  # moving objects in view, not everywhere
    assert sources.read_clip(clips["dynamic/dynamic_3/10002"], captions).dynamic is None  # npz clips carry none


def test_a_bad_dynamic_mask_is_named_when_the_mask_is_read(masked, tmp_path):
    # the cache reads no mask: a clip whose masks are broken reads as before; its mask is a ClipError naming the file
    data_dir = tmp_path / "data"
    shutil.copytree(masked, data_dir)
    folder = data_dir / "dynamic" / "dynamic_1" / "10000_0-4"
    clip = {c.id: c for c in sources.find_clips(data_dir).clips}["dynamic/dynamic_1/10000_0-4"]
    before = sources.read_clip(clip, sources.Captions(masked))
    (folder / "dynamic_mask_2.png").unlink()
    cases = {
        f"dynamic mask {folder / 'dynamic_mask_2.png'} is missing": None,
        f"dynamic mask {folder / 'dynamic_mask_2.png'} is 10x12, the depth 24x32": np.zeros((10, 12), np.uint8),
        f"cannot read dynamic mask {folder / 'dynamic_mask_2.png'}": b"not a png",
    }
    for message, content in cases.items():
        if isinstance(content, bytes):
            (folder / "dynamic_mask_2.png").write_bytes(content)
        elif content is not None:
            Image.fromarray(content).save(folder / "dynamic_mask_2.png")
        raw = sources.read_clip(clip, sources.Captions(data_dir))
        np.testing.assert_array_equal(raw.depth, before.depth)
        with pytest.raises(sources.ClipError, match=re.escape(message)):
            _ = raw.dynamic


def test_cli_user_errors_are_one_line(single, tree):
    spec = importlib.util.spec_from_file_location("build_wan_dataset", ROOT / "build_wan_dataset.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    base = ["--data_dir", str(tree), "--out", str(single), "--model_path", TINY]
    with pytest.raises(SystemExit, match=r"^build_wan_dataset.py: task_idx must be in \[0, num_tasks\), got 2"):
        run(cli.main, cli.build_parser(), [*base, "--num_tasks", "2", "--task_idx", "2"])
    with pytest.raises(SystemExit, match="built with other settings"):
        run(cli.main, cli.build_parser(), [*base, "--resolution_h", "48", "--resolution_w", "48", "--num_frames", "9"])
    with pytest.raises(SystemExit, match="num_frames must be 4k\\+1"):
        run(cli.main, cli.build_parser(), [*base, "--num_frames", "10"])
    with pytest.raises(SystemExit, match="model folder /nonexistent does not exist"):
        args = ["--data_dir", str(tree), "--out", str(single.parent / "other"), "--model_path", "/nonexistent"]
        run(cli.main, cli.build_parser(), args)


# ---------------------------------------------------------------------------------------------------------------
# The nested layouts of the reference, the cache spec, and one centre per clip


@pytest.fixture(scope="module")
def nested(tmp_path_factory) -> Path:
    """Every nested layout in miniature (write_tree(layout="nested")), plus entries that fit no layout."""
    data_dir = write_tree(tmp_path_factory.mktemp("nested"), 5, *SOURCE, seed=2, layout="nested")
    misplaced = data_dir / "static" / "static_1" / "10003" / "deeper" / "frame_1-frame_7.npz"
    misplaced.parent.mkdir()
    shutil.copy(data_dir / "static" / "static_1" / "10003" / "frame_1-frame_7.npz", misplaced)
    (data_dir / "dynamic" / "dynamic_1" / "10000" / "notes").mkdir()  # a leaf folder with no range in its name
    (data_dir / "dynamic" / "dynamic_1" / "10000" / "notes" / "preview.gif").write_bytes(b"GIF89a")
    (data_dir / "static" / "static_2" / "preview.gif").write_bytes(b"GIF89a")
    return data_dir


@pytest.fixture(scope="module")
def nested_cache(nested, encoders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nested_cache")
    summary = build(_config(nested, out), encoders, show_progress=False)
    assert summary.done == 5 and summary.failed == 2 and summary.merged
    assert summary.ignored == ["static/static_2/preview.gif"]
    return out


def test_every_nested_layout_is_read_captioned_and_cached(nested, nested_cache):
    """Each layout the reference reads: the right caption id (the video or scene folder, not the file name), the
    RGB frames from the right source starting at the name's <start>, everything cached."""
    records = {r["id"]: r for r in _records(nested_cache)}
    expected = {  # id: (layout, RGB source, reader)
        "dynamic/dynamic_1/10000/part_1-7": ("monst3r_in_video_folder", "raw/dynamic/dynamic_1/10000", "decord"),
        "dynamic/dynamic_2/10001/part_2-8": ("monst3r_in_video_folder", "raw/dynamic/dynamic_2/10001", "decord"),
        "dynamic/dynamic_3/10002/frame_3-frame_9": ("dynamic_npz_in_video_folder", None, "npz"),
        "static/static_1/10003/frame_1-frame_7": (
            "static_npz_in_scene_folder",
            "raw/static/static_1/10003/images_4",
            "images",
        ),
        "static/static_2/group_0/10004/frame_2-frame_8": (
            "static_npz_in_video_folder",
            "raw/static/static_2/10004",
            "decord",
        ),
    }
    assert set(records) == set(expected)
    captions = {}
    for subset in sorted({r["subset"] for r in records.values()}):
        with open(nested / "caption" / f"{subset}_with_caption_upload.csv", newline="") as fh:
            captions |= {int(row["number"]): row["caption"] for row in csv.DictReader(fh)}
    for clip_id, (layout, rgb_source, reader) in expected.items():
        r = records[clip_id]
        start = int(re.search(r"_(\d+)-", clip_id)[1])
        number = int(clip_id.split("/")[-2])
        assert (r["layout"], r["rgb_source"], r["reader"], r["rgb_start"]) == (layout, rgb_source, reader, start)
        assert r["number"] == number and r["caption"] == captions[number] and r["source_frames"] == SOURCE[0]
        assert all((nested_cache / path).is_file() for path in r["files"].values())
        # The first cached frame is frame <start> of the scene, not frame 0.
        i = number - 10000
        scene = render_scene(2 * 100003 + i, start + 2, *SOURCE[1:], dynamic=not clip_id.startswith("static"))
        first = np.asarray(Image.open(nested_cache / r["files"]["first_frame"])).astype(np.float64)
        crops = [
            prepare.cover_crop(torch.from_numpy(f).permute(2, 0, 1)[None].float(), *RES, "bilinear")[0][0]
            for f in scene.rgb
        ]
        errors = [np.abs(c.permute(1, 2, 0).numpy() - first).mean() for c in crops]
        assert int(np.argmin(errors)) == start, (clip_id, errors)


def test_entries_that_fit_no_layout_are_failures_naming_the_layouts(nested_cache):
    failures = {f["id"]: f for f in map(json.loads, (nested_cache / "failures.jsonl").read_text().splitlines())}
    assert set(failures) == {"dynamic/dynamic_1/10000/notes", "static/static_1/10003/deeper/frame_1-frame_7"}
    folder = failures["dynamic/dynamic_1/10000/notes"]
    assert folder["layout"] is None and folder["format"] == "monst3r"
    assert folder["reason"].startswith("dynamic/dynamic_1/10000/notes/ fits no clip layout")
    assert "dynamic/<subset>/<video>_<start>-<end>/" in folder["reason"]
    assert "dynamic/{dynamic_1,dynamic_2}/<video>/<name>_<start>-<end>/" in folder["reason"]
    npz = failures["static/static_1/10003/deeper/frame_1-frame_7"]["reason"]
    assert npz.startswith("static/static_1/10003/deeper/frame_1-frame_7.npz fits no clip layout")
    forms = [layout.form for layout in sources.LAYOUTS if layout.kind == "static"]
    assert len(forms) == 3 and all(form in npz for form in forms)


def test_discovery_rules(tmp_path):
    """Ranges as the reference parses them (a .png after a number included), one layout per entry, subsets named
    by the nested rules only, and two entries that would share an id refused."""
    entries = [
        "dynamic/dynamic_3/20001/frame_0.png-frame_8.png.npz",
        "dynamic/dynamic_2/20002/clip_a_3-11/",
        "dynamic/dynamic_3/20003/clip_3-11/",
        "static/static_9/20004/frame_0-frame_8.npz",
        "static/static_1/20005.npz",
        "static/static_1/20005/",
        "dynamic/dynamic_1/20006_0-8.npz",
        "dynamic/dynamic_1/20006_0-8/",
    ]
    for entry in entries:
        path = tmp_path / entry
        if entry.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    clips = {c.id: c for c in sources.find_clips(tmp_path).clips}
    png = clips["dynamic/dynamic_3/20001/frame_0.png-frame_8.png"]
    assert (png.layout, png.video, png.start, png.length, png.problem) == (
        "dynamic_npz_in_video_folder",
        "20001",
        0,
        9,
        None,
    )
    named = clips["dynamic/dynamic_2/20002/clip_a_3-11"]
    assert (named.layout, named.video, named.rgb, named.start, named.length) == (
        "monst3r_in_video_folder",
        "20002",
        "raw/dynamic/dynamic_2/20002",
        3,
        9,
    )
    assert "fits no clip layout" in clips["dynamic/dynamic_3/20003/clip_3-11"].problem  # MonST3R folders: dynamic_1/2
    assert "fits no clip layout" in clips["static/static_9/20004/frame_0-frame_8"].problem  # nested: static_1/2 only
    assert set(clips) == {entry.removesuffix("/").removesuffix(".npz") for entry in entries}
    assert clips["static/static_1/20005"].layout == "static_npz"  # the npz; the empty folder under static/ is no entry
    same = clips["dynamic/dynamic_1/20006_0-8"].problem
    assert same == (
        "dynamic/dynamic_1/20006_0-8.npz and dynamic/dynamic_1/20006_0-8/ map to the same clip id "
        "dynamic/dynamic_1/20006_0-8"
    )


def test_a_range_that_disagrees_with_the_frames_is_a_failure(tree, encoders, tmp_path):
    """MonST3R folder names are inclusive (the reference's rule): an exclusive name, or an npz holding other frames
    than its name says, is refused with both numbers, never guessed."""
    data_dir = tmp_path / "data"
    shutil.copytree(tree, data_dir)
    monst3r = data_dir / "dynamic" / "dynamic_1" / "10000_0-6"
    monst3r.rename(monst3r.with_name("10000_0-7"))  # 7 depth files, exclusive end
    nested_npz = data_dir / "dynamic" / "dynamic_3" / "20000" / "frame_0-frame_4.npz"  # holds 9 frames
    nested_npz.parent.mkdir()
    (data_dir / "dynamic" / "dynamic_3" / f"{NATIVE}.npz").rename(nested_npz)
    out = tmp_path / "cache"
    summary = build(_config(data_dir, out), encoders, show_progress=False)
    assert summary.failed == 2 and summary.done == 4
    failures = {json.loads(line)["id"]: json.loads(line)["reason"] for line in (out / "failures.jsonl").open()}
    assert "range 0-7 is 8 frames (inclusive) but it holds 7 depth files" in failures["dynamic/dynamic_1/10000_0-7"]
    assert (
        "range 0-4 is 5 frames (inclusive) but it holds 9 frames" in failures["dynamic/dynamic_3/20000/frame_0-frame_4"]
    )


def _spec_pattern(path: str) -> re.Pattern:
    """A cache spec path (with <id> and <sha256>) as a regular expression."""
    return re.compile(re.escape(path).replace("<id>", ".+").replace("<sha256>", "[0-9a-f]{64}"))


def test_written_cache_is_exactly_the_spec(nested_cache):
    """Files, tensors, metadata, manifest, stats, build-config and failure keys written are those cache.FILES lists."""
    out = nested_cache
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    matched = {f.path: [p for p in written if _spec_pattern(f.path).fullmatch(p)] for f in cache.FILES}
    assert all(matched.values()), [path for path, files in matched.items() if not files]
    assert sorted(p for files in matched.values() for p in files) == written  # nothing unlisted, nothing twice
    config = json.loads((out / "build_config.json").read_text())
    assert list(config) == [k.name for k in cache.BUILD_CONFIG_KEYS]
    assert list(json.loads((out / "stats.json").read_text())) == [k.name for k in cache.STATS_KEYS]
    records = _records(out)
    for r in records:
        assert sorted(r) == sorted(k.name for k in cache.MANIFEST_KEYS)
        assert list(json.loads((out / "records" / f"{r['id']}.json").read_text())) == [
            k.name for k in cache.MANIFEST_KEYS
        ]
        assert sorted(r["files"]) == sorted(cache.CLIP_FILES)
        for key, spec in cache.CLIP_FILES.items():
            assert _spec_pattern(spec.path).fullmatch(r["files"][key])
            if not spec.tensors:
                continue
            with safe_open(out / r["files"][key], "pt") as fh:
                assert sorted(fh.keys()) == sorted(t.name for t in spec.tensors), key
                assert sorted(fh.metadata() or {}) == sorted(m.name for m in spec.metadata), key
                for t in spec.tensors:
                    dtype = config["text_encoder_dtype"] if t.dtype == "text encoder" else t.dtype
                    assert str(fh.get_tensor(t.name).dtype) == f"torch.{dtype}", (key, t.name)
    for line in (out / "failures.jsonl").read_text().splitlines():
        assert list(json.loads(line)) == sorted(k.name for k in cache.FAILURE_KEYS)  # jsonl lines sort their keys
    for path in (out / "failures").rglob("*.json"):
        assert list(json.loads(path.read_text())) == [k.name for k in cache.FAILURE_KEYS]


def _readme_table(heading: str) -> list[str]:
    """The markdown table right under ``heading`` in README.md, as lines."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    return [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[first:])]


def test_readme_tables_are_the_spec():
    """The README's cache-layout table lists exactly the spec's files (and is its rendering); its input table is
    the rendering of the discovery's layouts."""
    table = _readme_table("### Cache layout")
    files = [row.split("|")[1].strip().strip("`") for row in table[2:]]
    assert files == [f.path for f in cache.FILES]
    assert "\n".join(table) == cache.markdown_table()
    assert "\n".join(_readme_table("### Clip layouts")) == sources.layouts_markdown()


@pytest.mark.parametrize("seed", [0, 2])  # a field with the camera trucking sideways, a room with a dolly-in
def test_one_centre_per_clip_keeps_the_camera_path(seed, encoders, tmp_path):
    """A static scene with known cameras goes through the build; pm_registration's fit on the cached pointmap
    recovers the camera centres (Sim(3)-aligned to the truth in the first camera's frame) within 1 % of the path
    with --center clip. With --center per_frame each frame's own centre shifts static points between frames, which
    registration reads as camera motion: the error is many times larger (measured: 0.09 % vs 7.9 % for seed 0,
    0.13 % vs 11.4 % for seed 2)."""
    frames, height, width = 17, 48, 64
    scene = render_scene(seed, frames, height, width, dynamic=False)
    data_dir = tmp_path / "data"
    write_static_npz(scene, data_dir / "static" / "static_1" / "500.npz", data_dir / "raw/static/static_1/500.mp4")
    write_captions(data_dir / "caption" / "static_1_with_caption_upload.csv", {500: scene.caption})
    c2w = scene.cam2world.astype(np.float64)
    truth = torch.from_numpy((np.linalg.inv(c2w[0]) @ c2w)[:, :3, 3])  # (F, 3) centres in the first camera's frame
    path_length = float((truth[1:] - truth[:-1]).norm(dim=-1).sum())
    errors = {}
    for center in ("clip", "per_frame"):
        out = tmp_path / center
        cfg = BuildConfig(str(data_dir), str(out), TINY, frames, resolution_h=height, resolution_w=width, center=center)
        assert build(cfg, encoders, show_progress=False).done == 1
        record = _records(out)[0]
        pointmap = load_file(out / record["files"]["pointmap"])["pointmap"].float()  # (F, H, W, 3) as cached
        centres = register(pointmap).cam2world[:, :3, 3].double()
        scale, rotation, shift = umeyama(centres, truth)
        errors[center] = float((scale * centres @ rotation.T + shift - truth).norm(dim=-1).max()) / path_length
        assert json.loads((out / "stats.json").read_text())["center"] == center
        assert read_stats(out).center == center
    assert errors["clip"] < 0.01, errors
    assert errors["per_frame"] > 0.05 and errors["per_frame"] > 50 * errors["clip"], errors


def test_channels_last_convolutions_keep_the_encoding():
    """The build's GPU layout for the VAE (channels-last 3D convolution weights) changes the memory order only: every
    3D convolution weight is in that layout, and the tiny VAE encodes a video to the same latents (float32)."""
    from fourdnex.model.fusion import encode_latents
    from fourdnex.model.loading import channels_last_convolutions, load_vae

    video = torch.rand(2, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = load_vae(TINY).eval()
    with torch.no_grad():
        before = encode_latents(vae, video)
        channels_last_convolutions(vae)
        after = encode_latents(vae, video)
    convolutions = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convolutions and all(
        m.weight.is_contiguous(memory_format=torch.channels_last_3d) and not m.weight.is_contiguous()
        for m in convolutions
        if m.weight[0, 0].numel() > 1
    )
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5) and before.abs().max() > 0.1


def test_the_benchmark_s_vae_variants_table(tmp_path):
    """bench_dataset.py --vae_variants times each variant of the VAE and reports how far its latents are from the
    first row's: channels-last weights, each layer over the whole clip and the conditions' zero frames skipped, on a
    CPU in float32, move them by rounding only; bfloat16 by its own rounding."""
    table = tmp_path / "variants.json"
    args = ["--vae_variants", "--device", "cpu", "--model_path", TINY, "--num_frames", "25", "--height", "32"]
    args += ["--width", "48", "--variants", "fp32,fp32+channels_last,fp32+whole_clip,fp32+zero_tail,bf16"]
    args += ["--repeats", "1", "--json", str(table)]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dataset.py"), *args], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = json.loads(table.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "fp32+channels_last", "fp32+whole_clip", "fp32+zero_tail", "bf16"]
    assert rows[0]["max_abs_dev_over_std"] == 0 and max(r["max_abs_dev_over_std"] for r in rows[1:4]) < 1e-5
    assert 1e-4 < rows[4]["max_abs_dev_over_std"] < 0.2
    assert all(r["seconds"] > 0 and r["flops_per_second"] > 0 for r in rows)


@pytest.mark.parametrize("cond_frames", [5, 9])
def test_the_benchmark_s_vae_floor_counts_what_the_build_encodes(encoders, cond_frames):
    """bench_dataset.py's floor counts the VAE FLOPs of one clip as the build spends them: torch's FLOP counter around
    the build's own encode_batch (RGB and XYZ videos, fused and RGB conditions) gives the bench's count, both on the
    meta device."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    from bench.bench_dataset import vae_flops
    from fourdnex.data.build import encode_batch
    from fourdnex.model.whole_clip import whole_clip_vae

    config = dict(encoders.vae.config)
    on_meta = Encoders.__new__(Encoders)  # the build's encoders on the meta device, as the bench counts (no compute)
    with torch.device("meta"):
        on_meta.vae, on_meta.device = whole_clip_vae(AutoencoderKLWan.from_config(config)), torch.device("meta")
        clip = SimpleNamespace(videos=torch.empty(2, 3, 9, *RES))
    on_meta._zero_tail = {}
    with torch.no_grad():
        encode_batch(on_meta, [clip], cond_frames)  # the build decides how to encode each condition shape once
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encode_batch(on_meta, [clip], cond_frames)
    counted = vae_flops(config, 9, *RES, cond_frames)
    assert counter.get_total_flops() == counted["clip"] > 2 * counted["video"] + counted["cond"] > 0


@pytest.mark.parametrize("frames, zero_tail", [(9, False), (25, True)])
def test_the_build_s_conditions_are_diffusers_latents_of_the_condition_videos(encoders, frames, zero_tail):
    """A condition encodes to diffusers' latents of its video (the first frame, then zeros; both kinds), whichever way
    the build takes: a long one through only what depends on its first frame, a short one in diffusers' chunks."""
    from fourdnex.model.fusion import condition_video, encode_latents
    from fourdnex.model.whole_clip import skips_zero_tail

    first = torch.rand(2, 3, *RES, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for modalities in ("rgbxyz", "rgb"):
        got = encoders.encode_condition(first, frames, modalities)
        want = encode_latents(encoders.vae, condition_video(first, frames, modalities))
        shape = tuple(condition_video(first, frames, modalities).shape)
        assert skips_zero_tail(encoders.vae.config, shape) is zero_tail
        assert (
            got.shape
            == want.shape
            == (2, 16, (frames - 1) // 4 + 1, RES[0] // 8, RES[1] // 8 * (1 + (modalities == "rgbxyz")))
        )
        assert (got - want).abs().max() <= (1e-5 if zero_tail else 0) * want.abs().max()
